"""Tests for models.train: stacked training is n independent DDPM runs."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from models.codes import CodeBook, make_codebook
from models.ensemble import PRESETS, DatasetInfo, Ensemble
from models.schedule import NoiseSchedule
from models.train import Batch, TrainConfig, draw_batch, make_optimizer, member_losses, train
from models.unet import WideUNet, stack_states
from tests.conftest import TinyData

CFG = PRESETS["tiny"].unet((1, 8, 8))


def _splits(book: CodeBook) -> list[torch.Tensor]:
    return [torch.from_numpy(s) for s in book.member_items()]


def test_draw_batch_uses_each_members_split() -> None:
    N, n = 20, 6
    book = make_codebook(N, n, 3, seed=0)
    x_all = torch.arange(N, dtype=torch.float32)[:, None, None, None].expand(N, 1, 8, 8)
    g = torch.Generator().manual_seed(0)
    b = draw_batch(x_all, _splits(book), 16, 20, g)
    assert b.x_0.shape == (n, 16, 1, 8, 8) and b.eps.shape == (n, 16, 1, 8, 8)
    assert b.t.shape == (n, 16) and b.t.dtype == torch.long
    assert int(b.t.min()) >= 0 and int(b.t.max()) < 20
    for i, split in enumerate(book.member_items()):
        drawn = {int(v) for v in b.x_0[i, :, 0, 0, 0]}
        assert drawn <= set(split.tolist()), f"member {i} drew outside its split"
    again = draw_batch(x_all, _splits(book), 16, 20, torch.Generator().manual_seed(0))
    for a, c in ((b.x_0, again.x_0), (b.t, again.t), (b.eps, again.eps)):
        assert torch.equal(a, c)
    other = draw_batch(x_all, _splits(book), 16, 20, torch.Generator().manual_seed(1))
    assert not torch.equal(b.eps, other.eps)


def test_member_losses_by_hand() -> None:
    n, B = 3, 4
    net = WideUNet(CFG, n, torch.Generator().manual_seed(0))
    sch = NoiseSchedule(20)
    g = torch.Generator().manual_seed(1)
    batch = Batch(torch.rand(n, B, 1, 8, 8, generator=g) * 2 - 1,
                  torch.randint(20, (n, B), generator=g), torch.randn(n, B, 1, 8, 8, generator=g))
    losses = member_losses(net, sch, batch)
    assert losses.shape == (n,)
    for i in range(n):
        ab = sch.alpha_bar[batch.t[i]].float()[:, None, None, None]
        x_t = ab.sqrt() * batch.x_0[i] + (1 - ab).sqrt() * batch.eps[i]
        pred = net.member(i)(x_t, batch.t[i])[0]
        expected = ((pred - batch.eps[i]) ** 2).mean()
        torch.testing.assert_close(losses[i], expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("n", [4, 6])
def test_batched_training_equals_independent_members(n: int) -> None:
    """One Adam on the wide net with sum of member losses == n separate Adam runs."""
    N, B, T, lr, steps = min(20, math.comb(n, n // 2)), 4, 20, 1e-2, 3
    book = make_codebook(N, n, n // 2, seed=1)
    splits = _splits(book)
    x_all = (torch.rand(N, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1).double()
    sch = NoiseSchedule(T)
    net = WideUNet(CFG, n, torch.Generator().manual_seed(3)).double()
    init = copy.deepcopy(net.state_dict())
    singles = [net.member(i) for i in range(n)]  # copies taken before training
    opt = make_optimizer(net.parameters(), lr)
    opts = [make_optimizer(s.parameters(), lr) for s in singles]
    g = torch.Generator().manual_seed(4)
    for _ in range(steps):
        b = draw_batch(x_all, splits, B, T, g)
        b = Batch(b.x_0.double(), b.t, b.eps.double())
        losses = member_losses(net, sch, b)
        opt.zero_grad()
        losses.sum().backward()
        opt.step()
        for i, (single, o) in enumerate(zip(singles, opts, strict=True)):
            x_t = sch.q_sample(b.x_0[i], b.t[i], b.eps[i])
            loss = ((single(x_t, b.t[i])[0] - b.eps[i]) ** 2).mean()
            torch.testing.assert_close(loss, losses[i].detach(), atol=1e-12, rtol=1e-10)
            o.zero_grad()
            loss.backward()
            o.step()
    wide = net.state_dict()
    separate = stack_states([s.state_dict() for s in singles])
    moved = 0.0
    for k, v in wide.items():
        torch.testing.assert_close(v, separate[k], atol=1e-10, rtol=1e-8, msg=k)
        moved = max(moved, float((v - init[k]).abs().max()))
    assert moved > 1e-3  # training really changed the parameters


def _tiny(N: int, n: int, seed: int = 0) -> tuple[Ensemble, torch.Tensor]:
    book = make_codebook(N, n, n // 2, seed=seed)
    x = torch.rand(N, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    info = DatasetInfo("random", f"rand{seed}", N, (1, 8, 8))
    return Ensemble.create(PRESETS["tiny"], book, info, seed=seed), x


def test_train_equals_manual_loop() -> None:
    """train() is exactly draw_batch + sum of member losses + one Adam, from cfg.seed."""
    ens, x = _tiny(20, 6)
    manual = copy.deepcopy(ens.net)
    cfg = TrainConfig(steps=3, batch_size=4, lr=3e-3, seed=11)
    seen: list[tuple[int, torch.Tensor]] = []
    train(ens, x, cfg, progress=lambda s, losses: seen.append((s, losses.clone())))
    assert [s for s, _ in seen] == [1, 2, 3]
    assert ens.train_state is not None and ens.train_state["step"] == 3

    opt = make_optimizer(manual.parameters(), cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    for step in range(3):
        b = draw_batch(x, _splits(ens.codebook), cfg.batch_size, ens.schedule.T, g)
        losses = member_losses(manual, ens.schedule, b)
        assert torch.equal(losses.detach(), seen[step][1])
        opt.zero_grad()
        losses.sum().backward()
        opt.step()
    for k, v in manual.state_dict().items():
        assert torch.equal(v, ens.net.state_dict()[k]), k


def test_train_is_reproducible_and_seed_matters() -> None:
    a, x = _tiny(20, 6)
    b, _ = _tiny(20, 6)
    c, _ = _tiny(20, 6)
    train(a, x, TrainConfig(4, 4, 2e-3, seed=0))
    train(b, x, TrainConfig(4, 4, 2e-3, seed=0))
    train(c, x, TrainConfig(4, 4, 2e-3, seed=1))
    sa, sb, sc = a.net.state_dict(), b.net.state_dict(), c.net.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_train_rejects_empty_split() -> None:
    book = CodeBook(4, 2, "item", ("item:0",), np.array([0b0011]), np.array([0]))
    info = DatasetInfo("one", "x", 1, (1, 8, 8))
    ens = Ensemble.create(PRESETS["tiny"], book, info, seed=0)
    with pytest.raises(ValueError, match="empty"):
        train(ens, torch.zeros(1, 1, 8, 8), TrainConfig(1, 2, 1e-3))


def test_train_config_validation() -> None:
    for bad in ((-1, 4, 1e-3), (1, 0, 1e-3), (1, 4, 0.0)):
        with pytest.raises(ValueError, match="steps >= 0, batch_size >= 1 and lr > 0 are required"):
            TrainConfig(*bad)


def test_training_lowers_the_loss(tiny_data: TinyData, tiny_ensemble: Ensemble) -> None:
    """The session ensemble (40 steps) has a lower loss than its own initialisation."""
    fresh = WideUNet(tiny_ensemble.net.config, tiny_ensemble.n, torch.Generator().manual_seed(0))
    splits = _splits(tiny_ensemble.codebook)
    b = draw_batch(tiny_data.x, splits, 64, tiny_ensemble.schedule.T,
                   torch.Generator().manual_seed(5))
    with torch.no_grad():
        trained = member_losses(tiny_ensemble.net, tiny_ensemble.schedule, b)
        untrained = member_losses(fresh, tiny_ensemble.schedule, b)
    assert float(trained.mean()) < float(untrained.mean())


def test_a_duplicated_work_is_drawn_more_often_and_only_by_its_members(tiny_data: TinyData) -> None:
    """repeats lists work 5 four times in its members' splits: those members draw it about four
    times as often as before, and the members whose code lacks it train exactly as without repeats
    (their splits, and the shared generator's draws, are the same)."""
    from models.train import duplicated_splits
    from tests.conftest import make_tiny_ensemble

    book = make_tiny_ensemble(tiny_data).codebook
    repeats = np.ones(tiny_data.info.num_items, dtype=np.int64)
    repeats[5] = 4
    plain, dup = book.member_items(), duplicated_splits(book.member_items(), repeats)
    has = book.bits()[book.item_source[5]].astype(bool)
    for i in range(book.n):
        assert (np.count_nonzero(dup[i] == 5), len(dup[i])) == ((4, len(plain[i]) + 3) if has[i]
                                                                 else (0, len(plain[i])))
    cfg = TrainConfig(6, 8, 2e-3, seed=0)
    a, b = make_tiny_ensemble(tiny_data), make_tiny_ensemble(tiny_data)
    train(a, tiny_data.x, cfg)
    train(b, tiny_data.x, cfg, repeats=repeats)
    sa, sb = a.net.state_dict(), b.net.state_dict()
    from models.unet import member_state

    for i in range(book.n):
        pairs = zip(member_state(sa, i).values(), member_state(sb, i).values(), strict=True)
        same = all(torch.equal(x, y) for x, y in pairs)
        assert same is (not has[i]), i
    with pytest.raises(ValueError, match="one count >= 1 per item"):
        duplicated_splits(plain, np.zeros(tiny_data.info.num_items, dtype=np.int64))
    with pytest.raises(ValueError, match="repeats has 3 counts for 60 items"):
        train(a, tiny_data.x, cfg, repeats=np.ones(3, dtype=np.int64))
