"""Concurrency of the API process: group commit (app.writer) -- concurrent writing requests
share transactions, and one request's failure leaves nothing of it behind while the others in
its batch still commit -- and the bounded thread pool of the hot reads (app.deps.ReadPool). On
SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import HTTPException
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from app.db import Database
from app.deps import ReadPool
from app.orm import Base, Generation, Job, Owner
from app.queue import make_celery
from app.settings import Settings
from app.writer import Tx, Writer
from tests.service.conftest import Backend, Service
from tests.service.services import empty_database

BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(params=BACKENDS)
def svc(request: pytest.FixtureRequest, make_service: Callable[..., Service]) -> Service:
    """The service on each database."""
    backend: Backend = request.param
    return make_service(database=backend)


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of each kind the service runs on."""
    with empty_database(request.param, tmp_path) as url:
        yield url


def _writer(tmp_path: Path, url: str, create: bool = True) -> Writer:
    settings = Settings(data_dir=tmp_path, broker_url="memory://", database_url=url)
    db = Database(settings.database_url)
    if create:
        Base.metadata.create_all(db.engine)
    return Writer(db, make_celery(settings))


def _owner(name: str, fail: Exception | None = None):
    def fn(tx: Tx) -> str:
        tx.s.add(Owner(name=name))
        tx.s.flush()  # written, then (maybe) fails: its row must not survive
        if fail is not None:
            raise fail
        return name
    return fn


def test_a_failing_request_leaves_nothing_and_the_batch_commits(tmp_path: Path, url: str) -> None:
    w = _writer(tmp_path, url)

    async def go() -> list[object]:
        return await asyncio.gather(
            w.run(_owner("a")), w.run(_owner("b", HTTPException(404, "no such thing"))), w.run(_owner("c")),
            w.run(_owner("d", ValueError("a bug"))), w.run(_owner("e")), return_exceptions=True)

    out = asyncio.run(go())
    assert out[0] == "a" and out[2] == "c" and out[4] == "e"
    assert isinstance(out[1], HTTPException) and out[1].status_code == 404
    assert isinstance(out[3], ValueError)
    with w.db.session() as s:
        assert sorted(s.scalars(select(Owner.name))) == ["a", "c", "e"]
    assert w.requests == 3 and w.transactions == 1  # one batch: the three good ones, committed once
    w.db.dispose()


def test_a_unique_violation_is_that_request_s_error(tmp_path: Path, url: str) -> None:
    w = _writer(tmp_path, url)

    async def go() -> list[object]:
        return await asyncio.gather(w.run(_owner("x")), w.run(_owner("x")), w.run(_owner("y")),
                                    return_exceptions=True)

    out = asyncio.run(go())
    assert out[0] == "x" and out[2] == "y"
    assert "UNIQUE" in str(out[1]) or "unique" in str(out[1])
    with w.db.session() as s:
        assert sorted(s.scalars(select(Owner.name))) == ["x", "y"]
    w.db.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_database_down_fails_every_request_of_the_batch(tmp_path: Path, backend: str) -> None:
    down = {"sqlite": f"sqlite:///{tmp_path / 'missing-dir' / 'no' / 'w.db'}",  # cannot be opened
            "postgres": "postgresql+psycopg://postgres@127.0.0.1:1/attrib"}[backend]  # nothing listens
    w = _writer(tmp_path, down, create=False)

    async def go() -> list[object]:
        return await asyncio.gather(w.run(_owner("a")), w.run(_owner("b")), return_exceptions=True)

    out = asyncio.run(go())
    assert all(isinstance(e, OperationalError) for e in out), out
    assert w.transactions == 0
    w.db.dispose()


def test_concurrent_generates_are_group_committed(svc: Service) -> None:
    """32 concurrent POST /generate through the ASGI app: each its own generation and queued job,
    in fewer transactions than requests; two requests with one Idempotency-Key in the same burst
    get one job."""
    app = svc.client.app
    writer: Writer = app.state.writer  # type: ignore[attr-defined]
    before = writer.transactions, writer.requests

    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                     headers=svc.op()) as c:
            reqs = [c.post("/generate", json={"seeds": [1000 + i], "steps": 2}) for i in range(30)]
            reqs += [c.post("/generate", json={"seeds": [7], "steps": 2}, headers={"Idempotency-Key": "k1"})
                     for _ in range(2)]
            return await asyncio.gather(*reqs)

    rs = asyncio.run(go())
    assert [r.status_code for r in rs] == [202] * 32, [r.text for r in rs if r.status_code != 202]
    ids = [r.json()["job_id"] for r in rs]
    assert len(set(ids[:30])) == 30 and ids[30] == ids[31]
    transactions, requests = writer.transactions - before[0], writer.requests - before[1]
    assert requests == 32 and transactions < requests
    with svc.db.session() as s:
        assert s.scalar(select(func.count()).select_from(Job).where(Job.id.in_(ids))) == 31
        assert s.scalar(select(func.count()).select_from(Generation).where(Generation.steps == 2)) == 31
    assert svc.run_jobs() == ["succeeded"] * 31  # each job samples its generation


@pytest.mark.parametrize("path", ["/generate", "/attribute", "/batches"])
def test_writing_routes_answer_404_without_writing(svc: Service, path: str) -> None:
    body = {"/generate": {"seeds": [1], "ensemble_id": 999},
            "/attribute": {"generation_id": 999},
            "/batches": {"seeds": [1, 2], "ensemble_id": 999}}[path]
    def counts() -> tuple[int | None, ...]:
        with svc.db.session() as s:
            return tuple(s.scalar(select(func.count()).select_from(t)) for t in (Job, Generation))

    before = counts()
    r = svc.client.post(path, json=body, headers=svc.op())
    assert r.status_code == 404, r.text
    assert counts() == before


def test_read_pool_bounds_the_threads_and_returns_in_order() -> None:
    """12 reads that block until released: once every one is either running or queued at the
    pool's limiter, exactly 3 run (no timing: the reads wait for the test, not for a sleep)."""
    pool = ReadPool(3)
    running = 0
    lock = threading.Lock()
    release = threading.Event()

    def read(i: int) -> int:
        nonlocal running
        with lock:
            running += 1
        assert release.wait(timeout=30), "never released"
        with lock:
            running -= 1
        return i * i

    async def go() -> list[int]:
        reads = asyncio.gather(*(pool.run(read, i) for i in range(12)))
        deadline = time.monotonic() + 30
        while True:  # until all 12 are accounted for: running, or waiting for a thread
            await asyncio.sleep(0.001)
            limiter = pool._limiter  # private: only the limiter knows how many wait for it
            stats = limiter.statistics() if limiter is not None else None
            if stats is not None and stats.tasks_waiting + running == 12 and running == stats.borrowed_tokens:
                break
            assert time.monotonic() < deadline, (running, stats)
        with lock:
            assert running == 3
        release.set()
        return await reads

    assert asyncio.run(go()) == [i * i for i in range(12)]
    release.clear()
    assert asyncio.run(go()) == [i * i for i in range(12)]  # a new event loop: a new limiter, the same bound
