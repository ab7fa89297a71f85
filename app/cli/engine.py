"""`attrib train|generate|attribute|info`: the engine's commands.

Thin glue over models/: turn flags into calls, show progress, write PNG and JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.cli.common import (
    CLIError,
    device,
    emit,
    load_ensemble,
    log,
    read_owners_csv,
    sampling_steps,
)
from models.attribute import (
    AttributionConfig,
    SampleAttribution,
    SourceScore,
    attribute,
    copy_checks,
    default_score,
)
from models.codes import CapacityError
from models.copies import CopyCheck
from models.data import ImageDataset, load_data
from models.distances import LPIPSMetric, LPIPSUnavailable, load_lpips
from models.ensemble import Ensemble
from models.images import attribution_figure, grid
from models.sampler import make_tape, sample
from models.train import TrainSpec, create_ensemble, train
from models.unet import num_parameters


# --------------------------------------------------------------------------- train
@dataclass(frozen=True)
class TrainRequest:
    """What `attrib train` does, as `demo-setup` also asks for it: train ``spec`` into ``out``
    (with ``resume``, continue the checkpoint there), owners read from ``owners_csv``."""

    out: Path
    spec: TrainSpec
    owners_csv: str | None = None
    resume: bool = False
    device: str = "auto"


def train_checkpoint(req: TrainRequest, *, progress_bar: bool = True) -> dict[str, Any]:
    """Train (or, with ``resume``, continue) an ensemble into ``req.out``; returns the summary
    `attrib train --json` prints."""
    on = device(req.device)
    out, spec = req.out, req.spec
    ds = load_data(spec.data, spec.subset, spec.subset_seed)
    try:
        cfg = spec.train_config()
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    if out.exists() and not req.resume:
        raise CLIError(f"{out} exists: pass --resume to continue training it, or another --out")
    if out.exists():
        ens = load_ensemble(out, torch.device("cpu"))
        if ens.dataset.fingerprint != ds.fingerprint():
            raise CLIError(f"{out} was trained on other data ({ens.dataset.name}); "
                           "--resume needs the same --data/--subset")
        state = ens.train_state or {}
        stored = state.get("config", {})  # minibatches continue as they were drawn
        cfg = dataclasses.replace(cfg, batch_size=stored.get("batch_size", cfg.batch_size),
                                  lr=stored.get("lr", cfg.lr), seed=stored.get("seed", cfg.seed))
        log(f"resuming {out} at step {state.get('step', 0)} of {cfg.steps}")
    else:
        if spec.granularity == "class" and ds.labels is None:
            raise CLIError("--granularity class needs labelled data")
        if spec.granularity == "owner" and not req.owners_csv:
            raise CLIError("--granularity owner needs --owners FILE.csv")
        owners = read_owners_csv(req.owners_csv, ds.N) if req.owners_csv else None
        try:
            ens = create_ensemble(spec, ds, owners)
        except (CapacityError, ValueError) as exc:
            raise CLIError(str(exc)) from exc
        book = ens.codebook
        log(f"training {ens.n} members (k={ens.k}, {book.num_sources} {spec.granularity} sources, "
            f"{num_parameters(ens.net):,} parameters each) on {ds.N} items of {ds.name} "
            f"{ds.shape}, preset {ens.preset}, {cfg.steps} steps, device {on}")
    ens.net.to(on)
    bar = _progress_bar(cfg.steps, (ens.train_state or {}).get("step", 0)) if progress_bar else None
    t0 = time.perf_counter()

    def progress(step: int, losses: torch.Tensor) -> None:
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{float(losses.mean()):.4f}")

    try:
        train(ens, ds.to_tensor(), cfg, checkpoint=out, progress=progress)
    except KeyboardInterrupt:
        raise CLIError(f"interrupted; progress saved to {out} (continue with --resume)") from None
    finally:
        if bar is not None:
            bar.close()
    return {"checkpoint": str(out), "steps": cfg.steps, "seconds": round(time.perf_counter() - t0, 2),
            "n": ens.n, "k": ens.k, "sources": ens.codebook.num_sources}


def _progress_bar(total: int, initial: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> None:
    spec = TrainSpec(data=args.data, subset=args.subset, subset_seed=args.subset_seed, preset=args.preset,
                     n=args.n, k=args.k, granularity=args.granularity, seed=args.seed, steps=args.steps,
                     batch_size=args.batch_size, lr=args.lr, checkpoint_every=args.checkpoint_every)
    req = TrainRequest(out=Path(args.out), spec=spec, owners_csv=args.owners, resume=args.resume,
                       device=args.device)
    result = train_checkpoint(req, progress_bar=not args.json)
    emit(args.json, result,
         f"saved {result['checkpoint']} ({result['steps']} steps, {result['seconds']:.1f} s)")


def _seeds(args: argparse.Namespace) -> list[int]:
    """``--seeds`` ('0,5,7', '0-15') or ``--count`` from ``--seed-start``."""
    if args.seeds:
        try:
            seeds: list[int] = []
            for part in args.seeds.split(","):
                if "-" in part.strip()[1:]:
                    first, last = part.split("-", 1)
                    seeds.extend(range(int(first), int(last) + 1))
                else:
                    seeds.append(int(part))
        except ValueError as exc:
            raise CLIError(f"--seeds: expected e.g. '0,5,7' or '0-15', got {args.seeds!r}") from exc
    else:
        seeds = list(range(args.seed_start, args.seed_start + args.count))
    if not seeds:
        raise CLIError("no seeds given")
    if not all(0 <= s < 2**63 for s in seeds):
        raise CLIError("seeds must lie in 0..2**63-1")
    return seeds


# ------------------------------------------------------------------------ generate
def cmd_generate(args: argparse.Namespace) -> None:
    on = device(args.device)
    ens = load_ensemble(args.ckpt, on)
    seeds = _seeds(args)
    steps = sampling_steps(args.steps, ens)
    t0 = time.perf_counter()
    x = sample(ens.net, ens.schedule, make_tape(seeds, ens.shape, steps))
    seconds = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    grid(x, ncol=min(8, len(seeds)), scale=args.scale).save(args.out)
    emit(args.json, {"png": args.out, "seeds": seeds, "steps": steps, "seconds": round(seconds, 3)},
          f"wrote {args.out} ({len(seeds)} samples, {steps} steps, {seconds:.1f} s)")


# ----------------------------------------------------------------------- attribute
def cmd_attribute(args: argparse.Namespace) -> None:
    on = device(args.device)
    ens = load_ensemble(args.ckpt, on)
    seeds = _seeds(args)
    steps = sampling_steps(args.steps, ens)
    spec = args.data or ens.dataset.spec
    ds = load_data(spec, ens.dataset.subset, ens.dataset.subset_seed)
    if ds.fingerprint() != ens.dataset.fingerprint:
        raise CLIError(f"--data {spec!r} is not the data {args.ckpt} was trained on "
                       f"(fingerprint mismatch)")
    score = args.score or default_score(ens.codebook.granularity, args.metric)
    try:
        cfg = AttributionConfig(args.top_k, args.metric, max(args.rerank, args.top_k),
                                min(args.verify_top_k, ens.codebook.num_sources), score=score,
                                decoys=args.decoys, alpha=args.alpha)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    lpips: LPIPSMetric | None = None
    if args.metric == "lpips" or args.lpips_random_trunk:
        try:
            lpips = load_lpips(random_trunk=args.lpips_random_trunk, device=on)
        except LPIPSUnavailable as exc:
            raise CLIError(str(exc)) from exc
    t0 = time.perf_counter()
    images = ds.to_tensor()
    tape = make_tape(seeds, ens.shape, steps)
    results = attribute(ens, tape, cfg, lpips, images=images)
    checks = copy_checks(ens, tape, results, images)
    seconds = time.perf_counter() - t0
    report = _report(ens, ds, results, checks, cfg, steps, seconds, lpips)
    if args.out_json:
        Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_json).write_text(json.dumps(report, indent=2))
    if args.out_png:
        _figure(ens, ds, results, cfg, args.figure_top).save(args.out_png)
    summary = (f"attributed {len(seeds)} samples over {ens.codebook.num_sources} sources in "
               f"{seconds:.1f} s" + (f"; wrote {args.out_json}" if args.out_json else "")
               + (f", {args.out_png}" if args.out_png else ""))
    emit(args.json, report, summary)


def _source_items(ens: Ensemble, ds: ImageDataset, s: int, limit: int = 10) -> dict[str, Any]:
    items = ens.codebook.source_items(s)
    return {"items": [int(i) for i in items[:limit]], "refs": [ds.refs[i] for i in items[:limit]],
            "num_items": len(items)}


def _report(ens: Ensemble, ds: ImageDataset, results: list[SampleAttribution], checks: list[CopyCheck],
            cfg: AttributionConfig, steps: int, seconds: float,
            lpips: LPIPSMetric | None) -> dict[str, Any]:
    keys = ens.codebook.source_keys
    samples = []
    for res, check in zip(results, checks, strict=True):
        ranking = []
        for rank, e in enumerate(res.ranking, 1):
            entry: dict[str, Any] = {"rank": rank, "source": keys[e.source],
                                     "score": e.value(cfg.score, cfg.metric), "l2": e.l2,
                                     "resemblance": e.resemblance, "p_value": e.p_value}
            if e.lpips is not None:
                entry["lpips"] = e.lpips
            if e.exact_l2 is not None:
                entry["exact_score"] = e.exact_value(cfg.score, cfg.metric)
                entry["exact_l2"] = e.exact_l2
                entry["exact_resemblance"] = e.exact_resemblance
                entry["exact_p_value"] = e.exact_p_value
            if res.significance is not None:
                entry["significant"] = res.significance.names(e)
            entry.update(_source_items(ens, ds, e.source))
            ranking.append(entry)
        sig = res.significance
        samples.append({"seed": res.seed, "ranking": ranking, "verification": res.agreement,
                        "attributable": None if sig is None else sig.attributable,
                        "significance": None if sig is None else sig.to_json(),
                        "near_copy": {"nearest": [keys[int(ens.codebook.item_source[i])]
                                                  for i in check.items],
                                      "distances": check.distances.tolist(), "ratio": check.ratio,
                                      "threshold": check.threshold, "near_copy": check.near_copy,
                                      "confirmed": check.confirmed, "moved_away": check.moved_away}})
    return {
        "ensemble": {"n": ens.n, "k": ens.k, "T": ens.schedule.T, "preset": ens.preset,
                     "granularity": ens.codebook.granularity,
                     "sources": ens.codebook.num_sources, "dataset": ens.dataset.name},
        "method": "synthetic", "metric": cfg.metric, "score": cfg.score, "top_k": cfg.top_k, "steps": steps,
        "verify_top_k": cfg.verify_top_k, "decoys": cfg.decoys, "alpha": cfg.alpha,
        "lpips_random_trunk": None if lpips is None else lpips.random_trunk,
        "seconds": round(seconds, 3), "samples": samples,
    }


def _figure(ens: Ensemble, ds: ImageDataset, results: list[SampleAttribution],
            cfg: AttributionConfig, top: int) -> Any:
    x_train = ds.to_tensor()
    samples = torch.stack([r.image.cpu().float() for r in results])
    attributed, captions, marked = [], [], []
    for r in results:
        firsts = [int(ens.codebook.source_items(e.source)[0]) for e in r.ranking[:top]]
        attributed.append(x_train[firsts])
        captions.append([_caption(e, cfg) for e in r.ranking[:top]])
        sig = r.significance
        marked.append([sig is not None and sig.names(e) for e in r.ranking[:top]])
    titles = [f"seed {r.seed}" + ("" if r.significance is None or r.significance.attributable else " (n/a)")
              for r in results]
    return attribution_figure(samples, attributed, captions, titles, marked=marked)


def _caption(e: SourceScore, cfg: AttributionConfig) -> str:
    """The ranking score (exact where verified) and its p-value."""
    exact = e.exact_value(cfg.score, cfg.metric)
    value = e.value(cfg.score, cfg.metric) if exact is None else exact
    return f"{value:.2f}" + ("" if e.p is None else f" p{e.p:.0e}")


# ---------------------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> None:
    ens = load_ensemble(args.ckpt, torch.device("cpu"))
    loads = ens.codebook.bits()[ens.codebook.item_source].sum(axis=0)
    info = {"checkpoint": args.ckpt, "preset": ens.preset, "n": ens.n, "k": ens.k,
            "T": ens.schedule.T, "granularity": ens.codebook.granularity,
            "sources": ens.codebook.num_sources, "dataset": ens.dataset.name,
            "items": ens.dataset.num_items, "shape": list(ens.shape),
            "parameters_per_member": num_parameters(ens.net),
            "trained_steps": (ens.train_state or {}).get("step"),
            "items_per_member": [int(v) for v in np.asarray(loads)]}
    emit(args.json, info, json.dumps(info, indent=2))
