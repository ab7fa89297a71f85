"""Helpers for the shares and page tests: generations attributed through the API, and a browser
session signed in through the sign-in form."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient
from sqlalchemy import update

from app.orm import Attribution, AttributionEntry
from tests.service.conftest import Service


def attribute_seeds(svc: Service, seeds: list[int], steps: int = 6, name_top: int = 0,
                    sampled: bool = False, **options: object) -> list[int]:
    """Sample ``seeds`` and attribute each (``options`` as for POST /attribute); the jobs are
    run. Returns the attribution ids, in seed order.

    The jobs run are exactly this call's: one generate job sampling the seeds (none when
    ``sampled``: an earlier call sampled them already, so the generate job is done at once), then
    one attribute job per seed, each succeeded.

    name_top: make each attribution one that names its top ``name_top`` works (attributable, those
    significant), as a significant attribution would: the tiny test ensemble copies nothing, so
    its own attributions are not attributable and share nothing."""
    r = svc.client.post("/generate", json={"seeds": seeds, "steps": steps}, headers=svc.op())
    assert r.status_code == 202, r.text
    generate_job = r.json()["job_id"]
    out, attribute_jobs = [], []
    for gid in r.json()["generation_ids"]:
        a = svc.client.post("/attribute", json={"generation_id": gid, **options}, headers=svc.op())
        assert a.status_code == 202, a.text
        out.append(a.json()["attribution_id"])
        attribute_jobs.append(a.json()["job_id"])
    assert len(set(out)) == len(set(attribute_jobs)) == len(seeds)
    states = svc.run_jobs()
    ran = [svc.client.get(f"/jobs/{j}", headers=svc.op()).json() for j in [generate_job, *attribute_jobs]]
    assert states == ["succeeded"] * ((0 if sampled else 1) + len(seeds)), (states, ran)
    assert [(j["kind"], j["status"]) for j in ran] == [("generate", "succeeded")] + [
        ("attribute", "succeeded")] * len(seeds), ran
    if name_top:
        with svc.db.session() as s:
            s.execute(update(AttributionEntry).where(AttributionEntry.attribution_id.in_(out))
                      .values(significant=AttributionEntry.rank <= name_top))
            s.execute(update(Attribution).where(Attribution.id.in_(out)).values(attributable=True))
    return out


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "no CSRF token in the page"
    return found.group(1)


def sign_in(client: TestClient, key: str) -> None:
    """Sign ``client`` in with ``key`` through the form (its cookies then hold the session)."""
    page = client.get("/web/sign-in")
    r = client.post("/web/sign-in", data={"key": key, "csrf_token": csrf_of(page.text)},
                    follow_redirects=False)
    assert r.status_code == 303, r.text
