"""Job life cycle, shared by the API (create, enqueue, re-send lost) and the worker (claim,
heartbeat, finish). The job row is the source of truth; the broker carries only its id.

    queued --claim--> running --finish--> succeeded
                         |  \\--fail----> failed
                         \\-- worker lost (no heartbeat) --> re-sent, claimed again
                              (attempts counted; past job_max_attempts -> failed for good)
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from typing import Any, cast

from celery import Celery
from sqlalchemy import Table, insert, or_, select, update
from sqlalchemy.orm import Session

from app.db import Database
from app.orm import Job, utcnow
from app.queue import publish
from app.settings import Settings

log = logging.getLogger(__name__)


def new_job(s: Session, kind: str, payload: dict[str, Any], *, batch_id: int | None = None,
            idempotency_key: str | None = None, done: dict[str, Any] | None = None) -> str:
    """Insert a queued job (or, with ``done``, one already succeeded with that result) in the
    caller's transaction; returns its id. An ``idempotency_key`` in use raises IntegrityError."""
    now = utcnow()
    values: dict[str, Any] = dict(id=str(uuid.uuid4()), kind=kind, status="queued", payload=payload,
                                  batch_id=batch_id, idempotency_key=idempotency_key, created_at=now,
                                  updated_at=now, enqueued_at=now)
    if done is not None:
        values.update(status="succeeded", progress=1.0, result=done, finished_at=now)
    s.connection().execute(_INSERT_JOB, values)
    return str(values["id"])


_INSERT_JOB = insert(cast(Table, Job.__table__))  # Core, compiled once (the ORM's insert compiles per call)


def enqueue(celery: Celery, job_ids: list[str]) -> int:
    """Publish job ids (after their rows are committed); returns how many were sent. A failure
    leaves the jobs queued: the reaper re-sends them after ``requeue_after_s``."""
    sent = 0
    try:
        with celery.producer_or_acquire() as producer:  # one producer for all of them
            for jid in job_ids:
                publish(celery, jid, producer)
                sent += 1
    except Exception as exc:  # broker down: the jobs are safe in the database
        log.warning("could not publish %d job(s), from %s (%s); the reaper will re-send them",
                    len(job_ids) - sent, job_ids[sent] if sent < len(job_ids) else "-", exc)
    return sent


def requeue_lost(db: Database, celery: Celery, settings: Settings) -> list[str]:
    """Re-send jobs whose message was lost: queued with no activity for ``requeue_after_s``, or
    running with no heartbeat for ``stale_after_s`` (the worker died). Safe to run anywhere and
    concurrently: a duplicate message is harmless (claim is atomic)."""
    now = utcnow()
    queued_cut = now - timedelta(seconds=settings.requeue_after_s)
    stale_cut = now - timedelta(seconds=settings.stale_after_s)
    with db.session() as s:
        ids = list(s.scalars(select(Job.id).where(or_(
            (Job.status == "queued") & (Job.updated_at < queued_cut),
            (Job.status == "running") & (Job.heartbeat_at < stale_cut),
        )).limit(500)))
        if ids:
            # Touch them first, so the next sweep waits a full period again.
            s.execute(update(Job).where(Job.id.in_(ids)).values(updated_at=now, enqueued_at=now))
    if ids:
        log.info("re-sending %d lost job(s)", len(ids))
        enqueue(celery, ids)
    return ids


def claim(db: Database, job_id: str, worker: str, settings: Settings) -> Job | None:
    """Atomically take ``job_id`` for this worker, or None when it is not ours to run
    (finished, failed, or running in another process with a fresh heartbeat). Each claim counts an
    attempt; past ``job_max_attempts`` the job is failed for good instead."""
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
                    heartbeat_at=now, updated_at=now)
        )
        if res.rowcount != 1:  # type: ignore[attr-defined]
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
