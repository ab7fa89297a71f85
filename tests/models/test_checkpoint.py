"""Tests for models.ensemble checkpoints: bit-identical round trip, bad files, and resuming
an interrupted training run."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from models.codes import make_codebook
from models.ensemble import PRESETS, DatasetInfo, Ensemble
from models.sampler import make_tape, sample
from models.train import TrainConfig, train
from models.unet import UNetConfig

SHAPE = (1, 8, 8)


def _fresh(seed: int = 0, granularity: str = "item") -> tuple[Ensemble, torch.Tensor]:
    N, n = 20, 6
    labels = np.arange(N) % 5
    book = make_codebook(N, n, 3, seed=seed, granularity=granularity,
                         labels=labels if granularity == "class" else None)
    x = torch.rand(N, *SHAPE, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    info = DatasetInfo("random", f"sha-{seed}", N, SHAPE)
    return Ensemble.create(PRESETS["tiny"], book, info, seed=seed), x


def _assert_same(a: Ensemble, b: Ensemble) -> None:
    sa, sb = a.net.state_dict(), b.net.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert a.net.config == b.net.config
    assert a.n == b.n and a.k == b.k
    ca, cb = a.codebook, b.codebook
    assert (ca.n, ca.k, ca.granularity, ca.source_keys) == (cb.n, cb.k, cb.granularity,
                                                            cb.source_keys)
    assert cb.codes.dtype == np.int64
    np.testing.assert_array_equal(ca.codes, cb.codes)
    np.testing.assert_array_equal(ca.item_source, cb.item_source)
    assert a.dataset == b.dataset
    assert a.preset == b.preset
    assert (a.schedule.T, a.schedule.beta_start, a.schedule.beta_end) == (
        b.schedule.T, b.schedule.beta_start, b.schedule.beta_end)
    assert torch.equal(a.schedule.alpha_bar, b.schedule.alpha_bar)


def test_roundtrip_is_bit_identical(tiny_ensemble: Ensemble, tmp_path: Path) -> None:
    path = tiny_ensemble.save(tmp_path / "sub" / "ens.pt")
    assert path.is_file()
    assert not list(path.parent.glob("*.tmp"))  # the atomic write left no temporary file
    loaded = Ensemble.load(path)
    _assert_same(tiny_ensemble, loaded)
    assert loaded.dataset.shape == SHAPE and isinstance(loaded.dataset.shape, tuple)
    tape = make_tape([1, 2], SHAPE, 5)
    assert torch.equal(sample(tiny_ensemble.net, tiny_ensemble.schedule, tape),
                       sample(loaded.net, loaded.schedule, tape))


def test_roundtrip_class_codebook_and_attention(tmp_path: Path) -> None:
    ens, _ = _fresh(3, granularity="class")
    cfg = UNetConfig(1, 8, 8, (1, 2), attn_resolutions=(4,), norm_groups=4, heads=2)
    ens = Ensemble.create(PRESETS["tiny"], ens.codebook, ens.dataset, seed=3, unet=cfg)
    loaded = Ensemble.load(ens.save(tmp_path / "c.pt"))
    _assert_same(ens, loaded)
    assert loaded.codebook.granularity == "class"
    assert loaded.net.config.attn_resolutions == (4,)
    assert loaded.train_state is None


def test_not_a_checkpoint(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(ValueError, match=re.escape(str(junk))):
        Ensemble.load(junk)
    other = tmp_path / "other.pt"
    torch.save({"format": "something-else", "weights": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match=re.escape(str(other))):
        Ensemble.load(other)
    plain = tmp_path / "plain.pt"
    torch.save(torch.zeros(3), plain)
    with pytest.raises(ValueError, match=re.escape(str(plain))):
        Ensemble.load(plain)
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        Ensemble.load(tmp_path / "missing.pt")


def test_wrong_version(tmp_path: Path) -> None:
    ens, _ = _fresh()
    art = ens.to_artifact()
    art["version"] = 999
    path = tmp_path / "future.pt"
    torch.save(art, path)
    with pytest.raises(ValueError, match=r"future\.pt.*999"):
        Ensemble.load(path)


class Interrupt:
    """A progress callback that simulates Ctrl-C after a given step."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.steps: list[int] = []

    def __call__(self, step: int, losses: torch.Tensor) -> None:
        self.steps.append(step)
        if step == self.at:
            raise KeyboardInterrupt


def test_resume_after_interruption_equals_uninterrupted(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=10, batch_size=4, lr=3e-3, seed=5, checkpoint_every=1000)
    ref, x = _fresh(1)
    train(ref, x, cfg)

    ens, _ = _fresh(1)
    ckpt = tmp_path / "run.pt"
    stop = Interrupt(6)
    with pytest.raises(KeyboardInterrupt):
        train(ens, x, cfg, checkpoint=ckpt, progress=stop)
    assert stop.steps == [1, 2, 3, 4, 5, 6]
    assert ckpt.is_file(), "the interrupt handler did not save"

    mid = Ensemble.load(ckpt)
    assert mid.train_state is not None and mid.train_state["step"] == 6
    _assert_same(ens, mid)  # what was saved is the state at the interruption
    assert not all(torch.equal(v, ref.net.state_dict()[k])
                   for k, v in mid.net.state_dict().items())

    rest = Interrupt(-1)
    train(mid, x, cfg, checkpoint=ckpt, progress=rest)
    assert rest.steps == [7, 8, 9, 10]
    for k, v in ref.net.state_dict().items():
        torch.testing.assert_close(mid.net.state_dict()[k], v, atol=1e-6, rtol=0, msg=k)
        assert torch.equal(mid.net.state_dict()[k], v), f"{k} differs after resuming"

    final = Ensemble.load(ckpt)
    assert final.train_state is not None and final.train_state["step"] == 10
    _assert_same(ref, final)
    # the optimiser moments match the uninterrupted run too
    assert ref.train_state is not None
    s_ref, s_fin = ref.train_state["optimizer"]["state"], final.train_state["optimizer"]["state"]
    assert s_ref.keys() == s_fin.keys()
    for key in s_ref:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(s_ref[key][name], s_fin[key][name])

    # training past the end is a no-op
    again = copy.deepcopy(final)
    train(again, x, cfg)
    _assert_same(final, again)


def test_extend_training_in_memory_and_from_disk(tmp_path: Path) -> None:
    """10 steps, then the same run extended to 13 (in memory, or from the saved file) ==
    13 steps in one go."""
    cfg10 = TrainConfig(steps=10, batch_size=4, lr=3e-3, seed=7)
    cfg13 = TrainConfig(steps=13, batch_size=4, lr=3e-3, seed=7)
    ref, x = _fresh(4)
    train(ref, x, cfg13)
    ens, _ = _fresh(4)
    train(ens, x, cfg10, checkpoint=tmp_path / "a.pt")
    from_disk = Ensemble.load(tmp_path / "a.pt")
    train(ens, x, cfg13)
    train(from_disk, x, cfg13)
    _assert_same(ref, ens)
    _assert_same(ref, from_disk)


def test_periodic_checkpoints(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=5, batch_size=4, lr=3e-3, seed=2, checkpoint_every=2)
    ens, x = _fresh(2)
    ckpt = tmp_path / "p.pt"
    saved: list[int] = []

    def watch(step: int, losses: torch.Tensor) -> None:
        if ckpt.is_file():
            saved.append(int(Ensemble.load(ckpt).train_state["step"]))  # type: ignore[index]

    train(ens, x, cfg, checkpoint=ckpt, progress=watch)
    # progress runs before the save of its own step: it sees the previous checkpoint
    assert saved == [2, 2, 4]
    assert Ensemble.load(ckpt).train_state["step"] == 5  # type: ignore[index]


def test_loaded_checkpoint_for_inference(tiny_ensemble: Ensemble, tmp_path: Path) -> None:
    loaded = Ensemble.load(tiny_ensemble.save(tmp_path / "e.pt")).for_inference()
    assert all(not p.requires_grad for p in loaded.net.parameters())
    assert not loaded.net.training
