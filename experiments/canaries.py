"""Canaries: a benchmark whose truth is known. A few works of the training set are made
distinctive (their image inverted: a light digit on a dark ground becomes a dark digit on a light
one, far from every ordinary image) and listed ``duplicates`` times in their members' splits
(heavily duplicated works are what diffusion models memorise, Carlini et al. 2023); the rest stay
ordinary. A sample that comes near a canary (its nearest training image is the canary, within the
copy ratio) must name it -- first, attributable, and causally (the authors' FAR) -- and a sample
that does not must not name a canary; with the codes shuffled after training nothing may be
attributable.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.common import (
    ExperimentError,
    LogFn,
    Planted,
    ProgressFn,
    Report,
    Target,
    ignore_log,
    ignore_progress,
    prepare,
)
from experiments.configs import CanariesConfig
from experiments.copies import causal_stats, copy_detection, near_copies, shuffled, trust
from models.attribute import DEFAULT_SCORE, AttributionConfig
from models.data import ImageDataset

TOP1_NEAR = Target(">=", 0.95)
"""Samples near a canary whose served top source is that canary."""
ATTRIBUTABLE_NEAR = Target(">=", 0.9)
"""Samples near a canary that the selective test calls attributable, naming that canary."""
FAR_NEAR = Target("<=", 0.05)
"""The authors' false attribution rate of the served top source on the samples near a canary."""
CANARY_NAMED_ELSEWHERE = Target("<=", 0.05)
"""Samples not near a canary that name a canary."""
SHUFFLED_ATTRIBUTABLE = Target("<=", 0.05)
"""Samples called attributable with the codes shuffled after training."""


def canary_items(n_items: int, count: int, seed: int) -> np.ndarray:
    """The ``count`` items made canaries, drawn from ``seed`` (sorted)."""
    if count >= n_items:
        raise ValueError(f"--canaries {count} leaves no ordinary work among {n_items}")
    return np.sort(np.random.default_rng(seed).choice(n_items, size=count, replace=False))


def plant_canaries(ds: ImageDataset, items: np.ndarray, duplicates: int) -> Planted:
    """``ds`` with the images of ``items`` inverted (255 - u) and referenced as canaries, each
    listed ``duplicates`` times in its members' splits."""
    images = ds.images.copy()
    images[items] = 255 - images[items]
    refs = list(ds.refs)
    for i in items.tolist():
        refs[i] = f"canary:{refs[i]}"
    repeats = np.ones(ds.N, dtype=np.int64)
    repeats[items] = duplicates
    return Planted(replace(ds, name=f"{ds.name}+canaries", images=images, refs=tuple(refs)), repeats)


def run(config: CanariesConfig, out_dir: Path, progress: ProgressFn = ignore_progress, *,
        device: torch.device | str = "cpu", log: LogFn = ignore_log) -> Report:
    """Train an item ensemble on the planted data, sample, attribute every sample as the service
    does (and with the codes shuffled), measure FAR; write report.json into ``out_dir``."""
    t0 = time.perf_counter()
    chosen: list[np.ndarray] = []

    def plant(ds: ImageDataset) -> Planted:
        chosen.append(canary_items(ds.N, config.canaries, config.canary_seed))
        return plant_canaries(ds, chosen[0], config.duplicates)

    try:
        setup = prepare(config, out_dir, granularity="item", device=torch.device(device), progress=progress,
                        log=log, plant=plant)
    except ValueError as exc:
        raise ExperimentError(str(exc)) from exc
    ens, ds, tape = setup.ensemble, setup.data, setup.tape
    canaries = chosen[0]
    x_train = ds.to_tensor()
    res = copy_detection(ens, tape, x_train, top=5, progress=progress)
    S = ens.codebook.num_sources
    cfg = AttributionConfig(top_k=5, score=DEFAULT_SCORE, verify_top_k=min(config.verify_top_k, S),
                            decoys=config.decoys)
    assert res.jacobians is not None
    _, served = trust(ens, tape, res.images, res.jacobians, x_train, cfg, progress=progress)
    _, control = trust(shuffled(ens), tape, res.images, res.jacobians, x_train, cfg)
    is_copy = near_copies(res, config.copy_ratio)
    near = is_copy & np.isin(res.nn_item, canaries)
    top = np.array([t[0] for t in served.top])
    progress("causal", 0, 1)
    causal = causal_stats(ens, tape, res, served, x_train, is_copy, draws=config.far_draws, seed=config.seed,
                          more={"service_near_canary": np.where(near, top, -1)})
    progress("causal", 1, 1)

    canary_source = set(ens.codebook.item_source[canaries].tolist())
    on_top = top == res.nn_source
    named = [set(n) for n in served.named]
    names_its_canary = np.array([bool(a) and int(s) in nm for a, s, nm in
                                 zip(served.attributable, res.nn_source, named, strict=True)])
    names_a_canary = np.array([bool(nm & canary_source) for nm in named])
    far_near = causal["far"]["service_near_canary"]["far"]  # u and u_r over the same near samples
    others = ~near
    n_near = int(near.sum())

    def rate(v: np.ndarray, mask: np.ndarray) -> float:
        return float(v[mask].mean()) if mask.any() else float("nan")

    def measured(target: Target, value: float | None, n: int) -> Any:
        # no sample near a canary (or FAR undefined) measures nothing: NaN, which never meets a
        # target, so a benchmark that saw no canary fails rather than passes
        return target.outcome(float("nan") if not n or value is None else value)

    targets = {"top1_near_canary": measured(TOP1_NEAR, rate(on_top, near), n_near),
               "attributable_near_canary": measured(ATTRIBUTABLE_NEAR, rate(names_its_canary, near), n_near),
               "far_near_canary": measured(FAR_NEAR, far_near, n_near),
               "canary_named_elsewhere": measured(CANARY_NAMED_ELSEWHERE, rate(names_a_canary, others),
                                                  int(others.sum())),
               "shuffled_attributable": SHUFFLED_ATTRIBUTABLE.outcome(float(np.mean(control.attributable)))}
    numbers: dict[str, Any] = {
        "ensemble": setup.info, "steps": setup.steps, "samples": len(res.seeds),
        "canaries": [ds.refs[i] for i in canaries.tolist()], "duplicates": config.duplicates,
        "n_near_canary": n_near, "n_other": int(others.sum()),
        "near_canary_per_canary": {ds.refs[i]: int((near & (res.nn_item == i)).sum())
                                   for i in canaries.tolist()},
        "top1_near_canary": rate(on_top, near), "attributable_near_canary": rate(names_its_canary, near),
        "attributable_rate_all": float(np.mean(served.attributable)),
        "canary_named_elsewhere": rate(names_a_canary, others),
        "far_near_canary": far_near, "causal": causal,
        "shuffled_attributable": float(np.mean(control.attributable)),
        "train_nn_median": res.train_nn_median,
        "per_sample": [{"seed": res.seeds[b], "nn_ref": ds.refs[int(res.nn_item[b])],
                        "nn_dist": float(res.nn_dist[b]), "near_canary": bool(near[b]),
                        "top": ds.refs[int(ens.codebook.source_items(int(top[b]))[0])],
                        "attributable": bool(served.attributable[b]),
                        "names_a_canary": bool(names_a_canary[b])} for b in range(len(res.seeds))],
        "total_seconds": round(time.perf_counter() - t0, 1)}
    far_text = "undefined" if far_near is None else f"{far_near:.3f}"
    headline = (f"{len(res.seeds)} samples, {n_near} near one of {len(canaries)} canaries "
                f"(x{config.duplicates}): served top is the canary for {rate(on_top, near):.2f}, "
                f"attributable naming it {rate(names_its_canary, near):.2f}, FAR {far_text}; "
                f"{int(others.sum())} other samples name a canary {rate(names_a_canary, others):.2f}; "
                f"shuffled codes attributable {numbers['shuffled_attributable']:.2f}")
    report = Report("canaries (a benchmark whose truth is known)", targets, numbers, (), headline)
    report.write(out_dir)
    return report
