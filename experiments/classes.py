"""The class-ablation control (paper Figure 1c): sources are whole classes.

Each generated sample is classified; ablating its predicted class (dropping every member that
saw the class) should move it further than ablating any other class. Exact counterfactuals,
Euclidean and LPIPS distance, a one-sided Mann-Whitney U test.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from experiments.classifiers import Classifier, train_classifier
from experiments.common import (
    Comparison,
    LogFn,
    Outcome,
    ProgressFn,
    Report,
    Target,
    exact_ablations,
    generate,
    ignore_log,
    ignore_progress,
    prepare,
)
from experiments.configs import ClassesConfig
from experiments.figures import histogram, image_table, stack
from experiments.statistics import mann_whitney_greater
from models.distances import LPIPSMetric, LPIPSUnavailable, l2_distance, load_lpips
from models.ensemble import Ensemble
from models.sampler import NoiseTape
from models.scores import default_score

P_VALUE = Target("<", 1e-30)
"""Mann-Whitney p of the predicted class's distances against the other classes'."""
FRAC_LARGEST = Target(">=", 0.6)
"""Samples whose predicted class's ablation moves them most."""
FRAC_LARGEST_CONFIDENT = Target(">=", 0.8)
"""The same among samples classified with confidence >= min_confidence."""
MIN_SAMPLES = Target(">=", 1000)
"""Samples: fewer cannot pass."""
DEFAULT_AT_LEAST_PAPER = Comparison("default score", ">=", "influence")
"""The default score's fraction of samples whose predicted class is largest, against the paper's
(influence, L2) in the same run."""


@dataclass
class ClassAblation:
    """Raw results of the class-ablation control for B samples and S class sources.

    Attributes:
        seeds: (B,) sample seeds.
        images: (B, C, H, W) the samples.
        proba: (B, S) classifier probabilities of each sample.
        l2: (B, S) Euclidean distance between each sample and its counterfactual with class
            s ablated (exact).
        lpips: (B, S) the same in LPIPS, or None.
        cf_pred: (B,) the classifier's label of the counterfactual with the predicted class
            ablated.
        kept: (b, S, C, H, W) the counterfactuals of the first b samples (for figures).
        resemblance: name -> (B, S) exact resemblance d(cf_s, X_s) - d(f, X_s) to the class's
            images X_s, for each way of measuring distance to a set (``SET_DISTANCES``).
    """

    seeds: list[int]
    images: Tensor
    proba: np.ndarray
    l2: np.ndarray
    lpips: np.ndarray | None
    cf_pred: np.ndarray
    kept: Tensor
    resemblance: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def predicted(self) -> np.ndarray:
        return self.proba.argmax(axis=1)

    @property
    def confidence(self) -> np.ndarray:
        return self.proba.max(axis=1)


SET_DISTANCES = ("nearest", "mean", "nearest10")
"""Distance from an image to a class's images: to the nearest (the service's definition of d(y, X)),
the mean distance to all of them, the mean distance to the 10 nearest."""


def set_distances(y: Tensor, x_train: Tensor, item_source: np.ndarray, num_sources: int) -> dict[str, Tensor]:
    """Each ``SET_DISTANCES`` from images y (R, C, H, W) to every source's images -> name -> (R, S)."""
    d = torch.cdist(y.flatten(1).double(), x_train.flatten(1).double())  # (R, N)
    out = {name: torch.empty(d.shape[0], num_sources, dtype=torch.float64) for name in SET_DISTANCES}
    for s in range(num_sources):
        ds = d[:, torch.from_numpy(np.flatnonzero(item_source == s))]
        out["nearest"][:, s] = ds.min(dim=1).values
        out["mean"][:, s] = ds.mean(dim=1)
        out["nearest10"][:, s] = torch.topk(ds, min(10, ds.shape[1]), largest=False).values.mean(dim=1)
    return out


def class_ablation(ens: Ensemble, tape: NoiseTape, classifier: Classifier, *,
                   lpips: LPIPSMetric | None = None, keep: int = 8, chunk: int = 1024,
                   progress: ProgressFn = ignore_progress, x_train: Tensor | None = None) -> ClassAblation:
    """Sample, classify, and ablate every class exactly for every sample (B * S reruns); with the
    training images ``x_train`` (item order), each counterfactual's resemblance too."""
    if ens.codebook.granularity != "class":
        raise ValueError(f"the class-ablation control needs a class-granularity ensemble, "
                         f"not '{ens.codebook.granularity}'")
    S = ens.codebook.num_sources
    f = generate(ens, tape, progress=progress)
    B = f.shape[0]
    proba = classifier.predict_proba(f)
    if proba.shape[1] != S:
        raise ValueError(f"classifier knows {proba.shape[1]} classes, the ensemble {S} sources")
    pred = proba.argmax(axis=1)
    sample_index = torch.arange(B).repeat_interleave(S)
    sources = torch.arange(S).repeat(B)
    l2 = np.zeros(B * S)
    lp = np.zeros(B * S) if lpips is not None else None
    cf_pred = np.full(B, -1, dtype=np.int64)
    keep = min(keep, B)
    kept = torch.zeros(keep * S, *f.shape[1:])
    item_source = ens.codebook.item_source
    resem = {name: np.zeros(B * S) for name in SET_DISTANCES} if x_train is not None else {}
    f_set = set_distances(f, x_train, item_source, S) if x_train is not None else {}

    def consume(sl: slice, x: Tensor) -> None:
        ref = f[sample_index[sl]]
        l2[sl] = l2_distance(x, ref).double().numpy()
        if x_train is not None:
            cf_set = set_distances(x, x_train, item_source, S)
            pick = torch.arange(sl.stop - sl.start)
            for name in SET_DISTANCES:
                resem[name][sl] = (cf_set[name][pick, sources[sl]]
                                   - f_set[name][sample_index[sl], sources[sl]]).numpy()
        if lpips is not None and lp is not None:
            lp[sl] = lpips(x, ref).double().cpu().numpy()
        rows = torch.arange(sl.start, sl.stop)
        own = rows[sources[sl] == torch.from_numpy(pred)[sample_index[sl]]]
        if len(own):
            cf_pred[sample_index[own].numpy()] = classifier.predict_proba(x[own - sl.start]).argmax(1)
        k = rows[rows < keep * S]
        if len(k):
            kept[k] = x[k - sl.start]

    exact_ablations(ens, tape, sample_index, sources, chunk=chunk, progress=progress,
                    consume=consume)
    return ClassAblation(list(tape.seeds), f, proba, l2.reshape(B, S),
                         None if lp is None else lp.reshape(B, S), cf_pred,
                         kept.reshape(keep, S, *f.shape[1:]),
                         {name: v.reshape(B, S) for name, v in resem.items()})


def class_ablation_stats(dist: np.ndarray, predicted: np.ndarray, confidence: np.ndarray,
                         min_confidence: Annotated[float, Field(gt=0, le=1)] = 0.9) -> dict[str, Any]:
    """Statistics of one distance (B, S) of the class-ablation control.

    frac_largest: fraction of samples whose predicted class's ablation gives the largest
    distance (ties count as not largest); the same among samples classified with confidence
    >= min_confidence; Mann-Whitney U of the predicted-class distances (B,) against the
    other classes' (B (S - 1),), alternative "greater".
    """
    dist = np.asarray(dist, float)
    B, S = dist.shape
    rows = np.arange(B)
    own = dist[rows, predicted]
    mask = np.ones_like(dist, bool)
    mask[rows, predicted] = False
    others = dist[mask]
    other_max = np.where(mask, dist, -np.inf).max(axis=1)
    largest = own > other_max
    conf = confidence >= min_confidence
    out: dict[str, Any] = {
        "n_samples": B,
        "frac_largest": float(largest.mean()),
        "n_confident": int(conf.sum()),
        "frac_largest_confident": float(largest[conf].mean()) if conf.any() else float("nan"),
        "median_predicted": float(np.median(own)),
        "median_other": float(np.median(others)),
        "chance_largest": 1.0 / S,
    }
    out["mann_whitney"] = mann_whitney_greater(own, others)
    return out


def run(config: ClassesConfig, out_dir: Path, progress: ProgressFn = ignore_progress, *,
        device: torch.device | str = "cpu", log: LogFn = ignore_log) -> Report:
    """Train (or load) a class-granularity ensemble, classify ``config.samples`` samples, ablate
    every class exactly for each; write report.json, classes.png and classes_grid.png into
    ``out_dir``. ExperimentError (or DatasetError) for a bad config or data."""
    t0 = time.perf_counter()
    device = torch.device(device)
    setup = prepare(config, out_dir, granularity="class", device=device, progress=progress, log=log,
                    codes=config.codes, exclude_classes=config.exclude_classes)
    ens, ds = setup.ensemble, setup.data
    lpips, lpips_note = _lpips(config, device, log)
    t1 = time.perf_counter()
    clf = train_classifier(ds.to_tensor(), ens.codebook.item_source, kind=config.classifier, seed=config.seed)
    log(f"classifier {clf.kind}: held-out accuracy {clf.accuracy:.3f} ({clf.n_test} items)")
    res = class_ablation(ens, setup.tape, clf, lpips=lpips, keep=config.grid_rows, chunk=config.chunk,
                         progress=progress, x_train=ds.to_tensor())
    seconds = time.perf_counter() - t1
    pred, conf = res.predicted, res.confidence
    dists = {"l2": res.l2} | ({"lpips": res.lpips} if res.lpips is not None else {})
    stats = {name: class_ablation_stats(d, pred, conf, config.min_confidence) for name, d in dists.items()}
    resemblance_stats = {name: class_ablation_stats(d, pred, conf, config.min_confidence)
                         for name, d in res.resemblance.items()}
    score = default_score(ens.codebook.granularity)
    default_stats = stats["l2"] if score == "influence" else resemblance_stats["nearest"]
    keys = ens.codebook.source_keys
    numbers: dict[str, Any] = {
        "ensemble": setup.info, "steps": setup.steps,
        "samples": len(pred), "seeds": [config.seed_start, config.seed_start + config.samples - 1],
        "classes": list(keys),
        "excluded_classes": ",".join(config.exclude_classes) or None,
        "classifier": {"kind": clf.kind, "held_out_accuracy": clf.accuracy, "n_train": clf.n_train,
                       "n_test": clf.n_test},
        "lpips": lpips_note,
        "min_confidence": config.min_confidence,
        "predicted_class_counts": np.bincount(pred, minlength=len(keys)).tolist(),
        "median_confidence": float(np.median(conf)),
        "counterfactual_changes_class": float((res.cf_pred != pred).mean()),
        "stats": stats,
        "resemblance_stats": resemblance_stats,
        "default_score": score,
        "seconds": round(seconds, 1), "total_seconds": round(time.perf_counter() - t0, 1),
    }
    if config.raw:
        numbers["raw"] = {"predicted": pred.tolist(), "confidence": conf.tolist(),
                          **{name: d.tolist() for name, d in dists.items()}}
    _figures(out_dir, res, dists, stats, keys)
    l2 = stats["l2"]
    headline = (f"{len(pred)} samples, classifier accuracy {clf.accuracy:.3f}: predicted class largest (L2) "
                f"in {l2['frac_largest']:.3f} (confident: {l2['frac_largest_confident']:.3f} of "
                f"{l2['n_confident']}), Mann-Whitney log10 p = {l2['mann_whitney']['log10_p']:.1f}"
                + (f"; LPIPS: largest {stats['lpips']['frac_largest']:.3f}, log10 p = "
                   f"{stats['lpips']['mann_whitney']['log10_p']:.1f}" if "lpips" in stats else
                   "; LPIPS unavailable") + f" ({seconds:.0f} s)")
    checks = targets(stats, len(pred), lpips_note)
    checks["default_at_least_influence"] = DEFAULT_AT_LEAST_PAPER.outcome(default_stats["frac_largest"],
                                                                          stats["l2"]["frac_largest"])
    checks["p_default"] = P_VALUE.outcome(default_stats["mann_whitney"]["p_value"],
                                          log10=default_stats["mann_whitney"]["log10_p"])
    near = resemblance_stats.get("nearest")
    headline += ("" if near is None else
                 f"; resemblance (nearest image of the class): largest in {near['frac_largest']:.3f}, "
                 f"log10 p = {near['mann_whitney']['log10_p']:.1f}; default score: {score}")
    report = Report("class-ablation control (paper Figure 1c)", checks,
                    numbers, ("classes.png", "classes_grid.png"), headline)
    report.write(out_dir)
    return report


def targets(stats: dict[str, Any], samples: int, lpips_note: dict[str, Any]) -> dict[str, Outcome]:
    """The targets of the statistics of each distance (``stats``: name -> class_ablation_stats);
    LPIPS's p is unmeasured (``lpips_note`` says why) when LPIPS was not used."""
    out: dict[str, Outcome] = {}
    for name in ("l2", "lpips"):
        st = stats.get(name)
        if st is None:
            out[f"p_{name}"] = P_VALUE.unmeasured(note=lpips_note)
        else:
            test = st["mann_whitney"]
            out[f"p_{name}"] = P_VALUE.outcome(test["p_value"], log10=test["log10_p"])
    for name, st in stats.items():
        out[f"frac_largest_{name}"] = FRAC_LARGEST.outcome(st["frac_largest"])
        out[f"frac_largest_confident_{name}"] = FRAC_LARGEST_CONFIDENT.outcome(st["frac_largest_confident"])
    out["samples"] = MIN_SAMPLES.outcome(samples)
    return out


def _lpips(config: ClassesConfig, device: torch.device,
           log: LogFn) -> tuple[LPIPSMetric | None, dict[str, Any]]:
    if not config.lpips:
        return None, {"available": False, "reason": "--no-lpips"}
    try:
        m = load_lpips(random_trunk=config.lpips_random_trunk, device=device)
    except LPIPSUnavailable as exc:
        log("LPIPS unavailable (Euclidean only): " + str(exc).splitlines()[0])
        return None, {"available": False, "reason": str(exc)}
    return m, {"available": True, "random_trunk": m.random_trunk,
               "backbone": None if m.backbone_path is None else str(m.backbone_path),
               "note": "TESTING ONLY: random trunk" if m.random_trunk else "ImageNet AlexNet trunk"}


def _figures(out_dir: Path, res: ClassAblation, dists: dict[str, np.ndarray], stats: dict[str, Any],
             keys: tuple[str, ...]) -> None:
    """Both distance distributions per metric (classes.png); the first samples beside every
    class-ablated counterfactual, the predicted class framed (classes_grid.png)."""
    pred, conf = res.predicted, res.confidence
    panels = []
    for name, d in dists.items():
        mask = np.ones_like(d, bool)
        mask[np.arange(len(pred)), pred] = False
        st = stats[name]
        title = (f"{name}: predicted class largest {st['frac_largest']:.2f}, "
                 f"log10 p = {st['mann_whitney']['log10_p']:.1f}")
        panels.append(histogram({"predicted class ablated": d[np.arange(len(pred)), pred],
                                         "other class ablated": d[mask]}, title,
                                        f"{name} distance to the sample"))
    stack(panels, horizontal=True).save(out_dir / "classes.png")
    b = res.kept.shape[0]
    rows = [torch.cat([res.images[i : i + 1], res.kept[i]]) for i in range(b)]
    header = ["sample"] + [f"-{k.split(':', 1)[-1]}" for k in keys]
    labels = [f"{keys[pred[i]].split(':', 1)[-1]} p={conf[i]:.2f}" for i in range(b)]
    marks = [[False] + [j == pred[i] for j in range(len(keys))] for i in range(b)]
    image_table(rows, header, labels, marks=marks).save(out_dir / "classes_grid.png")
