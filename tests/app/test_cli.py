"""The `attrib` CLI end to end on a tiny ensemble: train -> generate -> attribute -> info."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.cli import main
from models.data import load_data
from models.ensemble import Ensemble
from models.sampler import make_tape, sample


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "tiny.pt"
    rc = main(["train", "--preset", "tiny", "--n", "8", "--subset", "40", "--steps", "12",
               "--checkpoint-every", "5", "--out", str(out), "--json", "--device", "cpu"])
    assert rc == 0
    return out


def _samples(ckpt: Path, seeds: list[int]) -> torch.Tensor:
    """The engine's samples for ``seeds``: the full ensemble, the checkpoint's T steps."""
    ens = Ensemble.load(ckpt).for_inference()
    return sample(ens.net, ens.schedule, make_tape(seeds, ens.shape, ens.schedule.T))


def _pixels(x: torch.Tensor, scale: int) -> np.ndarray:
    """One (1, H, W) image in [-1, 1] as the (H * scale, W * scale, 3) uint8 RGB block a figure shows."""
    a = ((x[0].clamp(-1, 1).numpy().astype(np.float64) + 1.0) * 127.5).round().astype(np.uint8)
    a = a.repeat(scale, axis=0).repeat(scale, axis=1)
    return np.repeat(a[..., None], 3, axis=2)


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def test_train_writes_a_loadable_checkpoint(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ens = Ensemble.load(ckpt)
    assert ens.n == 8 and ens.k == 4 and ens.codebook.num_sources == 40
    assert ens.train_state is not None and ens.train_state["step"] == 12
    assert ens.dataset.spec == "digits" and ens.dataset.subset == 40
    assert main(["info", "--ckpt", str(ckpt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["trained_steps"] == 12 and sum(info["items_per_member"]) == 40 * 4


def test_generate_is_reproducible(ckpt: Path, tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    for out, seeds in ((a, "3,4"), (b, "3-4"), (c, "5,6")):
        assert main(["generate", "--ckpt", str(ckpt), "--seeds", seeds, "--out", str(out),
                     "--device", "cpu"]) == 0
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    # the grid: one row of two 8x8 samples at --scale 4, 2-pixel white padding; nothing else
    x = _samples(ckpt, [3, 4])
    expected = np.full((2 + 8 * 4 + 2, 2 + 2 * (8 * 4 + 2), 3), 255, np.uint8)
    for i in range(2):
        expected[2:34, 2 + 34 * i: 34 + 34 * i] = _pixels(x[i], 4)
    np.testing.assert_array_equal(_png(a), expected)


def test_attribute_report_and_figure(ckpt: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    rj, rp = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["attribute", "--ckpt", str(ckpt), "--count", "2", "--top-k", "4",
               "--verify-top-k", "2", "--out-json", str(rj), "--out-png", str(rp),
               "--device", "cpu", "--json"])
    assert rc == 0
    report = json.loads(rj.read_text())
    assert report == json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(report["samples"]) == 2
    for s in report["samples"]:
        ranks = s["ranking"]
        assert [r["rank"] for r in ranks] == [1, 2, 3, 4]
        # the two verified first (the work nearest the sample among them), here in the order of
        # their exact scores (no work named or confirmed moves one first), then the synthetic rest
        exact = [r["exact_score"] for r in ranks[:2]]
        assert exact == sorted(exact, reverse=True)
        rest = [r["score"] for r in ranks[2:]]
        assert rest == sorted(rest, reverse=True)
        assert all("exact_score" in r for r in ranks[:2])
        assert all("exact_score" not in r for r in ranks[2:])
        assert all(r["source"].startswith("item:") and len(r["refs"]) == 1 for r in ranks)
        assert set(s["verification"]) >= {"spearman", "top1_agrees", "median_rel_err"}
    # Figure 2's layout (scale 6, 8x8 images, --figure-top 3): a 12-pixel title row, then one
    # column of cells 70 wide and 66 high per sample: the sample, its top 3 sources' first items
    fig = _png(rp)
    assert fig.shape == (12 + 4 * 66 + 6 + 4, 2 * 70 + 6, 3)
    x = _samples(ckpt, [s["seed"] for s in report["samples"]])
    ens = Ensemble.load(ckpt)
    train_x = load_data(ens.dataset.spec, ens.dataset.subset, ens.dataset.subset_seed).to_tensor()
    for b, s in enumerate(report["samples"]):
        x0 = 6 + 70 * b
        np.testing.assert_array_equal(fig[14:62, x0:x0 + 48], _pixels(x[b], 6))
        for j, entry in enumerate(s["ranking"][:3]):
            y0 = 16 + 66 * (j + 1)
            np.testing.assert_array_equal(fig[y0:y0 + 48, x0:x0 + 48], _pixels(train_x[entry["items"][0]], 6))


def test_lpips_without_weights_is_a_clear_error(ckpt: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope" / "alexnet-owt-7be5be79.pth"
    monkeypatch.setenv("ATTRIB_LPIPS_BACKBONE", str(missing))
    rc = main(["attribute", "--ckpt", str(ckpt), "--count", "1", "--metric", "lpips",
               "--device", "cpu"])
    assert rc == 2
    assert str(missing) in capsys.readouterr().err


def test_lpips_random_trunk_reranks(ckpt: Path, tmp_path: Path) -> None:
    rj = tmp_path / "r.json"
    rc = main(["attribute", "--ckpt", str(ckpt), "--count", "1", "--top-k", "3", "--rerank", "8",
               "--metric", "lpips", "--lpips-random-trunk", "--verify-top-k", "1",
               "--out-json", str(rj), "--device", "cpu"])
    assert rc == 0
    report = json.loads(rj.read_text())
    assert report["lpips_random_trunk"] is True
    ranks = report["samples"][0]["ranking"]
    assert [r["score"] for r in ranks] == sorted((r["lpips"] for r in ranks), reverse=True)
    assert "exact_score" in ranks[0]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["train", "--n", "4", "--subset", "40", "--preset", "tiny"], "smallest n that fits"),
        (["train", "--data", "/nonexistent/x.npz", "--preset", "tiny"], "/nonexistent/x.npz"),
        (["train", "--granularity", "owner", "--preset", "tiny"], "--owners"),
    ],
)
def test_bad_input_is_one_clear_line(argv: list[str], needle: str, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    rc = main([*argv, "--out", str(tmp_path / "x.pt"), "--device", "cpu"])
    assert rc == 2
    err = capsys.readouterr().err
    assert needle in err
    assert not (tmp_path / "x.pt").exists()


def test_existing_checkpoint_is_not_overwritten(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = ckpt.read_bytes()
    assert main(["train", "--preset", "tiny", "--out", str(ckpt), "--device", "cpu"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert ckpt.read_bytes() == before


def test_bad_seeds_and_steps(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "g.png")
    assert main(["generate", "--ckpt", str(ckpt), "--seeds", "a,b", "--out", out]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert main(["generate", "--ckpt", str(ckpt), "--steps", "9999", "--out", out]) == 2
    assert "--steps" in capsys.readouterr().err
    assert main(["generate", "--ckpt", str(tmp_path / "missing.pt"), "--out", out]) == 2
    assert "missing.pt" in capsys.readouterr().err
