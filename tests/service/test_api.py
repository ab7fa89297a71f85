"""Every route through the ASGI app: the happy paths checked against the engine computed
independently, and the 401/403/404/409/413/422 paths."""

from __future__ import annotations

import hashlib
import io
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from scipy import stats
from sqlalchemy import func, select, update

from app.orm import AttributionEntry, Job, TrainingItem
from models.ablation import ablation_weights, delta_w, jacobian, predicted_counterfactuals
from models.distances import l2_distance
from models.ensemble import Ensemble
from models.images import png_bytes
from models.sampler import exact_counterfactuals, make_tape, sample
from tests.conftest import TinyData
from tests.service.conftest import OWNERS, Service, owner_of_label


def pixels(png: bytes) -> np.ndarray:
    with PILImage.open(io.BytesIO(png)) as im:
        return np.asarray(im).astype(int)


def generate(svc: Service, seeds: list[int], **kw: object) -> dict:
    r = svc.client.post("/generate", json={"seeds": seeds, **kw}, headers=svc.op())
    assert r.status_code == 202, r.text
    return r.json()


def attribute(svc: Service, generation_id: int, **kw: object) -> dict:
    r = svc.client.post("/attribute", json={"generation_id": generation_id, **kw}, headers=svc.op())
    assert r.status_code == 202, r.text
    return r.json()


# ----------------------------------------------------------------------- health, docs
def test_health_ready_metrics_docs(svc: Service) -> None:
    c = svc.client
    assert c.get("/healthz").json() == {"status": "ok"}
    r = c.get("/readyz")
    assert r.status_code == 200 and r.json()["failed"] == []
    c.get("/healthz")
    m = c.get("/metrics")
    assert m.status_code == 200
    assert 'attrib_http_requests_total{method="GET",route="/healthz",status="200"}' in m.text
    assert 'attrib_writes{what="transactions"} 0.0' in m.text
    assert c.get("/docs").status_code == 200
    spec = c.get("/openapi.json").json()
    paths = set(spec["paths"])
    for p in ("/generate", "/attribute", "/jobs/{job_id}", "/generations/{generation_id}",
              "/generations/{generation_id}/image.png", "/attributions/{attribution_id}",
              "/attributions/{attribution_id}/counterfactual/{item_id}.png", "/batches",
              "/batches/{batch_id}", "/validations", "/validations/{job_id}",
              "/validations/{job_id}/figures/{name}", "/works", "/works/{work_id}",
              "/works/{work_id}/influence", "/works/{work_id}/opt-out", "/opt-outs/{opt_out_id}", "/healthz",
              "/readyz", "/metrics"):
        assert p in paths, p
    # Every protected operation documents its errors; every request field is described.
    for p, ops in spec["paths"].items():
        for op in ops.values():
            if p.startswith(("/works", "/generate", "/attribut", "/jobs", "/generations", "/batches",
                             "/validations", "/opt-outs")):
                # opt-outs take a holder's key and an operator's alike: no 403 there
                either = {"403"} if p.endswith("/opt-out") or p.startswith("/opt-outs") else set()
                documented = set(op["responses"])
                assert {"401", "403", "404", "422"} - either <= documented, (p, documented)
    for name, model in spec["components"]["schemas"].items():  # every field of every body
        if name not in ("HTTPValidationError", "ValidationError"):  # FastAPI's own
            undocumented = [k for k, v in model.get("properties", {}).items() if "description" not in v]
            assert not undocumented, (name, undocumented)


def test_readyz_names_the_failed_database(make_service: Callable[..., Service]) -> None:
    svc = make_service()
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    broken = Settings(**{**svc.settings.model_dump(),
                         "database_url": "postgresql+psycopg://nobody@127.0.0.1:1/none"})
    with TestClient(create_app(broken)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503
        assert r.json()["failed"] == ["database"]
        assert c.get("/healthz").status_code == 200
        r = c.get("/jobs/x", headers=svc.op())  # the key lookup itself needs the database
        assert r.status_code == 503 and "database" in r.json()["detail"]


# ------------------------------------------------------------------------------ auth
OPERATOR_GETS = ["/jobs/x", "/generations/1", "/generations/1/image.png", "/attributions/1",
                 "/attributions/1/counterfactual/1.png", "/batches/1"]
OPERATOR_POSTS = [("/generate", {"seeds": [0]}), ("/attribute", {"generation_id": 1}),
                  ("/batches", {"count": 1})]
OWNER_GETS = ["/works", "/works/1", "/works/1/image.png", "/works/1/influence",
              "/works/1/influence/1/generation.png", "/works/1/influence/1/counterfactual.png"]


def test_no_key_401_bad_key_401(svc: Service) -> None:
    c = svc.client
    for path in OPERATOR_GETS + OWNER_GETS:
        assert c.get(path).status_code == 401, path
        assert c.get(path, headers={"Authorization": "Bearer attrib_000000000000_nope"}).status_code == 401
        assert c.get(path, headers={"X-API-Key": "garbage"}).status_code == 401
    for path, body in OPERATOR_POSTS:
        r = c.post(path, json=body)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    # Two different keys at once are refused, whichever is valid.
    both = {"Authorization": f"Bearer {svc.operator_key}", "X-API-Key": svc.owner_keys["alice"]}
    assert c.get("/jobs/x", headers=both).status_code == 401
    # A key's prefix with another secret is refused.
    forged = svc.operator_key.rsplit("_", 1)[0] + "_" + "x" * 43
    assert c.get("/jobs/x", headers={"Authorization": f"Bearer {forged}"}).status_code == 401


def test_owner_key_on_operator_routes_403_and_operator_on_works_403(svc: Service) -> None:
    c = svc.client
    for path in OPERATOR_GETS:
        assert c.get(path, headers=svc.owner("alice")).status_code == 403, path
    for path, body in OPERATOR_POSTS:
        assert c.post(path, json=body, headers=svc.owner("alice")).status_code == 403, path
    for path in OWNER_GETS:
        assert c.get(path, headers=svc.op()).status_code == 403, path


def test_revoked_key_is_refused(svc: Service) -> None:
    from app.auth import revoke_key

    assert svc.client.get("/works", headers=svc.owner("bob")).status_code == 200
    prefix = svc.owner_keys["bob"].split("_")[1]
    with svc.db.session() as s:
        assert revoke_key(s, prefix)
    assert svc.client.get("/works", headers=svc.owner("bob")).status_code == 401


def test_keys_are_stored_hashed(svc: Service) -> None:
    from app.orm import ApiKey

    with svc.db.session() as s:
        stored = list(s.scalars(select(ApiKey.key_hash)))
    for key in [svc.operator_key, *svc.owner_keys.values()]:
        secret = key.split("_", 2)[2]
        assert len(secret) >= 40 and all(secret not in h for h in stored)
        assert hashlib.sha256(key.encode()).hexdigest() in stored


# -------------------------------------------------------------------------- generate
def test_generate_runs_and_matches_the_engine(svc: Service, tiny_ensemble: Ensemble) -> None:
    out = generate(svc, [0, 7])
    c = svc.client
    job = c.get(f"/jobs/{out['job_id']}", headers=svc.op()).json()
    assert job["status"] == "queued" and job["attempts"] == 0
    assert svc.run_jobs() == ["succeeded"]
    job = c.get(f"/jobs/{out['job_id']}", headers=svc.op()).json()
    assert job["status"] == "succeeded" and job["progress"] == 1.0 and job["attempts"] == 1
    assert job["created_at"].endswith(("Z", "+00:00"))  # UTC, explicit
    ens = tiny_ensemble
    x = sample(ens.net, ens.schedule, make_tape([0, 7], ens.shape, out["steps"]))
    for gid, x_i in zip(out["generation_ids"], x, strict=True):
        g = c.get(f"/generations/{gid}", headers=svc.op()).json()
        assert g["status"] == "done" and g["has_jacobian"] is False
        png = c.get(g["image_url"], headers=svc.op())
        assert png.headers["content-type"] == "image/png"
        assert png.content == png_bytes(x_i)  # byte-identical to the engine
        big = c.get(g["image_url"] + "?scale=4", headers=svc.op())
        assert pixels(big.content).shape == (32, 32)


def test_generate_again_reuses_generations_and_needs_no_work(svc: Service) -> None:
    first = generate(svc, [3, 4])
    svc.run_jobs()
    again = generate(svc, [4, 3])
    assert again["generation_ids"] == first["generation_ids"][::-1]
    job = svc.client.get(f"/jobs/{again['job_id']}", headers=svc.op()).json()
    assert job["status"] == "succeeded"
    assert svc.run_jobs() == []


def test_generate_count_and_steps(svc: Service) -> None:
    r = svc.client.post("/generate", json={"count": 3, "seed_start": 10, "steps": 5}, headers=svc.op())
    assert r.status_code == 202
    out = r.json()
    assert out["steps"] == 5 and len(out["generation_ids"]) == 3
    svc.run_jobs()
    seeds = [svc.client.get(f"/generations/{g}", headers=svc.op()).json()["seed"]
             for g in out["generation_ids"]]
    assert seeds == [10, 11, 12]


def test_idempotency_key_replays_the_first_job(svc: Service) -> None:
    h = {**svc.op(), "Idempotency-Key": "req-1"}
    a = svc.client.post("/generate", json={"seeds": [1]}, headers=h).json()
    b = svc.client.post("/generate", json={"seeds": [1]}, headers=h).json()
    assert a == b
    r = svc.client.post("/attribute", json={"generation_id": a["generation_ids"][0]}, headers=h)
    assert r.status_code == 409 and "req-1" in r.json()["detail"]


@pytest.mark.parametrize("body, needle", [
    ({"seeds": list(range(5))}, "max_seeds_per_request=4"),
    ({"seeds": [0], "steps": 9}, "max_steps=8"),
    ({"seeds": [0], "steps": 30, "ensemble_id": None}, "max_steps=8"),
])
def test_generate_limits_name_the_setting(make_service: Callable[..., Service], body: dict,
                                          needle: str) -> None:
    svc = make_service(max_seeds_per_request=4, max_steps=8)
    r = svc.client.post("/generate", json=body, headers=svc.op())
    assert r.status_code == 422 and needle in r.json()["detail"]


def test_generate_steps_past_T(svc: Service) -> None:
    r = svc.client.post("/generate", json={"seeds": [0], "steps": 21}, headers=svc.op())
    assert r.status_code == 409 and "T=20" in r.json()["detail"]


@pytest.mark.parametrize("body", [
    {}, {"seeds": [0], "count": 2}, {"seeds": []}, {"seeds": [-1]}, {"seeds": [2**53]}, {"seeds": [1, 1]},
    {"count": 0}, {"seeds": [0], "steps": 0}, {"seeds": [0], "colour": "red"}, {"seeds": "0"},
    {"count": 2, "seed_start": 2**52 + 1}, {"seeds": None, "count": 2}, {"count": 2**62},
])
def test_generate_bad_bodies_422(svc: Service, body: dict) -> None:
    r = svc.client.post("/generate", json=body, headers=svc.op())
    assert r.status_code == 422, body
    assert "detail" in r.json()


def test_body_over_the_limit_413(make_service: Callable[..., Service]) -> None:
    svc = make_service(max_body_bytes=200)
    r = svc.client.post("/generate", content=b'{"seeds": [' + b"1," * 200 + b"1]}",
                        headers={**svc.op(), "Content-Type": "application/json"})
    assert r.status_code == 413 and "max_body_bytes=200" in r.json()["detail"]


def test_unknown_ensemble_generation_404(svc: Service) -> None:
    c = svc.client
    r = c.post("/generate", json={"seeds": [0], "ensemble_id": 99}, headers=svc.op())
    assert r.status_code == 404 and "ensemble 99" in r.json()["detail"]
    for path in ("/generations/999", "/generations/999/image.png", "/attributions/999", "/jobs/nope",
                 "/batches/999", "/attributions/999/counterfactual/1.png"):
        assert c.get(path, headers=svc.op()).status_code == 404, path
    r = c.post("/attribute", json={"generation_id": 999}, headers=svc.op())
    assert r.status_code == 404


# ------------------------------------------------------------------------- attribute
def test_synthetic_attribution_matches_the_engine(svc: Service, tiny_ensemble: Ensemble) -> None:
    gid = generate(svc, [5])["generation_ids"][0]
    svc.run_jobs()
    acc = attribute(svc, gid, top_k=6, verify_top_k=2, score="influence")
    assert svc.run_jobs() == ["succeeded"]
    att = svc.client.get(f"/attributions/{acc['attribution_id']}", headers=svc.op()).json()
    assert att["status"] == "succeeded" and len(att["entries"]) == 6 and att["score"] == "influence"
    assert [e["rank"] for e in att["entries"]] == list(range(1, 7))

    ens = tiny_ensemble
    tape = make_tape([5], ens.shape, ens.schedule.T)
    f, J = jacobian(ens.net, ens.schedule, tape)
    dW = delta_w(torch.from_numpy(ens.codebook.bits()), ens.k)
    scores = (torch.einsum("dn,mn->md", J[0].double(), dW)).norm(dim=1)  # brute force ||J dw||
    with svc.db.session() as s:
        index_of = dict(s.execute(select(TrainingItem.id, TrainingItem.index)).all())
        label_of = dict(s.execute(select(TrainingItem.id, TrainingItem.label)).all())
    got = [index_of[e["training_item_id"]] for e in att["entries"]]
    np.testing.assert_allclose([e["score"] for e in att["entries"]], scores[got].numpy(), rtol=1e-4)
    assert [e["score"] for e in att["entries"]] == [e["influence"] for e in att["entries"]]
    assert sorted(scores.numpy(), reverse=True)[5] == pytest.approx(att["entries"][-1]["score"], rel=1e-4)
    for e in att["entries"]:
        assert e["owner_name"] == owner_of_label(label_of[e["training_item_id"]])
        verified = e["rank"] <= 2
        assert (e["exact_score"] is not None) == verified
        assert e["counterfactual_kind"] == ("exact" if verified else "predicted")

    # The verified two are the brute-force top two, each with its exact counterfactual: the
    # agreement of synthetic and exact influence over them, computed here (too few for
    # correlations; JSON has no NaN).
    verified = [index_of[e["training_item_id"]] for e in att["entries"][:2]]
    assert sorted(verified) == sorted(torch.topk(scores, 2).indices.tolist())
    W = ablation_weights(torch.from_numpy(ens.codebook.bits()[verified]), ens.k)
    x_cfs = exact_counterfactuals(ens.net, ens.schedule, tape, W, torch.zeros(2, dtype=torch.long))
    syn, exa = scores[verified].numpy(), l2_distance(x_cfs, f.expand_as(x_cfs)).numpy()
    agreement = att["agreement"]
    assert set(agreement) == {"median_rel_err", "top1_agrees", "spearman", "pearson"}
    assert agreement["median_rel_err"] == pytest.approx(float(np.median(np.abs(syn - exa) / exa)), rel=1e-3)
    assert (agreement["top1_agrees"], agreement["spearman"], agreement["pearson"]) == (1.0, None, None)

    # Exact counterfactual PNG == rerun without the members trained on the work.
    top = att["entries"][0]
    x_cf = x_cfs[0]
    assert svc.client.get(top["counterfactual_url"], headers=svc.op()).content == png_bytes(x_cf)
    assert top["exact_score"] == pytest.approx(float(l2_distance(x_cf[None], f)[0]), rel=1e-4)
    # Predicted counterfactual PNG == f + J dw rendered (to one grey level: float32 storage).
    last = att["entries"][-1]
    i = index_of[last["training_item_id"]]
    pred = predicted_counterfactuals(f, J, dW[[i]][None])[0, 0]
    got_px = pixels(svc.client.get(last["counterfactual_url"], headers=svc.op()).content)
    assert np.abs(got_px - pixels(png_bytes(pred))).max() <= 1
    # The Jacobian is stored once per generation.
    assert svc.client.get(f"/generations/{gid}", headers=svc.op()).json()["has_jacobian"] is True


@dataclass(frozen=True)
class ByHand:
    """A default attribution (resemblance, the synthetic top 50 verified, 10 decoys) of one seed,
    computed here from the trained ensemble, its Jacobian and the pixels. Item granularity: source
    i is training image i. Tensors indexed by source unless said otherwise."""

    f: torch.Tensor  # (D,) the sample
    d_f: torch.Tensor  # (N,) d(f, x_s)
    resemblance: torch.Tensor  # (N,) synthetic: ||f + J dw_s - x_s|| - d(f, x_s)
    p: torch.Tensor  # (N,) its empirical p-value against the decoys: (1 + #decoys >= r) / 11
    tail_p: torch.Tensor  # (N,) the normal-tail p-value of the same decoys (the catalogue figure)
    synthetic_top: list[int]  # the six best by synthetic resemblance
    ranked: list[int]  # the six best of the synthetic top 50 by exact resemblance, best first
    exact_resemblance: torch.Tensor  # (6,) of ``ranked``: ||cf_s - x_s|| - d(f, x_s)
    exact_influence: torch.Tensor  # (6,) of ``ranked``: ||cf_s - f||
    radius: float  # max ||cf_s - f|| over the 50 verified
    top_cf: torch.Tensor  # (D,) the exact counterfactual of ``ranked[0]``


def default_attribution_by_hand(ens: Ensemble, images: torch.Tensor, seed: int) -> ByHand:
    n, k = ens.n, ens.k
    tape = make_tape([seed], ens.shape, ens.schedule.T)
    f = sample(ens.net, ens.schedule, tape)[0].flatten().double()
    J = jacobian(ens.net, ens.schedule, tape)[1][0].double()  # (D, n)
    X = images.flatten(1).double()

    def dw(bits: np.ndarray) -> torch.Tensor:  # (M, n) -> w' - w, dropping the members of each code
        return torch.from_numpy((1.0 - bits) / (n - k) - 1.0 / n)

    d_f = (X - f).norm(dim=1)
    bits = ens.codebook.bits()
    r = (f + dw(bits.astype(float)) @ J.T - X).norm(dim=1) - d_f
    # decoys: every weight-k code no source holds (C(8, 4) = 70 codes, 60 held)
    held = {tuple(c) for c in bits.tolist()}
    free = [c for c in itertools.product((0, 1), repeat=n) if sum(c) == k and c not in held]
    assert len(free) == 10
    null = torch.cdist(X, f + dw(np.array(free, dtype=float)) @ J.T) - d_f[:, None]  # (N, 10)
    p = (1.0 + (null >= r[:, None]).sum(dim=1).double()) / 11.0
    tail_p = torch.from_numpy(stats.norm.sf(((r - null.mean(dim=1)) / null.std(dim=1)).numpy()))
    top50 = torch.topk(r, 50).indices
    W = ablation_weights(torch.from_numpy(bits[top50.numpy()]), k)
    cf = exact_counterfactuals(ens.net, ens.schedule, tape, W, torch.zeros(50, dtype=torch.long))
    cf = cf.flatten(1).double()
    r_exact = (cf - X[top50]).norm(dim=1) - d_f[top50]
    order = torch.argsort(r_exact, descending=True)[:6]
    return ByHand(f, d_f, r, p, tail_p, top50[:6].tolist(), top50[order].tolist(), r_exact[order],
                  (cf[order] - f).norm(dim=1), float((cf - f).norm(dim=1).max()), cf[order[0]])


@pytest.mark.parametrize(("seed", "reranked", "p_top"), [
    (3, True, 0.139),  # the exact values change the synthetic top six, and their order
    (8, False, 0.00305),  # the same six in the same order; the top tail p-value within 4x of 0.05/60
])
def test_the_default_attribution_is_resemblance_verified_with_significance(
        svc: Service, tiny_ensemble: Ensemble, tiny_data: TinyData, seed: int, reranked: bool,
        p_top: float) -> None:
    """No score or verify_top_k asked: resemblance ranks, the synthetic top 50 re-ranked exactly;
    every entry has both scores and a p-value, the attribution says whether it is attributable
    (and why not), which entries it names, and the copy check (nearest works by pixel L2). Every
    number against the attribution computed by hand (``default_attribution_by_hand``)."""
    gid = generate(svc, [seed])["generation_ids"][0]
    acc = attribute(svc, gid, top_k=6)
    assert svc.run_jobs() == ["succeeded", "succeeded"]
    att = svc.client.get(f"/attributions/{acc['attribution_id']}", headers=svc.op()).json()
    assert (att["score"], att["verify_top_k"], len(att["entries"])) == ("resemblance", 50, 6)
    entries = att["entries"]
    with svc.db.session() as s:
        index_of = dict(s.execute(select(TrainingItem.id, TrainingItem.index)).all())
    ranked = [index_of[e["training_item_id"]] for e in entries]
    want = default_attribution_by_hand(tiny_ensemble, tiny_data.x, seed)
    assert ranked == want.ranked and (ranked != want.synthetic_top) == reranked
    np.testing.assert_allclose([e["exact_resemblance"] for e in entries], want.exact_resemblance.numpy(),
                               rtol=1e-4)
    np.testing.assert_allclose([e["exact_influence"] for e in entries], want.exact_influence.numpy(),
                               rtol=1e-4)
    np.testing.assert_allclose([e["resemblance"] for e in entries], want.resemblance[ranked].numpy(),
                               rtol=1e-4)
    assert [e["score"] for e in entries] == [e["resemblance"] for e in entries]
    assert [e["exact_score"] for e in entries] == [e["exact_resemblance"] for e in entries]
    np.testing.assert_allclose([e["p_value"] for e in entries], want.p[ranked].numpy(), rtol=1e-3)

    # Significance, the selective test: the five works nearest the generation, each against the
    # 10 decoys (empirical p at best 1/11, above 0.05/5): no work is named. The catalogue figure:
    # the top work's normal-tail p-value against 0.05/60.
    sig = att["significance"]
    assert {key: sig[key] for key in ("test", "sources_tested", "decoys", "p_method", "attributable")} == {
        "test": "selective", "sources_tested": 5, "decoys": 10, "p_method": "empirical",
        "attributable": False}
    assert sig["threshold"] == pytest.approx(0.05 / 5)
    nearest5 = torch.argsort(want.d_f)[:5].tolist()
    assert [index_of[c["training_item_id"]] for c in sig["candidates"]] == nearest5
    candidates = sig["candidates"]
    np.testing.assert_allclose([c["p_value"] for c in candidates], want.p[nearest5].numpy(), rtol=1e-12)
    np.testing.assert_allclose([c["distance"] for c in candidates], want.d_f[nearest5].numpy(), rtol=1e-5)
    assert sig["named_training_item_id"] is None
    assert sig["top_p"] == pytest.approx(float(want.p[ranked[0]]), rel=1e-12)
    catalogue = sig["catalogue"]
    assert (catalogue["sources"], catalogue["p_method"], catalogue["attributable"]) == (
        60, "gaussian tail", False)
    assert catalogue["threshold"] == pytest.approx(0.05 / 60)
    assert float(want.tail_p[ranked[0]]) == pytest.approx(p_top, rel=1e-2)
    assert catalogue["top_p"] == pytest.approx(float(want.tail_p[ranked[0]]), rel=1e-3)
    assert att["attributable"] is False
    best = float(want.p[nearest5].min())
    assert sig["reason"].startswith(f"the best of the 5 works nearest the generation has p-value {best:.3g} "
                                    "(empirical, 10 decoys), above 0.05/5 = 0.01")
    assert [e["significant"] for e in entries] == [False] * 6

    # The authors' measures: the radius over the 50 verified works, and whether dropping the top
    # work changes the generation's nearest training image (by brute force on its exact counterfactual).
    causal = att["causal"]
    assert causal["radius_over_verified"] == 50
    assert causal["radius"] == pytest.approx(want.radius, rel=1e-4)
    top_nearest = int(torch.argmin((tiny_data.x.flatten(1).double() - want.top_cf).norm(dim=1)))
    assert index_of[causal["nearest_training_item_id"]] == int(torch.argmin(want.d_f))
    assert index_of[causal["top_counterfactual_nearest_training_item_id"]] == top_nearest
    assert causal["top_changes_nearest"] == (top_nearest != int(torch.argmin(want.d_f)))

    # The copy check: the nearest training works by brute force, the nearest distance over the
    # training set's median nearest-neighbour distance; above 1, far from 0.5: no near-copy.
    near = att["near_copy"]
    assert [index_of[m["training_item_id"]] for m in near["nearest"]] == torch.argsort(want.d_f)[:3].tolist()
    np.testing.assert_allclose([m["distance"] for m in near["nearest"]],
                               torch.sort(want.d_f).values[:3].numpy(), rtol=1e-4)
    pair = torch.cdist(tiny_data.x.flatten(1).double(), tiny_data.x.flatten(1).double())
    pair.fill_diagonal_(float("inf"))
    ratio = float(want.d_f.min()) / float(np.median(pair.min(dim=1).values.numpy()))
    assert near["ratio"] == pytest.approx(ratio, rel=1e-4) and ratio > 1.0
    assert (near["threshold"], near["near_copy"], near["confirmed"], near["moved_away"]) == (
        0.5, False, None, None)


def test_exact_attribution_equals_brute_force(svc: Service, tiny_ensemble: Ensemble,
                                             tiny_data: TinyData) -> None:
    gid = generate(svc, [2], steps=10)["generation_ids"][0]
    acc = attribute(svc, gid, method="exact", top_k=4, verify_top_k=3)  # samples the generation itself
    assert svc.run_jobs() == ["succeeded", "succeeded"]
    att = svc.client.get(f"/attributions/{acc['attribution_id']}", headers=svc.op()).json()
    assert att["verify_top_k"] == 0 and att["method"] == "exact"
    ens = tiny_ensemble
    tape = make_tape([2], ens.shape, 10)
    f = sample(ens.net, ens.schedule, tape)
    W = ablation_weights(torch.from_numpy(ens.codebook.bits()), ens.k)
    x = exact_counterfactuals(ens.net, ens.schedule, tape, W, torch.zeros(len(W), dtype=torch.long))
    d = l2_distance(x, f.expand_as(x)).numpy()
    x_train = tiny_data.x[: len(W)]  # item granularity: source s is item s
    r = (l2_distance(x, x_train) - l2_distance(f.expand_as(x_train), x_train)).numpy()  # resemblance
    with svc.db.session() as s:
        index_of = dict(s.execute(select(TrainingItem.id, TrainingItem.index)).all())
    got = [index_of[e["training_item_id"]] for e in att["entries"]]
    assert att["score"] == "resemblance" and att["attributable"] is None  # exact: no decoy null
    np.testing.assert_allclose([e["score"] for e in att["entries"]], r[got], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(sorted(r, reverse=True)[:4], r[got], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose([e["influence"] for e in att["entries"]], d[got], rtol=1e-5)
    assert all(e["exact_score"] == e["score"] and e["counterfactual_kind"] == "exact" for e in att["entries"])


def test_attribute_same_request_same_attribution(svc: Service) -> None:
    gid = generate(svc, [1])["generation_ids"][0]
    a = attribute(svc, gid, top_k=3)
    b = attribute(svc, gid, top_k=3)
    assert a == b
    svc.run_jobs()
    c = attribute(svc, gid, top_k=3)
    assert c["attribution_id"] == a["attribution_id"]
    assert svc.run_jobs() == []


@pytest.mark.parametrize("body, needle", [
    ({"top_k": 11}, "max_top_k=10"), ({"top_k": 5, "verify_top_k": 3}, "max_verify_top_k=2"),
])
def test_attribute_limits(make_service: Callable[..., Service], body: dict, needle: str) -> None:
    svc = make_service(max_top_k=10, max_verify_top_k=2)
    gid = generate(svc, [0])["generation_ids"][0]
    r = svc.client.post("/attribute", json={"generation_id": gid, **body}, headers=svc.op())
    assert r.status_code == 422 and needle in r.json()["detail"]


@pytest.mark.parametrize("body", [
    {"top_k": 0}, {"top_k": 2, "verify_top_k": 1.5}, {"method": "magic"}, {"metric": "l1"},
    {"verify_top_k": -1},
])
def test_attribute_bad_bodies_422(svc: Service, body: dict) -> None:
    r = svc.client.post("/attribute", json={"generation_id": 1, **body}, headers=svc.op())
    assert r.status_code == 422


def test_counterfactual_of_an_unranked_item_404(svc: Service) -> None:
    gid = generate(svc, [0])["generation_ids"][0]
    acc = attribute(svc, gid, top_k=2)
    svc.run_jobs()
    att = svc.client.get(f"/attributions/{acc['attribution_id']}", headers=svc.op()).json()
    ranked = {e["training_item_id"] for e in att["entries"]}
    other = next(i for i in range(1, 61) if i not in ranked)
    r = svc.client.get(f"/attributions/{acc['attribution_id']}/counterfactual/{other}.png", headers=svc.op())
    assert r.status_code == 404


def test_lpips_without_backbone_fails_the_job_clearly(svc: Service, monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: object) -> None:
    monkeypatch.setenv("ATTRIB_LPIPS_BACKBONE", "/nonexistent/alex.pth")
    gid = generate(svc, [0])["generation_ids"][0]
    acc = attribute(svc, gid, metric="lpips", top_k=2)
    assert svc.run_jobs()[-1] == "failed"
    job = svc.client.get(f"/jobs/{acc['job_id']}", headers=svc.op()).json()
    assert job["status"] == "failed" and "lpips" in job["error"].lower() and job["attempts"] == 1
    att = svc.client.get(f"/attributions/{acc['attribution_id']}", headers=svc.op()).json()
    assert att["status"] == "failed" and att["entries"] == []
    # Asking again retries (a new job), instead of returning the failure forever.
    again = attribute(svc, gid, metric="lpips", top_k=2)
    assert again["attribution_id"] == acc["attribution_id"] and again["job_id"] != acc["job_id"]


# --------------------------------------------------------------------------- batches
def test_batch_with_attribution_progress_over_all(svc: Service) -> None:
    r = svc.client.post("/batches", json={"count": 4, "seed_start": 100, "steps": 5,
                                          "attribute": {"top_k": 3}}, headers=svc.op())
    assert r.status_code == 202, r.text
    bid = r.json()["batch_id"]
    b = svc.client.get(f"/batches/{bid}", headers=svc.op()).json()
    assert b["total"] == 4 and b["jobs"] == {"queued": 4} and b["progress"] == 0 and not b["done"]
    jid = r.json()["job_ids"][0]
    from worker.tasks import execute_job

    execute_job(jid, svc.worker)
    b = svc.client.get(f"/batches/{bid}", headers=svc.op()).json()
    assert b["progress"] == pytest.approx(0.25) and b["jobs"] == {"queued": 3, "succeeded": 1}
    svc.run_jobs()
    b = svc.client.get(f"/batches/{bid}", headers=svc.op()).json()
    assert b["done"] and b["progress"] == 1.0 and len(b["attribution_ids"]) == 4
    for aid in b["attribution_ids"]:
        att = svc.client.get(f"/attributions/{aid}", headers=svc.op()).json()
        assert att["status"] == "succeeded" and len(att["entries"]) == 3


def test_batch_generate_only_in_chunks(make_service: Callable[..., Service]) -> None:
    svc = make_service(generate_chunk=3, max_batch_seeds=7)
    r = svc.client.post("/batches", json={"count": 7, "steps": 4}, headers=svc.op())
    assert len(r.json()["job_ids"]) == 3
    svc.run_jobs()
    b = svc.client.get(f"/batches/{r.json()['batch_id']}", headers=svc.op()).json()
    assert b["done"] and len(b["generation_ids"]) == 7 and b["attribution_ids"] == []
    r = svc.client.post("/batches", json={"count": 8}, headers=svc.op())
    assert r.status_code == 422 and "max_batch_seeds=7" in r.json()["detail"]


# ------------------------------------------------------------------- rights holders
def test_works_are_private_to_their_owner(svc: Service) -> None:
    c = svc.client
    with svc.db.session() as s:
        rows = s.execute(select(TrainingItem.id, TrainingItem.label)).all()
    mine = {o: sorted(i for i, lab in rows if owner_of_label(lab) == o) for o in OWNERS}
    for o in OWNERS:
        page = c.get("/works?limit=500", headers=svc.owner(o)).json()
        assert [w["id"] for w in page["items"]] == mine[o] and page["total"] == len(mine[o])
        other = mine[OWNERS[(OWNERS.index(o) + 1) % 3]][0]
        for path in (f"/works/{other}", f"/works/{other}/image.png", f"/works/{other}/influence"):
            r = c.get(path, headers=svc.owner(o))
            assert r.status_code == 404, path  # never 200, never 403
        w = c.get(f"/works/{mine[o][0]}", headers=svc.owner(o)).json()
        assert c.get(w["image_url"], headers=svc.owner(o)).status_code == 200
    page = c.get("/works?offset=2&limit=3", headers=svc.owner("alice")).json()
    assert [w["id"] for w in page["items"]] == mine["alice"][2:5]
    r = c.get("/works?limit=100000", headers=svc.owner("alice"))
    assert r.status_code == 422 and "max_page_size" in r.json()["detail"]


def test_rights_holder_finds_the_generation_under_influence(svc: Service) -> None:
    gid = generate(svc, [9])["generation_ids"][0]
    acc = attribute(svc, gid, top_k=5, verify_top_k=1)
    svc.run_jobs()
    att = svc.client.get(f"/attributions/{acc['attribution_id']}", headers=svc.op()).json()
    top = att["entries"][0]
    owner = top["owner_name"]
    inf = svc.client.get(f"/works/{top['training_item_id']}/influence", headers=svc.owner(owner)).json()
    assert inf["total"] == 1
    item = inf["items"][0]
    assert (item["generation_id"], item["rank"], item["attribution_id"]) == (gid, 1, acc["attribution_id"])
    assert item["exact_score"] == top["exact_score"]
    gen_png = svc.client.get(item["generation_url"], headers=svc.owner(owner))
    op_png = svc.client.get(f"/generations/{gid}/image.png", headers=svc.op())
    assert gen_png.status_code == 200 and gen_png.content == op_png.content
    cf = svc.client.get(item["counterfactual_url"], headers=svc.owner(owner))
    assert cf.content == svc.client.get(top["counterfactual_url"], headers=svc.op()).content
    # Another holder cannot reach this work's influence pictures, nor use their own work id to
    # reach an attribution that did not rank it.
    stranger = next(o for o in OWNERS if o != owner)
    influence = f"/works/{top['training_item_id']}/influence"
    for path in (item["generation_url"], item["counterfactual_url"], influence):
        assert svc.client.get(path, headers=svc.owner(stranger)).status_code == 404
    past = svc.client.get(f"{influence}?offset=3", headers=svc.owner(owner)).json()
    assert (past["total"], past["items"], past["offset"]) == (1, [], 3)
    with svc.db.session() as s:
        own_unranked = s.scalar(select(TrainingItem.id).where(
            TrainingItem.owner_id == svc.owner_ids[stranger],
            TrainingItem.id.not_in([e["training_item_id"] for e in att["entries"]])))
    r = svc.client.get(f"/works/{own_unranked}/influence/{acc['attribution_id']}/generation.png",
                       headers=svc.owner(stranger))
    assert r.status_code == 404


def test_influence_pages_are_reused_for_influence_cache_s(make_service: Callable[..., Service]) -> None:
    """On the app's clock, driven here: a page is reused until influence_cache_s has passed."""
    now = 1000.0
    svc = make_service(influence_cache_s=2.0, clock=lambda: now)
    gid = generate(svc, [12])["generation_ids"][0]
    first = attribute(svc, gid, top_k=5, verify_top_k=0)
    assert set(svc.run_jobs()) == {"succeeded"}
    top = svc.client.get(f"/attributions/{first['attribution_id']}", headers=svc.op()).json()["entries"][0]
    url, me = f"/works/{top['training_item_id']}/influence", svc.owner(top["owner_name"])
    assert svc.client.get(url, headers=me).json()["total"] == 1  # cached at 1000.0
    attribute(svc, gid, top_k=4, verify_top_k=0)  # ranks the same work first again
    assert set(svc.run_jobs()) == {"succeeded"}
    now += 1.5
    assert svc.client.get(url, headers=me).json()["total"] == 1  # the cached page
    stranger = next(o for o in OWNERS if o != top["owner_name"])
    assert svc.client.get(url, headers=svc.owner(stranger)).status_code == 404  # never from the cache
    now += 0.5  # exactly influence_cache_s after it was cached
    assert svc.client.get(url, headers=me).json()["total"] == 2  # expired: read anew


# ----------------------------------------------------------------- jobs, idempotency
def test_a_task_run_twice_leaves_one_set_of_results(svc: Service) -> None:
    from worker.tasks import execute_job

    gid = generate(svc, [11])["generation_ids"][0]
    acc = attribute(svc, gid, top_k=4, verify_top_k=1)
    assert execute_job(acc["job_id"], svc.worker) == "succeeded"
    assert execute_job(acc["job_id"], svc.worker) == "skipped"  # duplicate message: no-op
    # A redelivery after the job was (wrongly) put back: it reruns and replaces, not appends.
    with svc.db.session() as s:
        s.execute(update(Job).where(Job.id == acc["job_id"]).values(status="queued"))
    assert execute_job(acc["job_id"], svc.worker) == "succeeded"
    with svc.db.session() as s:
        n = s.scalar(select(func.count()).select_from(AttributionEntry)
                     .where(AttributionEntry.attribution_id == acc["attribution_id"]))
        job = s.get(Job, acc["job_id"])
        assert job is not None
        assert n == 4 and job.attempts == 2 and job.status == "succeeded"


def test_lost_jobs_are_resent_and_dead_workers_bounded(make_service: Callable[..., Service]) -> None:
    from datetime import timedelta

    from app import jobs
    from app.orm import utcnow
    from app.queue import INTERACTIVE, broker_depth
    from worker.tasks import execute_job

    svc = make_service(requeue_after_s=30, stale_after_s=60, job_max_attempts=2)
    celery = svc.client.app.state.celery  # type: ignore[attr-defined]

    def broker_loses_everything() -> None:  # the in-memory broker is shared by the whole process
        with celery.connection_for_write() as conn:
            conn.default_channel.queue_purge(INTERACTIVE)

    def published(count: int) -> None:
        """Wait for the writer's publish: it runs right after the answer, on the app's loop."""
        deadline = time.monotonic() + 30
        while broker_depth(celery, INTERACTIVE) < count:
            assert time.monotonic() < deadline, "the job's message was never published"
            time.sleep(0.01)

    broker_loses_everything()
    jid = generate(svc, [0])["job_id"]
    published(1)
    t0 = utcnow()
    assert jobs.requeue_lost(svc.db, celery, svc.settings, t0 + timedelta(hours=1)) == []  # waiting: not lost
    broker_loses_everything()
    assert jobs.requeue_lost(svc.db, celery, svc.settings, t0 + timedelta(seconds=29)) == []  # not yet
    assert jobs.requeue_lost(svc.db, celery, svc.settings, t0 + timedelta(seconds=31)) == [jid]
    # The re-sent message waits in the broker: never a second one while it does.
    assert jobs.requeue_lost(svc.db, celery, svc.settings, t0 + timedelta(hours=2)) == []
    assert execute_job(jid, svc.worker) == "succeeded"
    # A worker that took a job and died mid-way: re-sent once when stale, not every sweep.
    jid = generate(svc, [1])["job_id"]
    published(1)
    assert jobs.claim(svc.db, jid, "dead:1", svc.settings) is not None
    broker_loses_everything()  # (the message that worker took)
    t1 = utcnow()
    assert jobs.requeue_lost(svc.db, celery, svc.settings, t1 + timedelta(seconds=59)) == []
    assert jobs.requeue_lost(svc.db, celery, svc.settings, t1 + timedelta(seconds=61)) == [jid]
    assert jobs.requeue_lost(svc.db, celery, svc.settings, t1 + timedelta(seconds=76)) == []
    assert jobs.requeue_lost(svc.db, celery, svc.settings, t1 + timedelta(seconds=600)) == []
    with svc.db.session() as s:  # ... it was taken again, and that worker died too
        s.execute(update(Job).values(status="running", attempts=2, worker="dead:2",
                                     heartbeat_at=utcnow() - timedelta(seconds=61)))
    assert execute_job(jid, svc.worker) == "skipped"
    job = svc.client.get(f"/jobs/{jid}", headers=svc.op()).json()
    assert job["status"] == "failed" and "gave up after 2 attempts" in job["error"]
    assert execute_job(jid, svc.worker) == "skipped"  # never retried again
    assert jobs.requeue_lost(svc.db, celery, svc.settings, t1 + timedelta(hours=3)) == []


def test_a_running_job_with_a_live_worker_is_not_taken(svc: Service) -> None:
    from app.orm import utcnow
    from worker.tasks import execute_job

    out = generate(svc, [0])
    with svc.db.session() as s:
        s.execute(update(Job).values(status="running", attempts=1, worker="other:1", heartbeat_at=utcnow()))
    assert execute_job(out["job_id"], svc.worker) == "skipped"


def test_a_big_batch_twice_makes_one_job_per_attribution(make_service: Callable[..., Service]) -> None:
    svc = make_service(max_batch_seeds=3000)
    r = svc.client.post("/batches", json={"count": 3000, "attribute": {"top_k": 3}}, headers=svc.op())
    assert r.status_code == 202 and len(set(r.json()["job_ids"])) == 3000
    again = svc.client.post("/batches", json={"count": 3000, "attribute": {"top_k": 3}}, headers=svc.op())
    assert again.json()["job_ids"] == []  # same attributions, already queued: no second job each
    b = svc.client.get(f"/batches/{again.json()['batch_id']}", headers=svc.op()).json()
    assert len(set(b["attribution_ids"])) == 3000 and b["done"]
    with svc.db.session() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 3000


def test_requests_exactly_at_the_limits_are_accepted(make_service: Callable[..., Service]) -> None:
    svc = make_service(max_seeds_per_request=4, max_steps=8, max_top_k=5, max_verify_top_k=2,
                       max_batch_seeds=6, max_page_size=7)
    r = svc.client.post("/generate", json={"seeds": [0, 1, 2, 3], "steps": 8}, headers=svc.op())
    assert r.status_code == 202
    gid = r.json()["generation_ids"][0]
    r = svc.client.post("/attribute", json={"generation_id": gid, "top_k": 5, "verify_top_k": 2},
                        headers=svc.op())
    assert r.status_code == 202
    assert svc.client.post("/batches", json={"count": 6, "steps": 8}, headers=svc.op()).status_code == 202
    assert svc.client.get("/works?limit=7", headers=svc.owner("bob")).status_code == 200
    assert svc.client.get("/works?limit=8", headers=svc.owner("bob")).status_code == 422
    assert svc.run_jobs() == ["succeeded"] * 3
    spec = svc.client.get("/openapi.json").json()["components"]["schemas"]
    assert spec["GenerateCreate"]["properties"]["seeds"]["maxItems"] == 4
    assert spec["BatchCreate"]["properties"]["seeds"]["maxItems"] == 6
