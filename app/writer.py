"""Group commit: the API's writing requests share one transaction per batch.

A POST that creates jobs spends most of its time in per-transaction work (a session, a thread
hop, BEGIN/COMMIT, the WAL write), not in its own rows. ``Writer.run(fn)`` queues ``fn``; one
drain task per event loop takes everything queued, runs the functions one after another in one
session in the thread pool, commits once, answers each caller, then publishes the new jobs' ids.
Under load a transaction carries tens of requests; alone, a request runs at once (no waiting
for company). It is also the write gate for SQLite, which has a single writer: this process's
writes never contend with each other in SQLite's busy handler.

Isolation between the requests of one batch: a function that raises (a 404, a 409, a bug) has
the whole transaction rolled back and the others run again in a new one without it, so nothing
of a failed request is committed. Functions must therefore be safe to run twice (they are:
get-or-create on unique keys, fresh job ids). A database error (connection lost, timeout) fails
the whole batch, each caller getting it (503).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from celery import Celery
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session

from app import jobs
from app.db import Database

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_BATCH = 64
"""Requests per transaction at most (bounds the time a batch holds SQLite's write lock)."""


class Tx:
    """What a write function gets: the batch's session, ids to publish once committed, and a memo
    shared by the batch (e.g. the default ensemble, looked up once)."""

    def __init__(self, s: Session, memo: dict[Any, Any]) -> None:
        self.s = s
        self.memo = memo
        self.publish: list[str] = []


class _Item(Generic[T]):
    __slots__ = ("fn", "future")

    def __init__(self, fn: Callable[[Tx], T], future: asyncio.Future[T]) -> None:
        self.fn, self.future = fn, future


def _database_error(exc: BaseException) -> bool:
    """An error of the database itself (not of one request's rows)."""
    return isinstance(exc, PoolTimeout) or (isinstance(exc, DBAPIError)
                                            and not isinstance(exc, IntegrityError))


class Writer:
    def __init__(self, db: Database, celery: Celery, max_batch: int = MAX_BATCH,
                 on_commit: Callable[[int], None] | None = None) -> None:
        self.db, self.celery, self.max_batch = db, celery, max_batch
        self.on_commit = on_commit  # called with the number of requests of each commit
        self._queue: list[_Item[Any]] = []
        self._drain: asyncio.Task[None] | None = None
        self.transactions = 0
        self.requests = 0

    async def run(self, fn: Callable[[Tx], T]) -> T:
        """Run ``fn`` in a shared transaction; its value once committed (or its exception)."""
        loop = asyncio.get_running_loop()
        item: _Item[T] = _Item(fn, loop.create_future())
        self._queue.append(item)
        if self._drain is None or self._drain.done() or self._drain.get_loop() is not loop:
            self._drain = loop.create_task(self._drain_queue())
        return await item.future

    async def _drain_queue(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            publish: list[str] = []
            try:
                outcomes, publish = await run_in_threadpool(self._execute, [it.fn for it in batch])
            except asyncio.CancelledError:  # shutting down: nobody is left to answer
                for it in batch + self._queue:
                    it.future.cancel()
                self._queue = []
                raise
            except Exception as exc:  # every caller must hear of it
                outcomes = [(False, exc)] * len(batch)
            for it, (ok, value) in zip(batch, outcomes, strict=True):
                if it.future.done():  # its request was cancelled (client gone)
                    continue
                if ok:
                    it.future.set_result(value)
                else:
                    it.future.set_exception(value)
            if publish:
                # After answering: the jobs are committed, and the reaper re-sends any whose
                # message is lost (this process dying now, the broker down).
                await run_in_threadpool(jobs.enqueue, self.celery, publish)

    def _execute(self, fns: list[Callable[[Tx], Any]]) -> tuple[list[tuple[bool, Any]], list[str]]:
        """Outcomes (ok, value or exception) in order, and the committed job ids to publish."""
        outcomes: dict[int, tuple[bool, Any]] = {}
        todo = list(range(len(fns)))
        while todo:
            memo: dict[Any, Any] = {}
            done: dict[int, Any] = {}
            publish: list[str] = []
            failed = None
            with self.db.sessions() as s:
                try:
                    for i in todo:
                        tx = Tx(s, memo)
                        try:
                            done[i] = fns[i](tx)
                            s.flush()
                        except Exception as exc:
                            if _database_error(exc):
                                raise
                            failed = i, exc
                            break
                        publish += tx.publish
                    if failed is None:
                        s.commit()
                    else:
                        s.rollback()
                except BaseException as exc:
                    with contextlib.suppress(Exception):  # the connection may be gone
                        s.rollback()
                    if not _database_error(exc):
                        raise
                    log.warning("write batch of %d request(s) failed: %s", len(todo), exc)
                    return [outcomes.get(i, (False, exc)) for i in range(len(fns))], []
            if failed is None:
                self.transactions += 1
                self.requests += len(todo)
                if self.on_commit is not None:
                    self.on_commit(len(todo))
                outcomes.update((i, (True, v)) for i, v in done.items())
                return [outcomes[i] for i in range(len(fns))], publish
            # Leave the failed request out and run the rest again (nothing was committed).
            i, err = failed
            outcomes[i] = (False, err)
            todo = [j for j in todo if j != i]
        return [outcomes[i] for i in range(len(fns))], []
