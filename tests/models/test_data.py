"""Tests for models.data: dataset loaders and the ImageDataset container.

All fixtures are built in tmp_path; nothing depends on /work/shared data.
"""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.data import (
    DatasetError,
    ImageDataset,
    load_dataset,
    load_digits,
    load_folder,
    load_idx,
    load_npz,
)

# ----------------------------------------------------------------------------- helpers


def _rand_u8(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _make_ds(n: int = 6, c: int = 1, h: int = 4, w: int = 5, labels: bool = True) -> ImageDataset:
    images = _rand_u8((n, c, h, w))
    images[0, 0, 0, 0] = 0
    images[1, 0, 0, 0] = 255
    lab = np.arange(n, dtype=np.int64) % 3 if labels else None
    return ImageDataset(
        name="toy",
        images=images,
        labels=lab,
        label_names=("a", "b", "c") if labels else None,
        refs=tuple(f"toy:{i}" for i in range(n)),
    )


def _write_idx_images(path: Path, arr: np.ndarray, *, gz: bool = False, magic: int = 0x803) -> None:
    n, h, w = arr.shape
    payload = struct.pack(">IIII", magic, n, h, w) + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


def _write_idx_labels(path: Path, lab: np.ndarray, *, gz: bool = False, magic: int = 0x801) -> None:
    payload = struct.pack(">II", magic, len(lab)) + lab.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


def _save(path: Path, arr: np.ndarray, mode: str | None = None, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)
    img.save(path, format=fmt)


# ----------------------------------------------------------------------------- ImageDataset


def test_dataset_properties_and_shape() -> None:
    ds = _make_ds(n=6, c=3, h=4, w=5)
    assert (ds.N, ds.C, ds.H, ds.W) == (6, 3, 4, 5)
    assert ds.shape == (3, 4, 5)
    assert all(type(v) is int for v in (ds.N, ds.C, ds.H, ds.W))
    assert ds.images.flags.c_contiguous
    assert ds.labels is not None and ds.labels.dtype == np.int64


def test_dataset_makes_noncontiguous_images_contiguous() -> None:
    base = _rand_u8((3, 4, 5, 3))
    nchw = base.transpose(0, 3, 1, 2)
    assert not nchw.flags.c_contiguous
    ds = ImageDataset("t", nchw, None, None, ("a", "b", "c"))
    assert ds.images.flags.c_contiguous
    np.testing.assert_array_equal(ds.images, nchw)


@pytest.mark.parametrize(
    ("images", "labels", "names", "refs", "match"),
    [
        (np.zeros((2, 1, 3, 3), np.float32), None, None, ("a", "b"), "uint8"),
        (np.zeros((2, 3, 3), np.uint8), None, None, ("a", "b"), "shape"),
        (np.zeros((0, 1, 3, 3), np.uint8), None, None, (), "empty"),
        (np.zeros((2, 2, 3, 3), np.uint8), None, None, ("a", "b"), "channel"),
        (np.zeros((2, 1, 3, 3), np.uint8), None, None, ("a",), "refs"),
        (np.zeros((2, 1, 3, 3), np.uint8), np.zeros(3, np.int64), None, ("a", "b"), "labels"),
        (np.zeros((2, 1, 3, 3), np.uint8), np.zeros(2, np.float32), None, ("a", "b"), "integer"),
        (np.zeros((2, 1, 3, 3), np.uint8), np.array([0, -1]), None, ("a", "b"), "negative"),
        (np.zeros((2, 1, 3, 3), np.uint8), np.array([0, 2]), ("x", "y"), ("a", "b"), "name"),
    ],
)
def test_dataset_validation(images, labels, names, refs, match) -> None:
    with pytest.raises(DatasetError, match=match):
        ImageDataset("bad", images, labels, names, refs)


def test_dataset_error_is_value_error() -> None:
    assert issubclass(DatasetError, ValueError)


def test_fingerprint_stable_and_sensitive() -> None:
    ds = _make_ds()
    fp = ds.fingerprint()
    assert len(fp) == 64 and int(fp, 16) >= 0 and ds.labels is not None
    # Same content, fresh arrays -> same fingerprint; name/refs do not matter.
    twin = ImageDataset("other", ds.images.copy(), ds.labels.copy(), ds.label_names, ds.refs[::-1])
    assert twin.fingerprint() == fp
    assert ds.fingerprint() == fp

    img = ds.images.copy()
    img[3, 0, 2, 1] ^= 1  # one pixel, one bit
    assert ImageDataset("toy", img, ds.labels, ds.label_names, ds.refs).fingerprint() != fp

    lab = ds.labels.copy()
    lab[0] = (lab[0] + 1) % 3
    assert ImageDataset("toy", ds.images, lab, ds.label_names, ds.refs).fingerprint() != fp
    assert ImageDataset("toy", ds.images, None, None, ds.refs).fingerprint() != fp

    # Same bytes, different shape -> different fingerprint.
    reshaped = ds.images.reshape(ds.N, 1, ds.W, ds.H).copy()
    assert ImageDataset("toy", reshaped, ds.labels, ds.label_names, ds.refs).fingerprint() != fp


def test_fingerprint_known_value() -> None:
    """Pinned by literals, so a change of the hashing scheme (which orphans every stored
    ensemble's dataset reference) cannot pass unnoticed."""
    images = np.arange(2 * 1 * 2 * 2, dtype=np.uint8).reshape(2, 1, 2, 2)
    labelled = ImageDataset("k", images, np.array([0, 1]), ("0", "1"), ("k:0", "k:1"))
    assert labelled.fingerprint() == "f5b744943affabfe25b121d8d3b7a7139b1b6ff9164bb7a22d378603c10823ef"
    unlabelled = ImageDataset("k", images, None, None, ("k:0", "k:1"))
    assert unlabelled.fingerprint() == "6031360ef36f0a1b7184d23061e5f5fb9f22045ce52a37042ea5e5839a46c55d"
    assert load_digits().fingerprint() == "27a9b933d337d6b28f3981af8e6de1b1097df876962ab61a962bdb21378fa0ad"


def test_item_sha256() -> None:
    import hashlib

    ds = _make_ds()
    assert ds.item_sha256(2) == hashlib.sha256(ds.images[2].tobytes()).hexdigest()
    assert ds.item_sha256(-1) == ds.item_sha256(ds.N - 1)
    assert ds.item_sha256(0) != ds.item_sha256(1)
    dup = ImageDataset("d", np.repeat(ds.images[:1], 2, axis=0), None, None, ("x", "y"))
    assert dup.item_sha256(0) == dup.item_sha256(1) == ds.item_sha256(0)
    # the dataset's own check (numpy's IndexError for images[N] would pass a bare pytest.raises)
    with pytest.raises(IndexError, match=re.escape(f"item {ds.N} out of range for dataset 'toy' (N = 6)")):
        ds.item_sha256(ds.N)
    with pytest.raises(IndexError, match=re.escape(f"item {-ds.N - 1} out of range")):
        ds.item_sha256(-ds.N - 1)


def test_to_tensor_mapping() -> None:
    ds = _make_ds()
    t = ds.to_tensor()
    assert isinstance(t, torch.Tensor)
    assert t.dtype == torch.float32 and tuple(t.shape) == ds.images.shape
    assert t[0, 0, 0, 0].item() == -1.0
    assert t[1, 0, 0, 0].item() == 1.0
    assert float(t.min()) >= -1.0 and float(t.max()) <= 1.0
    expected = torch.from_numpy(ds.images.astype(np.float32)) / 127.5 - 1.0
    assert torch.equal(t, expected)
    # Mapping of all 256 values is exact and monotone.
    allv = ImageDataset(
        "v", np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16), None, None, ("v",)
    )
    tv = allv.to_tensor(device="cpu").flatten()
    assert tv[0].item() == -1.0 and tv[255].item() == 1.0 and abs(tv[128].item() - 0.0039215) < 1e-6
    assert bool((tv[1:] > tv[:-1]).all())
    # The tensor does not alias the dataset's storage.
    t[0, 0, 0, 0] = 5.0
    assert ds.images[0, 0, 0, 0] == 0


def test_subset_keeps_alignment() -> None:
    ds = _make_ds(n=6)
    sub = ds.subset([4, 1, -1])
    assert sub.N == 3 and ds.labels is not None
    np.testing.assert_array_equal(sub.images, ds.images[[4, 1, 5]])
    np.testing.assert_array_equal(sub.labels, ds.labels[[4, 1, 5]])
    assert sub.refs == ("toy:4", "toy:1", "toy:5")
    assert sub.label_names == ds.label_names
    mask = np.zeros(6, bool)
    mask[[0, 3]] = True
    assert ds.subset(mask).refs == ("toy:0", "toy:3")
    with pytest.raises(DatasetError, match="empty"):
        ds.subset([])
    with pytest.raises(DatasetError, match="range"):
        ds.subset([6])


def test_sample_reproducible_distinct() -> None:
    ds = _make_ds(n=50, labels=False)
    a = ds.sample(20, seed=123)
    b = ds.sample(20, seed=123)
    c = ds.sample(20, seed=124)
    assert a.refs == b.refs
    np.testing.assert_array_equal(a.images, b.images)
    assert a.refs != c.refs
    assert len(set(a.refs)) == 20
    for ref, img in zip(a.refs, a.images, strict=True):
        np.testing.assert_array_equal(img, ds.images[int(ref.split(":")[1])])
    assert sorted(ds.sample(50, seed=0).refs) == sorted(ds.refs)
    with pytest.raises(DatasetError, match="'toy': cannot sample 51 distinct items from N = 50"):
        ds.sample(51, seed=0)
    # n = 0 is refused by sample itself, not by subset's "empty" on the zero items drawn
    with pytest.raises(DatasetError, match="'toy': cannot sample 0 distinct items from N = 50"):
        ds.sample(0, seed=0)


def test_sample_does_not_touch_global_rng() -> None:
    ds = _make_ds(n=10)
    np.random.seed(0)
    before = np.random.random()
    np.random.seed(0)
    ds.sample(5, seed=1)
    assert np.random.random() == before


# ----------------------------------------------------------------------------- digits


def test_load_digits() -> None:
    ds = load_digits()
    assert ds.name == "digits"
    assert ds.images.shape == (1797, 1, 8, 8) and ds.images.dtype == np.uint8
    assert ds.images.max() == 255 and ds.images.min() == 0
    assert ds.labels is not None and set(ds.labels.tolist()) == set(range(10))
    assert ds.label_names == tuple(str(i) for i in range(10))
    assert ds.refs[17] == "digits:17"
    from sklearn.datasets import load_digits as sk

    raw = sk().images
    np.testing.assert_array_equal(ds.images[:, 0], np.rint(raw * 255 / 16).astype(np.uint8))
    assert set(np.unique(ds.images).tolist()) <= {round(v * 255 / 16) for v in range(17)}
    assert load_digits().fingerprint() == ds.fingerprint()


# ----------------------------------------------------------------------------- npz


def test_load_npz_nhw_roundtrip(tmp_path: Path) -> None:
    imgs = _rand_u8((7, 6, 5))
    labels = np.array([3, 0, 1, 2, 3, 1, 0])
    p = tmp_path / "small.npz"
    np.savez(p, images=imgs, labels=labels)
    ds = load_npz(p)
    assert ds.name == "small"
    assert ds.images.shape == (7, 1, 6, 5)
    np.testing.assert_array_equal(ds.images[:, 0], imgs)
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.labels is not None and ds.labels.dtype == np.int64
    assert ds.label_names == ("0", "1", "2", "3")
    assert ds.refs[4] == "small.npz:4"
    assert load_dataset(str(p)).fingerprint() == ds.fingerprint()


def test_load_npz_layouts(tmp_path: Path) -> None:
    nhwc = _rand_u8((4, 6, 5, 3))
    np.savez(tmp_path / "hwc.npz", images=nhwc)
    ds = load_npz(tmp_path / "hwc.npz")
    assert ds.images.shape == (4, 3, 6, 5) and ds.labels is None and ds.label_names is None
    np.testing.assert_array_equal(ds.images, nhwc.transpose(0, 3, 1, 2))
    assert ds.images.flags.c_contiguous

    nchw = _rand_u8((4, 3, 6, 5))
    np.savez(tmp_path / "chw.npz", images=nchw)
    np.testing.assert_array_equal(load_npz(tmp_path / "chw.npz").images, nchw)

    nhw1 = _rand_u8((4, 6, 5, 1))
    np.savez_compressed(tmp_path / "hw1.npz", images=nhw1)
    np.testing.assert_array_equal(load_npz(tmp_path / "hw1.npz").images[:, 0], nhw1[..., 0])


def test_load_npz_int_and_float_values(tmp_path: Path) -> None:
    ints = _rand_u8((3, 4, 4)).astype(np.int32)
    np.savez(tmp_path / "i.npz", images=ints)
    np.testing.assert_array_equal(load_npz(tmp_path / "i.npz").images[:, 0], ints)
    floats = np.array([[[0.0, 254.6], [127.4, 255.0]]])
    np.savez(tmp_path / "f.npz", images=floats)
    np.testing.assert_array_equal(load_npz(tmp_path / "f.npz").images[0, 0], [[0, 255], [127, 255]])


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"pixels": np.zeros((2, 3, 3), np.uint8)}, "images"),
        ({"images": np.zeros((3, 3), np.uint8)}, "dimensions"),
        ({"images": np.zeros((2, 3, 3, 3, 1), np.uint8)}, "dimensions"),
        ({"images": np.zeros((2, 4, 4, 2), np.uint8)}, "channel"),
        ({"images": np.full((2, 3, 3), 256, np.int16)}, "0..255"),
        ({"images": np.full((2, 3, 3), -0.5)}, "0..255"),
        ({"images": np.full((2, 3, 3), np.nan)}, "finite"),
        ({"images": np.zeros((0, 3, 3), np.uint8)}, "empty"),
        ({"images": np.zeros((2, 3, 3), np.uint8), "labels": np.zeros(3, np.int64)}, "labels"),
        ({"images": np.zeros((2, 3, 3), np.uint8), "labels": np.array([0, -2])}, "negative"),
    ],
)
def test_load_npz_errors_name_file(tmp_path: Path, arrays, match) -> None:
    p = tmp_path / "broken_data.npz"
    np.savez(p, **arrays)
    with pytest.raises(DatasetError, match=match) as ei:
        load_npz(p)
    assert "broken_data.npz" in str(ei.value)


def test_load_npz_not_an_npz(tmp_path: Path) -> None:
    p = tmp_path / "junk.npz"
    p.write_bytes(b"this is not a zip archive at all")
    with pytest.raises(DatasetError, match=re.escape("junk.npz")):
        load_npz(p)
    q = tmp_path / "single.npz"
    with q.open("wb") as f:
        np.save(f, np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(DatasetError, match=re.escape("single.npz")):
        load_npz(q)
    with pytest.raises(DatasetError, match=re.escape("missing.npz")):
        load_npz(tmp_path / "missing.npz")


def test_load_npz_value_error_reports_item(tmp_path: Path) -> None:
    imgs = np.zeros((5, 2, 2), np.int32)
    imgs[3, 1, 0] = 300
    np.savez(tmp_path / "v.npz", images=imgs)
    with pytest.raises(DatasetError, match=r"item 3"):
        load_npz(tmp_path / "v.npz")


# ----------------------------------------------------------------------------- idx


@pytest.mark.parametrize("gz", [False, True])
def test_load_idx_with_sibling_labels(tmp_path: Path, gz: bool) -> None:
    imgs = _rand_u8((5, 7, 6))
    lab = np.array([9, 0, 4, 4, 1])
    suffix = ".gz" if gz else ""
    ip = tmp_path / f"train-images-idx3-ubyte{suffix}"
    _write_idx_images(ip, imgs, gz=gz)
    _write_idx_labels(tmp_path / f"train-labels-idx1-ubyte{suffix}", lab, gz=gz)
    ds = load_idx(ip)
    assert ds.images.shape == (5, 1, 7, 6)
    np.testing.assert_array_equal(ds.images[:, 0], imgs)
    np.testing.assert_array_equal(ds.labels, lab)
    assert ds.label_names == tuple(str(i) for i in range(10))
    assert ds.refs[2] == f"{ip.name}:2"
    assert ds.name == "train-images-idx3-ubyte"
    assert load_dataset(str(ip)).fingerprint() == ds.fingerprint()


def test_load_idx_sibling_mixed_compression(tmp_path: Path) -> None:
    imgs = _rand_u8((3, 4, 4))
    ip = tmp_path / "t10k-images-idx3-ubyte.gz"
    _write_idx_images(ip, imgs, gz=True)
    _write_idx_labels(tmp_path / "t10k-labels-idx1-ubyte", np.array([1, 2, 3]))
    np.testing.assert_array_equal(load_idx(ip).labels, [1, 2, 3])


def test_load_idx_without_labels_and_explicit_labels(tmp_path: Path) -> None:
    imgs = _rand_u8((3, 4, 4))
    ip = tmp_path / "some-images.idx"
    _write_idx_images(ip, imgs)
    ds = load_idx(ip)
    assert ds.labels is None and ds.label_names is None
    lp = tmp_path / "elsewhere.bin"
    _write_idx_labels(lp, np.array([2, 0, 1]))
    np.testing.assert_array_equal(load_idx(ip, lp).labels, [2, 0, 1])
    # A file with "labels" in place of "images" is found automatically.
    _write_idx_labels(tmp_path / "some-labels.idx", np.array([1, 1, 0]))
    np.testing.assert_array_equal(load_idx(ip).labels, [1, 1, 0])


def test_load_idx_bad_magic(tmp_path: Path) -> None:
    ip = tmp_path / "weird-images"
    _write_idx_images(ip, _rand_u8((2, 3, 3)), magic=0x00000801)
    with pytest.raises(DatasetError, match="magic") as ei:
        load_idx(ip)
    assert "weird-images" in str(ei.value)
    lp = tmp_path / "lab.bin"
    _write_idx_labels(lp, np.array([0, 1]), magic=0x00000803)
    _write_idx_images(ip, _rand_u8((2, 3, 3)))
    with pytest.raises(DatasetError, match=re.escape("lab.bin")):
        load_idx(ip, lp)


@pytest.mark.parametrize("gz", [False, True])
def test_load_idx_truncated(tmp_path: Path, gz: bool) -> None:
    ip = tmp_path / "cut-images-idx3-ubyte"
    full = struct.pack(">IIII", 0x803, 4, 3, 3) + bytes(4 * 9)
    ip.write_bytes(gzip.compress(full[:-5]) if gz else full[:-5])
    with pytest.raises(DatasetError, match="truncated") as ei:
        load_idx(ip)
    assert ip.name in str(ei.value)
    ip.write_bytes(full[:10])
    with pytest.raises(DatasetError, match="cut-images"):
        load_idx(ip)


def test_load_idx_corrupt_gzip(tmp_path: Path) -> None:
    ip = tmp_path / "z-images.gz"
    ip.write_bytes(gzip.compress(struct.pack(">IIII", 0x803, 1, 2, 2) + bytes(4))[:-6])
    with pytest.raises(DatasetError, match=re.escape("z-images.gz")):
        load_idx(ip)


def test_load_idx_label_count_mismatch(tmp_path: Path) -> None:
    ip = tmp_path / "a-images-idx3-ubyte"
    _write_idx_images(ip, _rand_u8((4, 2, 2)))
    lp = tmp_path / "a-labels-idx1-ubyte"
    _write_idx_labels(lp, np.array([0, 1, 2]))
    with pytest.raises(DatasetError, match="a-labels-idx1-ubyte"):
        load_idx(ip)


# ----------------------------------------------------------------------------- folders


def test_load_folder_flat_gray_roundtrip(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    arrs = [_rand_u8((6, 5), seed=s) for s in range(3)]
    for name, a in zip(["b.png", "a.PNG", "c.png"], arrs, strict=True):
        _save(root / name, a)
    (root / "notes.txt").write_text("ignore me")
    (root / "x.gif").write_bytes(b"GIF89a")
    ds = load_folder(root)
    assert ds.name == "flat"
    assert ds.refs == ("a.PNG", "b.png", "c.png")
    assert ds.images.shape == (3, 1, 6, 5)
    assert ds.labels is None and ds.label_names is None
    np.testing.assert_array_equal(ds.images[0, 0], arrs[1])
    np.testing.assert_array_equal(ds.images[1, 0], arrs[0])
    assert load_dataset(str(root)).fingerprint() == ds.fingerprint()


def test_load_folder_subfolder_labels(tmp_path: Path) -> None:
    root = tmp_path / "classes"
    cats = _rand_u8((4, 4), seed=1)
    _save(root / "zebra" / "z1.png", cats)
    _save(root / "cat" / "c2.png", cats)
    _save(root / "cat" / "c1.jpeg", np.full((4, 4), 200, np.uint8))
    _save(root / "cat" / "deeper" / "c3.JPG", np.full((4, 4), 10, np.uint8), fmt="JPEG")
    ds = load_folder(root)
    assert ds.label_names == ("cat", "zebra")
    assert ds.refs == ("cat/c1.jpeg", "cat/c2.png", "cat/deeper/c3.JPG", "zebra/z1.png")
    np.testing.assert_array_equal(ds.labels, [0, 0, 0, 1])
    assert ds.C == 1
    np.testing.assert_array_equal(ds.images[1, 0], cats)
    np.testing.assert_array_equal(ds.images[3, 0], cats)
    # JPEG is lossy; uniform images survive nearly exactly.
    assert abs(int(ds.images[0].mean()) - 200) <= 2
    assert abs(int(ds.images[2].mean()) - 10) <= 2


def test_load_folder_colour_promotes_all(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    gray = _rand_u8((5, 4), seed=3)
    rgb = _rand_u8((5, 4, 3), seed=4)
    _save(root / "a_gray.png", gray)
    _save(root / "b_rgb.png", rgb)
    _save(root / "c_bilevel.png", (gray > 128).astype(np.uint8) * 255, mode="1")
    ds = load_folder(root)
    assert ds.images.shape == (3, 3, 5, 4)
    for ch in range(3):
        np.testing.assert_array_equal(ds.images[0, ch], gray)
        np.testing.assert_array_equal(ds.images[2, ch], (gray > 128).astype(np.uint8) * 255)
    np.testing.assert_array_equal(ds.images[1], rgb.transpose(2, 0, 1))


def test_load_folder_gray_modes_stay_single_channel(tmp_path: Path) -> None:
    root = tmp_path / "grays"
    base = _rand_u8((4, 4), seed=5)
    _save(root / "l.png", base)
    la = np.stack([base, np.full_like(base, 255)], axis=-1)
    Image.fromarray(la, mode="LA").save(root / "la.png")
    Image.fromarray(base.astype(np.uint16) * 257).save(root / "i16.png")
    pal = Image.fromarray(base).convert("P")  # gray palette
    pal.save(root / "p_gray.png")
    ds = load_folder(root)
    assert ds.C == 1
    for i in range(4):
        np.testing.assert_array_equal(ds.images[i, 0], base)


def test_load_folder_alpha_and_palette(tmp_path: Path) -> None:
    root = tmp_path / "alpha"
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = [[255, 0], [255, 255]]
    root.mkdir()
    Image.fromarray(rgba, mode="RGBA").save(root / "a.png")
    pal = Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255]]] * 2, np.uint8)).convert(
        "P", palette=Image.Palette.ADAPTIVE, colors=4
    )
    pal.save(root / "b.png")
    ds = load_folder(root)
    assert ds.C == 3
    # Transparent pixel composited over black, opaque pixels keep their colour.
    np.testing.assert_array_equal(ds.images[0, 0], [[200, 0], [200, 200]])
    np.testing.assert_array_equal(ds.images[0, 1], np.zeros((2, 2)))
    np.testing.assert_array_equal(ds.images[1, :, 0, 0], [255, 0, 0])
    np.testing.assert_array_equal(ds.images[1, :, 0, 1], [0, 0, 255])


def test_load_folder_size_mismatch(tmp_path: Path) -> None:
    root = tmp_path / "sizes"
    _save(root / "a.png", np.zeros((4, 4), np.uint8))
    _save(root / "b.png", np.zeros((4, 4), np.uint8))
    _save(root / "c.png", np.zeros((5, 4), np.uint8))
    _save(root / "d.png", np.zeros((6, 6), np.uint8))
    with pytest.raises(DatasetError) as ei:
        load_folder(root)
    msg = str(ei.value)
    assert "c.png" in msg and "d.png" not in msg
    assert "4x5" in msg and "4x4" in msg


def test_load_folder_truncated_png(tmp_path: Path) -> None:
    root = tmp_path / "trunc"
    _save(root / "good.png", _rand_u8((16, 16)))
    good = (root / "good.png").read_bytes()
    (root / "zbad.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(DatasetError, match=re.escape("zbad.png")):
        load_folder(root)


def test_load_folder_fake_png(tmp_path: Path) -> None:
    root = tmp_path / "fake"
    _save(root / "good.png", _rand_u8((4, 4)))
    (root / "evil.png").write_text("<html>not an image</html>")
    with pytest.raises(DatasetError, match=re.escape("evil.png")):
        load_folder(root)


def test_load_folder_truncated_jpeg(tmp_path: Path) -> None:
    root = tmp_path / "tj"
    _save(root / "a.jpg", _rand_u8((32, 32, 3)), fmt="JPEG")
    data = (root / "a.jpg").read_bytes()
    (root / "a.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=re.escape("a.jpg")):
        load_folder(root)


def test_load_folder_root_images_with_subfolders(tmp_path: Path) -> None:
    root = tmp_path / "messy"
    _save(root / "cls" / "a.png", np.zeros((3, 3), np.uint8))
    _save(root / "stray.png", np.zeros((3, 3), np.uint8))
    with pytest.raises(DatasetError, match=re.escape("stray.png")):
        load_folder(root)


def test_load_folder_empty_and_missing(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    (root / "sub").mkdir(parents=True)
    (root / "readme.md").write_text("no images here")
    with pytest.raises(DatasetError, match="no images") as ei:
        load_folder(root)
    assert "empty" in str(ei.value)
    with pytest.raises(DatasetError, match="nowhere"):
        load_folder(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- dispatch


def test_load_dataset_dispatch(tmp_path: Path) -> None:
    assert load_dataset("digits").images.shape == (1797, 1, 8, 8)
    with (tmp_path / "d.NPZ").open("wb") as f:
        np.savez(f, images=_rand_u8((2, 3, 3)))
    assert load_dataset(str(tmp_path / "d.NPZ")).refs == ("d.NPZ:0", "d.NPZ:1")
    _write_idx_images(tmp_path / "raw-images", _rand_u8((2, 3, 3)))
    assert load_dataset(str(tmp_path / "raw-images")).N == 2
    # A non-npz, non-idx file goes to the IDX loader and fails naming the file.
    (tmp_path / "notes.txt").write_text("hello world, definitely not idx")
    with pytest.raises(DatasetError, match=re.escape("notes.txt")):
        load_dataset(str(tmp_path / "notes.txt"))


def test_load_dataset_missing_lists_forms(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as ei:
        load_dataset(str(tmp_path / "nope"))
    msg = str(ei.value)
    assert "nope" in msg
    for form in ("digits", "directory", ".npz", "IDX"):
        assert form in msg


def test_load_folder_ignores_hidden_files(tmp_path: Path) -> None:
    root = tmp_path / "hid"
    _save(root / "a.png", _rand_u8((3, 3)))
    (root / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble junk")
    _save(root / ".cache" / "b.png", _rand_u8((9, 9)))
    ds = load_folder(root)
    assert ds.refs == ("a.png",) and ds.labels is None


def test_load_idx_trailing_bytes(tmp_path: Path) -> None:
    ip = tmp_path / "long-images"
    ip.write_bytes(struct.pack(">IIII", 0x803, 2, 2, 2) + bytes(8) + b"extra")
    with pytest.raises(DatasetError, match="trailing") as ei:
        load_idx(ip)
    assert "long-images" in str(ei.value)
