"""End to end with real processes: the CLI sets up data, keys and an ensemble; `attrib serve`
(uvicorn) and Celery worker processes run the jobs. Once on the embedded default (SQLite +
filesystem broker, no servers) and once on PostgreSQL + Redis with two workers. Each must serve,
for a (ensemble, seed, steps), the PNG bytes the engine gives in this process: so both setups
give byte-identical images, whichever of the two tests runs (each checks on its own).

generate -> attribute (exact verification of the top 3) -> a rights holder finds the
generation under their work's influence -> a validation job (fidelity of the served ensemble)
-> the holder withdraws the work: served at once without its members, retrained by a worker.
"""

from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path

import httpx
import pytest

from models.ensemble import Ensemble
from models.images import png_bytes
from models.sampler import make_tape, sample
from tests.procs import BIN, attrib, free_port, start, stop, wait_job
from tests.service.services import fresh_postgres, redis_url

pytestmark = pytest.mark.slow
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@lru_cache(maxsize=4)
def engine_png(ckpt: Path, seed: int, steps: int) -> bytes:
    """The PNG of (ensemble, seed, steps) as the engine makes it here, without the service."""
    ens = Ensemble.load(ckpt).for_inference()
    return png_bytes(sample(ens.net, ens.schedule, make_tape([seed], ens.shape, steps))[0])


def run_flow(env: dict[str, str], cli_ckpt: Path, tmp: Path, separate_workers: int) -> None:
    attrib(env, "migrate")
    imported = attrib(env, "import", "--data", "digits", "--subset", "60", "--owners-by-label", "3")
    owner_keys = {k["owner"]: k["key"] for k in imported["keys"]}
    assert len(owner_keys) == 3
    attrib(env, "register", "--ckpt", str(cli_ckpt), "--name", "tiny")
    op = {"Authorization": f"Bearer {attrib(env, 'key', 'create')['key']}"}
    port = free_port()
    workers = 0 if separate_workers else 1
    procs = [start([str(BIN / "attrib"), "serve", "--port", str(port), "--workers", str(workers)], env,
                   tmp / "serve.log")]
    procs += [start([str(BIN / "attrib"), "worker"], env, tmp / f"worker{i}.log")
              for i in range(separate_workers)]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            for _ in range(150):
                try:
                    if c.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            else:
                raise AssertionError((tmp / "serve.log").read_text()[-3000:])
            r = c.post("/generate", json={"seeds": [0, 1]}, headers=op)
            assert r.status_code == 202, r.text
            gen_ids, steps = r.json()["generation_ids"], r.json()["steps"]
            assert wait_job(c, r.json()["job_id"], op)["status"] == "succeeded"
            image = c.get(f"/generations/{gen_ids[0]}/image.png", headers=op)
            assert image.status_code == 200 and image.headers["content-type"] == "image/png", image.text
            assert image.content[:8] == PNG_SIGNATURE
            assert image.content == engine_png(cli_ckpt, 0, steps)  # the same bytes on every setup

            r = c.post("/attribute", json={"generation_id": gen_ids[0], "top_k": 5, "verify_top_k": 3},
                       headers=op)
            assert r.status_code == 202, r.text
            job = wait_job(c, r.json()["job_id"], op)
            assert job["status"] == "succeeded", job
            att = c.get(f"/attributions/{r.json()['attribution_id']}", headers=op).json()
            assert [e["exact_score"] is not None for e in att["entries"]] == [True] * 3 + [False] * 2
            top = att["entries"][0]
            key = {"Authorization": f"Bearer {owner_keys[top['owner_name']]}"}
            inf = c.get(f"/works/{top['training_item_id']}/influence", headers=key).json()
            assert [(i["generation_id"], i["rank"]) for i in inf["items"]] == [(gen_ids[0], 1)]
            png = c.get(inf["items"][0]["counterfactual_url"], headers=key)
            assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
            other = next(k for o, k in owner_keys.items() if o != top["owner_name"])
            r = c.get(f"/works/{top['training_item_id']}/influence",
                      headers={"Authorization": f"Bearer {other}"})
            assert r.status_code == 404

            # A validation job: fidelity of the served ensemble, on a worker process.
            ens_id = c.get(f"/generations/{gen_ids[0]}", headers=op).json()["ensemble_id"]
            r = c.post("/validations", json={"experiment": "fidelity", "ensemble_id": ens_id, "samples": 1,
                                             "steps": 4, "sources": "all", "recall_k": 3}, headers=op)
            assert r.status_code == 202, r.text
            assert wait_job(c, r.json()["job_id"], op)["status"] == "succeeded"
            v = c.get(r.json()["url"], headers=op).json()
            assert v["report"]["per_sample"][0]["candidates"] == 60 and v["report"]["k"] == 3
            assert c.get(v["figures"]["fidelity.png"], headers=op).content[:4] == b"\x89PNG"

            # Opt-out: at once new generations come from a version without the work's members; a
            # worker retrains them and serves the restored version; new rankings leave the work out.
            work = top["training_item_id"]
            r = c.post(f"/works/{work}/opt-out", json={"reason": "e2e"}, headers=key)
            assert r.status_code == 202, r.text
            opt = r.json()
            [eff] = opt["ensembles"]
            assert eff["trained_version_id"] == ens_id and len(eff["members"]) == 4
            r = c.post("/generate", json={"seeds": [0]}, headers=op)
            assert r.status_code == 202 and r.json()["ensemble_id"] != ens_id  # masked, or already restored
            assert wait_job(c, r.json()["job_id"], op)["status"] == "succeeded"
            assert wait_job(c, eff["retrain_job_id"], op)["status"] == "succeeded"
            done = c.get(f"/opt-outs/{opt['id']}", headers=key).json()
            assert done["state"] == "restored" and done["ensembles"][0]["serving_version_id"] == \
                done["ensembles"][0]["restored_version_id"]
            r = c.post("/generate", json={"seeds": [0]}, headers=op)
            assert r.json()["ensemble_id"] == done["ensembles"][0]["restored_version_id"]
            assert wait_job(c, r.json()["job_id"], op)["status"] == "succeeded"
            new_gen = r.json()["generation_ids"][0]
            r = c.post("/attribute", json={"generation_id": new_gen, "top_k": 59}, headers=op)
            assert wait_job(c, r.json()["job_id"], op)["status"] == "succeeded"
            ranked = c.get(f"/attributions/{r.json()['attribution_id']}", headers=op).json()["entries"]
            assert work not in [e["training_item_id"] for e in ranked]
            assert c.get(f"/generations/{gen_ids[0]}", headers=op).json()["ensemble_id"] == ens_id

            m = c.get("/metrics").text
            assert 'attrib_jobs{kind="attribute",status="succeeded"} 2.0' in m
            assert 'attrib_jobs{kind="retrain",status="succeeded"} 1.0' in m
            assert 'attrib_jobs{kind="validate",status="succeeded"} 1.0' in m
    finally:
        stop(procs)


def test_embedded_default(base_env: dict[str, str], cli_ckpt: Path, tmp_path: Path) -> None:
    run_flow(base_env, cli_ckpt, tmp_path, separate_workers=0)
    assert (tmp_path / "data" / "attrib.db").exists() and (tmp_path / "data" / "broker").is_dir()
    assert not (tmp_path / "control").exists()  # the broker writes only under the data folder


def test_postgres_and_redis(base_env: dict[str, str], cli_ckpt: Path, tmp_path: Path) -> None:
    import redis

    url = redis_url(db=9)
    redis.Redis.from_url(url).flushdb()
    with fresh_postgres() as db:
        run_flow({**base_env, "DATABASE_URL": db, "BROKER_URL": url}, cli_ckpt, tmp_path,
                 separate_workers=2)
    assert not (tmp_path / "data" / "attrib.db").exists()
