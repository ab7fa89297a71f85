"""With real processes (`attrib serve`, embedded default, its default workers): while a long
validation holds the long queue, generate requests submitted one after the other each start and
finish inside the long job's run, by the times the jobs themselves recorded."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import httpx
import pytest

from app.settings import Settings
from tests.faults.test_processes import populate
from tests.procs import serve, stop, wait_job, wait_until

pytestmark = pytest.mark.slow
INTERACTIVE_JOBS = 8


def _at(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


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
            interactive = []
            for seed in range(INTERACTIVE_JOBS):  # one after the other, each waited for
                r = c.post("/generate", json={"seeds": [seed], "steps": 20}, headers=op)
                assert r.status_code == 202, r.text
                job = wait_job(c, r.json()["job_id"], op, timeout=120)
                assert job["status"] == "succeeded" and job["queue"] == "interactive", job
                interactive.append(job)
            long = c.get(f"/jobs/{long_job}", headers=op).json()
            assert long["queue"] == "long" and long["status"] in ("running", "succeeded"), long
            # Each interactive job ran inside the long job's run: started after it started, and
            # finished before it finished (or while it is still running, as seen just now).
            long_start = _at(long["started_at"])
            long_end = _at(long["finished_at"]) if long["finished_at"] else None
            for job in interactive:
                start, end = _at(job["started_at"]), _at(job["finished_at"])
                assert long_start < start <= end, (long, job)
                assert long_end is None or end < long_end, (long, job)
    finally:
        stop([proc])
