"""`attrib demo-setup`: what `make run` does before serving, run as a function chain (no argv)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from app.cli import main
from app.db import Database
from app.orm import EnsembleRow, Owner, TrainingItem
from app.settings import get_settings
from models.ensemble import Ensemble


@pytest.fixture(autouse=True)
def _settings_of_this_test() -> Iterator[None]:
    """Settings are read once per process: this test's environment, not an earlier test's."""
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_demo_setup_imports_trains_registers_and_is_idempotent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    monkeypatch.setenv("ATTRIB_DATA_DIR", str(data))
    for name in ("DATABASE_URL", "BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    assert main(["demo-setup", "--preset", "tiny", "--steps", "3", "--json"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    keys = first["keys"]
    assert set(keys) == {"operator"} | {f"holder-{2 * i}-{2 * i + 1}" for i in range(5)}
    assert all(k.startswith("attrib_") for k in keys.values())
    assert json.loads(Path(first["keys_file"]).read_text()) == keys
    ckpt = data / "ensembles" / "tiny.pt"
    assert (Ensemble.load(ckpt).train_state or {})["step"] == 3
    db = Database(f"sqlite:///{data / 'attrib.db'}")
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(TrainingItem)) == 1797
        assert s.scalar(select(func.count()).select_from(Owner)) == 5
        assert [r.name for r in s.scalars(select(EnsembleRow))] == ["digits-tiny"]
    # Again: nothing is imported, trained or registered twice, and the same keys come back.
    assert main(["demo-setup", "--preset", "tiny", "--steps", "3", "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["keys"] == keys
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(TrainingItem)) == 1797
        assert s.scalar(select(func.count()).select_from(EnsembleRow)) == 1
    db.dispose()
