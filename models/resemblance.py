"""Resemblance: how far ablating a source moves the sample away from the source's own image,
and how surprising that is against decoy codes.

The paper scores a source by its influence ||cf_s - f|| (cf_s: the sample without the members
trained on s). That depends on which members a code removes, not on what the source looks like.
Resemblance asks the causal question about the source's content:

    r_s = d(cf_s, X_s) - d(f, X_s),      d(y, X) = min_{x in X} ||y - x||,

X_s the source's training images (one for an item; the nearest of several for a class or owner).
Synthetically cf_s = f + J dw_s, so for an image x with a = f - x:

    ||f + J dw - x||^2 = ||a||^2 + 2 dw^T (J^T a) + dw^T G dw,

and every source needs only ||a||^2 and J^T a = J^T f - J^T x per image: one pass over the
images, (N, D) @ (D, n), chunked.

Decoys: a code of weight k that no source holds removes a random k-set of members that was
trained on nothing in particular. Scoring the decoys with a source's own image gives that
source's null distribution; its p-value is (1 + #decoys scoring at least as high) / (1 + M).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from models.codes import capacity

IMAGE_CHUNK = 1 << 16
"""Training images converted to float and multiplied per pass."""


@dataclass(frozen=True)
class ImageTerms:
    """Per training image x_i and one sample f: base_sq (N,) = ||f - x_i||^2 and
    lin (N, n) = J^T (f - x_i), float64. With G = J^T J they give the predicted distance of
    any weight change dw: ||f + J dw - x_i||^2 = base_sq + 2 lin dw + dw^T G dw."""

    base_sq: Tensor
    lin: Tensor


def image_terms(f: Tensor, J: Tensor, images: Tensor | np.ndarray, *, chunk: int = IMAGE_CHUNK,
                norms_sq: Tensor | None = None) -> ImageTerms:
    """The resemblance terms of every training image for one sample.

    Args:
        f: (C, H, W) the sample in [-1, 1]; J: (D, n) its Jacobian, D = C*H*W.
        images: (N, C, H, W) or (N, D) training images, float in [-1, 1], or uint8 in [0, 255]
            (mapped to [-1, 1] as u / 127.5 - 1; a numpy memmap is read chunk by chunk).
        norms_sq: optional (N,) ||x_i||^2 precomputed (float64), saving one pass over the pixels.
    """
    D, n = J.shape
    on = J.device
    f_flat = f.reshape(D).to(device=on, dtype=torch.float32)
    # x = scale * u + shift for uint8 images; identity for floats. J^T x and f . x both come
    # from one product with the (D, n + 1) matrix [J | f].
    A = torch.cat([J.to(torch.float32), f_flat[:, None]], dim=1)
    A_sum = A.to(torch.float64).sum(dim=0)
    N = images.shape[0]
    jx = torch.empty(N, n + 1, dtype=torch.float64)
    x_sq = torch.empty(N, dtype=torch.float64) if norms_sq is None else norms_sq.to(torch.float64)
    for lo in range(0, N, chunk):
        hi = min(N, lo + chunk)
        block = images[lo:hi]
        u = _read_only_tensor(block) if isinstance(block, np.ndarray) else block
        u = u.reshape(hi - lo, D).to(on)
        if u.dtype == torch.uint8:
            prod = (u.to(torch.float32) @ A).to(torch.float64) / 127.5 - A_sum
            if norms_sq is None:
                x = u.to(torch.float32) / 127.5 - 1.0
                x_sq[lo:hi] = (x.to(torch.float64) ** 2).sum(dim=1).cpu()
        else:
            x = u.to(torch.float32)
            prod = (x @ A).to(torch.float64)
            if norms_sq is None:
                x_sq[lo:hi] = (x.to(torch.float64) ** 2).sum(dim=1).cpu()
        jx[lo:hi] = prod.cpu()
    J64 = J.to(torch.float64).cpu()
    f64 = f_flat.to(torch.float64).cpu()
    jf = J64.T @ f64  # (n,)
    base_sq = (f64 @ f64) - 2.0 * jx[:, n] + x_sq
    lin = jf[None, :] - jx[:, :n]
    return ImageTerms(base_sq.clamp_min(0.0), lin)


def squared_norms(images: Tensor | np.ndarray, *, chunk: int = IMAGE_CHUNK) -> Tensor:
    """||x_i||^2 of every training image (N,) float64, in [-1, 1] (uint8 mapped as u / 127.5 - 1):
    a property of the data, computed once and passed to ``image_terms`` for every sample."""
    N = images.shape[0]
    out = torch.empty(N, dtype=torch.float64)
    for lo in range(0, N, chunk):
        out[lo : lo + chunk] = pixels(images, slice(lo, min(N, lo + chunk))).pow(2).sum(dim=1)
    return out


def pixels(images: Tensor | np.ndarray, index: slice | np.ndarray) -> Tensor:
    """Training images ``images[index]`` as (r, D) float64 in [-1, 1]: uint8 mapped as u / 127.5 - 1,
    floats as they are; a numpy memmap is read for these rows only."""
    if isinstance(images, np.ndarray):
        block = _read_only_tensor(images[index])
    else:
        block = images[index if isinstance(index, slice) else torch.from_numpy(np.asarray(index))]
    x = block.reshape(block.shape[0], -1).cpu()
    return x.to(torch.float64) / 127.5 - 1.0 if x.dtype == torch.uint8 else x.to(torch.float64)


def set_distance(y: Tensor, images: Tensor | np.ndarray, item_source: np.ndarray, source: int) -> Tensor:
    """d(y, X_s) = min over the source's images of ||y - x||: y (R, ...) -> (R,) float64, exact
    (no ||a||^2 - 2ab + ||b||^2 shortcut: a near-copy's distance is close to 0)."""
    x = pixels(images, np.flatnonzero(np.asarray(item_source) == source))
    d = torch.cdist(y.detach().reshape(y.shape[0], -1).to(torch.float64).cpu(), x,
                    compute_mode="donot_use_mm_for_euclid_dist")
    return d.min(dim=1).values


def _read_only_tensor(block: np.ndarray) -> Tensor:
    """A tensor over a numpy block without copying it, read-only memmaps included: torch warns that
    it cannot mark the tensor read-only; it is only read here (converted before any use)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.asarray(block))


def predicted_distances(terms: ImageTerms, G: Tensor, dW: Tensor) -> Tensor:
    """||f + J dw_m - x_i|| for images i and weight changes m: dW (M, n) -> (N, M) float64."""
    dW = dW.to(torch.float64)
    q = torch.einsum("mi,ij,mj->m", dW, G.to(torch.float64), dW)
    sq = terms.base_sq[:, None] + 2.0 * terms.lin @ dW.T + q[None, :]
    return sq.clamp_min(0.0).sqrt()


def _segment_min(values: Tensor, segment: Tensor, num_segments: int) -> Tensor:
    """min of ``values`` (N, ...) per segment id (N,) -> (num_segments, ...); +inf where empty."""
    out = torch.full((num_segments, *values.shape[1:]), float("inf"), dtype=values.dtype)
    index = segment.reshape(-1, *([1] * (values.ndim - 1))).expand_as(values)
    return out.scatter_reduce(0, index, values, reduce="amin")


def source_distances(terms: ImageTerms, item_source: np.ndarray, num_sources: int) -> Tensor:
    """d(f, X_s) = min over the source's images of ||f - x||, every source: (S,) float64 (+inf for a
    source with no image). What the selective test chooses its candidates by: content alone."""
    item_source_t = torch.as_tensor(np.asarray(item_source), dtype=torch.long)
    return _segment_min(terms.base_sq.clamp_min(0.0).sqrt(), item_source_t, num_sources)


def resemblance(terms: ImageTerms, G: Tensor, dW: Tensor, item_source: np.ndarray) -> Tensor:
    """Synthetic resemblance r_s = d(f + J dw_s, X_s) - d(f, X_s) of every source (S,) float64.

    dW: (S, n) each source's weight change (``models.ablation.delta_w`` of its code bits);
    item_source: (N,) the source of each training image.
    """
    S = dW.shape[0]
    item_source_t = torch.as_tensor(np.asarray(item_source), dtype=torch.long)
    # each image scored only at its own source's dw: dw_s . lin_i, picked without (N, S)
    dW_items = dW.to(torch.float64).cpu()[item_source_t]  # (N, n)
    q = torch.einsum("si,ij,sj->s", dW_items, G.to(torch.float64).cpu(), dW_items)
    cf_sq = terms.base_sq + 2.0 * (terms.lin * dW_items).sum(dim=1) + q
    cf_d = _segment_min(cf_sq.clamp_min(0.0).sqrt(), item_source_t, S)
    return cf_d - source_distances(terms, item_source, S)


def exact_resemblance(counterfactuals: Tensor, f: Tensor, images: Tensor) -> Tensor:
    """r = d(cf, X) - d(f, X) from computed images: counterfactuals (M, C, H, W), f (C, H, W),
    images (M, P, C, H, W) the training images of each counterfactual's source (P of them, or
    padded with copies of one) -> (M,) float64."""
    cf = counterfactuals.to(torch.float64).flatten(1)[:, None, :]
    x = images.to(torch.float64).flatten(2)
    d_cf = (cf - x).norm(dim=-1).min(dim=1).values
    d_f = (f.to(torch.float64).flatten()[None, None, :] - x).norm(dim=-1).min(dim=1).values
    return d_cf - d_f


def decoy_codes(codes_in_use: Iterable[int], n: int, k: int, count: int, seed: int = 0) -> np.ndarray:
    """Up to ``count`` distinct weight-k codes of length n that no source holds, (M,) int64.

    Exact nulls for "removing a random k-set of members". All of them when there are at most
    ``count`` (enumerated); otherwise drawn uniformly without replacement (rejection sampling
    from uniformly random k-subsets), reproducibly from ``seed``.
    """
    used = {int(c) for c in codes_in_use}
    free = capacity(n, k) - len(used)
    if free <= 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    if free <= count or capacity(n, k) <= 4 * count:
        from itertools import combinations

        every = np.array([sum(1 << i for i in combo) for combo in combinations(range(n), k)], dtype=np.int64)
        unused = every[~np.isin(every, np.fromiter(used, dtype=np.int64, count=len(used)))]
        if len(unused) <= count:
            return np.sort(unused)
        return np.sort(rng.choice(unused, size=count, replace=False))
    chosen: set[int] = set()
    weights = 1 << np.arange(n, dtype=np.int64)
    while len(chosen) < count:
        draw = np.argsort(rng.random((2 * (count - len(chosen)), n)), axis=1)[:, :k]
        for code in (weights[draw]).sum(axis=1).tolist():
            if code not in used and code not in chosen:
                chosen.add(code)
                if len(chosen) == count:
                    break
    return np.sort(np.fromiter(chosen, dtype=np.int64, count=count))


def decoy_pvalues(scores: Tensor, decoy_scores: Tensor) -> Tensor:
    """Empirical p-values (1 + #decoys scoring >= the source) / (1 + M): scores (S,), decoy_scores
    (S, M) each source's own null -> (S,) float64."""
    M = decoy_scores.shape[1]
    exceed = (decoy_scores >= scores[:, None]).sum(dim=1).to(torch.float64)
    return (1.0 + exceed) / (1.0 + M)


def gaussian_tail_pvalues(scores: Tensor, decoy_scores: Tensor) -> Tensor:
    """p-values from a normal fit of each source's decoys: the upper tail of
    z = (score - mean) / sd, scores (S,), decoy_scores (S, M) -> (S,) float64. A fit, for when
    M decoys are too few for the empirical p-value to reach a corrected level (1 / (1 + M) is its
    floor); it assumes the null's tail is no heavier than a normal one."""
    mean = decoy_scores.mean(dim=1)
    sd = decoy_scores.std(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    z = (scores.to(torch.float64) - mean) / sd
    return torch.special.ndtr(-z)


def decoy_resemblance(terms: ImageTerms, G: Tensor, dW_decoys: Tensor, items: Tensor,
                      item_source: np.ndarray, sources: Tensor) -> Tensor:
    """Synthetic resemblance of decoy codes, each scored with the images of ``sources``:
    -> (len(sources), M) float64, d(f + J dw_m, X_s) - d(f, X_s).

    dW_decoys: (M, n) the decoys' weight changes; items: the training images (indices into
    ``terms``) of the sources listed; item_source: the source of each training image (to group
    ``items`` by source)."""
    sub = ImageTerms(terms.base_sq[items], terms.lin[items])
    d_cf = predicted_distances(sub, G, dW_decoys)  # (P, M)
    d_f = sub.base_sq.sqrt()
    group = torch.as_tensor(np.asarray(item_source)[items.numpy()], dtype=torch.long)
    size = max(int(group.max()) if len(group) else 0, int(sources.max()) if len(sources) else 0) + 1
    slot = torch.full((size,), -1, dtype=torch.long)
    slot[sources.long()] = torch.arange(len(sources))
    seg = slot[group]
    num = len(sources)
    return _segment_min(d_cf, seg, num) - _segment_min(d_f, seg, num)[:, None]
