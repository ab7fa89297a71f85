"""The copy check: is a generation a near-copy of a training image?

A sample is a near-copy when its nearest training image (pixel L2) lies within ``ratio`` times
the training set's own typical nearest-neighbour distance: the median, over training images, of
the distance to their nearest *other* training image (the scale of "two different images" in
this data set; cf. Carlini et al. 2023, Somepalli et al. 2022). The service then confirms it
causally with one exact counterfactual (``confirmed``): removing the members trained on that
image must move the sample away from it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from models.resemblance import pixels

COPY_RATIO = 0.5
"""Near-copy: nearest distance <= COPY_RATIO * the training set's median nearest-neighbour distance."""
NN_SAMPLE = 2000
"""Training images whose nearest-neighbour distances estimate the median (all of them when fewer)."""
CHUNK = 1 << 14


def nearest_images(f: Tensor, images: Tensor | np.ndarray, count: int = 3,
                   exclude: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` training images nearest to f (C, H, W) in pixel L2, nearest first:
    (indices (count,), distances (count,)). ``exclude``: an index never returned (itself)."""
    target = f.detach().to(torch.float64).cpu().flatten()
    N = images.shape[0]
    best_d = torch.empty(0, dtype=torch.float64)
    best_i = torch.empty(0, dtype=torch.long)
    for lo in range(0, N, CHUNK):
        hi = min(N, lo + CHUNK)
        d = (pixels(images, slice(lo, hi)) - target).norm(dim=1)
        if exclude is not None and lo <= exclude < hi:
            d[exclude - lo] = float("inf")
        best_d = torch.cat([best_d, d])
        best_i = torch.cat([best_i, torch.arange(lo, hi)])
        keep = torch.topk(best_d, min(count, len(best_d)), largest=False).indices
        best_d, best_i = best_d[keep], best_i[keep]
    order = torch.argsort(best_d)
    return best_i[order].numpy(), best_d[order].numpy()


def nearest_neighbour_median(images: Tensor | np.ndarray, sample: int = NN_SAMPLE, seed: int = 0) -> float:
    """Median over (up to ``sample``, drawn with ``seed``) training images of the distance to their
    nearest other training image."""
    N = images.shape[0]
    if N < 2:
        raise ValueError("the nearest-neighbour distance needs at least two training images")
    rng = np.random.default_rng(seed)
    rows = np.arange(N) if sample >= N else np.sort(rng.choice(N, sample, replace=False))
    queries = pixels(images, rows)  # (Q, D)
    nearest = torch.full((len(rows),), float("inf"), dtype=torch.float64)
    own = torch.from_numpy(rows)
    for lo in range(0, N, CHUNK):
        hi = min(N, lo + CHUNK)
        d = torch.cdist(queries, pixels(images, slice(lo, hi)))  # (Q, r)
        inside = (own >= lo) & (own < hi)
        d[inside.nonzero().flatten(), own[inside] - lo] = float("inf")  # not itself
        nearest = torch.minimum(nearest, d.min(dim=1).values)
    return float(np.median(nearest.numpy()))


@dataclass(frozen=True)
class CopyCheck:
    """items, distances: the nearest training images, nearest first; ratio: the nearest distance over
    the training set's median nearest-neighbour distance; near_copy: ratio <= threshold;
    confirmed, moved_away: for a near-copy, whether the exact counterfactual without the nearest
    image's source moves the sample away from it (d(cf, x) - d(f, x) > 0), when checked."""

    items: np.ndarray
    distances: np.ndarray
    ratio: float
    threshold: float
    near_copy: bool
    confirmed: bool | None = None
    moved_away: float | None = None

    def confirm(self, moved_away: float) -> CopyCheck:
        return replace(self, confirmed=bool(moved_away > 0.0), moved_away=float(moved_away))


def copy_check(f: Tensor, images: Tensor | np.ndarray, nn_median: float, *, ratio: float = COPY_RATIO,
               count: int = 3) -> CopyCheck:
    """The copy check of one sample f (C, H, W) against the training images (not yet confirmed)."""
    items, distances = nearest_images(f, images, count)
    r = float(distances[0] / nn_median) if nn_median > 0 else float("inf")
    return CopyCheck(items, distances, r, ratio, r <= ratio)
