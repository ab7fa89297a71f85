"""The authors' causal measures of an attribution (Dai et al.'s follow-up, zheng-dai/
counterfactualuniverses: ``GetFAR``), from exact counterfactuals.

* **False attribution rate** FAR = u / u_r over samples: u, the fraction whose nearest training
  image is still their nearest after the members trained on the *attributed* source are dropped
  (same noise, re-run); u_r the same when a *random* source is dropped instead. An attribution
  that names the cause changes the nearest image where a random drop does not: FAR 0 is perfect,
  1 is no better than chance.
* **Counterfactual radius** of a sample: the largest pixel-L2 distance between it and any of its
  computed leave-one-out counterfactuals. 0 means no source moves it at all: unattributable.

Pixel L2 throughout, images in [-1, 1] (``models.resemblance.pixels``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from models.ablation import ablation_weights
from models.copies import nearest_images
from models.ensemble import Ensemble
from models.sampler import NoiseTape, exact_counterfactuals
from models.unet import WideUNet

TrainingImages = Tensor | np.ndarray
"""(N, C, H, W) float in [-1, 1] or uint8 in [0, 255], in code-book item order."""


def nearest_item(x: Tensor, images: TrainingImages) -> np.ndarray:
    """(B,) the index of the training image nearest (pixel L2) to each of x (B, C, H, W)."""
    return np.array([int(nearest_images(x[b], images, 1)[0][0]) for b in range(x.shape[0])], dtype=np.int64)


def counterfactual_radius(f: Tensor, counterfactuals: Tensor) -> float:
    """max_j ||cf_j - f|| over computed counterfactuals (K, C, H, W) of one sample f (C, H, W);
    0.0 for K = 0."""
    if counterfactuals.shape[0] == 0:
        return 0.0
    cf = counterfactuals.detach().to(torch.float64).cpu().flatten(1)
    diff = cf - f.detach().to(torch.float64).cpu().flatten()
    return float(diff.norm(dim=1).max())


@dataclass(frozen=True)
class FalseAttribution:
    """FAR of one attribution method over ``samples`` samples.

    unchanged: samples whose nearest image survived dropping the attributed source; unchanged_random:
    the same for the random drops (``draws`` per sample, so out of samples * draws); survived: per
    sample of the B given, whether its nearest image survived the attributed drop (None: the method
    named no source for it)."""

    samples: int
    draws: int
    unchanged: int
    unchanged_random: int
    survived: tuple[bool | None, ...] = ()

    @property
    def u(self) -> float:
        return self.unchanged / self.samples if self.samples else float("nan")

    @property
    def u_random(self) -> float:
        total = self.samples * self.draws
        return self.unchanged_random / total if total else float("nan")

    @property
    def rate(self) -> float | None:
        """u / u_r; None when no random drop left the nearest image (u_r = 0: undefined)."""
        if self.samples == 0 or self.unchanged_random == 0:
            return None
        return self.u / self.u_random

    def to_json(self) -> dict[str, object]:
        return {"far": self.rate, "u": self.u, "u_random": self.u_random, "samples": self.samples,
                "random_draws": self.draws, "unchanged": self.unchanged,
                "unchanged_random": self.unchanged_random}


def random_sources(num_sources: int, samples: int, draws: int, seed: int) -> np.ndarray:
    """(samples, draws) sources drawn uniformly (with replacement across samples) from ``seed``."""
    return np.random.default_rng(seed).integers(0, num_sources, size=(samples, draws))


def nearest_survives(ens: Ensemble, tape: NoiseTape, f: Tensor, pairs: Sequence[tuple[int, int]],
                     images: TrainingImages, *, served: Tensor | None = None,
                     members: Sequence[WideUNet] | None = None,
                     nearest: np.ndarray | None = None) -> np.ndarray:
    """Whether a sample's nearest training image is still its nearest after dropping a source.

    tape: the B samples' noise; f: (B, C, H, W) the samples; pairs: (sample, source) to drop, one
    exact counterfactual each, all in one batched pass; nearest: (B,) the samples' nearest items
    if known. Returns (len(pairs),) bool."""
    if nearest is None:
        nearest = nearest_item(f, images)
    if not pairs:
        return np.zeros(0, dtype=bool)
    rows = torch.tensor([b for b, _ in pairs])
    bits = torch.from_numpy(ens.codebook.bits())[[s for _, s in pairs]]
    cf = exact_counterfactuals(ens.net, ens.schedule, tape, ablation_weights(bits, ens.k, served), rows,
                               members=members)
    return nearest_item(cf, images) == nearest[rows.numpy()]


def false_attribution_rates(ens: Ensemble, tape: NoiseTape, f: Tensor, attributed: dict[str, np.ndarray],
                            images: TrainingImages, *, draws: int = 1, seed: int = 0,
                            served: Tensor | None = None,
                            members: Sequence[WideUNet] | None = None) -> dict[str, FalseAttribution]:
    """FAR of several attribution methods on the same samples, sharing one set of random drops.

    attributed: method name -> (B,) the source each method names per sample (-1: it names none;
    such samples count for that method neither in u nor in u_r). The random drops (``draws`` per
    sample, drawn from ``seed``) are the same for every method; each distinct (sample, source)
    runs once."""
    B = f.shape[0]
    rand = random_sources(ens.codebook.num_sources, B, draws, seed)
    named = {m: np.asarray(v, dtype=np.int64) for m, v in attributed.items()}
    for m, v in named.items():
        if v.shape != (B,):
            raise ValueError(f"attributed[{m!r}] must hold one source per sample ({B}), got {v.shape}")
    pairs = sorted({(b, int(s)) for b in range(B) for s in rand[b]}
                   | {(b, int(v[b])) for v in named.values() for b in range(B) if v[b] >= 0})
    survived = dict(zip(pairs, nearest_survives(ens, tape, f, pairs, images, served=served, members=members),
                        strict=True))
    out = {}
    for m, v in named.items():
        counted = [b for b in range(B) if v[b] >= 0]
        per = tuple(bool(survived[(b, int(v[b]))]) if v[b] >= 0 else None for b in range(B))
        out[m] = FalseAttribution(len(counted), draws, sum(bool(x) for x in per),
                                  sum(bool(survived[(b, int(s))]) for b in counted for s in rand[b]), per)
    return out


@dataclass(frozen=True)
class CausalMeasures:
    """The authors' measures of one attribution, from the exact counterfactuals it computed.

    radius: ``counterfactual_radius`` over the ``verified`` sources only (None when none was run
    exactly); nearest: the sample's nearest training item; top_nearest: the nearest item of the
    top source's exact counterfactual (None when the top source was not run exactly);
    top_changes_nearest: whether dropping the top source changes the sample's nearest image."""

    radius: float | None
    verified: int
    nearest: int
    top_nearest: int | None

    @property
    def top_changes_nearest(self) -> bool | None:
        return None if self.top_nearest is None else self.top_nearest != self.nearest


def causal_measures(f: Tensor, top_counterfactual: Tensor | None, radius: float | None, verified: int,
                    images: TrainingImages, nearest: int | None = None) -> CausalMeasures:
    """``CausalMeasures`` of a sample f (C, H, W): top_counterfactual (C, H, W) is its top source's
    exact counterfactual (None: not run exactly); radius, verified: ``counterfactual_radius`` over
    the ``verified`` sources run exactly; nearest: its nearest training item if known."""
    near = int(nearest_item(f[None], images)[0]) if nearest is None else int(nearest)
    top = None if top_counterfactual is None else int(nearest_item(top_counterfactual[None], images)[0])
    return CausalMeasures(radius if verified else None, verified, near, top)
