"""Opt-out as exact unlearning (DESIGN.md, "Opt-out as exact unlearning").

Withdrawing sources W: at once, serve with w_i = 0 on S(W) = the union of S(s) over s in W
(``served_members``; weights renormalised, models.sampler.served_weights), so nothing
generated afterwards depends on W. Then retrain exactly the members of S(W) from scratch on
their splits without W, and splice them into the ensemble; every other member is kept as it
was. Codes do not change, so Definition 1 still holds for the sources that remain, and the
cost is |S(W)|/n of a full training (k/n for one source).

A retrain saves its state (the new members, the optimiser, the RNG) every
``checkpoint_every`` steps to a file of its own, and resumes from it when run again with the
same plan: a killed retrain loses at most that many steps, and its result equals an
uninterrupted one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from models.codes import CodeBook, members_of
from models.ensemble import Ensemble, save_atomically
from models.train import ProgressFn, TrainConfig, fit
from models.unet import WideUNet, replace_members

FORMAT = "attrib-retrain"


@dataclass(frozen=True)
class RetrainPlan:
    """What a retrain does to an ensemble.

    Attributes:
        withdrawn: sorted indices of every source withdrawn once it is done (the ensemble's
            already withdrawn ones included).
        members: sorted indices of the members retrained: S(W) of the sources newly withdrawn.
    """

    withdrawn: tuple[int, ...]
    members: tuple[int, ...]

    def init_seed(self, seed: int) -> int:
        """The seed of the retrained members' initialisation: fixed by the plan and ``seed``."""
        digest = hashlib.sha256(repr((seed, self.withdrawn, self.members)).encode()).digest()
        return int.from_bytes(digest[:7], "little")


def served_members(book: CodeBook, withdrawn: Sequence[int]) -> int:
    """Bitmask m of the members that never trained on any source in ``withdrawn`` (nor on one
    the code book withdrew before): the members an opt-out leaves serving."""
    full = (1 << book.n) - 1
    dropped = members_of(book.codes[sorted(set(withdrawn) - set(book.withdrawn))])
    return full & ~dropped


def plan_retrain(book: CodeBook, withdrawn: Sequence[int]) -> RetrainPlan:
    """The retrain that withdraws ``withdrawn`` (source indices) from ``book``'s ensemble."""
    bad = [s for s in withdrawn if not 0 <= int(s) < book.num_sources]
    if bad:
        raise ValueError(f"source {bad[0]} is not in the code book ({book.num_sources} sources)")
    served = served_members(book, withdrawn)
    members = tuple(i for i in range(book.n) if not served >> i & 1)
    return RetrainPlan(tuple(sorted(set(book.withdrawn) | {int(s) for s in withdrawn})), members)


def retrain_config(ens: Ensemble, checkpoint_every: int) -> TrainConfig:
    """The training configuration the ensemble was trained with (steps, batch size, learning
    rate, seed), from its checkpoint, saving every ``checkpoint_every`` steps."""
    stored = (ens.train_state or {}).get("config")
    if not stored:
        raise ValueError(
            "the checkpoint does not record how it was trained (no train_state config): "
            "its members cannot be retrained the same way"
        )
    return TrainConfig(
        int(stored["steps"]),
        int(stored["batch_size"]),
        float(stored["lr"]),
        int(stored["seed"]),
        checkpoint_every,
    )


def retrain(
    ens: Ensemble,
    plan: RetrainPlan,
    x_all: Tensor,
    cfg: TrainConfig,
    *,
    state_path: Path,
    progress: ProgressFn | None = None,
) -> Ensemble:
    """Retrain ``plan.members`` of ``ens`` from scratch without the withdrawn sources.

    The new members are initialised from ``plan.init_seed(cfg.seed)`` and trained together
    (one wide network of |members| members, ``models.train.fit``) on their splits of
    ``ens.codebook.withdraw(plan.withdrawn)``. Resumes from ``state_path`` when it holds a
    state of the same plan; saves there every ``cfg.checkpoint_every`` steps. ``ens`` is not
    changed.

    x_all: (N, C, H, W) float in [-1, 1], the training items. Returns the new ensemble: the same
    members elsewhere (parameters copied unchanged), the code book with the sources withdrawn;
    its train_state says the step the run resumed from (``resumed_from``, 0 for a fresh start).
    """
    book = ens.codebook.withdraw(plan.withdrawn)
    if not plan.members:
        return Ensemble(ens.net, ens.schedule, book, ens.dataset, ens.preset, ens.train_state)
    members = list(plan.members)
    all_splits = book.member_items()
    splits = [torch.from_numpy(all_splits[i]) for i in members]
    device = next(ens.net.parameters()).device
    sub = WideUNet(ens.net.config, len(members), torch.Generator().manual_seed(plan.init_seed(cfg.seed)))
    state = _resume(state_path, plan, ens, sub)
    sub.to(device)

    def save(train_state: dict[str, Any]) -> None:
        save_atomically(
            {
                "format": FORMAT,
                "plan": _record(plan),
                "dataset": ens.dataset.fingerprint,
                "state_dict": {k: v.detach().cpu() for k, v in sub.state_dict().items()},
                "train_state": train_state,
            },
            state_path,
        )

    final = fit(sub, ens.schedule, splits, x_all, cfg, state=state, save=save, progress=progress)
    net = replace_members(ens.net, members, sub)
    return Ensemble(
        net,
        ens.schedule,
        book,
        ens.dataset,
        ens.preset,
        {"step": final["step"], "config": final["config"], "retrained": members,
         "resumed_from": int(state["step"]) if state is not None else 0},
    )


def _record(plan: RetrainPlan) -> dict[str, list[int]]:
    return {"withdrawn": list(plan.withdrawn), "members": list(plan.members)}


def _resume(path: Path, plan: RetrainPlan, ens: Ensemble, sub: WideUNet) -> dict[str, Any] | None:
    """Load the saved state of this plan into ``sub`` and return its training state; None when
    there is none (or it belongs to another plan or data: then it is started afresh)."""
    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if (
        not isinstance(saved, dict)
        or saved.get("format") != FORMAT
        or saved.get("plan") != _record(plan)
        or saved.get("dataset") != ens.dataset.fingerprint
    ):
        return None
    sub.load_state_dict(saved["state_dict"])
    return dict(saved["train_state"])
