"""Train all n members at once.

Each member is an ordinary DDPM (Ho et al. 2020, Algorithm 1: epsilon prediction, MSE
loss) on its own split. The wide network takes one input slice per member, so member i's
minibatch is drawn from its own split; the loss is the *sum* of the members' mean losses,
whose gradient with respect to member i's parameters is exactly member i's own gradient.
Adam is element-wise, so one Adam over the stacked parameters is n independent runs.

``TrainSpec`` and ``create_ensemble`` build a fresh ensemble (code book, initialised members,
the record of its data) from typed options; ``train`` trains it.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from models.codes import balanced_codes, default_k, make_codebook
from models.data import ImageDataset
from models.ensemble import PRESETS, DatasetInfo, Ensemble, Preset
from models.schedule import NoiseSchedule
from models.unet import WideUNet


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int
    lr: float
    seed: int = 0
    checkpoint_every: int = 200

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("steps >= 0, batch_size >= 1 and lr > 0 are required")


@dataclass(frozen=True)
class TrainSpec:
    """A fresh encoded ensemble and how to train it.

    Attributes:
        data, subset, subset_seed: the training data as ``models.data.load_data`` takes it
            (recorded in the checkpoint, so the data can be reloaded).
        preset: a name in ``models.ensemble.PRESETS``.
        n, k: ensemble size and code weight (None: n/2).
        granularity: what one code stands for: "item", "class" or "owner".
        codes: "random" (``make_codebook``'s) or "balanced" (``balanced_codes``: Hadamard rows,
            every pair of sources shares n/4 members; needs k = n/2).
        seed: seed of the codes, the members' initialisation and the minibatches.
        steps, batch_size, lr: training; None takes the preset's.
        checkpoint_every: save every this many steps (None: only at the end).
    """

    data: str = "digits"
    subset: int | None = None
    subset_seed: int = 0
    preset: str = "digits"
    n: int = 16
    k: int | None = None
    granularity: str = "item"
    codes: Literal["random", "balanced"] = "random"
    seed: int = 0
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    checkpoint_every: int | None = None

    @property
    def network(self) -> Preset:
        """The preset; ValueError naming the known ones if there is no such preset."""
        preset = PRESETS.get(self.preset)
        if preset is None:
            raise ValueError(f"unknown preset {self.preset!r} (one of {', '.join(PRESETS)})")
        return preset

    @property
    def weight(self) -> int:
        """The code weight k (n/2 unless given)."""
        return self.k if self.k is not None else default_k(self.n)

    def train_config(self) -> TrainConfig:
        """The TrainConfig of this spec, the preset's values where none is given."""
        preset = self.network
        steps = self.steps if self.steps is not None else preset.train_steps
        return TrainConfig(steps, self.batch_size or preset.batch_size, self.lr or preset.lr, self.seed,
                           self.checkpoint_every or max(steps, 1))


def create_ensemble(spec: TrainSpec, ds: ImageDataset, owners: Sequence[str] | None = None) -> Ensemble:
    """A freshly initialised ensemble for ``ds`` (N items; the data ``spec`` names, possibly with
    some items left out): its code book groups the items by ``spec.granularity`` (class labels
    from ``ds``, ``owners`` (N,) for owner granularity), and its DatasetInfo records ``ds``'s
    fingerprint and how to reload it. Train it with ``train(ens, ds.to_tensor(), spec.train_config())``.

    Raises CapacityError when the sources do not fit n and k, ValueError for an unknown preset,
    sources the granularity cannot form (no labels, no owners) or balanced codes with k != n/2.
    """
    preset, k = spec.network, spec.weight
    book = make_codebook(ds.N, spec.n, k, seed=spec.seed, granularity=spec.granularity,
                         labels=ds.labels if spec.granularity == "class" else None,
                         label_names=ds.label_names, owners=owners)
    if spec.codes == "balanced":
        if k != spec.n // 2:
            raise ValueError(f"balanced codes need k = n/2, not k = {k} with n = {spec.n}")
        book = dataclasses.replace(book, codes=balanced_codes(book.num_sources, spec.n))
    info = DatasetInfo(ds.name, ds.fingerprint(), ds.N, ds.shape, spec.data, spec.subset, spec.subset_seed)
    return Ensemble.create(preset, book, info, seed=spec.seed)


@dataclass(frozen=True)
class Batch:
    """One training step's draws. x_0, eps: (n, B, C, H, W); t: (n, B) long."""

    x_0: Tensor
    t: Tensor
    eps: Tensor


def draw_batch(x_all: Tensor, splits: Sequence[Tensor], batch_size: int, T: int,
               g: torch.Generator) -> Batch:
    """Member i's minibatch: B items from its split (with replacement), t ~ U{0..T-1}, eps ~ N(0, I).

    Drawn on the CPU from ``g`` in a fixed order, so training is reproducible on any device.
    x_all: (N, C, H, W) on the CPU; splits: n index tensors.
    """
    n = len(splits)
    idx = torch.stack([s[torch.randint(len(s), (batch_size,), generator=g)] for s in splits])
    t = torch.randint(T, (n, batch_size), generator=g)
    eps = torch.randn((n, batch_size, *x_all.shape[1:]), generator=g)
    return Batch(x_all[idx], t, eps)


def member_losses(net: WideUNet, schedule: NoiseSchedule, batch: Batch) -> Tensor:
    """Per-member mean squared error ||eps - eps_i(x_t, t)||^2: (n,)."""
    B = batch.t.shape[1]
    x_t = schedule.q_sample(batch.x_0, batch.t, batch.eps)  # (n, B, C, H, W)
    pred = net(x_t.transpose(0, 1).reshape(B, -1, *x_t.shape[3:]), batch.t.T)
    return ((pred - batch.eps) ** 2).mean(dim=(1, 2, 3, 4))


def make_optimizer(params: Iterable[Tensor], lr: float) -> torch.optim.Adam:
    """Adam, fused (one kernel over all parameters; element-wise, so still per member)."""
    return torch.optim.Adam(params, lr=lr, fused=True)


ProgressFn = Callable[[int, Tensor], None]
"""Called after every step with (step, per-member losses (n,))."""
SaveFn = Callable[[dict[str, Any]], None]
"""Stores a training state (what ``fit`` resumes from) with the network's parameters."""


def fit(net: WideUNet, schedule: NoiseSchedule, splits: Sequence[Tensor], x_all: Tensor, cfg: TrainConfig, *,
        state: dict[str, Any] | None = None, save: SaveFn | None = None,
        progress: ProgressFn | None = None) -> dict[str, Any]:
    """Train member i of ``net`` on the items ``splits[i]`` up to ``cfg.steps`` total steps, in place.

    Resumes from ``state`` (optimiser moments, RNG state, step) when given, so an interrupted
    run continued to the same step count equals an uninterrupted one. Calls ``save`` with the
    state every ``cfg.checkpoint_every`` steps and on interruption (KeyboardInterrupt, then
    re-raised); returns the final state.

    splits: n index tensors into x_all; x_all: (N, C, H, W) float in [-1, 1] (CPU).
    """
    if len(splits) != net.n:
        raise ValueError(f"{len(splits)} splits for {net.n} members")
    if any(len(s) == 0 for s in splits):
        raise ValueError("a member has an empty training split")
    device = next(net.parameters()).device
    for p in net.parameters():
        p.requires_grad_(True)
    net.train()
    opt = make_optimizer(net.parameters(), cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    step = 0
    if state is not None:
        if "optimizer" not in state:
            raise ValueError("this training state has no optimiser state (members retrained after an "
                             "opt-out): it cannot be continued; train a new ensemble instead")
        opt.load_state_dict(state["optimizer"])
        g.set_state(state["generator"])
        step = int(state["step"])
    x_all = x_all.cpu()

    def snapshot() -> dict[str, Any]:
        return {"step": step, "optimizer": copy.deepcopy(opt.state_dict()), "generator": g.get_state(),
                "config": asdict(cfg)}

    try:
        while step < cfg.steps:
            b = draw_batch(x_all, splits, cfg.batch_size, schedule.T, g)
            b = Batch(b.x_0.to(device), b.t.to(device), b.eps.to(device))
            losses = member_losses(net, schedule, b)
            opt.zero_grad(set_to_none=True)
            losses.sum().backward()
            opt.step()
            step += 1
            if progress is not None:
                progress(step, losses.detach())
            if save is not None and step % cfg.checkpoint_every == 0:
                save(snapshot())
    except KeyboardInterrupt:
        if save is not None:
            save(snapshot())
        raise
    return snapshot()


def duplicated_splits(splits: Sequence[np.ndarray], repeats: np.ndarray) -> list[np.ndarray]:
    """Each member's split with item i listed ``repeats[i]`` times (>= 1): drawn that many times as
    often as an item listed once, and still only by the members whose code has it (Definition 1
    holds: removing them removes it). repeats: (N,) int."""
    if repeats.ndim != 1 or (repeats < 1).any():
        raise ValueError("repeats must be one count >= 1 per item")
    return [np.repeat(s, repeats[s]) for s in splits]


def train(ens: Ensemble, x_all: Tensor, cfg: TrainConfig, *, checkpoint: str | Path | None = None,
          progress: ProgressFn | None = None, repeats: np.ndarray | None = None) -> Ensemble:
    """Train (or resume training) ``ens`` in place up to ``cfg.steps`` total steps, each member
    on its split of the code book (``fit``), from ``ens.train_state`` when present.

    Saves to ``checkpoint`` every ``cfg.checkpoint_every`` steps, at the end, and on
    interruption (KeyboardInterrupt), then re-raises.

    x_all: (N, C, H, W) float in [-1, 1], the training items (CPU); repeats: (N,) how many times
    each item is listed in its members' splits (``duplicated_splits``; None: once each). A resumed
    training must be given the same repeats.
    """
    member_items = ens.codebook.member_items()
    if repeats is not None:
        if len(repeats) != x_all.shape[0]:
            raise ValueError(f"repeats has {len(repeats)} counts for {x_all.shape[0]} items")
        member_items = duplicated_splits(member_items, np.asarray(repeats, dtype=np.int64))
    splits = [torch.from_numpy(s) for s in member_items]
    save: SaveFn | None = None
    if checkpoint is not None:
        path = checkpoint

        def save(state: dict[str, Any]) -> None:
            ens.train_state = state
            ens.save(path)

    ens.train_state = fit(ens.net, ens.schedule, splits, x_all, cfg, state=ens.train_state, save=save,
                          progress=progress)
    if checkpoint is not None:
        ens.save(checkpoint)
    return ens
