from __future__ import annotations

import re
import socket
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from torchvision import models as tv

from models.distances import (
    BACKBONE_ENV_VAR,
    LPIPSMetric,
    LPIPSUnavailable,
    l2_distance,
    load_lpips,
    lpips_backbone_path,
)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test fails loudly if anything tries to download weights or open a connection."""

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", boom)
    monkeypatch.setattr(torch.hub, "download_url_to_file", boom)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", boom)
    monkeypatch.setattr(urllib.request, "urlopen", boom)
    monkeypatch.setattr(socket.socket, "connect", boom)


@pytest.fixture(scope="module")
def metric() -> LPIPSMetric:
    return load_lpips(random_trunk=True)


def _images(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) * 2 - 1


# --------------------------------------------------------------------------------------------
# l2


@pytest.mark.parametrize(
    ("shape_a", "shape_b"),
    [
        ((3, 2, 4, 4), (3, 2, 4, 4)),
        ((5, 1, 1, 3, 3), (1, 4, 1, 3, 3)),
        ((1, 8, 8), (6, 1, 8, 8)),
        ((2, 3, 5, 7), (3, 5, 7)),
    ],
)
def test_l2_matches_numpy_with_broadcasting(
    shape_a: tuple[int, ...], shape_b: tuple[int, ...]
) -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal(shape_a)
    b = rng.standard_normal(shape_b)
    got = l2_distance(torch.from_numpy(a), torch.from_numpy(b)).numpy()

    a_bc, b_bc = np.broadcast_arrays(a, b)
    lead = a_bc.shape[:-3]
    want = np.empty(lead)
    for idx in np.ndindex(*lead):
        diff = (a_bc[idx] - b_bc[idx]).ravel()
        want[idx] = np.sqrt(sum(float(d) ** 2 for d in diff))
    assert got.shape == lead
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_l2_zero_and_int_promotion() -> None:
    a = torch.randint(0, 255, (4, 1, 8, 8))
    assert l2_distance(a, a).dtype == torch.float32
    assert torch.equal(l2_distance(a, a), torch.zeros(4))
    with pytest.raises(ValueError, match=re.escape("l2_distance expects (..., C, H, W) tensors, got shapes "
                                                   "(8, 8) and (8, 8)")):
        l2_distance(torch.zeros(8, 8), torch.zeros(8, 8))


# --------------------------------------------------------------------------------------------
# LPIPS, random trunk


def test_random_trunk_flag_and_determinism(metric: LPIPSMetric) -> None:
    assert metric.random_trunk is True
    assert metric.backbone_path is None
    state = torch.get_rng_state()
    other = load_lpips(random_trunk=True)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    for p, q in zip(metric.model.parameters(), other.model.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("shape", [(4, 1, 8, 8), (3, 3, 32, 32), (2, 3, 70, 65)])
def test_lpips_basic_properties(metric: LPIPSMetric, shape: tuple[int, ...]) -> None:
    a = _images(*shape, seed=1)
    b = _images(*shape, seed=2)
    d_ab = metric(a, b)
    assert d_ab.shape == shape[:1]
    assert d_ab.dtype == torch.float32
    assert torch.all(d_ab > 0)
    torch.testing.assert_close(d_ab, metric(b, a))
    torch.testing.assert_close(metric(a, a), torch.zeros(shape[0]), atol=1e-6, rtol=0)


def test_lpips_grayscale_equals_repeated_rgb(metric: LPIPSMetric) -> None:
    a = _images(3, 1, 8, 8, seed=3)
    b = _images(3, 1, 8, 8, seed=4)
    torch.testing.assert_close(metric(a, b), metric(a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1)))


def test_lpips_broadcast_and_batched_shapes(metric: LPIPSMetric) -> None:
    m, n = 3, 4
    queries = _images(m, 1, 1, 8, 8, seed=5)
    refs = _images(1, n, 1, 8, 8, seed=6)
    d = metric(queries, refs)
    assert d.shape == (m, n)
    for i in range(m):
        torch.testing.assert_close(d[i], metric(queries[i, 0].expand(n, 1, 8, 8), refs[0]))
    full_a = _images(m, n, 3, 16, 16, seed=7)
    full_b = _images(m, n, 3, 16, 16, seed=8)
    d_full = metric(full_a, full_b)
    assert d_full.shape == (m, n)
    torch.testing.assert_close(
        d_full.reshape(-1), metric(full_a.flatten(0, 1), full_b.flatten(0, 1))
    )
    # Unbatched single images -> scalar.
    assert metric(full_a[0, 0], full_b[0, 0]).shape == ()


def test_lpips_chunking_is_invisible(metric: LPIPSMetric) -> None:
    a = _images(3, 1, 1, 8, 8, seed=9)
    b = _images(1, 5, 1, 8, 8, seed=10)
    one = metric(a, b, chunk_size=10_000)
    for chunk in (1, 2, 7):
        torch.testing.assert_close(metric(a, b, chunk_size=chunk), one, atol=1e-6, rtol=1e-5)


def test_lpips_rejects_bad_inputs(metric: LPIPSMetric) -> None:
    with pytest.raises(ValueError, match="LPIPS expects 1 or 3 channels, got 2"):
        metric(torch.zeros(2, 2, 8, 8), torch.zeros(2, 2, 8, 8))
    with pytest.raises(ValueError, match=re.escape("LPIPS needs matching (C, H, W), got (3, 8, 8) "
                                                   "and (3, 16, 16)")):
        metric(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match=re.escape("LPIPS expects (..., C, H, W) tensors, got shapes "
                                                   "(8, 8) and (2, 1, 8, 8)")):
        metric(torch.zeros(8, 8), torch.zeros(2, 1, 8, 8))
    # the code's own check: range(0, n, 0) would raise a ValueError of its own
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        metric(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8), chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        LPIPSMetric(metric.model, net="alex", random_trunk=True, backbone_path=None,
                    device=metric.device, chunk_size=0)
    with pytest.raises(ValueError, match=re.escape("unsupported LPIPS net 'squeeze'; expected one of "
                                                   "['alex', 'vgg']")):
        load_lpips("squeeze", random_trunk=True)


# --------------------------------------------------------------------------------------------
# LPIPS, ImageNet trunk from disk


def test_backbone_path_default_and_override(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(BACKBONE_ENV_VAR, raising=False)
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    assert lpips_backbone_path() == checkpoints / "alexnet-owt-7be5be79.pth"
    assert lpips_backbone_path("vgg") == checkpoints / "vgg16-397923af.pth"
    with pytest.raises(ValueError, match="unsupported LPIPS net 'squeeze'"):
        lpips_backbone_path("squeeze")
    monkeypatch.setenv(BACKBONE_ENV_VAR, str(tmp_path / "x.pth"))
    assert lpips_backbone_path() == tmp_path / "x.pth"


def test_missing_weights_raise_with_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "alexnet-owt-7be5be79.pth"
    monkeypatch.setenv(BACKBONE_ENV_VAR, str(missing))
    with pytest.raises(LPIPSUnavailable) as info:
        load_lpips()
    msg = str(info.value)
    assert str(missing) in msg
    assert "alexnet-owt-7be5be79.pth" in msg
    assert BACKBONE_ENV_VAR in msg
    assert str(Path(torch.hub.get_dir()) / "checkpoints") in msg

    other = tmp_path / "explicit.pth"
    with pytest.raises(LPIPSUnavailable, match=re.escape(str(other))):
        load_lpips(backbone_path=other)


def test_weights_file_round_trip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    torch.manual_seed(123)
    ref = tv.alexnet(weights=None).eval()
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(ref.state_dict(), path)
    monkeypatch.setenv(BACKBONE_ENV_VAR, str(path))

    metric = load_lpips()
    assert metric.random_trunk is False
    assert metric.backbone_path == path

    saved = {k: v for k, v in torch.load(path).items() if k.startswith("features.")}
    trunk: Any = metric.model.net
    loaded = {
        f"features.{idx}.{name}": t
        for k in range(1, trunk.N_slices + 1)
        for idx, layer in getattr(trunk, f"slice{k}").named_children()
        for name, t in layer.named_parameters()
    }
    assert set(loaded) == set(saved)
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key

    # The lpips trunk computes exactly torchvision's features (up to relu5, before the last pool).
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(trunk(x).relu5, ref.features[:12](x))

    a, b = _images(2, 1, 8, 8, seed=11), _images(2, 1, 8, 8, seed=12)
    assert torch.all(metric(a, b) > 0)


def test_corrupt_weights_raise(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bad = tmp_path / "alexnet-owt-7be5be79.pth"
    bad.write_bytes(b"this is not a checkpoint")
    monkeypatch.setenv(BACKBONE_ENV_VAR, str(bad))
    with pytest.raises(LPIPSUnavailable) as info:
        load_lpips()
    assert str(bad) in str(info.value)


def test_wrong_architecture_weights_raise(tmp_path: Path) -> None:
    path = tmp_path / "not_alexnet.pth"
    torch.save({"features.0.weight": torch.zeros(3, 3, 3, 3)}, path)
    with pytest.raises(LPIPSUnavailable, match=re.escape(str(path))):
        load_lpips(backbone_path=path)
