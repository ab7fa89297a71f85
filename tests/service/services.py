"""Real PostgreSQL and Redis (and tools such as docker-compose) for integration tests: skipped
when absent, unless ATTRIB_REQUIRE_SERVICES=1 (CI), where absence is a failure naming what is missing."""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

PG_HOST = os.environ.get("ATTRIB_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")
REDIS_HOST = os.environ.get("ATTRIB_TEST_REDIS", "redis://127.0.0.1:6379")
REQUIRED = os.environ.get("ATTRIB_REQUIRE_SERVICES") == "1"


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require(name: str, host: str, port: int) -> None:
    if _reachable(host, port):
        return
    msg = f"{name} is not reachable at {host}:{port}"
    if REQUIRED:
        pytest.fail(f"{msg} (ATTRIB_REQUIRE_SERVICES=1)")
    pytest.skip(msg)


def require_tool(name: str, install: str) -> str:
    """The path of the command ``name``; absent, a failure naming it under ATTRIB_REQUIRE_SERVICES=1
    (CI installs it: a skip there would hide a test CI is meant to run), else a skip."""
    path = shutil.which(name)
    if path is not None:
        return path
    msg = f"{name} is not installed ({install})"
    if REQUIRED:
        pytest.fail(f"{msg} (ATTRIB_REQUIRE_SERVICES=1)")
    pytest.skip(msg)


@contextmanager
def fresh_postgres() -> Iterator[str]:
    """A new, empty database on the test server; dropped afterwards."""
    import psycopg

    require("PostgreSQL", "127.0.0.1", 5432)
    name = f"attrib_test_{uuid.uuid4().hex[:12]}"
    admin = PG_HOST.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_HOST}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def empty_database(kind: str, folder: Path) -> Iterator[str]:
    """The URL of an empty database of ``kind`` ("sqlite": a file in ``folder``; "postgres": a new
    database on the test server, dropped afterwards)."""
    if kind == "sqlite":
        yield f"sqlite:///{folder / 'empty.db'}"
    else:
        with fresh_postgres() as url:
            yield url


def redis_url(db: int = 7) -> str:
    require("Redis", "127.0.0.1", 6379)
    return f"{REDIS_HOST}/{db}"
