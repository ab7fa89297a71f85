"""Service fixtures: a migrated SQLite database holding the tiny digits subset (three rights
holders), the session's tiny ensemble registered, keys, and the ASGI app with an in-memory
broker. Jobs are run by calling the worker's ``execute_job`` directly (``run_jobs``).

``make_service(database="postgres")`` gives the same service on a PostgreSQL database instead (a
copy of a populated template database, made once per session; skipped without the server, see
tests/service/services.py)."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app import migrate
from app.auth import create_key
from app.db import Database
from app.deps import Clock
from app.main import create_app
from app.orm import Job, Owner
from app.registry import import_dataset, register_ensemble
from app.settings import Settings
from models.data import ImageDataset, load_digits
from models.ensemble import Ensemble
from tests.conftest import TINY_ITEMS
from tests.service.services import PG_HOST, require
from worker.tasks import WorkerState, execute_job

OWNERS = ("alice", "bob", "carol")


def owner_of_label(label: int | None) -> str:
    assert label is not None, "the test data sets are labelled"
    return OWNERS[label % 3]


@pytest.fixture(scope="session")
def tiny_dataset() -> ImageDataset:
    return load_digits().subset(np.arange(TINY_ITEMS))


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_ensemble: Ensemble, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_ensemble.save(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def populate(url: str, dataset: ImageDataset, ckpt: Path) -> None:
    """Migrate the empty database at ``url`` and put the tiny digits and ensemble in it."""
    migrate.upgrade(url)
    db = Database(url)
    with db.session() as s:
        assert dataset.labels is not None
        import_dataset(s, dataset, "tiny-digits", {"data": "digits"},
                       [owner_of_label(int(v)) for v in dataset.labels])
        register_ensemble(s, Ensemble.load(ckpt), ckpt, "tiny")
    db.dispose()


@pytest.fixture(scope="session")
def template_db(tiny_dataset: ImageDataset, tiny_ckpt: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated, populated SQLite file, copied for each test (migrating per test is slow)."""
    path = tmp_path_factory.mktemp("db") / "template.db"
    populate(f"sqlite:///{path}", tiny_dataset, tiny_ckpt)
    return path


PG_ADMIN = PG_HOST.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
PG_TIMEZONE = "Pacific/Kiritimati"
"""The session time zone of the services' PostgreSQL databases: UTC+14, so from 10:00 UTC on its
day is already the next one, and code taking a timestamp's day in the session's zone instead of
UTC's is caught (tests/service/test_shares.py)."""


def _pg_admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as c:
        c.execute(sql)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def pg_template(tiny_dataset: ImageDataset, tiny_ckpt: Path) -> Iterator[str]:
    """The name of a migrated, populated PostgreSQL database, the template of each test's own."""
    require("PostgreSQL", "127.0.0.1", 5432)
    name = f"attrib_template_{uuid.uuid4().hex[:12]}"
    _pg_admin(f'CREATE DATABASE "{name}"')
    try:
        populate(f"{PG_HOST}/{name}", tiny_dataset, tiny_ckpt)
        yield name
    finally:
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Service:
    client: TestClient
    settings: Settings
    db: Database
    operator_key: str
    owner_keys: dict[str, str]
    owner_ids: dict[str, int]
    worker: WorkerState

    def op(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.operator_key}"}

    def owner(self, name: str) -> dict[str, str]:
        return {"X-API-Key": self.owner_keys[name]}

    def run_jobs(self) -> list[str]:
        """Run every queued job to completion (as a worker would); returns their final states."""
        out = []
        with self.db.session() as s:
            ids = list(s.scalars(select(Job.id).where(Job.status == "queued").order_by(Job.created_at)))
        for jid in ids:
            out.append(execute_job(jid, self.worker))
        return out


Backend = Literal["sqlite", "postgres"]


@pytest.fixture
def make_service(template_db: Path, tmp_path: Path,
                 request: pytest.FixtureRequest) -> Iterator[Callable[..., Service]]:
    made: list[Service] = []
    databases: list[str] = []

    def factory(clock: Clock = time.monotonic, database: Backend = "sqlite", **overrides: object) -> Service:
        """A service with these settings; ``clock`` times its caches and rate limits; ``database``:
        the populated copy it runs on, SQLite or PostgreSQL."""
        data = tmp_path / f"data{len(made)}"
        data.mkdir()
        if database == "postgres":
            name = f"attrib_test_{uuid.uuid4().hex[:12]}"
            _pg_admin(f'CREATE DATABASE "{name}" TEMPLATE "{request.getfixturevalue("pg_template")}"')
            databases.append(name)
            _pg_admin(f"ALTER DATABASE \"{name}\" SET timezone TO '{PG_TIMEZONE}'")
            url = f"{PG_HOST}/{name}"
        else:
            shutil.copy(template_db, data / "attrib.db")
            url = f"sqlite:///{data / 'attrib.db'}"
        opts: dict[str, object] = dict(data_dir=data, database_url=url,
                                       broker_url="memory://", reaper_interval_s=0, auth_cache_s=0,
                                       heartbeat_s=0.2)
        opts.update(overrides)
        settings = Settings(**opts)  # type: ignore[arg-type]
        db = Database(settings.database_url)
        keys, ids = {}, {}
        with db.session() as s:
            _, op_key = create_key(s, None, "test operator")
            for o in s.scalars(select(Owner)):
                _, keys[o.name] = create_key(s, o, "test")
                ids[o.name] = o.id
        client = TestClient(create_app(settings, clock=clock))
        client.__enter__()
        svc = Service(client, settings, db, op_key, keys, ids, WorkerState(settings))
        made.append(svc)
        return svc

    yield factory
    for svc in made:
        svc.client.__exit__(None, None, None)
        svc.db.dispose()
        svc.worker.db.dispose()
    for name in databases:
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def svc(make_service: Callable[..., Service]) -> Service:
    return make_service()
