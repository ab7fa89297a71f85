"""The pages' defences, each checked where it can fail: the full security headers on every HTML
answer of every /web route (enumerated from the app's routes: pages, 404 pages, refused forms,
sign-in redirects) and /docs's own policy; hostile text (owner names, job and validation errors)
escaped on every page that shows it; and no picture of one rights holder for another (404 on the
pages, 403 on the API's operator routes), while its owner or an operator gets it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, cast

import httpx
from fastapi import FastAPI, routing
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from markupsafe import escape
from sqlalchemy import select, update

from app.auth import create_key
from app.jobs import new_job
from app.orm import Generation, Job, Owner, TrainingItem
from app.routes.shares import counterfactual_key
from tests.service.attributed import attribute_seeds, csrf_of, sign_in
from tests.service.conftest import Service

# Written out here, not imported: a weakened policy in app/web must fail these tests.
CSP = ("default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; object-src 'none'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
DOCS_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
            "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {"x-content-type-options": "nosniff", "referrer-policy": "no-referrer",
                    "x-frame-options": "DENY"}

SCRIPT = "<script>alert(1)</script>"
BREAKOUT = "\"'><img src=x onerror=alert(1)>"  # out of an attribute, into a tag
HOSTILE = SCRIPT + BREAKOUT
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;&#34;&#39;&gt;&lt;img src=x onerror=alert(1)&gt;"


@dataclass
class World:
    """One attribution whose top work (verified: an exact counterfactual) is the only work of a
    fourth holder, ``holder``, whose owner-level counterfactual was computed; and a validation."""

    attribution_id: int
    generation_id: int
    work_id: int
    holder_id: int
    holder_key: str
    validation_id: str
    other_owner_id: int
    """Another owner the attribution names (alice, bob or carol)."""


def make_world(svc: Service, holder_name: str = "dave") -> World:
    [aid] = attribute_seeds(svc, [31], top_k=5, verify_top_k=1, name_top=3)
    ranking = svc.client.get(f"/attributions/{aid}", headers=svc.op()).json()
    top = ranking["entries"][0]
    assert top["counterfactual_kind"] == "exact"
    with svc.db.session() as s:
        holder = Owner(name=holder_name)
        s.add(holder)
        s.flush()
        s.execute(update(TrainingItem).where(TrainingItem.id == top["training_item_id"])
                  .values(owner_id=holder.id))
        holder_id = holder.id
        _, holder_key = create_key(s, holder, "test")
    r = svc.client.post(f"/attributions/{aid}/shares/{holder_id}/counterfactual", headers=svc.op())
    assert r.status_code == 202, r.text
    assert svc.run_jobs() == ["succeeded"]
    shares = svc.client.get(f"/attributions/{aid}/shares", headers=svc.op()).json()["shares"]
    owners = [o["owner_id"] for o in shares]
    assert holder_id in owners
    other = next(o for o in owners if o not in (None, holder_id))
    # queued, never run (the tests run no job after this)
    v = svc.client.post("/validations", json={"experiment": "copies"}, headers=svc.op())
    assert v.status_code == 202, v.text
    return World(aid, ranking["generation_id"], top["training_item_id"], holder_id, holder_key,
                 v.json()["job_id"], other)


def browser(svc: Service, key: str | None = None) -> TestClient:
    """A client of its own (its own cookies), signed in with ``key`` if given."""
    c = TestClient(svc.client.app, follow_redirects=False)
    if key is not None:
        sign_in(c, key)
    return c


# ----------------------------------------------------------------------------- headers
def api_routes(app: FastAPI) -> list[tuple[str, set[str]]]:
    """(path, methods) of every route of ``app`` that FastAPI answers (not the mounts), those of
    included routers too: FastAPI from 0.13x keeps an included router as one entry of
    ``app.routes``, which fastapi.routing.iter_route_contexts walks (as the OpenAPI schema does)."""
    flatten = getattr(routing, "iter_route_contexts", None)
    out = []
    r: Any
    for r in flatten(app.routes) if flatten is not None else app.routes:
        if isinstance(getattr(r, "original_route", r), APIRoute):
            out.append((str(r.path), set(r.methods)))
    return out


def _check_headers(r: httpx.Response, where: str) -> str:
    """The answer's kind ("html", "redirect", "png"), its security headers checked."""
    kind = r.headers.get("content-type", "").split(";")[0]
    if r.is_redirect:
        assert r.headers["location"].startswith("/web"), where
        assert r.headers.get("content-security-policy") == CSP, where
        assert {k: r.headers.get(k) for k in SECURITY_HEADERS} == SECURITY_HEADERS, where
        return "redirect"
    if kind == "image/png":
        assert r.status_code == 200 and r.headers.get("x-content-type-options") == "nosniff", where
        return "png"
    assert kind == "text/html", f"{where}: {kind}"
    assert r.headers.get("content-security-policy") == CSP, where
    assert {k: r.headers.get(k) for k in SECURITY_HEADERS} == SECURITY_HEADERS, where
    assert r.headers.get("cache-control") == "no-store", where
    return "html"


def test_every_web_answer_carries_the_full_policy(svc: Service) -> None:
    w = make_world(svc)
    with svc.db.session() as s:  # the validation finished, with a figure (the generation's PNG)
        sha = s.scalar(select(Generation.image_sha).where(Generation.id == w.generation_id))
        s.execute(update(Job).where(Job.id == w.validation_id).values(
            status="succeeded", progress=1.0,
            result={"passed": True, "report": {"checked": 1}, "figures": {"copies.png": sha}}))
    existing = {"work_id": str(w.work_id), "attribution_id": str(w.attribution_id),
                "picture": "counterfactual", "owner_id": str(w.holder_id), "item_id": str(w.work_id),
                "generation_id": str(w.generation_id), "job_id": w.validation_id, "name": "copies.png",
                "anything": "nowhere"}
    missing = {**{k: "999999" for k in existing}, "picture": "nope", "job_id": "nope",
               "name": "nope.png", "anything": "nowhere/else"}
    routes = [(path, methods) for path, methods in api_routes(cast(FastAPI, svc.client.app))
              if path.startswith("/web")]
    assert len(routes) >= 20  # the pages, enumerated from the app (none is left out by a list here)

    def url(path: str, values: dict[str, str]) -> str:
        return re.sub(r"\{(\w+)(?::\w+)?\}", lambda m: values[m.group(1)], path)

    anonymous, holder, operator = browser(svc), browser(svc, w.holder_key), browser(svc, svc.operator_key)
    seen: set[tuple[str, int]] = set()
    served: set[str] = set()  # routes that answered 200 to someone
    for path, methods in routes:
        for method in methods:
            for who, c in (("anonymous", anonymous), ("holder", holder), ("operator", operator)):
                for values in (existing, missing):
                    target = url(path, values)
                    r = c.request(method, target, data={} if method == "POST" else None)
                    kind = _check_headers(r, f"{method} {target} as {who}")
                    seen.add((kind, r.status_code))
                    if r.status_code == 200:
                        served.add(path)
    assert {p for p, methods in routes if "GET" in methods} - served == {"/web", "/web/{anything:path}"}
    # Answers the enumeration does not reach, the forms with their tokens: a refused key, a
    # signing in and out, a refused request and a done one.
    signing = browser(svc)
    sign_in_token = csrf_of(signing.get("/web/sign-in").text)
    extra = [signing.post("/web/sign-in", data={"key": key, "csrf_token": sign_in_token})
             for key in ("attrib_000000000000_nope", w.holder_key)]
    extra.append(signing.post("/web/sign-out", data={"csrf_token": csrf_of(signing.get("/web/works").text)}))
    token = csrf_of(operator.get(f"/web/attributions/{w.attribution_id}").text)
    form = f"/web/attributions/{w.attribution_id}/shares/{{}}/counterfactual"
    extra += [operator.post(form.format(w.other_owner_id), data={"csrf_token": token}),
              operator.post(form.format(w.holder_id), data={"csrf_token": token})]
    assert [r.status_code for r in extra] == [401, 303, 303, 409, 303]
    for r in extra:
        seen.add((_check_headers(r, str(r.request.url)), r.status_code))
    assert {("html", 200), ("html", 401), ("html", 403), ("html", 404), ("html", 409), ("redirect", 303),
            ("png", 200)} == seen
    docs = anonymous.get("/docs")
    assert docs.status_code == 200 and docs.headers["content-security-policy"] == DOCS_CSP
    assert docs.headers["cache-control"] == "no-store"
    assert {k: docs.headers.get(k) for k in SECURITY_HEADERS} == SECURITY_HEADERS


# ------------------------------------------------------------------------- hostile text
def _shows_escaped(html: str, where: str, at_least: int = 1) -> None:
    assert SCRIPT not in html and BREAKOUT not in html and "<img src=x" not in html, where
    assert html.count(ESCAPED) >= at_least, f"{where}: the text is not shown ({html.count(ESCAPED)})"


def test_hostile_names_and_errors_are_shown_escaped(svc: Service) -> None:
    assert str(escape(HOSTILE)) == ESCAPED
    w = make_world(svc, holder_name=HOSTILE)
    with svc.db.session() as s:
        # another owner's counterfactual failed, and the validation, with hostile errors
        new_job(s, "counterfactual", {"attribution_id": w.attribution_id, "owner_id": w.other_owner_id},
                idempotency_key=counterfactual_key(w.attribution_id, w.other_owner_id))
        s.execute(update(Job).where(Job.idempotency_key == counterfactual_key(w.attribution_id,
                                                                               w.other_owner_id))
                  .values(status="failed", error=f"counterfactual: {HOSTILE}"))
        s.execute(update(Job).where(Job.id == w.validation_id)
                  .values(status="failed", error=f"validation: {HOSTILE}"))
    holder = browser(svc, w.holder_key)
    for page, times in (("/web/works", 1), (f"/web/works/{w.work_id}", 1), ("/web/shares", 2),
                        ("/web/nowhere", 1)):  # the header; the share chart's title
        r = holder.get(page)
        assert r.status_code in (200, 404), page
        _shows_escaped(r.text, page, times)
    operator = browser(svc, svc.operator_key)
    attribution = operator.get(f"/web/attributions/{w.attribution_id}").text
    # the ranked work's owner, the shares table, the counterfactual's alt text; the failed job
    _shows_escaped(attribution, "attribution page", 4)
    assert f"failed: counterfactual: {ESCAPED}" in attribution
    assert f"without any member trained on {ESCAPED}'s works" in attribution
    jobs = operator.get("/web/jobs").text
    _shows_escaped(jobs, "jobs page", 2)
    assert f"counterfactual: {ESCAPED}" in jobs and f"validation: {ESCAPED}" in jobs
    validation = operator.get(f"/web/validations/{w.validation_id}").text
    _shows_escaped(validation, "validation page")
    assert f'<p class="error">validation: {ESCAPED}</p>' in validation


# ----------------------------------------------------------------- one holder's pictures
def test_a_holder_gets_no_other_owners_pictures(svc: Service) -> None:
    w = make_world(svc)
    aid, gid, work, holder_id = w.attribution_id, w.generation_id, w.work_id, w.holder_id
    others = {name: svc.owner_keys[name] for name in ("alice", "bob")}
    operator = browser(svc, svc.operator_key)
    owner = browser(svc, w.holder_key)
    web_pictures = {  # URL -> who may see it
        f"/web/generations/{gid}/image.png": operator,
        f"/web/items/{work}/image.png": operator,
        f"/web/attributions/{aid}/counterfactual/{work}.png": operator,
        f"/web/attributions/{aid}/shares/{holder_id}/counterfactual.png": operator,
        f"/web/works/{work}/image.png": owner,
        f"/web/works/{work}/influence/{aid}/generation.png": owner,
        f"/web/works/{work}/influence/{aid}/counterfactual.png": owner,
    }
    api_pictures = {  # URL -> the key that may see it, and what a holder's key gets otherwise
        f"/generations/{gid}/image.png": (svc.operator_key, 403),
        f"/attributions/{aid}/counterfactual/{work}.png": (svc.operator_key, 403),
        f"/attributions/{aid}/shares/{holder_id}/counterfactual.png": (svc.operator_key, 403),
        f"/works/{work}/image.png": (w.holder_key, 404),
        f"/works/{work}/influence/{aid}/generation.png": (w.holder_key, 404),
        f"/works/{work}/influence/{aid}/counterfactual.png": (w.holder_key, 404),
    }
    for name, key in {**others, "the work's owner": w.holder_key}.items():
        c = owner if key == w.holder_key else browser(svc, key)
        not_found = c.get("/web/nowhere").text
        for url, allowed in web_pictures.items():
            picture = allowed.get(url)
            assert picture.status_code == 200 and picture.headers["content-type"] == "image/png", url
            if allowed is c:
                continue
            r = c.get(url)
            assert (r.status_code, r.text) == (404, not_found), f"{url} for {name}"
        for url, (allowed_key, refused) in api_pictures.items():
            picture = svc.client.get(url, headers={"X-API-Key": allowed_key})
            assert picture.status_code == 200 and picture.headers["content-type"] == "image/png", url
            if allowed_key == key:
                continue
            r = svc.client.get(url, headers={"X-API-Key": key})
            assert r.status_code == refused and r.headers["content-type"] == "application/json", \
                f"{url} for {name}: {r.status_code}"
        # nor may a holder ask for an owner-level counterfactual (a job making another picture)
        form = f"/web/attributions/{aid}/shares/{holder_id}/counterfactual"
        r = c.post(form, data={"csrf_token": csrf_of(c.get("/web/works").text)})
        assert (r.status_code, r.text) == (404, not_found), f"{form} for {name}"
        r = svc.client.post(form.removeprefix("/web"), headers={"X-API-Key": key})
        assert r.status_code == 403, f"POST {form} for {name}"
