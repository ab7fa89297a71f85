"""The pages in a real browser: Debian's Chromium driven by Playwright. A holder signs in,
browses the gallery, opens a work's page with its images loaded, reads the share chart and signs
out; another holder's work shows the 404 page; a hostile title fires no dialog; a form without
its CSRF token is refused; /docs lists every operation with no request leaving the machine; no
console errors. Skipped without Chromium or Playwright, unless ATTRIB_REQUIRE_SERVICES=1.

ATTRIB_SCREENSHOT=PATH also saves the work's page there (the README's docs/holder-page.png)."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from sqlalchemy import func, select, update

import app.shares
from app.main import create_app
from app.orm import Attribution, TrainingItem
from tests.service.attributed import attribute_seeds
from tests.service.conftest import Service

CHROMIUM = "/usr/bin/chromium"
TODAY = datetime(2026, 3, 14, 12, 0, tzinfo=UTC)
"""The service's wall clock for the share chart: "today" is 2026-03-14 (UTC), whenever this runs."""
HOSTILE = '<img src=x onerror=alert(1)><script>alert("owned")</script>'


def _browser_or_skip() -> Any:
    missing = []
    if not Path(CHROMIUM).exists():
        missing.append(f"{CHROMIUM} (apt-get install -y chromium)")
    sync_playwright: Any = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("the playwright package (pip install playwright)")
    if missing:
        why = "browser tests need " + " and ".join(missing)
        if os.environ.get("ATTRIB_REQUIRE_SERVICES") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return sync_playwright


@pytest.fixture
def served(svc: Service) -> Iterator[str]:
    """The service's app on a real port (a second app over the same database), in a thread."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(svc.settings), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, name="browser-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the test server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_holder_and_docs_in_chromium(svc: Service, served: str, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    sync_playwright = _browser_or_skip()

    class Pinned(datetime):  # the chart's "today", read by the server thread in this process
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> Pinned:  # type: ignore[override]
            return cls.fromtimestamp(TODAY.timestamp(), tz)

    monkeypatch.setattr(app.shares, "datetime", Pinned)
    aids = attribute_seeds(svc, [3, 4], top_k=20, verify_top_k=2, name_top=5)
    with svc.db.session() as s:  # finished on the pinned day, a run across midnight changes nothing
        s.execute(update(Attribution).where(Attribution.id.in_(aids)).values(finished_at=TODAY))
    with svc.db.session() as s:  # carol's works go to alice: two gallery pages; one title is hostile
        s.execute(update(TrainingItem).where(TrainingItem.owner_id == svc.owner_ids["carol"])
                  .values(owner_id=svc.owner_ids["alice"]))
        first_page = set(s.scalars(select(TrainingItem.id)
                                   .where(TrainingItem.owner_id == svc.owner_ids["alice"])
                                   .order_by(TrainingItem.id).limit(24)))
    ranking = svc.client.get(f"/attributions/{aids[0]}", headers=svc.op()).json()
    # a ranked work of alice's on the gallery's first page (which shows works by id)
    mine = next(e for e in ranking["entries"] if e["training_item_id"] in first_page)
    theirs = next(e for e in ranking["entries"] if e["owner_name"] == "bob")
    with svc.db.session() as s:
        s.execute(update(TrainingItem).where(TrainingItem.id == mine["training_item_id"])
                  .values(external_ref=HOSTILE))
        works = s.scalar(select(func.count()).where(TrainingItem.owner_id == svc.owner_ids["alice"]))
    assert works is not None and 24 < works <= 48
    spec = svc.client.get("/openapi.json").json()
    operations = {f"{method.upper()} {path}" for path, ops in spec["paths"].items() for method in ops}

    errors: list[str] = []
    dialogs: list[str] = []
    outside: list[str] = []
    expected_status = (f"/web/works/{theirs['training_item_id']}", "/web/sign-out")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})

        def on_console(msg: Any) -> None:
            # The 404 and 403 pages are expected answers: Chromium logs their status as an error.
            url = msg.location.get("url", "")
            if msg.type == "error" and not ("status of 40" in msg.text and url.endswith(expected_status)):
                errors.append(f"{msg.text} at {msg.location}")

        page.on("console", on_console)
        page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
        def on_dialog(dialog: Any) -> None:
            dialogs.append(dialog.message)
            dialog.dismiss()

        page.on("dialog", on_dialog)
        def on_request(request: Any) -> None:
            if not request.url.startswith((served, "data:")):
                outside.append(request.url)

        page.on("request", on_request)

        def images_loaded() -> list[str]:
            """The src of every image on the page that did not load."""
            page.wait_for_load_state("load")
            return page.eval_on_selector_all(
                "img", "els => els.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)")

        # Sign in.
        page.goto(f"{served}/web")
        assert page.url.endswith("/web/sign-in")
        page.get_by_label("Your API key").fill(svc.owner_keys["alice"])
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url("**/web/works")
        assert svc.owner_keys["alice"] not in page.content() and svc.owner_keys["alice"] not in page.url

        # The gallery: two pages; the hostile title is text.
        assert page.locator("ul.gallery li").count() == 24 and images_loaded() == []
        assert page.get_by_text(HOSTILE, exact=True).count() == 1
        page.get_by_role("link", name="Next →").click()
        page.wait_for_url("**/web/works?page=2")
        assert page.locator("ul.gallery li").count() == works - 24 and images_loaded() == []

        # A work's page: the generations it shaped, with and without it.
        page.goto(f"{served}/web/works/{mine['training_item_id']}")
        assert page.locator("h1.work-title").inner_text() == HOSTILE
        assert page.locator("table.uses tbody tr").count() >= 1
        without = f'img[alt="Generation {ranking["generation_id"]} without this work"]'
        assert page.locator(without).count() == 1
        assert images_loaded() == []
        page.screenshot(path=str(tmp_path / "holder-page.png"))
        if os.environ.get("ATTRIB_SCREENSHOT"):
            shutil.copy(tmp_path / "holder-page.png", os.environ["ATTRIB_SCREENSHOT"])

        # The share chart: 30 days, today's bar is alice's share of today's generations.
        page.get_by_role("link", name="My shares").click()
        page.wait_for_url("**/web/shares")
        chart = page.get_by_role("img", name="Share of alice per day")
        assert chart.count() == 1
        bars = chart.locator("rect.bar")
        assert bars.count() == 30
        shares = [svc.client.get(f"/attributions/{a}/shares", headers=svc.op()).json() for a in aids]
        alice = [next((o["share"] for o in sh["shares"] if o["owner_name"] == "alice"), 0.0) for sh in shares]
        today = float(bars.last.get_attribute("data-share") or "nan")
        assert abs(today - sum(alice) / len(aids)) < 1e-5, (today, alice)
        assert "%" in (bars.last.locator("title").text_content() or "")

        # Another holder's work, and a form without its CSRF token.
        r = page.goto(f"{served}/web/works/{theirs['training_item_id']}")
        assert r is not None and r.status == 404
        assert page.get_by_role("heading", name="Not found").count() == 1
        page.goto(f"{served}/web/works")
        page.eval_on_selector("form.sign-out input[name=csrf_token]", "el => el.remove()")
        with page.expect_navigation():
            page.get_by_role("button", name="Sign out").click()
        assert page.get_by_role("heading", name="Form refused").count() == 1
        page.goto(f"{served}/web/works")
        assert page.url.endswith("/web/works")  # still signed in

        # Sign out: the pages need a sign-in again.
        page.get_by_role("button", name="Sign out").click()
        page.wait_for_url("**/web/sign-in?signed_out")
        page.goto(f"{served}/web/works")
        assert page.url.endswith("/web/sign-in")

        # /docs: Swagger UI from the app itself lists every operation.
        page.goto(f"{served}/docs")
        page.wait_for_selector(".opblock", timeout=30_000)
        listed = page.eval_on_selector_all(".opblock", "els => els.map(e => "
                                           "e.querySelector('.opblock-summary-method').textContent + ' ' + "
                                           "e.querySelector('.opblock-summary-path').dataset.path)")
        assert set(listed) == operations
        browser.close()
    assert dialogs == [], dialogs
    assert outside == [], outside
    assert errors == [], errors
