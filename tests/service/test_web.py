"""The web pages over HTTP (tests/service/test_browser.py drives them in Chromium): sign-in by
form into a database session with a safe cookie, CSRF on every form, escaping, the 404 page for
anything not the holder's, expiry and revocation, operator pages, security headers, /docs offline."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from app.auth import revoke_key
from app.orm import ApiKey, TrainingItem, WebSession
from app.web import routes as web_routes
from tests.service.attributed import attribute_seeds, csrf_of, sign_in
from tests.service.conftest import Service

HOSTILE = '<script>alert("owned")</script>'


def test_sign_in_session_cookie_and_sign_out(svc: Service) -> None:
    c, key = svc.client, svc.owner_keys["alice"]
    first = c.get("/web/works", follow_redirects=False)
    assert first.status_code == 303 and first.headers["location"] == "/web/sign-in"
    form = c.get("/web/sign-in")
    assert form.headers["content-security-policy"].startswith("default-src 'self'")
    token = csrf_of(form.text)
    # Without the form's CSRF token (a login forged by another site): refused, no session.
    r = c.post("/web/sign-in", data={"key": key}, follow_redirects=False)
    assert r.status_code == 403 and "Form refused" in r.text
    bad = c.post("/web/sign-in", data={"key": "attrib_000000000000_nope", "csrf_token": token})
    assert bad.status_code == 401 and "not valid" in bad.text and "attrib_000000000000_nope" not in bad.text
    r = c.post("/web/sign-in", data={"key": key, "csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303
    cookies = [v for k, v in r.headers.multi_items() if k == "set-cookie"]
    cookie = next(v for v in cookies if v.startswith("attrib_session="))
    assert {"httponly", "samesite=strict", "path=/web"} <= {p.strip().lower() for p in cookie.split(";")}
    with svc.db.session() as s:  # only the token's hash is stored
        stored = s.scalars(select(WebSession.token_hash)).all()
        assert len(stored) == 1 and stored[0] not in cookie and key not in cookie
    for page in ("/web/works", "/web/shares"):
        r = c.get(page)
        assert r.status_code == 200 and key not in r.text and "alice" in r.text
        assert r.headers["cache-control"] == "no-store" and r.headers["x-frame-options"] == "DENY"
    # Sign-out needs the session's CSRF token too.
    assert c.post("/web/sign-out", data={}).status_code == 403
    assert c.get("/web/works").status_code == 200
    token = csrf_of(c.get("/web/works").text)
    out = c.post("/web/sign-out", data={"csrf_token": token}, follow_redirects=False)
    assert out.status_code == 303 and out.headers["location"] == "/web/sign-in?signed_out"
    with svc.db.session() as s:
        assert s.scalars(select(WebSession)).all() == []
    assert c.get("/web/works", follow_redirects=False).status_code == 303


def test_sessions_expire_and_end_with_their_key(svc: Service) -> None:
    c = svc.client
    sign_in(c, svc.owner_keys["alice"])
    with svc.db.session() as s:
        s.execute(update(WebSession).values(expires_at=WebSession.created_at))
    assert c.get("/web/works", follow_redirects=False).headers["location"] == "/web/sign-in"
    sign_in(c, svc.owner_keys["bob"])
    assert c.get("/web/works").status_code == 200
    with svc.db.session() as s:  # the expired session was deleted by the next sign-in
        assert len(s.scalars(select(WebSession)).all()) == 1
        prefix = s.scalar(select(ApiKey.prefix).where(ApiKey.owner_id == svc.owner_ids["bob"]))
        assert prefix is not None and revoke_key(s, prefix)
    assert c.get("/web/works", follow_redirects=False).status_code == 303


def test_holder_pages_escape_and_hide_other_holders(svc: Service) -> None:
    [aid] = attribute_seeds(svc, [5], top_k=20, verify_top_k=2, name_top=5)
    ranking = svc.client.get(f"/attributions/{aid}", headers=svc.op()).json()
    mine = next(e for e in ranking["entries"] if e["owner_name"] == "alice")
    theirs = next(e for e in ranking["entries"] if e["owner_name"] == "bob")
    with svc.db.session() as s:
        s.execute(update(TrainingItem).where(TrainingItem.id == mine["training_item_id"])
                  .values(external_ref=HOSTILE))
    c = svc.client
    sign_in(c, svc.owner_keys["alice"])
    for page in ("/web/works", f"/web/works/{mine['training_item_id']}"):
        html = c.get(page).text
        assert HOSTILE not in html and "&lt;script&gt;alert(&#34;owned&#34;)&lt;/script&gt;" in html
    work = c.get(f"/web/works/{mine['training_item_id']}").text
    assert f"/web/works/{mine['training_item_id']}/influence/{aid}/generation.png" in work
    assert "estimate" in work or "exact" in work
    for png in re.findall(r'src="(/web/works/[^"]+\.png)"', work):
        r = c.get(png)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", png
    not_found = c.get("/web/works/999999")
    assert not_found.status_code == 404 and "Not found" in not_found.text
    other, own = f"/web/works/{theirs['training_item_id']}", f"/web/works/{mine['training_item_id']}"
    for url in (other, f"{other}/image.png", f"{other}/influence/{aid}/generation.png",
                f"{own}/influence/{aid}/other.png", f"{own}/influence/{aid + 1}/generation.png",
                "/web/works/abc", "/web/attributions", f"/web/attributions/{aid}", "/web/jobs",
                "/web/nowhere"):
        r = c.get(url)
        assert r.status_code == 404 and r.text == not_found.text, url
    shares = c.get("/web/shares").text
    assert 'id="share-chart"' in shares and shares.count('class="bar"') == 30


def test_operator_pages(svc: Service) -> None:
    [aid] = attribute_seeds(svc, [7], top_k=12, verify_top_k=2, name_top=5)
    c = svc.client
    sign_in(c, svc.operator_key)
    assert c.get("/web", follow_redirects=False).headers["location"] == "/web/attributions"
    listing = c.get("/web/attributions").text
    assert f'href="/web/attributions/{aid}"' in listing
    page = c.get(f"/web/attributions/{aid}")
    assert page.status_code == 200 and 'class="figure2"' in page.text
    assert page.text.count('class="rank"') >= 10
    assert page.text.count('class="named"') == 5 and "attributable" in page.text  # name_top=5
    # the authors' measures and the catalogue figure, as the API gives them
    att = c.get(f"/attributions/{aid}", headers=svc.op()).json()
    assert att["causal"]["radius_over_verified"] == 2
    assert f"Counterfactual radius {att['causal']['radius']:.3f} over the 2 works run exactly" in page.text
    moved = att["causal"]["top_changes_nearest"]
    assert ("changes the generation's nearest training image" in page.text) is moved
    assert ("leaves the generation's nearest training image" in page.text) is (not moved)
    assert "Over the whole catalogue (60 works, a stricter figure that does not decide)" in page.text
    for png in set(re.findall(r'src="(/web/[^"]+\.png)"', page.text)):
        assert c.get(png).status_code == 200, png
    # The owner-level counterfactual form: refused without its token, explained when too few remain.
    form_url = f"/web/attributions/{aid}/shares/{svc.owner_ids['alice']}/counterfactual"
    assert form_url in page.text
    assert c.post(form_url, data={}).status_code == 403
    refused = c.post(form_url, data={"csrf_token": csrf_of(page.text)})
    assert refused.status_code == 409 and "owner_counterfactual_min_members" in refused.text
    jobs = c.get("/web/jobs").text
    assert "<progress" in jobs and "attribute" in jobs
    assert "No validations yet" in c.get("/web/validations").text
    assert c.get("/web/works").status_code == 404
    assert c.get("/web/validations/nope").status_code == 404


def test_docs_are_served_by_the_app(svc: Service) -> None:
    r = svc.client.get("/docs")
    assert r.status_code == 200 and "http" not in r.text.replace("http-equiv", "")
    assets = re.findall(r'(?:src|href)="(/[^"]+)"', r.text)
    assert "/docs/assets/swagger-ui-bundle.js" in assets and "/web/static/docs.js" in assets
    for asset in assets:
        assert svc.client.get(asset).status_code == 200, asset
    assert svc.client.get("/redoc").status_code == 404
    assert not [p for p in svc.client.get("/openapi.json").json()["paths"] if p.startswith(("/web", "/docs"))]


def test_sessions_and_holder_pages_are_reused_for_their_cache_times(
        make_service: Callable[..., Service]) -> None:
    """On the app's clock, driven here: a session is looked up once per auth_cache_s (expiry and
    revocation are seen after it, sign-out in this process at once), and a holder's page is
    rendered once per influence_cache_s for that session and URL."""
    now = 1000.0
    svc = make_service(auth_cache_s=2.0, influence_cache_s=2.0, clock=lambda: now)
    c = svc.client
    sign_in(c, svc.owner_keys["alice"])
    before = c.get("/web/works").text
    attribute_seeds(svc, [5], top_k=20, verify_top_k=0, name_top=5)
    with svc.db.session() as s:  # a work of alice's renamed: the cached gallery does not show it yet
        item = s.scalar(select(TrainingItem).where(TrainingItem.owner_id == svc.owner_ids["alice"])
                        .order_by(TrainingItem.id))
        assert item is not None
        item.external_ref = "renamed-work"
        s.execute(update(WebSession).values(expires_at=WebSession.created_at))  # and the session expired
    assert c.get("/web/works").text == before
    now += 2.5
    assert c.get("/web/works", follow_redirects=False).headers["location"] == "/web/sign-in"
    sign_in(c, svc.owner_keys["alice"])
    assert "renamed-work" in c.get("/web/works").text
    token = csrf_of(c.get("/web/works").text)
    assert c.post("/web/sign-out", data={"csrf_token": token}, follow_redirects=False).status_code == 303
    assert c.get("/web/works", follow_redirects=False).status_code == 303  # at once, within the TTL


class _Renderings(dict[Any, Any]):
    """app.state.web_pages_rendering (a page's key -> its rendering in progress) that counts the
    readers arriving to wait for a rendering: cached_page looks a rendering up by key (``[]``)
    only to wait for it. ``all_waiting`` is set once ``readers`` of them wait."""

    def __init__(self, readers: int) -> None:
        super().__init__()
        self.readers, self.waiting = readers, 0
        self.all_waiting = asyncio.Event()

    def __getitem__(self, key: Any) -> Any:
        self.waiting += 1
        if self.waiting == self.readers:
            self.all_waiting.set()
        return super().__getitem__(key)


def test_readers_of_an_expired_page_wait_for_one_rendering(make_service: Callable[..., Service],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Ten requests for the same expired page at once: it is rendered once, and all get its bytes.
    The rendering holds on until the nine others wait for it (without single-flight they would
    each render it: none of them ever waits, and the rendering goes on after the guard's timeout
    only so that the failure is an assertion rather than a hang)."""
    now = 1000.0
    svc = make_service(influence_cache_s=2.0, clock=lambda: now)
    sign_in(svc.client, svc.owner_keys["alice"])
    cookie = svc.client.cookies.get("attrib_session")
    assert cookie is not None
    first = svc.client.get("/web/works?page=1")
    assert first.status_code == 200
    now += 2.5  # the cached page expired
    renderings = _Renderings(readers=9)
    monkeypatch.setattr(svc.client.app.state, "web_pages_rendering", renderings)  # type: ignore[attr-defined]
    renders: list[str] = []
    real_render, real_read = web_routes.render, web_routes._read

    def counted(request: Any, template: str, *args: Any, **kwargs: Any) -> Any:
        renders.append(template)
        return real_render(request, template, *args, **kwargs)

    async def read_once_all_wait(request: Any, fn: Any, *args: Any) -> Any:
        """The gallery's read, once the other readers wait (or the guard gives up)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(renderings.all_waiting.wait(), timeout=30)
        return await real_read(request, fn, *args)

    monkeypatch.setattr(web_routes, "render", counted)
    monkeypatch.setattr(web_routes, "_read", read_once_all_wait)

    async def many() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=svc.client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test",
                                     cookies={"attrib_session": cookie}) as c:
            return await asyncio.gather(*(c.get("/web/works?page=1") for _ in range(10)))

    answers = asyncio.run(many())
    assert [r.status_code for r in answers] == [200] * 10
    assert renders == ["gallery.html"]
    assert renderings.waiting == 9, "the other readers did not wait for the rendering in progress"
    assert {r.text for r in answers} == {first.text}
    assert renderings == {}  # the rendering is forgotten once done: the next expiry renders again
