"""Request dependencies: settings, a database session, the caller."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Annotated, Any, Generic, TypeVar

import anyio
from celery import Celery
from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.auth import Principal, authenticate, hash_key
from app.db import MAX_SESSIONS, Database
from app.orm import OptOut
from app.settings import Settings
from app.writer import Writer

T = TypeVar("T")
V = TypeVar("V")
Clock = Callable[[], float]
"""Seconds on a monotonic scale: ``time.monotonic``, or a test's own clock (no sleeping)."""

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="or X-API-Key: <API key>")


# Trivial dependencies are async: no trip to the thread pool.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def get_db(request: Request) -> Database:
    return request.app.state.db  # type: ignore[no-any-return]


async def get_celery(request: Request) -> Celery:
    return request.app.state.celery  # type: ignore[no-any-return]


def get_session(request: Request) -> Iterator[Session]:
    db: Database = request.app.state.db
    with db.session() as s:
        yield s


async def get_writer(request: Request) -> Writer:
    return request.app.state.writer  # type: ignore[no-any-return]


class ReadPool:
    """The hot read routes' database work (key lookups, rankings, influence lists) in at most
    ``threads`` threads at once. With FastAPI's default (40) every waiting request gets a
    thread, and 30-odd threads fight for the GIL: the influence list at 32 clients had p99
    100-125 ms for a p50 of 26-31 ms, and 39 ms with 2 threads (bench/api.py --phases influence,
    same busy machine). One limiter per event loop."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._limiter: anyio.CapacityLimiter | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        if self._limiter is None or self._loop is not loop:
            self._limiter, self._loop = anyio.CapacityLimiter(self.threads), loop
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)


class TTLCache(Generic[V]):
    """Values by key for ``ttl`` seconds (math.inf: until evicted), at most ``size``, least
    recently used dropped first. Used from the event loop only (no lock)."""

    def __init__(self, ttl: float, size: int = 10_000, clock: Clock = time.monotonic) -> None:
        self.ttl, self.size, self.clock = ttl, size, clock
        self._items: OrderedDict[Hashable, tuple[float, V]] = OrderedDict()

    def get(self, key: Hashable) -> V | None:
        hit = self._items.get(key)
        if hit is None or hit[0] <= self.clock():
            return None
        self._items.move_to_end(key)
        return hit[1]

    def put(self, key: Hashable, value: V) -> None:
        if self.ttl <= 0:
            return
        self._items[key] = (self.clock() + self.ttl, value)
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def discard(self, key: Hashable) -> None:
        self._items.pop(key, None)


BodyCache = TTLCache[bytes]
"""Response bodies (JSON or HTML) by key."""


class Withdrawals:
    """How many works are withdrawn (opt-outs), re-read at most every ``ttl`` seconds per API
    process: part of the key of a cached ranking, whose entries mark withdrawn works (so a
    withdrawal shows in rankings within ``ttl``)."""

    def __init__(self, ttl: float, clock: Clock = time.monotonic) -> None:
        self.ttl, self.clock = ttl, clock
        self._read_at = -math.inf
        self._count = 0

    def fresh(self) -> int | None:
        """The count, if read within ``ttl``."""
        return self._count if self.clock() - self._read_at < self.ttl else None

    def read(self, db: Database) -> int:
        with db.session() as s:
            count = s.scalar(select(func.count()).select_from(OptOut)) or 0
        self._count, self._read_at = count, self.clock()
        return count


async def get_reads(request: Request) -> ReadPool:
    return request.app.state.reads  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_settings)]
ReadsDep = Annotated[ReadPool, Depends(get_reads)]
# At most MAX_SESSIONS requests hold a session at once (the rest wait without a thread), and the
# session ends with the handler, before the response is sent. The connection pool is larger
# (app.db), so a thread never waits for a connection that a thread-less request holds.
SessionDep = Annotated[Session, Depends(get_session, scope="function", max_concurrency=MAX_SESSIONS)]
WriterDep = Annotated[Writer, Depends(get_writer)]
DatabaseDep = Annotated[Database, Depends(get_db)]
CeleryDep = Annotated[Celery, Depends(get_celery)]


class KeyCache:
    """Recently authenticated keys (by hash) for ``ttl`` seconds: one DB lookup per key per
    TTL instead of per request. Revocation therefore takes effect within ``ttl``."""

    def __init__(self, ttl: float, clock: Clock = time.monotonic) -> None:
        self.ttl, self.clock = ttl, clock
        self._hits: dict[str, tuple[float, Principal | None]] = {}

    def get(self, key: str) -> tuple[bool, Principal | None]:
        hit = self._hits.get(hash_key(key))
        if hit is None or self.clock() - hit[0] > self.ttl:
            return False, None
        return True, hit[1]

    def put(self, key: str, p: Principal | None) -> None:
        if len(self._hits) > 10_000:
            self._hits.clear()
        self._hits[hash_key(key)] = (self.clock(), p)


async def get_principal(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header: Annotated[str | None, Depends(_header)],
) -> Principal:
    if bearer is None and "authorization" in request.headers:
        # Not ignored in favour of X-API-Key: a client whose credentials are malformed must know.
        raise HTTPException(401, "Authorization header is not 'Bearer <API key>'",
                            headers={"WWW-Authenticate": "Bearer"})
    key = bearer.credentials if bearer is not None else header
    if bearer is not None and header is not None and bearer.credentials != header:
        raise HTTPException(401, "two different API keys (Authorization and X-API-Key): send one",
                            headers={"WWW-Authenticate": "Bearer"})
    if not key:
        raise HTTPException(401, "missing API key (Authorization: Bearer <key> or X-API-Key)",
                            headers={"WWW-Authenticate": "Bearer"})
    settings: Settings = request.app.state.settings
    cache: KeyCache = request.app.state.key_cache
    found, p = cache.get(key) if cache.ttl > 0 else (False, None)
    if not found:
        p = await request.app.state.reads.run(_lookup, request.app.state.db, key, settings.operator_key)
        if cache.ttl > 0:
            cache.put(key, p)
    if p is None:
        raise HTTPException(401, "invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})
    return p


def _lookup(db: Database, key: str, operator_key: str | None) -> Principal | None:
    with db.session() as s:
        return authenticate(s, key, operator_key)


async def require_operator(p: Annotated[Principal, Depends(get_principal)]) -> Principal:
    if not p.is_operator:
        raise HTTPException(403, "operator route: a rights holder's key cannot use it")
    return p


async def require_owner(p: Annotated[Principal, Depends(get_principal)]) -> Principal:
    if p.is_operator:
        raise HTTPException(403, "rights-holder route: use a rights holder's key")
    return p


OperatorDep = Annotated[Principal, Depends(require_operator)]
OwnerDep = Annotated[Principal, Depends(require_owner)]


class RateLimiter:
    """Token buckets per key: ``burst`` requests at once, refilled at ``per_minute``. In-process
    (each API process limits on its own)."""

    def __init__(self, per_minute: float, burst: int, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self.rate = per_minute / 60.0
        self.burst = float(max(1, burst))
        self._buckets: dict[object, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, who: object) -> float:
        """0 when allowed, else the seconds until a request would be."""
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.get(who, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[who] = (tokens - 1.0, now)
                return 0.0
            self._buckets[who] = (tokens, now)
            return (1.0 - tokens) / self.rate


async def rate_limited(request: Request, p: OperatorDep) -> Principal:
    limiter: RateLimiter = request.app.state.rate_limiter
    wait = limiter.take(p.key_id if p.key_id is not None else "env-operator")
    if wait > 0:
        raise HTTPException(429, f"rate limit: at most {limiter.burst:g} requests at once and "
                            f"{limiter.rate * 60:g} per minute per key "
                            "(rate_limit_burst, rate_limit_per_minute)",
                            headers={"Retry-After": str(max(1, math.ceil(wait)))})
    return p


LimitedOperatorDep = Annotated[Principal, Depends(rate_limited)]
