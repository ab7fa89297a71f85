"""Service fixtures: a migrated SQLite database holding the tiny digits subset (three rights
holders), the session's tiny ensemble registered, keys, and the ASGI app with an in-memory
broker. Jobs are run by calling the worker's ``execute_job`` directly (``run_jobs``)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

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


@pytest.fixture(scope="session")
def template_db(tiny_dataset: ImageDataset, tiny_ckpt: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated, populated SQLite file, copied for each test (migrating per test is slow)."""
    path = tmp_path_factory.mktemp("db") / "template.db"
    url = f"sqlite:///{path}"
    migrate.upgrade(url)
    db = Database(url)
    with db.session() as s:
        assert tiny_dataset.labels is not None
        import_dataset(s, tiny_dataset, "tiny-digits", {"data": "digits"},
                       [owner_of_label(int(v)) for v in tiny_dataset.labels])
        register_ensemble(s, Ensemble.load(tiny_ckpt), tiny_ckpt, "tiny")
    db.dispose()
    return path


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


@pytest.fixture
def make_service(template_db: Path, tmp_path: Path) -> Iterator[Callable[..., Service]]:
    made: list[Service] = []

    def factory(clock: Clock = time.monotonic, **overrides: object) -> Service:
        """A service with these settings; ``clock`` times its caches and rate limits."""
        data = tmp_path / f"data{len(made)}"
        data.mkdir()
        shutil.copy(template_db, data / "attrib.db")
        opts: dict[str, object] = dict(data_dir=data, database_url=f"sqlite:///{data / 'attrib.db'}",
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


@pytest.fixture
def svc(make_service: Callable[..., Service]) -> Service:
    return make_service()
