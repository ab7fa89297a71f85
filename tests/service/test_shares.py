"""Shares (app/shares.py): per attribution they sum to 1 over owners, or say unattributed; a
holder's page and daily totals agree with them and count each generation once; the owner-level
counterfactual is refused when too few members would remain, and with one work it is exactly
that work's counterfactual. On SQLite and on PostgreSQL (whose sessions here run in UTC+14:
the days are UTC days all the same)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, tzinfo

import pytest
from sqlalchemy import select, update

import app.shares
from app.orm import Attribution, AttributionEntry, Owner, TrainingItem
from tests.service.attributed import attribute_seeds
from tests.service.conftest import Backend, Service

NOW = datetime(2026, 3, 14, 12, 0, tzinfo=UTC)
"""The service's wall clock in these tests: "today" is 2026-03-14 (UTC), whenever they run."""


@pytest.fixture(params=["sqlite", "postgres"])
def svc(request: pytest.FixtureRequest, make_service: Callable[..., Service],
        monkeypatch: pytest.MonkeyPatch) -> Service:
    """The service on each database, its clock pinned at NOW (a run across midnight sees one day)."""

    class Pinned(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> Pinned:  # type: ignore[override]
            return cls.fromtimestamp(NOW.timestamp(), tz)

    monkeypatch.setattr(app.shares, "datetime", Pinned)
    backend: Backend = request.param
    return make_service(database=backend)


def expected_shares(ranking: dict) -> dict[int | None, float]:
    """The README's definition, from GET /attributions/{id}: positive scores, exact where verified,
    of the works the attribution names (all of them where no p-values exist)."""
    weight: dict[int | None, float] = defaultdict(float)
    for e in ranking["entries"]:
        score = e["exact_score"] if e["exact_score"] is not None else e["score"]
        weight[e["owner_id"]] += max(score, 0.0) if e["significant"] is not False else 0.0
    total = sum(weight.values())
    return {o: w / total for o, w in weight.items()}


def test_shares_sum_to_one_on_every_attribution(svc: Service) -> None:
    ids = attribute_seeds(svc, [11, 12, 13], top_k=12, verify_top_k=3)
    ids += attribute_seeds(svc, [14], top_k=8, method="exact")  # no p-values: every positive score
    with svc.db.session() as s:
        # one ranking with no positive score
        s.execute(update(AttributionEntry).where(AttributionEntry.attribution_id == ids[0])
                  .values(score=0.0, exact_score=None))
        # one attributable ranking that names its top three works (as a significant one would)
        s.execute(update(AttributionEntry).where(AttributionEntry.attribution_id == ids[1])
                  .values(significant=AttributionEntry.rank <= 3))
        s.execute(update(Attribution).where(Attribution.id == ids[1]).values(attributable=True))
    seen = set()
    for aid in ids:
        body = svc.client.get(f"/attributions/{aid}/shares", headers=svc.op()).json()
        ranking = svc.client.get(f"/attributions/{aid}", headers=svc.op()).json()
        if aid == ids[0] or ranking["attributable"] is False:
            assert body == {"attribution_id": aid, "attributable": False, "status": "unattributed",
                            "shares": []}
            assert aid == ids[0] or all(e["significant"] is False for e in ranking["entries"])
            seen.add("unattributed")
            continue
        seen.add("exact" if ranking["attributable"] is None else "named")
        assert body["status"] == "attributed"
        assert math.isclose(sum(o["share"] for o in body["shares"]), 1.0, abs_tol=1e-12)
        want = expected_shares(ranking)
        assert {o["owner_id"] for o in body["shares"]} == set(want)
        assert all(math.isclose(o["share"], want[o["owner_id"]], rel_tol=1e-12) for o in body["shares"])
        listed = [o["share"] for o in body["shares"]]
        assert listed == sorted(listed, reverse=True)
        assert sum(o["works"] for o in body["shares"]) == len(ranking["entries"])
    assert seen == {"unattributed", "exact", "named"}
    assert svc.client.get(f"/attributions/{ids[1]}/shares", headers=svc.owner("alice")).status_code == 403
    assert svc.client.get("/attributions/999/shares", headers=svc.op()).status_code == 404


def test_holder_pages_and_days_count_each_generation_once(svc: Service) -> None:
    first = attribute_seeds(svc, [21, 22, 23], top_k=10, name_top=3)
    # The same generations attributed again (another top_k): only these newer ones count.
    newer = attribute_seeds(svc, [21, 22, 23], top_k=15, name_top=3, sampled=True)
    # Finished on two UTC days, near their ends: 2026-03-13 23:30 (already the 14th in UTC+14)
    # and 2026-03-14 10:30 (the 15th there).
    finished = [datetime(2026, 3, 13, 23, 30, tzinfo=UTC)] + [datetime(2026, 3, 14, 10, 30, tzinfo=UTC)] * 2
    with svc.db.session() as s:
        for aid, at in zip(newer, finished, strict=True):
            s.execute(update(Attribution).where(Attribution.id == aid).values(finished_at=at))
    per_attribution = {aid: {o["owner_name"]: o["share"] for o in svc.client.get(
        f"/attributions/{aid}/shares", headers=svc.op()).json()["shares"]} for aid in newer}
    for name in ("alice", "bob"):
        mine = {aid: sh[name] for aid, sh in per_attribution.items() if sh.get(name, 0) > 0}
        page = svc.client.get("/me/shares?limit=2", headers=svc.owner(name)).json()
        assert page["total"] == len(mine) and len(page["items"]) == min(2, len(mine))
        rest = svc.client.get("/me/shares?offset=2&limit=2", headers=svc.owner(name)).json()
        got = {i["attribution_id"]: i["share"] for i in page["items"] + rest["items"]}
        assert set(got) == set(mine) and not set(got) & set(first)
        assert all(math.isclose(got[a], mine[a], rel_tol=1e-12) for a in mine)
        assert [i["attribution_id"] for i in page["items"]] == sorted(got, reverse=True)[:2]
        days = svc.client.get("/me/shares/days?days=3", headers=svc.owner(name)).json()["days"]
        assert [(d["day"], d["attributable"]) for d in days] == [
            ("2026-03-12", 0), ("2026-03-13", 1), ("2026-03-14", 2)]
        assert days[0]["total"] == days[0]["share"] == 0.0
        for day, aids in ((days[1], newer[:1]), (days[2], newer[1:])):
            total = sum(mine.get(a, 0.0) for a in aids)
            assert math.isclose(day["total"], total, rel_tol=1e-12, abs_tol=1e-15)
            assert math.isclose(day["share"], total / len(aids), rel_tol=1e-12, abs_tol=1e-15)
        assert math.isclose(days[1]["total"] + days[2]["total"], sum(mine.values()), rel_tol=1e-12)
        one = svc.client.get("/me/shares/days?days=1", headers=svc.owner(name)).json()["days"]
        assert one == days[-1:]
    past = svc.client.get("/me/shares?offset=50", headers=svc.owner("alice")).json()
    assert past["items"] == [] and past["total"] == len(
        [a for a, sh in per_attribution.items() if sh.get("alice", 0) > 0])
    assert svc.client.get("/me/shares", headers=svc.op()).status_code == 403
    assert svc.client.get("/me/shares/days?days=0", headers=svc.owner("alice")).status_code == 422


def test_owner_counterfactual_refused_or_exact(svc: Service) -> None:
    [aid] = attribute_seeds(svc, [31], top_k=5, verify_top_k=1, name_top=3)
    ranking = svc.client.get(f"/attributions/{aid}", headers=svc.op()).json()
    top = ranking["entries"][0]
    # alice's works cover all 8 members of the tiny ensemble: nothing would remain.
    alice = svc.owner_ids["alice"]
    r = svc.client.post(f"/attributions/{aid}/shares/{alice}/counterfactual", headers=svc.op())
    assert r.status_code == 409
    assert "owner_counterfactual_min_members=2" in r.json()["detail"] and "8 of the 8" in r.json()["detail"]
    # A holder of one work: dropping its members is that work's exact counterfactual.
    with svc.db.session() as s:
        dave = Owner(name="dave")
        s.add(dave)
        s.flush()
        s.execute(update(TrainingItem).where(TrainingItem.id == top["training_item_id"])
                  .values(owner_id=dave.id))
        dave_id = dave.id
    url = f"/attributions/{aid}/shares/{dave_id}/counterfactual"
    assert svc.client.get(url + ".png", headers=svc.op()).status_code == 404
    r = svc.client.post(url, headers=svc.op())
    assert r.status_code == 202, r.text
    body = r.json()
    assert (body["members_dropped"], body["members_left"]) == (4, 4)
    assert svc.client.post(url, headers=svc.op()).json()["job_id"] == body["job_id"]  # asked again: same job
    assert "not ready" in svc.client.get(url + ".png", headers=svc.op()).json()["detail"]
    assert svc.run_jobs() == ["succeeded"]
    job = svc.client.get(f"/jobs/{body['job_id']}", headers=svc.op()).json()
    assert job["kind"] == "counterfactual" and math.isclose(job["result"]["l2_distance"],
                                                             top["exact_influence"], rel_tol=1e-4)
    owner_png = svc.client.get(url + ".png", headers=svc.op())
    item_png = svc.client.get(top["counterfactual_url"], headers=svc.op())
    assert top["counterfactual_kind"] == "exact"
    assert owner_png.status_code == 200 and owner_png.content == item_png.content
    with svc.db.session() as s:
        owner = s.scalar(select(TrainingItem.owner_id).where(TrainingItem.id == top["training_item_id"]))
        assert owner == dave_id
    missing = svc.client.post(f"/attributions/{aid}/shares/999/counterfactual", headers=svc.op())
    assert missing.status_code == 404
