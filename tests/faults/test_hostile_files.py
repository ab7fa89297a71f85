"""Hostile files on dataset import (`attrib import --data FOLDER`, the service's only upload):
format allow-list, Pillow's decompression-bomb guard as an error, a size limit, truncated and
corrupt files, mixed sizes. Each is a clear CLI error naming the file, and nothing is written."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import create_engine, func, select

from app import migrate
from app.cli import main
from app.orm import Dataset, TrainingItem
from app.orm import Image as ImageRow
from models.data import MAX_ITEM_PIXELS


def png(w: int, h: int, value: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w), value, dtype=np.uint8), "L").save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(w: int, h: int) -> bytes:
    """A PNG that claims w x h pixels (IHDR) with no image data: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IEND", b""))


def noise_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


def gif_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="GIF")
    return buf.getvalue()


CASES = {
    "truncated": (lambda: noise_png()[:70], "corrupt"),  # cut inside the image data
    "not-an-image": (lambda: b"hello, I am text", "not a readable PNG or JPEG"),
    "gif-named-png": (gif_bytes, "not a readable PNG or JPEG"),
    "bomb": (lambda: png_header_only(100_000, 100_000), "DecompressionBomb"),
    "bomb-warning-zone": (lambda: png_header_only(10_000, 10_000), "DecompressionBomb"),
    "too-large": (lambda: png(1100, 1000), f"over the limit of {MAX_ITEM_PIXELS:,} pixels"),
    "other-size": (lambda: png(9, 9), "differs from"),
}


def import_folder(folder: Path, url: str, monkeypatch: pytest.MonkeyPatch) -> int:
    """`attrib import --data FOLDER` into a freshly migrated database; its exit status."""
    from app.settings import get_settings

    migrate.upgrade(url)
    monkeypatch.setenv("ATTRIB_DATABASE_URL", url)
    get_settings.cache_clear()
    try:
        return main(["import", "--data", str(folder)])
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_image_in_a_folder_is_a_clear_error_and_nothing_is_written(
        case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    make, needle = CASES[case]
    folder = tmp_path / "works"
    (folder / "a").mkdir(parents=True)
    for i in range(3):
        (folder / "a" / f"{i}.png").write_bytes(png(8, 8, 10 * i))
    bad = folder / "a" / "9-bad.png"
    bad.write_bytes(make())
    url = f"sqlite:///{tmp_path / 'attrib.db'}"
    assert import_folder(folder, url, monkeypatch) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and needle in err, err
    assert len(err.strip().splitlines()) == 1  # one clear line, no traceback
    engine = create_engine(url)
    with engine.connect() as c:
        for table in (Dataset, TrainingItem, ImageRow):
            assert c.execute(select(func.count()).select_from(table)).scalar() == 0
    engine.dispose()


def test_the_same_folder_without_the_bad_file_imports(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "works"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir(parents=True)
    for i in range(3):
        (folder / "a" / f"{i}.png").write_bytes(png(8, 8, 10 * i))
        (folder / "b" / f"{i}.jpg").write_bytes(png(8, 8, 100 + i))  # PNG bytes, .jpg name: allowed
    url = f"sqlite:///{tmp_path / 'attrib.db'}"
    assert import_folder(folder, url, monkeypatch) == 0
    engine = create_engine(url)
    with engine.connect() as c:
        assert c.execute(select(func.count()).select_from(TrainingItem)).scalar() == 6
        assert set(c.execute(select(TrainingItem.label).distinct()).scalars()) == {0, 1}
    engine.dispose()
