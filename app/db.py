"""Engine and sessions: SQLite (embedded) or PostgreSQL, same code."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

MAX_SESSIONS = 32
"""Requests holding a session at once in one API process (app.deps.SessionDep)."""
POOL_SIZE = MAX_SESSIONS + 8  # + key lookups, the reaper, readiness checks


def make_engine(url: str, **kw: Any) -> Engine:
    """An engine with the settings the service relies on.

    SQLite: WAL (readers never block the one writer), foreign keys on, a busy timeout so
    concurrent writers wait instead of failing. PostgreSQL: a connection idle for a second is
    pinged before use so a restarted server is noticed, and short connect/statement timeouts
    so a lost database fails requests fast.
    """
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               pool_size=POOL_SIZE, max_overflow=10, **kw)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    connect_args: dict[str, Any] = {}
    if url.startswith("postgresql"):
        connect_args = {"connect_timeout": 3, "options": "-c statement_timeout=30000"}
    engine = create_engine(url, pool_size=POOL_SIZE, max_overflow=10, pool_timeout=5,
                           connect_args=connect_args, **kw)
    _ping_when_idle(engine)
    return engine


PING_IF_IDLE_S = 1.0


def _ping_when_idle(engine: Engine) -> None:
    """Pre-ping a pooled connection only when it sat idle for PING_IF_IDLE_S: a server restart
    is still noticed before use, but a busy pool does not pay a round trip per checkout.
    A connection broken within that second fails its statement, and SQLAlchemy then
    invalidates the whole pool (disconnect detection): a 503 once, then fresh connections."""

    @event.listens_for(engine, "checkin")
    def _used(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since < PING_IF_IDLE_S:
            return
        try:
            cur = dbapi_conn.cursor()
            cur.execute("SELECT 1")
            cur.close()
            dbapi_conn.rollback()
        except Exception as exc:  # the pool drops it and checks out another (or connects anew)
            raise DisconnectionError(str(exc)) from exc


class Database:
    """One engine and its session factory."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        # The same pool, each statement its own transaction: no BEGIN/ROLLBACK round trips for
        # the hot reads (a statement sees one consistent snapshot).
        self.reads = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        with self.sessions() as s:
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

    def ping(self) -> None:
        with self.engine.connect() as c:
            c.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()


def dialect_insert(dialect: str) -> Any:
    """The INSERT construct with ON CONFLICT support of a dialect (PostgreSQL's or SQLite's)."""
    return pg_insert if dialect == "postgresql" else sqlite_insert


def insert_ignore(s: Session, table: Any, rows: list[dict[str, Any]], chunk: int = 500) -> None:
    """INSERT ... ON CONFLICT DO NOTHING: rows created concurrently elsewhere are simply kept."""
    insert = dialect_insert(s.get_bind().dialect.name)
    for lo in range(0, len(rows), chunk):
        s.execute(insert(table).values(rows[lo : lo + chunk]).on_conflict_do_nothing())
