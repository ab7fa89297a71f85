"""Job life cycle, shared by the API (create, enqueue, re-send lost) and the worker (claim,
heartbeat, finish, hand back). The job row is the source of truth; the broker carries only
its id, on the job's queue (app.queue: interactive or long).

    queued --claim--> running --finish--> succeeded
      ^                  |  \\--fail----> failed
      |                  |\\-- worker stopped (SIGTERM) --> handed back: queued, at the front,
      |                  |                                  the attempt not counted
      \\------------------\\-- worker lost (no heartbeat) --> re-sent, claimed again
                              (attempts counted; past job_max_attempts -> failed for good)

Delivery is tracked: ``enqueued_at`` is when a message was last sent, ``delivered_at`` when a
worker last received one. A job sent and not received since is waiting in the broker, not lost:
the reaper re-sends such jobs only when the broker holds fewer messages than there are of them.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from celery import Celery
from sqlalchemy import Table, func, insert, or_, select, update
from sqlalchemy.orm import Session

from app.db import Database
from app.orm import Batch, Job, utcnow
from app.queue import INTERACTIVE, QUEUES, broker_depth, publish, queue_for
from app.schemas import JobPublic
from app.settings import Settings

log = logging.getLogger(__name__)
RESEND_AT_MOST = 500  # jobs re-sent by one sweep of the reaper, per rule and queue


class JobRef(str):
    """A job id that knows its queue: what new_job returns, so publishing it needs no lookup."""

    queue: str

    def __new__(cls, job_id: str, queue: str) -> JobRef:
        ref = super().__new__(cls, job_id)
        ref.queue = queue
        return ref


def new_job(s: Session, kind: str, payload: dict[str, Any], *, batch_id: int | None = None,
            idempotency_key: str | None = None, done: dict[str, Any] | None = None) -> str:
    """Insert a queued job (or, with ``done``, one already succeeded with that result) in the
    caller's transaction; returns its id, as a JobRef (typed str: callers keep it as an id). An
    ``idempotency_key`` in use raises IntegrityError."""
    now = utcnow()
    batch = s.get(Batch, batch_id) if batch_id is not None else None  # in the session: no query
    queue = queue_for(kind, batch.total if batch is not None else None)
    values: dict[str, Any] = dict(id=str(uuid.uuid4()), kind=kind, queue=queue, status="queued",
                                  payload=payload, batch_id=batch_id, idempotency_key=idempotency_key,
                                  created_at=now, updated_at=now, enqueued_at=now)
    if done is not None:
        values.update(status="succeeded", progress=1.0, result=done, finished_at=now)
    s.connection().execute(_INSERT_JOB, values)
    return JobRef(values["id"], queue)


_INSERT_JOB = insert(cast(Table, Job.__table__))  # Core, compiled once (the ORM's insert compiles per call)


def enqueue(celery: Celery, job_ids: Sequence[str]) -> int:
    """Publish job ids (after their rows are committed) to their queues (a plain id, not a
    JobRef, goes to the interactive queue); returns how many were sent. A failure leaves the
    jobs queued: the reaper finds them missing from the broker and re-sends them."""
    sent = 0
    try:
        with celery.producer_or_acquire() as producer:  # one producer for all of them
            for jid in job_ids:
                publish(celery, jid, getattr(jid, "queue", INTERACTIVE), producer)
                sent += 1
    except Exception as exc:  # broker down: the jobs are safe in the database
        log.warning("could not publish %d job(s), from %s (%s); the reaper will re-send them",
                    len(job_ids) - sent, job_ids[sent] if sent < len(job_ids) else "-", exc)
    return sent


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)  # SQLite gives naive UTC


def _awaiting_delivery() -> Any:
    """Jobs with a message sent that no worker has received since."""
    return Job.enqueued_at.is_not(None) & (Job.delivered_at.is_(None) | (Job.delivered_at < Job.enqueued_at))


def requeue_lost(db: Database, celery: Celery, settings: Settings, now: datetime | None = None) -> list[str]:
    """Re-send the jobs whose message is lost; returns their ids. Three cases:

    * received by a worker that did not run it (the worker died between the two, or a
      transient error's retry was lost): queued, delivered ``requeue_after_s`` ago and not
      re-sent since;
    * running with no heartbeat for ``stale_after_s`` (its worker died), whose last message was
      received: re-sent once, and again only after that message reached a worker;
    * waiting in the broker: not lost, unless the broker holds fewer messages of its queue than
      there are jobs awaiting delivery on it (a broker restarted empty, a publish that failed).
      Then as many as are missing are re-sent, longest waiting first, each backing off: it is
      re-sent only after waiting at least as long again as it had waited before.

    A job therefore has at most one re-sent message outstanding, and the broker never holds
    more messages than there are jobs awaiting delivery. Safe to run anywhere and concurrently:
    a duplicate message is harmless (claim is atomic)."""
    now = now or utcnow()
    requeue_cut = now - timedelta(seconds=settings.requeue_after_s)
    stale_cut = now - timedelta(seconds=settings.stale_after_s)
    received = Job.delivered_at.is_not(None) & (Job.enqueued_at.is_(None)
                                                 | (Job.delivered_at >= Job.enqueued_at))
    picked: dict[str, list[str]] = {q: [] for q in QUEUES}
    with db.session() as s:
        for jid, queue in s.execute(select(Job.id, Job.queue).where(or_(
                (Job.status == "queued") & received & (Job.delivered_at < requeue_cut),
                (Job.status == "running") & received & (Job.heartbeat_at < stale_cut)
                & (Job.enqueued_at.is_(None) | (Job.enqueued_at < stale_cut)),
        )).limit(RESEND_AT_MOST)):
            picked[queue].append(jid)
        for queue in QUEUES:
            picked[queue] += _missing_from_broker(s, celery, queue, now, settings.requeue_after_s)
        ids = [jid for q in QUEUES for jid in picked[q]]
        if ids:
            # Marked sent first: the next sweep sees them awaiting delivery.
            s.execute(update(Job).where(Job.id.in_(ids)).values(enqueued_at=now))
    if ids:
        log.info("re-sending %d lost job(s)", len(ids))
        enqueue(celery, [JobRef(jid, q) for q in QUEUES for jid in picked[q]])
    return ids


def _missing_from_broker(s: Session, celery: Celery, queue: str, now: datetime,
                         requeue_after_s: float) -> list[str]:
    """Jobs of ``queue`` to re-send because the broker lacks their messages (see requeue_lost)."""
    grace = now - timedelta(seconds=requeue_after_s)
    # The depth first: a job counted below was sent before it was measured, so its message,
    # unless lost, was in the broker then (it has not been received since).
    depth = broker_depth(celery, queue)
    waiting = (Job.queue == queue) & Job.status.in_(("queued", "running")) & _awaiting_delivery() \
        & (Job.enqueued_at < grace)
    missing = int(s.scalar(select(func.count()).select_from(Job).where(waiting)) or 0) - depth
    if missing <= 0:
        return []
    out: list[str] = []
    rows = s.execute(select(Job.id, Job.created_at, Job.enqueued_at).where(waiting)
                     .order_by(Job.enqueued_at).limit(RESEND_AT_MOST))
    for jid, created, sent in rows:
        assert sent is not None  # selected by enqueued_at < grace
        before = (_aware(sent) - _aware(created)).total_seconds()  # waited before its last send
        if (now - _aware(sent)).total_seconds() >= max(requeue_after_s, before):
            out.append(jid)
            if len(out) == missing:
                break
    return out


def claim(db: Database, job_id: str, worker: str, settings: Settings) -> Job | None:
    """Atomically take ``job_id`` for this worker, or None when it is not ours to run
    (finished, failed, or running in another process with a fresh heartbeat). Either way the
    job's message counts as received. Each claim counts an attempt; past ``job_max_attempts``
    the job is failed for good instead."""
    now = utcnow()
    stale_cut = now - timedelta(seconds=settings.stale_after_s)
    with db.session() as s:
        res = s.execute(
            update(Job)
            .where(Job.id == job_id)
            .where(or_(Job.status == "queued",
                       # stale: its worker died; or ours: this process runs one job at a time,
                       # so a run of ours still marked running was interrupted (a retry).
                       (Job.status == "running") & ((Job.heartbeat_at < stale_cut) | (Job.worker == worker))))
            .values(status="running", attempts=Job.attempts + 1, worker=worker, started_at=now,
                    heartbeat_at=now, updated_at=now, delivered_at=now)
        )
        if res.rowcount != 1:  # type: ignore[attr-defined]
            s.execute(update(Job).where(Job.id == job_id, Job.status.in_(("queued", "running")))
                      .values(delivered_at=now))
            return None
        job = s.get(Job, job_id)
        assert job is not None
        if job.attempts > settings.job_max_attempts:
            job.status, job.finished_at = "failed", now
            job.error = (f"gave up after {settings.job_max_attempts} attempts: the worker was lost "
                         f"each time (killed, out of memory, or past its time limit)")
            return None
        s.expunge(job)
        return job


def hand_back(db: Database, celery: Celery, job_id: str, worker: str) -> bool:
    """A stopping worker gives its job back: queued again, this attempt not counted, sent to the
    front of its queue so it runs next. False when the job was no longer this worker's."""
    now = utcnow()
    with db.session() as s:
        res = s.execute(update(Job).where(Job.id == job_id, Job.status == "running", Job.worker == worker)
                        .values(status="queued", worker=None, attempts=Job.attempts - 1, progress=0.0,
                                heartbeat_at=None, updated_at=now, enqueued_at=now))
        if res.rowcount != 1:  # type: ignore[attr-defined]
            return False
        queue = s.scalar(select(Job.queue).where(Job.id == job_id))
    try:
        publish(celery, job_id, queue or INTERACTIVE, first=True)
    except Exception as exc:  # the broker is down: the reaper finds it missing and re-sends it
        log.warning("handed back job %s but could not publish it: %s", job_id, exc)
    return True


def heartbeat(db: Database, job_id: str, worker: str, progress: float | None = None) -> None:
    values: dict[str, Any] = {"heartbeat_at": utcnow(), "updated_at": utcnow()}
    if progress is not None:
        values["progress"] = max(0.0, min(1.0, progress))
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id, Job.status == "running", Job.worker == worker)
                  .values(**values))


def finish(s: Session, job_id: str, result: dict[str, Any]) -> None:
    """Mark succeeded, in the caller's transaction (with the results it writes)."""
    now = utcnow()
    s.execute(update(Job).where(Job.id == job_id).values(
        status="succeeded", progress=1.0, result=result, error=None, finished_at=now, updated_at=now))


def fail(db: Database, job_id: str, error: str) -> None:
    now = utcnow()
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id, Job.status.in_(("queued", "running"))).values(
            status="failed", error=error[:4000], finished_at=now, updated_at=now))


def job_public(s: Session, job: Job, settings: Settings) -> JobPublic:
    """GET /jobs/{id}: the row, with why it waits (queued behind N jobs of its queue) and whether
    a running job has gone stale (no heartbeat for stale_after_s: its worker is presumably lost)."""
    out = JobPublic.model_validate(job, from_attributes=True)
    if job.status == "queued":
        sent = job.enqueued_at or job.created_at
        ahead = int(s.scalar(select(func.count()).select_from(Job).where(
            Job.queue == job.queue, Job.status == "queued", Job.enqueued_at < sent)) or 0)
        out.ahead = ahead
        out.waiting = f"queued behind {ahead} job(s) of the {job.queue} queue"
    elif job.status == "running" and job.heartbeat_at is not None:
        silent = (utcnow() - _aware(job.heartbeat_at)).total_seconds()
        if silent > settings.stale_after_s:
            out.stale = True
            out.waiting = (f"stale: no heartbeat from its worker for {silent:.0f} s (over stale_after_s="
                           f"{settings.stale_after_s:g}); presumed lost, it is re-sent to run again")
    return out
