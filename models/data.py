"""Dataset loading for the attribution engine.

Every loader returns an :class:`ImageDataset`: a frozen bundle of ``uint8`` images in
``(N, C, H, W)`` layout (``C`` in ``{1, 3}``), optional integer class labels, the label
names, and one external reference string per item (used to point back at the original
training example in attribution results).

Supported sources:

* ``load_digits()`` -- scikit-learn's bundled 8x8 digits (no download).
* ``load_npz(path)`` -- ``.npz`` archives with an ``images`` array and optional ``labels``.
* ``load_idx(images_path, labels_path=None)`` -- MNIST IDX files, plain or gzip.
* ``load_folder(path)`` -- a directory tree of PNG/JPEG files, optional class subfolders.
* ``load_dataset(spec)`` -- dispatch on a string spec.

All failures caused by bad input data raise :class:`DatasetError` (a ``ValueError``) whose
message names the offending file, and the item or index where relevant. Nothing here uses
global random state: :meth:`ImageDataset.sample` draws from ``np.random.default_rng(seed)``.
"""

from __future__ import annotations

import gzip
import hashlib
import operator
import os
import struct
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from models.errors import DatasetError

__all__ = [
    "DatasetError",
    "ImageDataset",
    "load_data",
    "load_dataset",
    "load_digits",
    "load_folder",
    "load_idx",
    "load_npz",
]

PathLike = str | os.PathLike[str]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801
_GZIP_MAGIC = b"\x1f\x8b"
_FINGERPRINT_TAG = b"attrib.ImageDataset.v1"
#: What a folder may hold: the decoder is chosen from these only, whatever the extension says.
ALLOWED_FORMATS = ("PNG", "JPEG")
#: Largest image accepted in a dataset folder (checked from the header, before decoding).
MAX_ITEM_PIXELS = 1024 * 1024

_PIL_ERRORS = (
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
)
# Modes whose pixels carry colour; everything else (1, L, LA, La, I, I;16*, F, P with a
# gray palette) is treated as grayscale.
_COLOUR_MODES = frozenset({"RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})


# ----------------------------------------------------------------------------- dataset


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """An in-memory image dataset.

    Attributes:
        name: Short human-readable name (e.g. ``"digits"``, ``"mnist10k"``).
        images: ``(N, C, H, W)`` ``uint8`` array, ``C`` in ``{1, 3}``, C-contiguous
            (a non-contiguous array is copied on construction).
        labels: ``(N,)`` ``int64`` class indices, or ``None``.
        label_names: Label index -> name, or ``None``. When given alongside ``labels``,
            every label must index into it.
        refs: ``N`` external references, one per item (``"digits:17"``,
            ``"mnist10k.npz:42"``, or a relative file path for folders).

    Validation failures raise :class:`DatasetError`. Arrays are not copied unless needed;
    treat them as read-only (mutating them changes :meth:`fingerprint`).
    """

    name: str
    images: np.ndarray
    labels: np.ndarray | None
    label_names: tuple[str, ...] | None
    refs: tuple[str, ...]

    def __post_init__(self) -> None:
        where = f"dataset {self.name!r}"
        images = self.images
        if not isinstance(images, np.ndarray):
            raise DatasetError(f"{where}: images must be a numpy array, got {type(images)}")
        if images.dtype != np.uint8:
            raise DatasetError(f"{where}: images must be uint8, got {images.dtype}")
        if images.ndim != 4:
            raise DatasetError(f"{where}: images must have shape (N, C, H, W), got {images.shape}")
        n, c, h, w = images.shape
        if n < 1:
            raise DatasetError(f"{where}: dataset is empty (N = 0)")
        if c not in (1, 3):
            raise DatasetError(f"{where}: channel count must be 1 or 3, got C = {c}")
        if h < 1 or w < 1:
            raise DatasetError(f"{where}: images have zero size {h}x{w}")
        if not images.flags.c_contiguous:
            object.__setattr__(self, "images", np.ascontiguousarray(images))

        labels = self.labels
        if labels is not None:
            if not isinstance(labels, np.ndarray):
                raise DatasetError(f"{where}: labels must be a numpy array or None")
            if labels.shape != (n,):
                raise DatasetError(
                    f"{where}: labels must have shape ({n},) to match images, got {labels.shape}"
                )
            if not np.issubdtype(labels.dtype, np.integer):
                raise DatasetError(f"{where}: labels must be integers, got {labels.dtype}")
            if labels.dtype != np.int64:
                labels = labels.astype(np.int64)
                object.__setattr__(self, "labels", labels)
            if labels.min() < 0:
                bad = int(np.flatnonzero(labels < 0)[0])
                raise DatasetError(f"{where}: negative label {int(labels[bad])} at index {bad}")

        names = self.label_names
        if names is not None:
            names = tuple(names)
            if not all(isinstance(s, str) for s in names):
                raise DatasetError(f"{where}: label_names must be strings")
            object.__setattr__(self, "label_names", names)
            if labels is None:
                raise DatasetError(f"{where}: label_names given without labels")
            if labels.max() >= len(names):
                bad = int(np.flatnonzero(labels >= len(names))[0])
                raise DatasetError(
                    f"{where}: label {int(labels[bad])} at index {bad} has no name "
                    f"({len(names)} label_names)"
                )

        refs = tuple(self.refs)
        if len(refs) != n:
            raise DatasetError(f"{where}: {len(refs)} refs for {n} images")
        if not all(isinstance(r, str) for r in refs):
            raise DatasetError(f"{where}: refs must be strings")
        object.__setattr__(self, "refs", refs)

    # -- shape helpers --------------------------------------------------------------

    @property
    def N(self) -> int:
        """Number of items."""
        return int(self.images.shape[0])

    @property
    def C(self) -> int:
        """Channels (1 or 3)."""
        return int(self.images.shape[1])

    @property
    def H(self) -> int:
        """Image height in pixels."""
        return int(self.images.shape[2])

    @property
    def W(self) -> int:
        """Image width in pixels."""
        return int(self.images.shape[3])

    @property
    def shape(self) -> tuple[int, int, int]:
        """Per-item shape ``(C, H, W)``."""
        return (self.C, self.H, self.W)

    def __len__(self) -> int:
        return self.N

    def __repr__(self) -> str:
        nl = "no labels" if self.labels is None else f"{len(self.label_names or ())} labels"
        return f"ImageDataset({self.name!r}, N={self.N}, shape={self.shape}, {nl})"

    # -- hashing --------------------------------------------------------------------

    def fingerprint(self) -> str:
        """SHA-256 hex digest over the ``(N, C, H, W)`` shape, image bytes and label bytes.

        Stable across runs and platforms (labels hashed as little-endian int64); independent
        of ``name``, ``refs`` and ``label_names``.
        """
        h = hashlib.sha256(_FINGERPRINT_TAG)
        h.update(np.asarray(self.images.shape, dtype="<i8").tobytes())
        h.update(np.ascontiguousarray(self.images).tobytes())
        if self.labels is None:
            h.update(b"\x00")
        else:
            h.update(b"\x01")
            h.update(np.ascontiguousarray(self.labels, dtype="<i8").tobytes())
        return h.hexdigest()

    def item_sha256(self, i: int) -> str:
        """SHA-256 hex digest of item ``i``'s image bytes (its ``(C, H, W)`` uint8 array).

        Negative indices count from the end; out-of-range raises ``IndexError``.
        """
        i = operator.index(i)
        if not -self.N <= i < self.N:
            raise IndexError(f"item {i} out of range for dataset {self.name!r} (N = {self.N})")
        return hashlib.sha256(np.ascontiguousarray(self.images[i]).tobytes()).hexdigest()

    # -- conversion / selection ------------------------------------------------------

    def to_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """All images as a float32 ``(N, C, H, W)`` tensor in ``[-1, 1]`` (``x / 127.5 - 1``).

        The uint8 data is moved to ``device`` before conversion (4x less transfer).
        """
        src = self.images if self.images.flags.writeable else self.images.copy()
        t = torch.from_numpy(src)
        if device is not None:
            t = t.to(device)
        return t.to(torch.float32).div_(127.5).sub_(1.0)

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageDataset:
        """Items at ``indices`` (ints, negatives allowed, or an ``(N,)`` boolean mask), in
        that order, with labels and refs kept aligned. Empty selection -> DatasetError."""
        idx = np.asarray(indices)
        if idx.dtype == np.bool_:
            if idx.shape != (self.N,):
                raise DatasetError(
                    f"dataset {self.name!r}: boolean mask must have shape ({self.N},), "
                    f"got {idx.shape}"
                )
            idx = np.flatnonzero(idx)
        elif idx.size == 0:
            idx = idx.astype(np.int64).reshape(0)
        elif not np.issubdtype(idx.dtype, np.integer):
            raise DatasetError(f"dataset {self.name!r}: indices must be integers, got {idx.dtype}")
        if idx.ndim != 1:
            raise DatasetError(f"dataset {self.name!r}: indices must be 1-D, got shape {idx.shape}")
        if idx.size == 0:
            raise DatasetError(f"dataset {self.name!r}: subset would be empty")
        idx = idx.astype(np.int64)
        bad = (idx < -self.N) | (idx >= self.N)
        if bad.any():
            raise DatasetError(
                f"dataset {self.name!r}: index {int(idx[bad][0])} out of range (N = {self.N})"
            )
        idx = np.where(idx < 0, idx + self.N, idx)
        return ImageDataset(
            name=self.name,
            images=np.ascontiguousarray(self.images[idx]),
            labels=None if self.labels is None else self.labels[idx],
            label_names=self.label_names,
            refs=tuple(self.refs[i] for i in idx.tolist()),
        )

    def sample(self, n: int, seed: int) -> ImageDataset:
        """``n`` distinct items drawn with ``np.random.default_rng(seed)``, kept in dataset
        order. Same ``(n, seed)`` -> same items. ``n < 1`` or ``n > N`` -> DatasetError."""
        n = operator.index(n)
        if not 1 <= n <= self.N:
            raise DatasetError(
                f"dataset {self.name!r}: cannot sample {n} distinct items from N = {self.N}"
            )
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(self.N, size=n, replace=False))
        return self.subset(idx)


# ----------------------------------------------------------------------------- helpers


def _names_for(labels: np.ndarray) -> tuple[str, ...]:
    """Label names ``"0" .. str(max)`` for ``(N,)`` non-negative integer labels."""
    return tuple(str(i) for i in range(int(labels.max()) + 1))


def _to_uint8(arr: np.ndarray, where: str) -> np.ndarray:
    """Validate values in 0..255 and return ``arr`` as uint8 (floats are rounded)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise DatasetError(f"{where}: images must be integer or float, got dtype {arr.dtype}")
    if arr.size == 0:
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(arr)
        if not finite.all():
            bad = np.unravel_index(int(np.flatnonzero(~finite)[0]), arr.shape)
            raise DatasetError(f"{where}: non-finite pixel value at item {int(bad[0])}")
    lo, hi = arr.min(), arr.max()
    if lo < 0 or hi > 255:
        out = (arr < 0) | (arr > 255)
        bad = np.unravel_index(int(np.flatnonzero(out)[0]), arr.shape)
        raise DatasetError(
            f"{where}: pixel values must lie in 0..255, got range [{lo}, {hi}] "
            f"(first offending item {int(bad[0])})"
        )
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.rint(arr)
    return arr.astype(np.uint8)


def _as_nchw(arr: np.ndarray, where: str) -> np.ndarray:
    """``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)`` with C in {1, 3} -> ``(N, C, H, W)``.

    If both axis 1 and axis 3 could be channels (e.g. ``(N, 3, 5, 3)``), channels-last wins.
    """
    if arr.ndim == 3:
        return arr[:, None, :, :]
    if arr.ndim == 4:
        if arr.shape[3] in (1, 3):
            return arr.transpose(0, 3, 1, 2)
        if arr.shape[1] in (1, 3):
            return arr
        raise DatasetError(
            f"{where}: cannot find a channel axis of size 1 or 3 in images shape {arr.shape} "
            "(expected (N,H,W), (N,H,W,C) or (N,C,H,W))"
        )
    raise DatasetError(
        f"{where}: images must have 3 or 4 dimensions ((N,H,W), (N,H,W,C) or (N,C,H,W)), "
        f"got shape {arr.shape}"
    )


def _check_labels(labels: Any, n: int, where: str) -> np.ndarray:
    """Validate an array of ``n`` non-negative integer labels; return ``(n,)`` int64."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise DatasetError(f"{where}: labels must be 1-D, got shape {arr.shape}")
    if arr.shape[0] != n:
        raise DatasetError(f"{where}: {arr.shape[0]} labels for {n} images")
    if np.issubdtype(arr.dtype, np.floating):
        if not (np.isfinite(arr).all() and (arr == np.rint(arr)).all()):
            raise DatasetError(f"{where}: labels must be whole numbers")
    elif not np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        raise DatasetError(f"{where}: labels must be integers, got dtype {arr.dtype}")
    if n and arr.min() < 0:
        bad = int(np.flatnonzero(arr < 0)[0])
        raise DatasetError(f"{where}: negative label {arr[bad]} at index {bad}")
    return arr.astype(np.int64)


# ----------------------------------------------------------------------------- loaders


def load_digits() -> ImageDataset:
    """scikit-learn's bundled digits: ``(1797, 1, 8, 8)`` uint8, labels 0..9.

    The original 0..16 intensities are mapped to ``round(v * 255 / 16)``; refs are
    ``"digits:<i>"``.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    raw = np.asarray(bunch.images, dtype=np.float64)  # (1797, 8, 8), values 0..16
    images = np.rint(raw * 255.0 / 16.0).astype(np.uint8)[:, None, :, :]
    labels = np.asarray(bunch.target, dtype=np.int64)
    return ImageDataset(
        name="digits",
        images=np.ascontiguousarray(images),
        labels=labels,
        label_names=tuple(str(i) for i in range(10)),
        refs=tuple(f"digits:{i}" for i in range(images.shape[0])),
    )


def load_npz(path: PathLike) -> ImageDataset:
    """Load an ``.npz`` archive.

    Keys:
        ``images``: uint8, or integer/float with values in 0..255 (floats are rounded);
            shape ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)`` with C in {1, 3}.
        ``labels`` (optional): ``(N,)`` non-negative integers.
        ``label_names`` (optional, only with labels): 1-D array of strings.

    Returns a dataset named after the file stem with refs ``"<file name>:<i>"``.
    """
    p = Path(path)
    where = str(p)
    try:
        npz = np.load(p, allow_pickle=False)
    except FileNotFoundError as e:
        raise DatasetError(f"{where}: file not found") from e
    except (OSError, ValueError, EOFError, zlib.error) as e:
        raise DatasetError(f"{where}: not a readable .npz archive ({e})") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DatasetError(f"{where}: not an .npz archive (a single .npy array?)")
    try:
        with npz:
            if "images" not in npz.files:
                raise DatasetError(
                    f"{where}: missing key 'images' (keys present: {sorted(npz.files)})"
                )
            raw_images = npz["images"]
            raw_labels = npz["labels"] if "labels" in npz.files else None
            raw_names = npz["label_names"] if "label_names" in npz.files else None
    except DatasetError:
        raise
    except (OSError, ValueError, EOFError, zlib.error, KeyError) as e:
        raise DatasetError(f"{where}: cannot read array data ({e})") from e

    images = _to_uint8(_as_nchw(raw_images, where), where)
    n = images.shape[0]
    if n == 0:
        raise DatasetError(f"{where}: 'images' is empty")
    if images.shape[1] not in (1, 3):  # pragma: no cover - guaranteed by _as_nchw
        raise DatasetError(f"{where}: bad channel count {images.shape[1]}")

    labels = None
    names: tuple[str, ...] | None = None
    if raw_labels is not None:
        labels = _check_labels(raw_labels, n, where)
        if raw_names is not None:
            arr = np.asarray(raw_names)
            if arr.ndim != 1 or arr.dtype.kind not in "US":
                raise DatasetError(f"{where}: 'label_names' must be a 1-D array of strings")
            names = tuple(x.decode() if isinstance(x, bytes) else str(x) for x in arr.tolist())
            if int(labels.max()) >= len(names):
                raise DatasetError(
                    f"{where}: label {int(labels.max())} has no entry in 'label_names' "
                    f"({len(names)} names)"
                )
        else:
            names = _names_for(labels)
    return ImageDataset(
        name=p.stem,
        images=np.ascontiguousarray(images),
        labels=labels,
        label_names=names,
        refs=tuple(f"{p.name}:{i}" for i in range(n)),
    )


def _read_maybe_gzip(p: Path) -> bytes:
    """File contents, transparently gunzipped when the file starts with the gzip magic."""
    try:
        data = p.read_bytes()
    except FileNotFoundError as e:
        raise DatasetError(f"{p}: file not found") from e
    except OSError as e:
        raise DatasetError(f"{p}: cannot read file ({e})") from e
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DatasetError(f"{p}: corrupt or truncated gzip data ({e})") from e
    return data


def _parse_idx(p: Path, expected_magic: int, ndim: int) -> np.ndarray:
    """Parse an IDX ``uint8`` file with ``ndim`` dimensions; return the array in that shape."""
    data = _read_maybe_gzip(p)
    if len(data) < 4:
        raise DatasetError(f"{p}: truncated IDX header ({len(data)} bytes)")
    (magic,) = struct.unpack(">I", data[:4])
    if magic != expected_magic:
        raise DatasetError(f"{p}: bad IDX magic 0x{magic:08X}, expected 0x{expected_magic:08X}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{p}: truncated IDX header ({len(data)} of {header} bytes)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    got = len(data) - header
    if got < expected:
        raise DatasetError(
            f"{p}: truncated IDX data: dims {dims} need {expected} bytes, file has {got}"
        )
    if got > expected:
        raise DatasetError(
            f"{p}: {got - expected} unexpected trailing bytes after IDX data of dims {dims}"
        )
    return np.frombuffer(data, dtype=np.uint8, count=expected, offset=header).reshape(dims)


def _sibling_labels(images_path: Path) -> Path | None:
    """Find the labels file next to an IDX images file (``images`` -> ``labels``,
    ``idx3`` -> ``idx1``, with or without ``.gz``); ``None`` if there is none."""
    name = images_path.name
    if "images" not in name:
        return None
    base = name[:-3] if name.lower().endswith(".gz") else name
    gz_first = name.lower().endswith(".gz")
    stems = [base.replace("images", "labels")]
    stems.append(stems[0].replace("idx3", "idx1"))
    candidates: list[str] = []
    for stem in reversed(stems):  # prefer the idx1 spelling (standard MNIST naming)
        pair = [stem + ".gz", stem] if gz_first else [stem, stem + ".gz"]
        candidates.extend(c for c in pair if c not in candidates)
    for cand in candidates:
        q = images_path.with_name(cand)
        if q != images_path and q.is_file():
            return q
    return None


def load_idx(images_path: PathLike, labels_path: PathLike | None = None) -> ImageDataset:
    """Load MNIST-style IDX files (plain or gzip, detected from content).

    ``images_path`` must have magic ``0x00000803`` (uint8, dims ``N, H, W``) and yields
    ``(N, 1, H, W)`` images. ``labels_path`` (magic ``0x00000801``, ``N`` uint8 labels) is
    optional; when ``None`` a sibling whose name has ``labels`` in place of ``images``
    (e.g. ``train-images-idx3-ubyte`` -> ``train-labels-idx1-ubyte``, ``.gz`` or not) is
    used if present. Refs are ``"<images file name>:<i>"``.
    """
    ip = Path(images_path)
    arr = _parse_idx(ip, IDX_IMAGES_MAGIC, 3)
    n, h, w = arr.shape
    if n == 0:
        raise DatasetError(f"{ip}: IDX file holds no images")
    if h == 0 or w == 0:
        raise DatasetError(f"{ip}: IDX images have zero size {h}x{w}")

    lp = Path(labels_path) if labels_path is not None else _sibling_labels(ip)
    labels = None
    names = None
    if lp is not None:
        raw = _parse_idx(lp, IDX_LABELS_MAGIC, 1)
        if raw.shape[0] != n:
            raise DatasetError(f"{lp}: {raw.shape[0]} labels but {ip.name} has {n} images")
        labels = raw.astype(np.int64)
        names = _names_for(labels)

    name = ip.name[:-3] if ip.name.lower().endswith(".gz") else ip.name
    return ImageDataset(
        name=name,
        images=np.ascontiguousarray(arr[:, None, :, :]),
        labels=labels,
        label_names=names,
        refs=tuple(f"{ip.name}:{i}" for i in range(n)),
    )


def _composite_alpha(values: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composite ``values`` (``(H, W)`` or ``(H, W, 3)`` uint8) over black using ``alpha``
    (``(H, W)`` uint8); returns uint8 of the same shape as ``values``."""
    a = alpha.astype(np.uint32)
    if values.ndim == 3:
        a = a[:, :, None]
    return ((values.astype(np.uint32) * a + 127) // 255).astype(np.uint8)


def _decode_pil(im: Image.Image) -> tuple[np.ndarray, bool]:
    """Decode a loaded PIL image to ``(H, W)`` gray or ``(H, W, 3)`` RGB uint8.

    Returns ``(array, is_colour)``. Transparent pixels are composited over black; 16/32-bit
    integer grayscale is scaled from 0..65535 to 0..255; palette images count as colour
    only if they contain non-gray pixels.
    """
    mode = im.mode
    if mode == "1":
        return np.asarray(im.convert("L"), dtype=np.uint8), False
    if mode == "L":
        return np.asarray(im, dtype=np.uint8), False
    if mode in ("LA", "La"):
        la = np.asarray(im.convert("LA"), dtype=np.uint8)
        return _composite_alpha(la[:, :, 0], la[:, :, 1]), False
    if mode.startswith("I"):  # I, I;16, I;16B, I;16L, ...: assume 16-bit range
        v = np.asarray(im).astype(np.float64)
        return np.rint(np.clip(v, 0, 65535) / 257.0).astype(np.uint8), False
    if mode == "F":
        v = np.asarray(im, dtype=np.float64)
        v = np.nan_to_num(v, nan=0.0, posinf=255.0, neginf=0.0)
        return np.rint(np.clip(v, 0, 255)).astype(np.uint8), False
    if mode == "P" or mode == "PA":
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint8)
        rgb = _composite_alpha(rgba[:, :, :3], rgba[:, :, 3])
        gray = bool((rgb[:, :, 0] == rgb[:, :, 1]).all() and (rgb[:, :, 1] == rgb[:, :, 2]).all())
        return (rgb[:, :, 0].copy(), False) if gray else (rgb, True)
    if mode in ("RGBA", "RGBa"):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint8)
        return _composite_alpha(rgba[:, :, :3], rgba[:, :, 3]), True
    return np.asarray(im.convert("RGB"), dtype=np.uint8), True


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def load_folder(path: PathLike) -> ImageDataset:
    """Load every ``*.png`` / ``*.jpg`` / ``*.jpeg`` (case-insensitive) under ``path``.

    Files are sorted by relative POSIX path; hidden files and folders (names starting
    with ``.``) and other extensions are ignored. If images sit in subfolders, the
    top-level subfolder name is the label (``label_names`` sorted); images directly in the
    root alongside labelled subfolders are an error. All images must share one size.
    Grayscale images give ``C = 1`` unless any image is colour, in which case all are
    RGB (``C = 3``). Refs are relative file paths. Returns ``(N, C, H, W)`` uint8.
    """
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory")
    rels = sorted(
        (
            p.relative_to(root)
            for p in root.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        ),
        key=lambda r: r.as_posix(),
    )
    rels = [r for r in rels if not _is_hidden(r)]
    if not rels:
        raise DatasetError(
            f"{root}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    in_root = [r for r in rels if len(r.parts) == 1]
    labelled = len(in_root) < len(rels)
    if labelled and in_root:
        sub = next(r for r in rels if len(r.parts) > 1)
        raise DatasetError(
            f"{root / in_root[0]}: image directly in the dataset root while other images "
            f"sit in class subfolders (e.g. {sub.as_posix()}); move it into a subfolder"
        )

    arrays: list[np.ndarray] = []
    any_colour = False
    size: tuple[int, int] | None = None
    first: Path | None = None
    for rel in rels:
        fp = root / rel
        try:
            with warnings.catch_warnings():
                # Pillow only warns between MAX_IMAGE_PIXELS and twice that: refuse those too.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im_cm = Image.open(fp, formats=ALLOWED_FORMATS)
            with im_cm as im:
                if im.width * im.height > MAX_ITEM_PIXELS:
                    raise DatasetError(f"{fp}: {im.width}x{im.height} image is over the limit of "
                                       f"{MAX_ITEM_PIXELS:,} pixels per item")
                im.load()
                if size is None:
                    size, first = im.size, rel
                elif im.size != size:
                    raise DatasetError(
                        f"{fp}: image size {im.size[0]}x{im.size[1]} (WxH) differs from "
                        f"{size[0]}x{size[1]} of {first.as_posix() if first else '?'}"
                    )
                arr, colour = _decode_pil(im)
        except DatasetError:
            raise
        except UnidentifiedImageError as e:
            raise DatasetError(f"{fp}: not a readable {' or '.join(ALLOWED_FORMATS)} image") from e
        except _PIL_ERRORS as e:
            raise DatasetError(
                f"{fp}: unreadable or corrupt image ({type(e).__name__}: {e})"
            ) from e
        arrays.append(arr)
        any_colour = any_colour or colour

    if any_colour:
        chw = [
            np.repeat(a[None, :, :], 3, axis=0) if a.ndim == 2 else a.transpose(2, 0, 1)
            for a in arrays
        ]
    else:
        chw = [a[None, :, :] for a in arrays]
    images = np.ascontiguousarray(np.stack(chw, axis=0))

    labels = None
    names = None
    if labelled:
        names = tuple(sorted({r.parts[0] for r in rels}))
        index = {nm: i for i, nm in enumerate(names)}
        labels = np.array([index[r.parts[0]] for r in rels], dtype=np.int64)
    return ImageDataset(
        name=root.resolve().name or str(root),
        images=images,
        labels=labels,
        label_names=names,
        refs=tuple(r.as_posix() for r in rels),
    )


def load_dataset(spec: str) -> ImageDataset:
    """Load a dataset from a spec string.

    Accepted forms: ``"digits"`` (scikit-learn digits); an existing directory (image
    folder); an existing ``*.npz`` file; any other existing file (MNIST IDX images, plain
    or gzip, with sibling labels if present). Anything else -> DatasetError.
    """
    if spec == "digits":
        return load_digits()
    p = Path(spec).expanduser()
    if p.is_dir():
        return load_folder(p)
    if p.is_file():
        if p.suffix.lower() == ".npz":
            return load_npz(p)
        return load_idx(p)
    raise DatasetError(
        f"{spec}: no such file or directory. Accepted dataset specs: 'digits' "
        "(scikit-learn 8x8 digits), a directory of PNG/JPEG images (optionally one "
        "subfolder per class), a .npz file with 'images' [and 'labels'], or an MNIST IDX "
        "images file (plain or .gz)"
    )


def load_data(spec: str, subset: int | None = None, subset_seed: int = 0) -> ImageDataset:
    """``load_dataset(spec)``, or a random ``subset`` of it drawn with ``subset_seed``
    (:meth:`ImageDataset.sample`): what an ensemble's DatasetInfo records to reload its data."""
    ds = load_dataset(spec)
    return ds if subset is None else ds.sample(subset, subset_seed)
