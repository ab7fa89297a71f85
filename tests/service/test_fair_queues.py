"""Queues by job class, bounded re-sending, and what GET /jobs/{id} says about a waiting job.

The broker bound runs with a fake clock (``requeue_lost(now=...)``) on both brokers the service
uses: the embedded filesystem one and Redis. Jobs are then run by taking their messages off the
broker, as a worker does.
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis as redis_lib
from celery import Celery
from sqlalchemy import select, update

from app import jobs
from app.orm import Job, utcnow
from app.queue import INTERACTIVE, LONG, LONG_BATCH_SEEDS, broker_depth, parse_queues, queue_for
from app.settings import Settings
from app.workers import serve_workers, worker_command
from tests.procs import wait_until
from tests.service.conftest import Service
from tests.service.services import redis_url
from worker import tasks
from worker.tasks import execute_job


def test_routing_by_job_kind_and_batch_size() -> None:
    assert queue_for("generate") == queue_for("attribute") == INTERACTIVE
    assert queue_for("validate") == queue_for("retrain") == LONG
    assert queue_for("generate", LONG_BATCH_SEEDS) == INTERACTIVE
    assert queue_for("attribute", LONG_BATCH_SEEDS + 1) == LONG
    assert parse_queues("long, interactive,long") == ["long", "interactive"]
    for bad in ("", "bulk", "interactive,bulk"):
        with pytest.raises(ValueError, match="queue"):
            parse_queues(bad)


def test_serve_runs_a_worker_per_queue(tmp_path: Path) -> None:
    specs = serve_workers(Settings(data_dir=tmp_path, long_worker_threads=1), 2)
    assert [(s.queues, s.concurrency, s.threads) for s in specs] == [(("interactive",), 2, None),
                                                                      (("long",), 1, 1)]
    assert specs[1].nice > specs[0].nice  # interactive jobs get the CPU first
    assert serve_workers(Settings(data_dir=tmp_path), 0) == []
    cmd = worker_command(["interactive", "long"], 3)
    assert cmd[cmd.index("--queues") + 1] == "interactive,long" and cmd[cmd.index("--concurrency") + 1] == "3"
    with pytest.raises(ValueError, match="queues must be among"):
        worker_command(["bulk"], 1)


def test_a_job_says_why_it_waits(make_service: Callable[..., Service]) -> None:
    svc = make_service(max_batch_seeds=1000, generate_chunk=100)
    first, second, third = (svc.client.post("/generate", json={"seeds": [i]}, headers=svc.op())
                            .json()["job_id"] for i in range(3))
    val = svc.client.post("/validations", json={"experiment": "copies"}, headers=svc.op()).json()["job_id"]
    big = svc.client.post("/batches", json={"count": LONG_BATCH_SEEDS + 1, "steps": 1},
                          headers=svc.op()).json()["job_ids"]
    small = svc.client.post("/batches", json={"count": 2, "steps": 1}, headers=svc.op()).json()["job_ids"]

    def get(jid: str) -> dict:
        return svc.client.get(f"/jobs/{jid}", headers=svc.op()).json()

    j = get(third)
    assert (j["queue"], j["ahead"]) == ("interactive", 2)
    assert j["waiting"] == "queued behind 2 job(s) of the interactive queue" and not j["stale"]
    assert (get(first)["ahead"], get(val)["queue"], get(val)["ahead"]) == (0, "long", 0)
    assert {get(b)["queue"] for b in big} == {"long"} and get(big[0])["ahead"] == 1  # the validation
    assert {get(b)["queue"] for b in small} == {"interactive"}
    # A running job whose worker stopped reporting: shown stale, not as frozen progress.
    with svc.db.session() as s:
        s.execute(update(Job).where(Job.id == second).values(
            status="running", worker="gone:1", heartbeat_at=utcnow() - timedelta(seconds=121)))
    j = get(second)
    assert j["stale"] and j["waiting"].startswith("stale: no heartbeat from its worker for 12")
    assert get(third)["ahead"] == 1  # the stale one is no longer queued ahead of it
    with svc.db.session() as s:
        s.execute(update(Job).where(Job.id == second).values(heartbeat_at=utcnow()))
    assert not get(second)["stale"] and get(second)["waiting"] is None


@pytest.fixture(params=["filesystem", "redis"])
def broker(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "filesystem":
        yield "filesystem://"
    else:
        url = redis_url(db=11)
        redis_lib.Redis.from_url(url).flushdb()
        yield url
        redis_lib.Redis.from_url(url).flushdb()


def _depth_reaches(celery: Celery, n: int) -> None:
    """The API publishes after answering: wait for its messages."""
    wait_until(lambda: broker_depth(celery, INTERACTIVE) >= n, 30, lambda: broker_depth(celery, INTERACTIVE))


def _take(celery: Celery, queue: str) -> str | None:
    """The next job id on ``queue``, taken off the broker as a worker takes it (None: empty)."""
    with celery.connection_for_write() as conn:
        msg = conn.default_channel.basic_get(queue, no_ack=True)
    return None if msg is None else str(msg.decode()[0][0])


def test_a_busy_worker_never_floods_the_broker(make_service: Callable[..., Service], broker: str) -> None:
    """The worker is busy with a long job for 5 minutes (fake clock, a reaper sweep every 5 s):
    200 jobs queued behind it stay 200 messages, one whose message the broker lost is re-sent
    once, and afterwards every job runs exactly once."""
    svc = make_service(broker_url=broker, generate_chunk=1, max_batch_seeds=200, requeue_after_s=60,
                       stale_after_s=120)
    celery: Celery = svc.client.app.state.celery  # type: ignore[attr-defined]
    busy = svc.client.post("/generate", json={"seeds": [1000]}, headers=svc.op()).json()["job_id"]
    _depth_reaches(celery, 1)
    assert _take(celery, INTERACTIVE) == busy
    assert jobs.claim(svc.db, busy, "busy:1", svc.settings) is not None
    queued = svc.client.post("/batches", json={"count": 200, "steps": 1}, headers=svc.op()).json()["job_ids"]
    _depth_reaches(celery, 200)
    assert len(queued) == 200 and broker_depth(celery, INTERACTIVE) == 200
    lost = _take(celery, INTERACTIVE)  # the broker lost one message
    t0, depths, resent = utcnow(), [], []
    for sweep in range(61):
        now = t0 + timedelta(seconds=5 * sweep)
        with svc.db.session() as s:  # the busy worker's heartbeat
            s.execute(update(Job).where(Job.id == busy).values(heartbeat_at=now))
        resent += jobs.requeue_lost(svc.db, celery, svc.settings, now)
        depths.append(broker_depth(celery, INTERACTIVE))
    # One message re-sent, once, for the one lost. Which job lacks its message the broker cannot
    # say (a batch's jobs were sent at the same instant): the longest waiting is re-sent, which
    # may be another job; then the lost one is re-sent by a sweep once that duplicate is read.
    assert lost in queued and len(resent) == 1
    assert max(depths) <= 200 and depths[-1] == 200
    with svc.db.session() as s:
        s.execute(update(Job).where(Job.id == busy).values(status="succeeded"))
    runs: Counter[str] = Counter()
    later = t0 + timedelta(seconds=5 * 61)
    for _ in range(3):
        while (jid := _take(celery, INTERACTIVE)) is not None:
            if execute_job(jid, svc.worker) == "succeeded":
                runs[jid] += 1
        later += timedelta(seconds=10 * svc.settings.requeue_after_s)
        if not jobs.requeue_lost(svc.db, celery, svc.settings, later):
            break
    assert runs == Counter(queued)
    with svc.db.session() as s:
        rows = s.execute(select(Job.status, Job.attempts).where(Job.id.in_(queued)))
        assert set(rows) == {("succeeded", 1)}


def test_a_stopping_worker_lets_a_job_about_to_end_finish(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SIGTERM decision, from the job's progress so far: it should end within the grace
    period -> let it (a timer bounds the wait); it should not -> hand it back at once."""
    in_hand = tasks._JobInHand()
    in_hand.grace_s = 10.0
    armed: list[float] = []
    monkeypatch.setattr(tasks.signal, "getitimer", lambda _which: (0.0, 0.0))
    monkeypatch.setattr(tasks.signal, "setitimer", lambda _which, s: armed.append(s))

    class Beat:
        progress: float | None = None

    in_hand.job_id, in_hand.heartbeat = "j", Beat()  # type: ignore[assignment]
    in_hand.started = tasks.time.monotonic() - 30  # 30 s in
    with pytest.raises(tasks.WorkerStopping):  # no progress reported yet: no telling
        in_hand.on_sigterm(signal.SIGTERM, None)
    Beat.progress = 0.5  # 30 s more to go
    with pytest.raises(tasks.WorkerStopping):
        in_hand.on_sigterm(signal.SIGTERM, None)
    Beat.progress = 0.9  # about 3 s more
    in_hand.on_sigterm(signal.SIGTERM, None)
    assert armed == [10.0]
    with pytest.raises(tasks.WorkerStopping):  # ... and it did not end in time
        in_hand.on_grace_over(signal.SIGALRM, None)
