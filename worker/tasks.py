"""The one Celery task: run a job by id. Thin glue over worker.engine.

Transient errors (database or broker connection lost) put the job back in the queue and
retry with back-off; anything else fails the job with its message, once, for good.
A worker killed mid-job leaves it ``running`` without heartbeat: the message is redelivered
(acks_late, reject_on_worker_lost) or re-sent by the API's reaper, and the next claim counts
another attempt.

A worker stopped by SIGTERM (docker stop, systemd, Ctrl-C of `attrib serve`) lets the job in
hand finish when its progress says it will within ``stop_grace_s``; otherwise, or when the grace
runs out, the job is handed back at once: queued, at the front of its queue, the attempt not
counted (app.jobs.hand_back).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from types import FrameType
from typing import Any

from billiard.process import active_children
from celery import signals
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import update
from sqlalchemy.exc import DBAPIError, OperationalError

from app import jobs
from app.db import Database
from app.orm import Attribution, Job
from app.queue import TASK_NAME
from app.runtime import tune_malloc
from app.settings import Settings, get_settings
from worker.celery_app import celery
from worker.engine import RUNNERS, EngineCache, JobError

log = logging.getLogger(__name__)
TRANSIENT = (OperationalError, ConnectionError, TimeoutError)


class WorkerState:
    """Per-process state: database handle and loaded ensembles (created lazily after fork)."""

    def __init__(self, settings: Settings) -> None:
        import torch

        tune_malloc()
        if settings.worker_threads > 0:
            torch.set_num_threads(settings.worker_threads)
        self.settings = settings
        self.db = Database(settings.database_url)
        self.cache = EngineCache(settings)
        self.name = f"{socket.gethostname()}:{os.getpid()}"


_state: WorkerState | None = None


def state() -> WorkerState:
    global _state
    if _state is None or _state.name.rsplit(":", 1)[1] != str(os.getpid()):
        _state = WorkerState(get_settings())
    return _state


class _Heartbeat:
    """Touches the job row every ``heartbeat_s`` while it runs, and records progress."""

    def __init__(self, st: WorkerState, job_id: str) -> None:
        self.st, self.job_id = st, job_id
        self.progress: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.st.settings.heartbeat_s):
            self.beat()

    def beat(self) -> None:
        try:
            jobs.heartbeat(self.st.db, self.job_id, self.st.name, self.progress)
        except Exception as exc:  # a missed heartbeat is not fatal
            log.warning("heartbeat for job %s failed: %s", self.job_id, exc)

    def set(self, p: float) -> None:
        self.progress = p
        self.beat()

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class WorkerStopping(BaseException):
    """Raised in the job's thread when the worker stops before the job would finish. A
    BaseException, so that no ``except Exception`` of a runner takes it for the job's failure."""


class _JobInHand:
    """The job this process is running, for the SIGTERM handler (signal handlers run in the main
    thread, where the job runs, between two Python steps)."""

    def __init__(self) -> None:
        self.job_id: str | None = None
        self.started = 0.0
        self.heartbeat: _Heartbeat | None = None
        self.grace_s = 0.0
        self.installed_in: int | None = None  # the process whose SIGTERM handler this is
        self.previous: Any = signal.SIG_DFL  # the handler it replaced (billiard's clean exit)

    def remaining_s(self) -> float:
        """Seconds the job should still take, from its progress so far (inf: none yet)."""
        p = self.heartbeat.progress if self.heartbeat is not None else None
        if not p or p <= 0:
            return float("inf")
        return (time.monotonic() - self.started) * (1 - min(p, 1.0)) / p

    def on_sigterm(self, _signum: int, _frame: FrameType | None) -> None:
        if self.job_id is None:  # nothing in hand: stop as a pool process always has
            if callable(self.previous):
                self.previous(_signum, _frame)
                return
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if signal.getitimer(signal.ITIMER_REAL)[0] > 0:
            return  # already finishing within its grace
        if self.remaining_s() <= self.grace_s:
            log.info("stopping: job %s should finish within %g s; letting it", self.job_id, self.grace_s)
            signal.setitimer(signal.ITIMER_REAL, self.grace_s)
            return
        raise WorkerStopping

    def on_grace_over(self, _signum: int, _frame: FrameType | None) -> None:
        if self.job_id is not None:
            raise WorkerStopping


_in_hand = _JobInHand()


@signals.task_prerun.connect
def _install_stop_handlers(**_: Any) -> None:
    """In the pool process, before its first job (billiard sets its own SIGTERM handler after
    Celery's process-init hooks have run): SIGTERM hands the job back instead of killing it."""
    if _in_hand.installed_in != os.getpid():
        _in_hand.grace_s = get_settings().stop_grace_s
        _in_hand.previous = signal.signal(signal.SIGTERM, _in_hand.on_sigterm)
        signal.signal(signal.SIGALRM, _in_hand.on_grace_over)
        _in_hand.installed_in = os.getpid()


_consumer: list[Any] = []  # the main process's Celery consumer, once the worker is ready


@signals.worker_ready.connect
def _keep_consumer(sender: Any = None, **_: Any) -> None:
    _consumer[:] = [sender]


@signals.worker_shutting_down.connect
def _stop_pool_processes(**_: Any) -> None:
    """In the worker's main process, on a warm shutdown: stop taking messages, then pass the stop
    to the pool processes, which run the jobs. A SIGTERM sent to the main process alone (docker
    stop) would otherwise wait for every job to end however long it takes; and a job handed back
    to the front of its queue must not be taken again by this stopping worker."""
    for consumer in _consumer:
        try:
            for queue in list(consumer.task_consumer.queues):
                consumer.task_consumer.cancel_by_queue(queue.name)
        except Exception as exc:  # stopping goes on regardless
            log.warning("could not stop consuming before shutdown: %s", exc)
    for child in active_children():
        if child.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)


def execute_job(job_id: str, st: WorkerState | None = None) -> str:
    """Run one job to a terminal state, or raise a transient error. Returns the final status
    ("skipped" when the job is not ours to run, "handed back" when the worker stopped first).
    Safe to call any number of times."""
    st = st or state()
    job = jobs.claim(st.db, job_id, st.name, st.settings)
    if job is None:
        return "skipped"
    runner = RUNNERS.get(job.kind)
    try:
        if runner is None:
            raise JobError(f"unknown job kind {job.kind!r}")
        with _Heartbeat(st, job.id) as hb:
            _in_hand.job_id, _in_hand.started, _in_hand.heartbeat = job.id, time.monotonic(), hb
            try:
                runner(st.db, st.cache, job, hb.set)
            finally:
                _in_hand.job_id, _in_hand.heartbeat = None, None
                signal.setitimer(signal.ITIMER_REAL, 0)
        return "succeeded"
    except WorkerStopping:
        jobs.hand_back(st.db, celery, job.id, st.name)
        log.info("stopping: job %s handed back (queued, first in its queue)", job.id)
        return "handed back"
    except TRANSIENT:
        _requeue(st, job)
        raise
    except SoftTimeLimitExceeded:
        _fail(st, job, f"time limit of {st.settings.job_soft_time_limit_s} s exceeded")
        return "failed"
    except JobError as exc:
        _fail(st, job, str(exc))
        return "failed"
    except DBAPIError as exc:
        _fail(st, job, f"database error: {exc.orig}")
        return "failed"
    except Exception as exc:
        log.exception("job %s failed", job.id)
        _fail(st, job, f"{type(exc).__name__}: {exc}")
        return "failed"


def _requeue(st: WorkerState, job: Job) -> None:
    try:
        with st.db.session() as s:
            s.execute(update(Job).where(Job.id == job.id, Job.status == "running")
                      .values(status="queued", worker=None))
    except Exception as exc:  # the database itself is down: the reaper re-sends later
        log.warning("could not re-queue job %s: %s", job.id, exc)


def _fail(st: WorkerState, job: Job, error: str) -> None:
    jobs.fail(st.db, job.id, error)
    if job.kind == "attribute":
        with st.db.session() as s:
            s.execute(update(Attribution).where(Attribution.id == int(job.payload["attribution_id"]))
                      .values(status="failed"))


@celery.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True,
             autoretry_for=TRANSIENT, retry_backoff=2, retry_backoff_max=60, max_retries=10)
def run_job(self: Any, job_id: str) -> str:
    return execute_job(job_id)
