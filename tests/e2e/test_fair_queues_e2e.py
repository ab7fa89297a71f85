"""With real processes (`attrib serve`, embedded default, its default workers): while a long
validation holds the long queue for over a minute, generate requests submitted one after the
other each finish in seconds; the validation is still running after all of them."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from app.settings import Settings
from tests.faults.test_processes import populate
from tests.procs import serve, stop, wait_job, wait_until

pytestmark = pytest.mark.slow
LONG_JOB_S = 60.0


def test_interactive_jobs_finish_while_a_long_one_runs(base_env: dict[str, str], cli_ckpt: Path,
                                                       tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    settings.data_dir.mkdir()
    op = populate(settings.database_url, cli_ckpt, "fair")
    env = {**base_env, "ATTRIB_RATE_LIMIT_PER_MINUTE": "0"}
    proc, url = serve(env, tmp_path)
    try:
        with httpx.Client(base_url=url, timeout=10) as c:
            # Thousands of training steps: minutes of work on the long queue.
            r = c.post("/validations", headers=op, json={
                "experiment": "copies", "samples": 4,
                "train": {"subset": 30, "preset": "tiny", "n": 8, "train_steps": 5000}})
            assert r.status_code == 202, r.text
            long_job = r.json()["job_id"]
            wait_until(lambda: c.get(f"/jobs/{long_job}", headers=op).json()["status"] == "running", 60)
            started = time.monotonic()
            took: list[float] = []
            seed = 0
            # 20 generate jobs, one after the other, and more until the long job has run a minute.
            while len(took) < 20 or time.monotonic() - started < LONG_JOB_S:
                t0 = time.monotonic()
                r = c.post("/generate", json={"seeds": [seed], "steps": 20}, headers=op)
                assert r.status_code == 202, r.text
                job = wait_job(c, r.json()["job_id"], op, timeout=60)
                assert job["status"] == "succeeded" and job["queue"] == "interactive", job
                took.append(time.monotonic() - t0)
                seed += 1
            long = c.get(f"/jobs/{long_job}", headers=op).json()
            assert long["status"] == "running" and long["queue"] == "long", long
            assert time.monotonic() - started >= LONG_JOB_S and len(took) >= 20
            assert max(took) < 30, took
    finally:
        stop([proc])
