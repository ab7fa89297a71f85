"""Faults with real processes, PostgreSQL and Redis: workers SIGKILLed mid-job, a job that
kills its worker every time, Redis restarted under a batch, PostgreSQL stopped under a batch,
`attrib serve` stopped by SIGTERM, and its several HTTP processes (one killed, a busy port).
Each test is bounded in time; lost-job detection is tuned to seconds through settings, and what
must never happen is checked by running the reaper's sweep, not by waiting for its periods."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import redis as redis_lib
from prometheus_client import CollectorRegistry, multiprocess
from sqlalchemy import create_engine, text

from app import jobs, migrate
from app.auth import create_key
from app.db import Database
from app.orm import utcnow
from app.queue import broker_depth, make_celery
from app.registry import import_dataset, register_ensemble
from app.settings import Settings
from models.data import ImageDataset, load_digits
from models.ensemble import Ensemble
from models.images import png_bytes
from models.sampler import make_tape, sample
from tests.procs import BIN, serve, stop, wait_job, wait_until, worker
from tests.service.services import fresh_postgres, redis_url

pytestmark = [pytest.mark.slow, pytest.mark.serial]  # it stops PostgreSQL and restarts Redis

FAST_RECOVERY = dict(ATTRIB_HEARTBEAT_S="0.5", ATTRIB_STALE_AFTER_S="3", ATTRIB_REAPER_INTERVAL_S="1",
                     ATTRIB_REQUEUE_AFTER_S="4", ATTRIB_JOB_MAX_ATTEMPTS="3",
                     ATTRIB_RATE_LIMIT_PER_MINUTE="0")


class Stack:
    def __init__(self, env: dict[str, str], tmp: Path, url: str, op: dict[str, str]) -> None:
        self.env, self.tmp, self.url, self.op = env, tmp, url, op
        self.c = httpx.Client(base_url=url, timeout=10)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.n_workers = 0

    def add_worker(self) -> subprocess.Popen[bytes]:
        self.n_workers += 1
        p = worker(self.env, self.tmp, f"worker{self.n_workers}")
        self.procs.append(p)
        return p

    def job(self, job_id: str) -> dict:
        return self.c.get(f"/jobs/{job_id}", headers=self.op).json()

    def sql(self, q: str) -> list:
        eng = create_engine(self.env["DATABASE_URL"])
        with eng.connect() as con:
            rows = list(con.execute(text(q)))
        eng.dispose()
        return rows


def cli_dataset() -> ImageDataset:
    return load_digits().sample(60, 0)  # what `attrib train --data digits --subset 60` trained on


def populate(database_url: str, cli_ckpt: Path, key_name: str) -> dict[str, str]:
    """Schema, the 60 digits as works, the CLI-trained ensemble registered and an operator key
    (in-process: the CLI path is covered by tests/e2e); returns the key's Authorization header."""
    migrate.upgrade(database_url)
    database = Database(database_url)
    with database.session() as s:
        import_dataset(s, cli_dataset(), "digits-60", {"data": "digits", "subset": 60})
        register_ensemble(s, Ensemble.load(cli_ckpt), cli_ckpt, "tiny")
        op = {"Authorization": f"Bearer {create_key(s, None, key_name)[1]}"}
    database.dispose()
    return op


@pytest.fixture
def stack(base_env: dict[str, str], cli_ckpt: Path, tmp_path: Path) -> Iterator[Stack]:
    r_url = redis_url(db=10)
    redis_lib.Redis.from_url(r_url).flushdb()
    with fresh_postgres() as db:
        env = {**base_env, **FAST_RECOVERY, "DATABASE_URL": db, "BROKER_URL": r_url}
        op = populate(db, cli_ckpt, "faults")
        api, url = serve(env, tmp_path, workers=0)
        st = Stack(env, tmp_path, url, op)
        st.procs.append(api)
        try:
            yield st
        finally:
            st.c.close()
            stop(st.procs)


def _running_pid(st: Stack, job_id: str) -> int | None:
    rows = st.sql(f"SELECT status, worker, progress FROM job WHERE id = '{job_id}'")
    status, who, _ = rows[0]
    return int(who.rsplit(":", 1)[1]) if status == "running" and who else None


def test_worker_killed_mid_generation_and_mid_attribution(stack: Stack, cli_ckpt: Path) -> None:
    st = stack
    st.env["ATTRIB_GENERATE_CHUNK"] = "1"  # workers read it: one seed per pass, progress per seed
    st.add_worker()
    seeds = list(range(40))
    r = st.c.post("/generate", json={"seeds": seeds, "steps": 20}, headers=st.op)
    assert r.status_code == 202, r.text
    job_id, gen_ids = r.json()["job_id"], r.json()["generation_ids"]
    wait_until(lambda: float(st.job(job_id)["progress"]) > 0.1, 120)
    pid = _running_pid(st, job_id)
    assert pid is not None, st.job(job_id)
    os.kill(pid, signal.SIGKILL)  # the pool child running the job
    job = wait_job(st.c, job_id, st.op, 120)
    assert job["status"] == "succeeded" and job["attempts"] >= 2, job
    rows = st.sql("SELECT count(*), count(DISTINCT image_sha), min(status), max(status) FROM generation")
    assert tuple(rows[0]) == (40, 40, "done", "done")
    # Determinism across the restart: the samples of the killed process and of its successor
    # are byte-identical to the engine's, computed here in-process.
    ens = Ensemble.load(cli_ckpt).for_inference()
    x = sample(ens.net, ens.schedule, make_tape(seeds, ens.shape, 20))
    stored = dict(st.sql("SELECT g.seed, i.png FROM generation g JOIN image i ON i.sha256 = g.image_sha"))
    assert all(bytes(stored[sd]) == png_bytes(x[i]) for i, sd in enumerate(seeds))

    # Mid-attribution: an exact attribution (one sampling run per source) is long enough to hit.
    r = st.c.post("/attribute", json={"generation_id": gen_ids[0], "method": "exact", "top_k": 5},
                  headers=st.op)
    att_job = r.json()["job_id"]
    wait_until(lambda: _running_pid(st, att_job) is not None, 60)
    # Looked up once: a second lookup after the wait can find the job just finished (None), and
    # os.kill(0, ...) would signal this test's own process group.
    att_pid = _running_pid(st, att_job)
    assert att_pid is not None and att_pid > 0, st.job(att_job)
    os.kill(att_pid, signal.SIGKILL)
    job = wait_job(st.c, att_job, st.op, 120)
    assert job["status"] == "succeeded" and job["attempts"] >= 2, job
    att = st.c.get(f"/attributions/{r.json()['attribution_id']}", headers=st.op).json()
    assert [e["rank"] for e in att["entries"]] == [1, 2, 3, 4, 5]
    assert st.sql("SELECT count(*) FROM attribution_entry")[0][0] == 5


def test_worker_killed_mid_retrain_resumes_and_finishes_once(stack: Stack) -> None:
    """An opt-out's retrain job, its worker SIGKILLed right after the retrain saved its first
    state: the job is re-sent (stale), a new worker process resumes it and it finishes once,
    with one restored version serving."""
    st = stack
    st.env["ATTRIB_RETRAIN_CHECKPOINT_EVERY"] = "5"  # workers read it: a state every 5 steps
    st.add_worker()
    work_id = st.sql("SELECT min(id) FROM training_item")[0][0]
    r = st.c.post(f"/works/{work_id}/opt-out", json={"reason": "fault test"}, headers=st.op)
    assert r.status_code == 202, r.text
    opt_out_id = r.json()["id"]
    [(job_id,)] = st.sql("SELECT id FROM job WHERE kind = 'retrain'")
    states = Path(st.env["ATTRIB_DATA_DIR"]) / "ensembles"
    wait_until(lambda: any(states.glob("retrain-*.state.pt")), 120, every=0.01)
    pid = _running_pid(st, job_id)
    assert pid is not None, st.job(job_id)  # still running: killed mid-retrain
    os.kill(pid, signal.SIGKILL)
    job = wait_job(st.c, job_id, st.op, 180)
    assert job["status"] == "succeeded" and job["attempts"] == 2, job
    assert job["result"]["resumed_from_step"] >= 5, job  # from the saved state, not from scratch
    state = st.c.get(f"/opt-outs/{opt_out_id}", headers=st.op).json()
    assert state["state"] == "restored", state
    rows = st.sql("SELECT status, count(*) FROM ensemble GROUP BY status ORDER BY status")
    assert rows == [("ready", 1), ("superseded", 2)], rows  # first, masked, restored (serving)
    assert st.sql("SELECT count(*) FROM job WHERE kind = 'retrain'")[0][0] == 1


def test_a_job_that_kills_its_worker_every_time_fails_for_good(stack: Stack) -> None:
    st = stack
    st.add_worker()
    r = st.c.post("/attribute", json={"generation_id": 1}, headers=st.op)  # no such generation yet
    assert r.status_code == 404
    r = st.c.post("/generate", json={"seeds": [5]}, headers=st.op)
    wait_job(st.c, r.json()["job_id"], st.op)
    r = st.c.post("/attribute", json={"generation_id": r.json()["generation_ids"][0], "method": "exact",
                                      "top_k": 3}, headers=st.op)
    job_id = r.json()["job_id"]
    killed: set[int] = set()

    def kill_whenever_running() -> bool:  # an out-of-memory job, as seen from outside
        pid = _running_pid(st, job_id)
        if pid is not None and pid not in killed:
            killed.add(pid)
            os.kill(pid, signal.SIGKILL)
        return bool(st.job(job_id)["status"] == "failed")

    wait_until(kill_whenever_running, 150, lambda: st.job(job_id), every=0.1)
    job = st.job(job_id)
    assert len(killed) == 3 and job["attempts"] == 4  # 3 runs killed; the 4th claim gives up
    assert "gave up after 3 attempts" in job["error"]
    # Never retried again: the reaper's sweep, run here as if every cut-off had passed long ago
    # (no waiting for its periods), leaves a job that failed for good alone.
    settings = Settings(database_url=st.env["DATABASE_URL"], broker_url=st.env["BROKER_URL"])
    database = Database(settings.database_url)
    try:
        a_day_later = utcnow() + timedelta(days=1)
        assert job_id not in jobs.requeue_lost(database, make_celery(settings), settings, a_day_later)
    finally:
        database.dispose()
    again = st.job(job_id)
    assert again["status"] == "failed" and again["attempts"] == 4


def test_redis_restarted_under_a_batch(stack: Stack) -> None:
    """Redis restarted empty while it still holds messages of the batch: the messages it lost
    are re-sent (their jobs' enqueued_at is after the restart) and every job runs once."""
    st = stack
    # An API process that splits batches one seed per job: many messages to be waiting.
    api_dir = st.tmp / "one-seed-jobs"
    api_dir.mkdir()
    api, st.c.base_url = serve({**st.env, "ATTRIB_GENERATE_CHUNK": "1"}, api_dir, workers=0)
    st.procs.append(api)
    st.add_worker()
    r = st.c.post("/batches", json={"count": 30, "steps": 10}, headers=st.op)
    assert r.status_code == 202, r.text
    bid, job_ids = r.json()["batch_id"], r.json()["job_ids"]
    assert len(job_ids) == 30
    [(queue,)] = st.sql(f"SELECT DISTINCT queue FROM job WHERE batch_id = {bid}")
    celery = make_celery(Settings(database_url=st.env["DATABASE_URL"], broker_url=st.env["BROKER_URL"]))

    def working_with_messages_waiting() -> bool:
        done = st.sql(f"SELECT count(*) FROM job WHERE batch_id = {bid} AND status = 'succeeded'")[0][0]
        return bool(done >= 1 and broker_depth(celery, queue) >= 5)

    wait_until(working_with_messages_waiting, 60, lambda: st.c.get(f"/batches/{bid}", headers=st.op).json())
    [(restarted_at,)] = st.sql("SELECT now()")
    _restart_redis()
    assert broker_depth(celery, queue) == 0  # restarted empty: the waiting messages are gone
    wait_until(lambda: st.c.get(f"/batches/{bid}", headers=st.op).json()["done"], 150,
               lambda: st.c.get(f"/batches/{bid}", headers=st.op).json())
    b = st.c.get(f"/batches/{bid}", headers=st.op).json()
    assert b["jobs"] == {"succeeded": 30}, b
    resent = st.sql(f"SELECT count(*) FROM job WHERE batch_id = {bid} AND enqueued_at > "
                    f"'{restarted_at.isoformat()}'")[0][0]
    assert resent >= 4, resent  # at least the messages Redis held at the restart, less one taken
    attempts = st.sql(f"SELECT attempts, count(*) FROM job WHERE batch_id = {bid} GROUP BY attempts")
    assert attempts == [(1, 30)], attempts  # each job ran once
    rows = st.sql("SELECT count(*), count(DISTINCT seed), min(status) FROM generation")
    assert tuple(rows[0]) == (30, 30, "done")


def _restart_redis() -> None:
    subprocess.run(["redis-cli", "-p", "6379", "shutdown", "nosave"], capture_output=True, timeout=10)
    wait_until(lambda: subprocess.run(["redis-cli", "ping"], capture_output=True).returncode != 0, 10)
    subprocess.run(["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379",
                    "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis", "--logfile",
                    "/var/log/redis/ci.log"], check=True, timeout=10)
    wait_until(lambda: subprocess.run(["redis-cli", "ping"], capture_output=True).stdout.strip() == b"PONG",
               10)


def _pg(action: str) -> None:
    version = os.listdir("/etc/postgresql")[0]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action], check=True,
                   capture_output=True, timeout=60)


def test_postgres_stopped_under_a_batch(stack: Stack) -> None:
    st = stack
    st.add_worker()
    r = st.c.post("/batches", json={"count": 30, "steps": 10}, headers=st.op)
    bid = r.json()["batch_id"]
    wait_until(lambda: st.c.get(f"/batches/{bid}", headers=st.op).json()["jobs"].get("succeeded", 0) >= 1, 60)
    done_before = st.sql("SELECT count(*) FROM generation WHERE status = 'done'")[0][0]
    _pg("stop")
    try:
        assert st.c.get("/healthz").status_code == 200
        r = st.c.get("/readyz")
        assert r.status_code == 503 and r.json()["failed"] == ["database"]
        # Fails fast, does not hang: the app's own database-down answer (a hang would be the
        # client's ReadTimeout, an error of this test, not a pass).
        r = st.c.get(f"/batches/{bid}", headers=st.op)
        assert r.status_code == 503 and r.headers["Retry-After"] == "5", r.text
        r = st.c.post("/generate", json={"seeds": [999]}, headers=st.op)
        assert r.status_code == 503
        time.sleep(2)
    finally:
        _pg("start")
    wait_until(lambda: st.c.get("/readyz").status_code == 200, 30)
    wait_until(lambda: st.c.get(f"/batches/{bid}", headers=st.op).json()["done"], 150,
               lambda: st.c.get(f"/batches/{bid}", headers=st.op).json())
    b = st.c.get(f"/batches/{bid}", headers=st.op).json()
    assert set(b["jobs"]) == {"succeeded"}  # every job of the batch, none failed
    rows = st.sql("SELECT count(*), min(status) FROM generation WHERE id IN "
                  f"({','.join(str(g) for g in b['generation_ids'])})")
    assert tuple(rows[0]) == (30, "done")
    assert st.sql("SELECT count(*) FROM generation WHERE status = 'done'")[0][0] >= max(done_before, 30)


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def _alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


def test_serve_stops_its_worker_on_sigterm(base_env: dict[str, str], tmp_path: Path) -> None:
    """`attrib serve` (embedded) shut down by SIGTERM, as docker stop or systemd do: its worker
    must not outlive it (uvicorn re-raises the signal after shutting down)."""
    proc, _url = serve(base_env, tmp_path)
    workers: list[int] = []

    def worker_started() -> bool:
        workers[:] = _children(proc.pid)
        return bool(workers)

    try:
        wait_until(worker_started, 30, "attrib serve started no worker process")
        os.kill(proc.pid, signal.SIGTERM)  # the serve process alone, not its group
        assert proc.wait(timeout=40) == 128 + signal.SIGTERM
        wait_until(lambda: not any(_alive(p) for p in workers), 30, f"worker {workers} outlived attrib serve")
    finally:
        stop([proc])
        for pid in workers:  # what the failure left behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


def _api_processes(serve_pid: int) -> list[int]:
    """The HTTP server processes of `attrib serve --api-processes N` (spawned children)."""
    out = []
    for pid in _children(serve_pid):
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
    return out


def healthz_by_process(metrics_dir: Path, pids: list[int]) -> dict[int, float]:
    """GET /healthz answered (200) by each API process, read from that process's own counter file
    (prometheus_client's multiprocess mode keeps one per process, counter_<pid>.db; a process
    still starting has none yet: it has answered nothing)."""
    out = {}
    for pid in pids:
        if not (metrics_dir / f"counter_{pid}.db").exists():
            out[pid] = 0.0
            continue
        with tempfile.TemporaryDirectory() as alone:
            shutil.copy(metrics_dir / f"counter_{pid}.db", alone)
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=alone)
            out[pid] = sum(s.value for family in registry.collect() for s in family.samples
                           if s.name == "attrib_http_requests_total"
                           and (s.labels.get("route"), s.labels.get("status")) == ("/healthz", "200"))
    return out


def test_serve_with_two_api_processes(base_env: dict[str, str], tmp_path: Path) -> None:
    """Two HTTP processes on one port, each with its own socket: new connections reach both,
    /metrics adds up both (whichever answers), a killed one is replaced, and SIGTERM stops all."""
    proc, url = serve(base_env, tmp_path, workers=0, args=("--api-processes", "2"))
    apis: list[int] = []
    try:
        def two() -> bool:
            apis[:] = _api_processes(proc.pid)
            return len(apis) == 2
        wait_until(two, 30, lambda: f"API processes {apis}")
        env = dict(e.split(b"=", 1) for e in Path(f"/proc/{apis[0]}/environ").read_bytes().split(b"\0") if e)
        metrics_dir = Path(env[b"PROMETHEUS_MULTIPROC_DIR"].decode())

        def healthz_count() -> float:
            text = httpx.get(f"{url}/metrics", timeout=5).text
            line = 'attrib_http_requests_total{method="GET",route="/healthz",status="200"}'
            return sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(line))

        before, before_each = healthz_count(), healthz_by_process(metrics_dir, apis)
        for _ in range(40):  # a new connection each
            assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        assert healthz_count() - before == 40
        # Both processes served: each one's own count grew (the kernel spread the 40 connections
        # over both sockets by their addresses; all to one has odds of 2 in 2^40).
        served = {pid: n - before_each[pid] for pid, n in healthz_by_process(metrics_dir, apis).items()}
        assert sum(served.values()) == 40 and min(served.values()) > 0, served

        os.kill(apis[0], signal.SIGKILL)
        wait_until(lambda: len(_api_processes(proc.pid)) == 2 and apis[0] not in _api_processes(proc.pid),
                   60, "the killed API process was not replaced")
        wait_until(lambda: all(httpx.get(f"{url}/healthz", timeout=5).status_code == 200 for _ in range(10)),
                   60, "not serving after the restart")
        apis[:] = _api_processes(proc.pid)

        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=40) == 128 + signal.SIGTERM
        wait_until(lambda: not any(_alive(p) for p in apis), 30, f"API processes {apis} outlived serve")
        assert not metrics_dir.exists()
    finally:
        stop([proc])
        for pid in apis:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_serve_processes_on_a_busy_port_fail_at_once(base_env: dict[str, str], tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cmd = [str(BIN / "attrib"), "serve", "--port", str(port), "--workers", "0", "--api-processes", "2"]
        r = subprocess.run(cmd, env=base_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in r.stderr
