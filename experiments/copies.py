"""Copy detection (paper Figure 2a): on a small training set the model reproduces training
images; for samples that are near-copies of their nearest training image, the top attribution
should be that image.

Besides the paper's synthetic influence ranking, the service's own attribution is measured
(``trust``): the default score, synthetic screen re-ranked by exact counterfactuals of the top
``verify_top_k``, decoy p-values and "attributable"; the same synthetic-only; and a control that
must fail: the code assignment shuffled after training (images paired with other items' members),
where nothing may be called attributable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from experiments.common import (
    LogFn,
    Outcome,
    ProgressFn,
    Report,
    Target,
    exact_ablations,
    ignore_log,
    ignore_progress,
    prepare,
    synthetic_scores,
)
from experiments.configs import CopiesConfig
from experiments.figures import image_table, stack
from models.attribute import (
    DEFAULT_SCORE,
    AttributionConfig,
    SampleAttribution,
    conclude,
    rank_sources,
    verify,
)
from models.causality import false_attribution_rates
from models.codes import CodeBook
from models.copies import nearest_neighbour_median
from models.distances import l2_distance
from models.ensemble import Ensemble
from models.resemblance import squared_norms
from models.sampler import NoiseTape

TOP1_RATE_COPIES = Target(">=", 0.9)
"""Near-copies whose top-1 source (the service's default attribution) is the copied image
(unmeasured without near-copies)."""
TOP3_RATE_COPIES = Target(">=", 0.97)
"""Near-copies whose copied image is in the default attribution's top 3."""
ATTRIBUTABLE_COPIES = Target(">=", 0.9)
"""Near-copies called attributable with the copied image as the top source."""
SHUFFLED_ATTRIBUTABLE = Target("<=", 0.05)
"""Samples called attributable when the codes are shuffled after training (a control that must fail:
the selective test's level)."""
SELECTIVE_ATTRIBUTABLE_COPIES = Target(">=", 0.5)
"""Near-copies the selective test calls attributable."""
CAUSE_ON_TOP = Target(">=", 0.9)
"""Near-copies whose nearest image the exact counterfactual confirms as the cause (dropping it changes
the sample's nearest image): the served top source is that image."""
FAR_ATTRIBUTABLE = Target("<=", 0.1)
"""The authors' false attribution rate of the served top source, on the samples called attributable."""
SHUFFLE_SEED = 12345


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
        exact_resemblance: (R, S) the same counterfactuals' resemblance d(cf_s, X_s) - d(f, X_s).
        jacobians: (B, D, n) each sample's Jacobian (what ``trust`` ranks from, whatever the codes).
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
    exact_resemblance: np.ndarray | None = None
    jacobians: Tensor | None = field(default=None, repr=False)


def nearest_training(images: Tensor, x_train: Tensor) -> tuple[np.ndarray, np.ndarray, float]:
    """Nearest training image of every sample: (index (B,), distance (B,)) and the median
    over training images of their nearest-other-image distance (the service's copy check's
    scale, ``models.copies.nearest_neighbour_median``)."""
    xt = x_train.flatten(1).double()
    d = torch.cdist(images.flatten(1).double().cpu(), xt)
    dist, idx = d.min(dim=1)
    return idx.numpy(), dist.numpy(), nearest_neighbour_median(x_train)


def copy_detection(ens: Ensemble, tape: NoiseTape, x_train: Tensor, *, top: int = 5,
                   jacobian_batch: int = 8, progress: ProgressFn = ignore_progress) -> CopyDetection:
    """Synthetic top-``top`` sources and the nearest training image of every sample."""
    f, J, syn = synthetic_scores(ens, tape, batch=jacobian_batch, progress=progress)
    nn_item, nn_dist, train_med = nearest_training(f, x_train)
    top_sources = torch.topk(syn, min(top, syn.shape[1]), dim=1).indices.numpy()
    nn_source = ens.codebook.item_source[nn_item]
    return CopyDetection(list(tape.seeds), f, nn_item, nn_dist, train_med, top_sources,
                         nn_source, _rank_of(syn.numpy(), nn_source), jacobians=J)


def _rank_of(score: np.ndarray, source: np.ndarray) -> np.ndarray:
    """Rank (1 = highest) of ``source[b]`` in row b of ``score`` (B, S); ties count against it."""
    own = score[np.arange(len(source)), source]
    return (score >= own[:, None]).sum(axis=1)


def near_copies(res: CopyDetection, copy_ratio: float = 0.5) -> np.ndarray:
    """(B,) bool: the nearest training image lies within ``copy_ratio`` times the training
    set's median nearest-neighbour distance."""
    return res.nn_dist <= copy_ratio * res.train_nn_median


def exact_copy_check(ens: Ensemble, tape: NoiseTape, res: CopyDetection, rows: np.ndarray,
                     x_train: Tensor, *, chunk: int = 1024,
                     progress: ProgressFn = ignore_progress) -> CopyDetection:
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
    exact_res = np.zeros(len(sources))
    x_flat = x_train.flatten(1).double()
    item_source = torch.from_numpy(np.asarray(ens.codebook.item_source, np.int64))

    def consume(sl: slice, x: Tensor) -> None:
        f = res.images[sample_index[sl]]
        exact[sl] = l2_distance(x, f).double().numpy()
        d_cf = torch.cdist(x.flatten(1).double(), x_flat)  # (r, N)
        d_f = torch.cdist(f.flatten(1).double(), x_flat)
        for j, s in enumerate(sources[sl].tolist()):
            own = item_source == s
            exact_res[sl.start + j] = float(d_cf[j, own].min() - d_f[j, own].min())

    exact_ablations(ens, tape, sample_index, sources, chunk=chunk, progress=progress, consume=consume)
    return replace(res, exact_rows=rows, exact=exact.reshape(len(rows), S),
                   exact_resemblance=exact_res.reshape(len(rows), S))


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

    resem: dict[str, Any] | None = None
    if res.exact_resemblance is not None:
        r_rank = _rank_of(res.exact_resemblance, nn_src)
        copies = is_copy[rows]
        resem = {"n": int(copies.sum()),
                 "exact_top1_rate": float((r_rank[copies] == 1).mean()) if copies.any() else float("nan"),
                 "exact_top3_rate": float((r_rank[copies] <= 3).mean()) if copies.any() else float("nan"),
                 "median_nn_exact_rank": float(np.median(r_rank[copies])) if copies.any() else float("nan")}
    return {"sources": int(exact.shape[1]), "copies": summary(is_copy[rows]), "resemblance": resem,
            "all_checked": summary(np.ones(len(rows), bool)),
            "per_sample": [{"sample": int(r), "exact_top1": int(exact_top1[j]),
                            **{k: v[j].item() for k, v in per.items()}}
                           for j, r in enumerate(rows)]}


@dataclass(frozen=True)
class Attributed:
    """What one attribution pipeline said of each sample: its top sources (best first), whether
    it was attributable, the top source's p-value, and the sources it names (significant)."""

    top: list[list[int]]
    attributable: list[bool]
    top_p: list[float | None]
    named: list[list[int]]
    p_of: list[dict[int, tuple[float | None, float | None]]]  # every candidate's (synthetic, exact) p


def _attributed(results: list[SampleAttribution], cfg: AttributionConfig,
                p_of: list[dict[int, tuple[float | None, float | None]]]) -> Attributed:
    sigs = [r.significance for r in results]
    return Attributed([[e.source for e in r.ranking] for r in results],
                      [bool(s is not None and s.attributable) for s in sigs],
                      [None if s is None else s.top_p for s in sigs],
                      [[e.source for e in r.ranking if s is not None and s.names(e)]
                       for r, s in zip(results, sigs, strict=True)], p_of)


def _candidate_p(results: list[SampleAttribution]) -> list[dict[int, tuple[float | None, float | None]]]:
    return [{e.source: (e.p_value, e.exact_p_value) for e in r.ranking} for r in results]


def trust(ens: Ensemble, tape: NoiseTape, f: Tensor, J: Tensor, x_train: Tensor, cfg: AttributionConfig, *,
          progress: ProgressFn = ignore_progress) -> tuple[Attributed, Attributed]:
    """The service's attribution of every sample: synthetic only (``conclude`` of the screen), and
    its default (the screen's top ``verify_top_k`` re-ranked by exact counterfactuals). f (B, C, H, W)
    and J (B, D, n): the samples and their Jacobians (they do not depend on the codes)."""
    B = len(tape.seeds)
    synthetic, verified = [], []
    norms_sq = squared_norms(x_train)
    on = next(ens.net.parameters()).device  # where the exact re-runs and their samples meet
    progress("trust", 0, B)
    for b0 in range(0, B, 8):
        rows = torch.arange(b0, min(B, b0 + 8))
        sub = tape.select(rows)
        results = rank_sources(ens, sub.seeds, f[rows].to(on), J[rows].to(on), cfg, images=x_train,
                               norms_sq=norms_sq)
        screen = [replace(r, ranking=list(r.ranking), exact=list(r.exact)) for r in results]
        screen_p = _candidate_p(screen)
        for r in screen:
            conclude(r, cfg)
        synthetic.append(_attributed(screen, cfg, screen_p))
        if cfg.verify_top_k:
            verify(ens, sub, results, cfg, images=x_train)
        verified_p = _candidate_p(results)
        for r in results:
            conclude(r, cfg)
        verified.append(_attributed(results, cfg, verified_p))
        progress("trust", int(sub.x_T.shape[0]) + b0, B)

    def join(parts: list[Attributed]) -> Attributed:
        return Attributed(*[[v for p in parts for v in getattr(p, name)] for name in
                            ("top", "attributable", "top_p", "named", "p_of")])

    return join(synthetic), join(verified)


def shuffled(ens: Ensemble, seed: int = SHUFFLE_SEED) -> Ensemble:
    """The same ensemble with its sources' codes permuted: each image paired with the members of
    another item (a control: what the members did no longer matches the images)."""
    book = ens.codebook
    perm = np.random.default_rng(seed).permutation(book.num_sources)
    return replace(ens, codebook=CodeBook(book.n, book.k, book.granularity, book.source_keys,
                                          book.codes[perm].copy(), book.item_source, book.withdrawn))


def trust_stats(att: Attributed, nn_source: np.ndarray, is_copy: np.ndarray) -> dict[str, Any]:
    """Top-1 / top-3 rate of the copied image among near-copies, attributable rates (near-copies
    with the copied image on top; all samples), and the share check: among attributable near-copies,
    how often the copied image's owner (one owner per item) gets the largest share, i.e. the
    copied image is the named source with the largest score (the first named)."""
    top1 = np.array([t[0] == s for t, s in zip(att.top, nn_source, strict=True)])
    top3 = np.array([s in t[:3] for t, s in zip(att.top, nn_source, strict=True)])
    attributable = np.array(att.attributable)
    right = attributable & top1
    largest = np.array([bool(named) and named[0] == s for named, s in zip(att.named, nn_source, strict=True)])
    n = int(is_copy.sum())

    def rate(v: np.ndarray) -> float:
        return float(v[is_copy].mean()) if n else float("nan")

    copies_attributable = attributable & is_copy
    return {"n_copies": n, "top1_rate_copies": rate(top1), "top3_rate_copies": rate(top3),
            "attributable_right_rate_copies": rate(right), "attributable_rate_copies": rate(attributable),
            "attributable_rate_all": float(attributable.mean()),
            "top1_rate_all": float(top1.mean()),
            "copy_owner_largest_share": float(largest[copies_attributable].mean())
            if copies_attributable.any() else float("nan"),
            "top_p_copies": [p for p, c in zip(att.top_p, is_copy, strict=True) if c],
            # the copied image's own p-values, synthetic and exact (exact decoys; None when not
            # run, or when the copy was not among the candidates)
            "copy_p_copies": [list(p_of.get(int(s), (None, None)))
                              for p_of, s, c in zip(att.p_of, nn_source, is_copy, strict=True) if c]}


def _fmt(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.2f}"


def causal_stats(ens: Ensemble, tape: NoiseTape, res: CopyDetection, served: Attributed, x_train: Tensor,
                 is_copy: np.ndarray, *, draws: int, seed: int,
                 more: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """The authors' measures on these samples, from exact counterfactuals: FAR (``models.causality``)
    of the served top source (on all samples, and on those called attributable), of nearest-image
    attribution and of the paper's influence ranking, with the same random drops; which near-copies'
    nearest image is confirmed as the cause (dropping it changes the sample's nearest image), and how
    often the served top source is that image there; how often the served top is the nearest image.
    more: further methods (name -> (B,) sources, -1 for none) measured on the same random drops."""
    top = np.array([t[0] for t in served.top], dtype=np.int64)
    attributable = np.array(served.attributable, dtype=bool)
    methods = {"service": top, "service_attributable": np.where(attributable, top, -1),
               "nearest_image": np.asarray(res.nn_source, dtype=np.int64),
               "influence": np.asarray(res.top_sources[:, 0], dtype=np.int64), **(more or {})}
    rates = false_attribution_rates(ens, tape, res.images, methods, x_train, draws=draws, seed=seed)
    cause = np.array([survived is False for survived in rates["nearest_image"].survived])  # dropping it moves
    on_top = top == res.nn_source
    confirmed = cause & is_copy
    return {"far": {name: r.to_json() for name, r in rates.items()}, "random_draws": draws,
            "cause_confirmed_copies": int(confirmed.sum()),
            "cause_on_top_rate_copies": float(on_top[confirmed].mean()) if confirmed.any() else float("nan"),
            "cause_confirmed_rate_all": float(cause.mean()),
            "top_is_nearest_rate_all": float(on_top.mean()),
            "top_is_nearest_rate_copies": float(on_top[is_copy].mean()) if is_copy.any() else float("nan"),
            "per_sample": [{"top_changes_nearest": None if s is None else not s, "nearest_is_cause": bool(c)}
                           for s, c in zip(rates["service"].survived, cause, strict=True)]}


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
    cfg = AttributionConfig(top_k=max(config.top, 3), score=DEFAULT_SCORE,
                            verify_top_k=min(config.verify_top_k, ens.codebook.num_sources),
                            decoys=config.decoys, exact_decoys=min(config.exact_decoys, config.decoys))
    is_copy = near_copies(res, config.copy_ratio)
    assert res.jacobians is not None
    syn_att, default_att = trust(ens, tape, res.images, res.jacobians, x_train, cfg, progress=progress)
    _, shuffled_att = trust(shuffled(ens), tape, res.images, res.jacobians, x_train, cfg)
    trust_numbers: dict[str, Any] = {
        "score": cfg.score, "verify_top_k": cfg.verify_top_k, "decoys": cfg.decoys,
        "exact_decoys": cfg.exact_decoys, "alpha": cfg.alpha,
        "service_default": trust_stats(default_att, res.nn_source, is_copy),
        "synthetic_only": trust_stats(syn_att, res.nn_source, is_copy),
        "shuffled_codes": trust_stats(shuffled_att, res.nn_source, is_copy)}
    causal = causal_stats(ens, tape, res, default_att, x_train, is_copy, draws=config.far_draws,
                          seed=config.seed)
    trust_numbers["causal"] = causal
    if config.exact != "none":
        rows = np.arange(len(res.seeds)) if config.exact == "all" else np.flatnonzero(
            near_copies(res, config.copy_ratio))
        res = exact_copy_check(ens, tape, res, rows, x_train, chunk=config.chunk, progress=progress)
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
    numbers["trust"] = trust_numbers
    if "exact" in numbers:
        numbers["trust"]["exact_every_source"] = numbers["exact"].get("resemblance")
    default, control = trust_numbers["service_default"], trust_numbers["shuffled_codes"]

    def measured(target: Target, value: float) -> Outcome:
        return target.outcome(value) if st["n_copies"] else target.unmeasured()

    targets = {"top1_rate_copies": measured(TOP1_RATE_COPIES, default["top1_rate_copies"]),
               "top3_rate_copies": measured(TOP3_RATE_COPIES, default["top3_rate_copies"]),
               "attributable_copies": measured(ATTRIBUTABLE_COPIES,
                                               default["attributable_right_rate_copies"]),
               "shuffled_attributable": SHUFFLED_ATTRIBUTABLE.outcome(control["attributable_rate_all"]),
               "selective_attributable_copies": measured(SELECTIVE_ATTRIBUTABLE_COPIES,
                                                         default["attributable_rate_copies"]),
               "cause_on_top_copies": CAUSE_ON_TOP.outcome(causal["cause_on_top_rate_copies"])
               if causal["cause_confirmed_copies"] else CAUSE_ON_TOP.unmeasured(),
               "far_attributable": FAR_ATTRIBUTABLE.outcome(causal["far"]["service_attributable"]["far"])
               if causal["far"]["service_attributable"]["far"] is not None else FAR_ATTRIBUTABLE.unmeasured()}
    headline += (f"; service default ({cfg.score}, exact top {cfg.verify_top_k}): copied image first in "
                 f"{default['top1_rate_copies']:.2f} of the near-copies, top 3 in "
                 f"{default['top3_rate_copies']:.2f}, attributable (copy on top) "
                 f"{default['attributable_right_rate_copies']:.2f}; synthetic only "
                 f"{trust_numbers['synthetic_only']['top1_rate_copies']:.2f}; shuffled codes: attributable "
                 f"{control['attributable_rate_all']:.2f} of all samples (copy first "
                 f"{control['top1_rate_copies']:.2f}); FAR (authors') of the served top source "
                 f"{_fmt(causal['far']['service']['far'])}, of nearest-image attribution "
                 f"{_fmt(causal['far']['nearest_image']['far'])}, of influence "
                 f"{_fmt(causal['far']['influence']['far'])}")
    report = Report("copy detection (paper Figure 2a)", targets, numbers, ("copies.png",), headline)
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
