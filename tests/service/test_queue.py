"""The embedded broker (kombu's filesystem transport): a message file appears whole or not at
all, so a worker listing the folder never reads a half-written one (it would die on it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import app.queue as queue
from app.queue import AtomicFilesystemTransport, make_celery, publish
from app.settings import Settings


def _messages(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith(f".{queue.INTERACTIVE}.msg"))


def test_a_message_appears_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    celery = make_celery(Settings(data_dir=tmp_path))
    folder = tmp_path / "broker"
    seen: list[tuple[list[Path], dict]] = []
    real_replace = os.replace

    def replace(src: str, dst: str) -> None:
        # Just before the rename: nothing a consumer would pick up exists yet, and the hidden
        # file already holds the complete message.
        seen.append((_messages(folder), json.loads(Path(src).read_bytes())))
        real_replace(src, dst)

    monkeypatch.setattr(queue.os, "replace", replace)
    publish(celery, "job-1", queue.INTERACTIVE)
    assert len(seen) == 1
    visible, payload = seen[0]
    assert visible == []
    assert payload["headers"]["task"] == queue.TASK_NAME
    (msg,) = _messages(folder)
    assert [p.name for p in folder.iterdir() if p.is_file()] == [msg.name]  # no hidden file left
    with celery.connection_for_read() as conn:
        assert isinstance(conn.transport, AtomicFilesystemTransport)
        got = conn.default_channel._get(queue.INTERACTIVE)  # what the worker's consumer does
    assert got["headers"]["argsrepr"] == "['job-1']"
    assert _messages(folder) == []


def test_a_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    celery = make_celery(Settings(data_dir=tmp_path))

    def replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(queue.os, "replace", replace)
    with pytest.raises(Exception, match="cannot add file"):
        publish(celery, "job-2", queue.INTERACTIVE)
    assert [p.name for p in (tmp_path / "broker").iterdir() if p.is_file()] == []


def test_the_broker_folder_is_a_setting(tmp_path: Path) -> None:
    shm = tmp_path / "elsewhere"
    settings = Settings(data_dir=tmp_path / "data", broker_dir=shm)
    assert settings.broker_folder == shm
    publish(make_celery(settings), "job-3", queue.INTERACTIVE)
    assert len(_messages(shm)) == 1
    assert not (tmp_path / "data" / "broker").exists()
