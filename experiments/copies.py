"""Copy detection (paper Figure 2a): on a small training set the model reproduces training
images; for samples that are near-copies of their nearest training image, the top synthetic
attribution should be that image.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import PositiveFloat, PositiveInt
from torch import Tensor

from experiments.common import (
    Checkpoint,
    ExperimentConfig,
    LogFn,
    ProgressFn,
    Report,
    Target,
    Training,
    exact_ablations,
    ignore_log,
    ignore_progress,
    prepare,
    synthetic_scores,
)
from experiments.figures import image_table, stack
from models.distances import l2_distance
from models.ensemble import Ensemble
from models.sampler import NoiseTape

TOP1_RATE_COPIES = Target(">=", 0.9)
"""Near-copies whose synthetic top-1 source is the copied image (unmeasured without near-copies)."""


class CopiesConfig(ExperimentConfig):
    """`attrib validate copies`: a small training set (300 items unless told), what counts as a
    near-copy, and whether to ablate every source exactly for some samples."""

    STAGES: ClassVar[tuple[str, ...]] = ("jacobian", "exact")

    ensemble: Checkpoint | Training = Training(subset=300)
    samples: PositiveInt = 64
    experiment: Literal["copies"] = "copies"
    copy_ratio: PositiveFloat = 0.5
    top: PositiveInt = 5
    grid: PositiveInt = 48
    exact: Literal["none", "copies", "all"] = "none"

    def stages(self) -> tuple[str, ...]:
        stages = super().stages()
        return stages if self.exact != "none" else stages[:-1]


@dataclass
class CopyDetection:
    """Raw results of copy detection for B samples.

    Attributes:
        nn_item: (B,) index of each sample's nearest training image (Euclidean).
        nn_dist: (B,) its distance.
        train_nn_median: median over training images of the distance to their nearest other
            training image (the scale of "different images" in this data set).
        top_sources: (B, K) the synthetic top-K sources, best first.
        nn_source: (B,) the source of the nearest training image.
        nn_rank: (B,) its rank under the synthetic scores (1 = top).
        exact_rows: (R,) the samples whose exact counterfactuals were computed (see
            ``exact_copy_check``; R may be 0).
        exact: (R, S) their exact counterfactual distance with each source ablated, or None
            when no exact check was asked for.
    """

    seeds: list[int]
    images: Tensor
    nn_item: np.ndarray
    nn_dist: np.ndarray
    train_nn_median: float
    top_sources: np.ndarray
    nn_source: np.ndarray
    nn_rank: np.ndarray
    exact_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    exact: np.ndarray | None = None


def nearest_training(images: Tensor, x_train: Tensor) -> tuple[np.ndarray, np.ndarray, float]:
    """Nearest training image of every sample: (index (B,), distance (B,)) and the median
    over training images of their nearest-other-image distance."""
    xt = x_train.flatten(1).double()
    d = torch.cdist(images.flatten(1).double().cpu(), xt)
    dist, idx = d.min(dim=1)
    dt = torch.cdist(xt, xt)
    dt.fill_diagonal_(float("inf"))
    return idx.numpy(), dist.numpy(), float(np.median(dt.min(dim=1).values.numpy()))


def copy_detection(ens: Ensemble, tape: NoiseTape, x_train: Tensor, *, top: int = 5,
                   jacobian_batch: int = 8, progress: ProgressFn = ignore_progress) -> CopyDetection:
    """Synthetic top-``top`` sources and the nearest training image of every sample."""
    f, _, syn = synthetic_scores(ens, tape, batch=jacobian_batch, progress=progress)
    nn_item, nn_dist, train_med = nearest_training(f, x_train)
    top_sources = torch.topk(syn, min(top, syn.shape[1]), dim=1).indices.numpy()
    nn_source = ens.codebook.item_source[nn_item]
    return CopyDetection(list(tape.seeds), f, nn_item, nn_dist, train_med, top_sources,
                         nn_source, _rank_of(syn.numpy(), nn_source))


def _rank_of(score: np.ndarray, source: np.ndarray) -> np.ndarray:
    """Rank (1 = highest) of ``source[b]`` in row b of ``score`` (B, S); ties count against it."""
    own = score[np.arange(len(source)), source]
    return (score >= own[:, None]).sum(axis=1)


def near_copies(res: CopyDetection, copy_ratio: float = 0.5) -> np.ndarray:
    """(B,) bool: the nearest training image lies within ``copy_ratio`` times the training
    set's median nearest-neighbour distance."""
    return res.nn_dist <= copy_ratio * res.train_nn_median


def exact_copy_check(ens: Ensemble, tape: NoiseTape, res: CopyDetection, rows: np.ndarray, *,
                     chunk: int = 1024, progress: ProgressFn = ignore_progress) -> CopyDetection:
    """``res`` with the exact counterfactual distance of samples ``rows`` for *every* source.

    It tells the two ways copy detection can fail apart: if the exact ablation's top source
    is the copied image but the synthetic top-1 is not, the first-order estimate is at fault;
    if the exact top source is not the copied image either, ablating the copied image does not
    move the sample most (the ensemble's members that never saw it reproduce it too), and no
    estimate of the exact counterfactual can rank it first.
    """
    rows = np.asarray(rows, np.int64)
    S = ens.codebook.num_sources
    sample_index = torch.from_numpy(rows).repeat_interleave(S)
    sources = torch.arange(S).repeat(len(rows))
    exact = np.zeros(len(sources))

    def consume(sl: slice, x: Tensor) -> None:
        exact[sl] = l2_distance(x, res.images[sample_index[sl]]).double().numpy()

    exact_ablations(ens, tape, sample_index, sources, chunk=chunk, progress=progress, consume=consume)
    return replace(res, exact_rows=rows, exact=exact.reshape(len(rows), S))


def copy_stats(res: CopyDetection, copy_ratio: float = 0.5) -> dict[str, Any]:
    """A sample is a near-copy when its nearest training image lies within ``copy_ratio``
    times the training set's median nearest-neighbour distance. Reports the rate at which
    the synthetic top-1 (and top-K) source is the nearest image's source, among near-copies
    and among all samples."""
    is_copy = near_copies(res, copy_ratio)
    hit1 = res.top_sources[:, 0] == res.nn_source
    hitk = (res.top_sources == res.nn_source[:, None]).any(axis=1)
    n = int(is_copy.sum())
    out: dict[str, Any] = {
        "n_samples": len(res.seeds), "n_copies": n, "copy_ratio": copy_ratio,
        "threshold": copy_ratio * res.train_nn_median, "train_nn_median": res.train_nn_median,
        "median_nn_dist": float(np.median(res.nn_dist)),
        "top1_rate_copies": float(hit1[is_copy].mean()) if n else float("nan"),
        f"top{res.top_sources.shape[1]}_rate_copies": float(hitk[is_copy].mean()) if n else float("nan"),
        "top1_rate_all": float(hit1.mean()),
        "median_nn_synthetic_rank_copies": float(np.median(res.nn_rank[is_copy])) if n else float("nan"),
        "is_copy": is_copy.tolist(), "hit": hit1.tolist(),
    }
    if res.exact is not None:
        out["exact"] = exact_copy_stats(res, is_copy)
    return out


def exact_copy_stats(res: CopyDetection, is_copy: np.ndarray) -> dict[str, Any]:
    """Over the samples with exact distances (``exact_copy_check``), and over the near-copies
    among them: how often the exact top source is the nearest image's (``exact_top1_rate``),
    the median exact rank of the nearest image's source, how often the synthetic top-1 is the
    exact top source, and how often screen-then-verify (the synthetic top K re-ranked by their
    exact distances) puts the nearest image first (``verified_top1_rate``). ``per_sample``
    is aligned with ``res.exact_rows``."""
    rows, exact = res.exact_rows, res.exact
    assert exact is not None, "exact_copy_check first"
    nn_src, top = res.nn_source[rows], res.top_sources[rows]
    exact_top1 = exact.argmax(axis=1)
    verified = top[np.arange(len(rows)), exact[np.arange(len(rows))[:, None], top].argmax(axis=1)]
    per = {"exact_top1_is_nearest": exact_top1 == nn_src,
           "nn_exact_rank": _rank_of(exact, nn_src),
           "synthetic_top1_is_exact_top1": top[:, 0] == exact_top1,
           "verified_top1_is_nearest": verified == nn_src}

    def summary(mask: np.ndarray) -> dict[str, float]:
        if not mask.any():
            return {"n": 0}
        return {"n": int(mask.sum()),
                "exact_top1_rate": float(per["exact_top1_is_nearest"][mask].mean()),
                "median_nn_exact_rank": float(np.median(per["nn_exact_rank"][mask])),
                "median_nn_synthetic_rank": float(np.median(res.nn_rank[rows][mask])),
                "synthetic_top1_is_exact_top1_rate": float(per["synthetic_top1_is_exact_top1"][mask].mean()),
                f"verified_top{top.shape[1]}_top1_rate": float(per["verified_top1_is_nearest"][mask].mean())}

    return {"sources": int(exact.shape[1]), "copies": summary(is_copy[rows]),
            "all_checked": summary(np.ones(len(rows), bool)),
            "per_sample": [{"sample": int(r), "exact_top1": int(exact_top1[j]),
                            **{k: v[j].item() for k, v in per.items()}}
                           for j, r in enumerate(rows)]}


def run(config: CopiesConfig, out_dir: Path, progress: ProgressFn = ignore_progress, *,
        device: torch.device | str = "cpu", log: LogFn = ignore_log) -> Report:
    """Train (or load) an item-granularity ensemble, find each sample's nearest training image and
    synthetic top sources (and, with ``config.exact``, every source's exact ablation); write
    report.json and copies.png into ``out_dir``. ExperimentError (or DatasetError) for a bad
    config or data."""
    t0 = time.perf_counter()
    setup = prepare(config, out_dir, granularity="item", device=torch.device(device), progress=progress,
                    log=log)
    ens, ds, tape = setup.ensemble, setup.data, setup.tape
    t1 = time.perf_counter()
    x_train = ds.to_tensor()
    res = copy_detection(ens, tape, x_train, top=config.top, progress=progress)
    if config.exact != "none":
        rows = np.arange(len(res.seeds)) if config.exact == "all" else np.flatnonzero(
            near_copies(res, config.copy_ratio))
        res = exact_copy_check(ens, tape, res, rows, chunk=config.chunk, progress=progress)
    seconds = time.perf_counter() - t1
    st = copy_stats(res, config.copy_ratio)
    rate = st["top1_rate_copies"]
    keys = ens.codebook.source_keys
    numbers: dict[str, Any] = {
        "ensemble": setup.info, "steps": setup.steps, "samples": len(res.seeds),
        **{k: v for k, v in st.items() if k not in ("is_copy", "hit")},
        "per_sample": [{"seed": res.seeds[i], "nn_item": int(res.nn_item[i]),
                        "nn_ref": ds.refs[int(res.nn_item[i])], "nn_dist": float(res.nn_dist[i]),
                        "is_copy": st["is_copy"][i],
                        "top_sources": [keys[s] for s in res.top_sources[i]],
                        "top1_is_nearest": st["hit"][i]} for i in range(len(res.seeds))],
        "seconds": round(seconds, 1), "total_seconds": round(time.perf_counter() - t0, 1),
    }
    if "exact" in st:
        ex = st["exact"]
        for e in ex.pop("per_sample"):
            e["exact_top1"] = keys[e["exact_top1"]]
            numbers["per_sample"][e.pop("sample")]["exact"] = e
        numbers["exact"] = ex
    _figure(out_dir, res, st, ens, x_train, config.grid)
    exact_line = ""
    if "exact" in st and st["exact"]["copies"]["n"]:
        ec = st["exact"]["copies"]
        verified = ec[f"verified_top{config.top}_top1_rate"]
        exact_line = (f"; exact ablation of all {st['exact']['sources']} sources: its top source is the "
                      f"copied image in {ec['exact_top1_rate']:.3f} of the near-copies (median rank "
                      f"{ec['median_nn_exact_rank']:.0f}; synthetic {ec['median_nn_synthetic_rank']:.0f}), "
                      f"synthetic top {config.top} verified exactly: {verified:.3f}")
    headline = (f"{len(res.seeds)} samples, {st['n_copies']} near-copies (nearest training image within "
                f"{st['threshold']:.3f}): top-1 attribution is the copied image in {rate:.3f} of them "
                f"({st['top1_rate_all']:.3f} of all samples){exact_line} ({seconds:.0f} s)")
    target = TOP1_RATE_COPIES.outcome(rate) if st["n_copies"] else TOP1_RATE_COPIES.unmeasured()
    report = Report("copy detection (paper Figure 2a)", {"top1_rate_copies": target}, numbers,
                    ("copies.png",), headline)
    report.write(out_dir)
    return report


def _figure(out_dir: Path, res: CopyDetection, st: dict[str, Any], ens: Ensemble, x_train: Tensor,
            grid: int) -> None:
    """The first ``grid`` samples (near-copies first): each beside its nearest training image, its
    synthetic top-1 source (framed when it is not the nearest) and, when checked, its exact one."""
    book = ens.codebook
    order = sorted(range(len(res.seeds)), key=lambda i: (not st["is_copy"][i], res.nn_dist[i]))[:grid]
    checked, exact_top1 = res.exact is not None, {}
    if res.exact is not None:
        exact_top1 = {int(r): int(row.argmax()) for r, row in zip(res.exact_rows, res.exact, strict=True)}
    header = ["sample", "nearest", "top-1"] + (["exact #1"] if checked else [])
    rows, labels, marks = [], [], []

    def image_of(source: int) -> torch.Tensor:
        return x_train[int(book.source_items(source)[0])]

    for i in order:
        cells = [res.images[i], x_train[int(res.nn_item[i])], image_of(int(res.top_sources[i, 0]))]
        mark = [False, False, not st["hit"][i]]
        if checked:  # samples not checked exactly get an empty (black) cell
            src = exact_top1.get(i)
            cells.append(-torch.ones_like(res.images[i]) if src is None else image_of(src))
            mark.append(src is not None and src != int(res.nn_source[i]))
        rows.append(torch.stack(cells))
        labels.append(f"{'copy' if st['is_copy'][i] else 'novel'} {res.nn_dist[i]:.2f}")
        marks.append(mark)
    tables = [image_table(rows[j : j + 16], header, labels[j : j + 16], marks=marks[j : j + 16])
              for j in range(0, len(rows), 16)]
    stack(tables, horizontal=True).save(out_dir / "copies.png")
