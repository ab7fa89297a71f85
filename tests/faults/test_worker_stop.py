"""A worker stopped by SIGTERM in the middle of a job (as `docker stop` does: to the worker's
main process only) hands the job back at once: queued, the attempt not counted, at the front of
its queue; started again, the worker runs that job first and finishes it."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.db import Database
from app.main import create_app
from app.orm import Job
from app.settings import Settings
from tests.faults.test_processes import populate
from tests.procs import stop, wait_until, worker

pytestmark = pytest.mark.slow


@pytest.fixture
def embedded(base_env: dict[str, str], cli_ckpt: Path, tmp_path: Path) -> Iterator[tuple[TestClient, Database,
                                                                                             dict[str, str]]]:
    """The API in-process and a migrated SQLite + filesystem broker the worker processes share."""
    settings = Settings(data_dir=tmp_path / "data", reaper_interval_s=0, rate_limit_per_minute=0,
                        max_seeds_per_request=64)
    settings.data_dir.mkdir()
    op = populate(settings.database_url, cli_ckpt, "stop")
    db = Database(settings.database_url)
    with TestClient(create_app(settings)) as client:
        client.headers.update(op)
        yield client, db, op
    db.dispose()


def test_sigterm_hands_the_job_back_and_it_runs_next(embedded: tuple[TestClient, Database, dict[str, str]],
                                                     base_env: dict[str, str], tmp_path: Path) -> None:
    client, db, _ = embedded
    # One seed per pass, so the job reports progress as it goes; no grace: hand back at once.
    env = {**base_env, "ATTRIB_GENERATE_CHUNK": "1", "ATTRIB_STOP_GRACE_S": "0", "ATTRIB_HEARTBEAT_S": "0.5"}
    procs: list[subprocess.Popen[bytes]] = [worker(env, tmp_path, "worker1")]
    try:
        long_job = client.post("/generate", json={"seeds": list(range(32)), "steps": 20}).json()["job_id"]

        def row(jid: str) -> Job:
            with db.session() as s:
                job = s.scalar(select(Job).where(Job.id == jid))
                assert job is not None
                s.expunge(job)
                return job

        wait_until(lambda: row(long_job).status == "running" and row(long_job).progress >= 0.1, 120,
                   lambda: (tmp_path / "worker1.log").read_text()[-3000:], every=0.05)
        behind = client.post("/generate", json={"seeds": [500], "steps": 20}).json()["job_id"]
        os.kill(procs[0].pid, signal.SIGTERM)  # the main process alone, as docker stop does
        wait_until(lambda: row(long_job).status == "queued", 5, lambda: vars(row(long_job)), every=0.05)
        handed = row(long_job)
        assert handed.attempts == 0 and handed.worker is None and handed.progress == 0  # not counted
        assert procs[0].wait(timeout=30) == 0
        assert row(behind).status == "queued"  # the stopping worker took nothing more

        procs.append(worker(env, tmp_path, "worker2"))
        wait_until(lambda: row(behind).status == "succeeded", 120,
                   lambda: (tmp_path / "worker2.log").read_text()[-3000:])
        first, then = row(long_job), row(behind)
        assert first.status == "succeeded" and first.attempts == 1  # no attempt lost to the stop
        assert first.started_at is not None and then.started_at is not None
        assert first.started_at < then.started_at  # it ran next, ahead of the job queued meanwhile
    finally:
        stop(procs)
