"""`attrib`: train an encoded ensemble, generate from it, and attribute its samples.

Thin glue over models/: parse flags, load data and checkpoints, show progress, write
PNG and JSON. Errors are one clear line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.runtime import tune_malloc
from models.attribute import METRICS, AttributionConfig, SampleAttribution, attribute
from models.codes import GRANULARITIES, CapacityError, default_k, make_codebook
from models.data import DatasetError, ImageDataset, load_dataset
from models.distances import LPIPSMetric, LPIPSUnavailable, load_lpips
from models.ensemble import PRESETS, DatasetInfo, Ensemble
from models.images import attribution_figure, grid
from models.sampler import make_tape, sample
from models.train import TrainConfig, train
from models.unet import num_parameters

DEFAULT_CKPT = "runs/digits.pt"


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {name} requested but CUDA is not available")
    return torch.device(name)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _load_data(spec: str, subset: int | None, subset_seed: int) -> ImageDataset:
    ds = load_dataset(spec)
    if subset is not None:
        ds = ds.sample(subset, subset_seed)
    return ds


def _owners(path: str | None, num_items: int) -> list[str] | None:
    """A CSV of `item_index,owner` lines (header optional) -> one owner per item."""
    if path is None:
        return None
    owners: list[str | None] = [None] * num_items
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        parts = [p.strip() for p in line.split(",")]
        if not line.strip() or (lineno == 1 and not parts[0].isdigit()):
            continue
        if len(parts) != 2 or not parts[0].isdigit() or not parts[1]:
            raise CLIError(f"{path}:{lineno}: expected 'item_index,owner', got {line!r}")
        i = int(parts[0])
        if i >= num_items:
            raise CLIError(f"{path}:{lineno}: item {i} out of range (dataset has {num_items})")
        owners[i] = parts[1]
    missing = [i for i, o in enumerate(owners) if o is None]
    if missing:
        raise CLIError(f"{path}: no owner for {len(missing)} items (first: item {missing[0]})")
    return [o for o in owners if o is not None]


def _parse_seeds(args: argparse.Namespace) -> list[int]:
    if args.seeds:
        try:
            seeds: list[int] = []
            for part in args.seeds.split(","):
                if "-" in part.strip()[1:]:
                    a, b = part.split("-", 1)
                    seeds.extend(range(int(a), int(b) + 1))
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


def _load_ensemble(path: str, device: torch.device) -> Ensemble:
    try:
        return Ensemble.load(path).for_inference(device)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from exc


def _steps(args: argparse.Namespace, ens: Ensemble) -> int:
    steps = args.steps or ens.schedule.T
    if not 1 <= steps <= ens.schedule.T:
        raise CLIError(f"--steps must be in 1..{ens.schedule.T} (the ensemble's T)")
    return steps


def _emit(args: argparse.Namespace, payload: dict[str, Any], human: str) -> None:
    print(json.dumps(payload) if args.json else human)


# --------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> None:
    device = _device(args.device)
    out = Path(args.out)
    ds = _load_data(args.data, args.subset, args.subset_seed)
    preset = PRESETS[args.preset]
    steps = args.steps if args.steps is not None else preset.train_steps
    if out.exists() and not args.resume:
        raise CLIError(f"{out} exists: pass --resume to continue training it, or another --out")
    if out.exists():
        ens = _load_ensemble(str(out), torch.device("cpu"))
        if ens.dataset.fingerprint != ds.fingerprint():
            raise CLIError(f"{out} was trained on other data ({ens.dataset.name}); "
                           "--resume needs the same --data/--subset")
        state = ens.train_state or {}
        cfg_d = state.get("config", {})
        cfg = TrainConfig(steps, cfg_d.get("batch_size", args.batch_size or preset.batch_size),
                          cfg_d.get("lr", args.lr or preset.lr), cfg_d.get("seed", args.seed),
                          args.checkpoint_every)
        _log(f"resuming {out} at step {state.get('step', 0)} of {steps}")
    else:
        n = args.n
        k = args.k if args.k is not None else default_k(n)
        labels = ds.labels if args.granularity == "class" else None
        if args.granularity == "class" and labels is None:
            raise CLIError("--granularity class needs labelled data")
        if args.granularity == "owner" and not args.owners:
            raise CLIError("--granularity owner needs --owners FILE.csv")
        try:
            book = make_codebook(ds.N, n, k, seed=args.seed, granularity=args.granularity,
                                 labels=labels, label_names=ds.label_names,
                                 owners=_owners(args.owners, ds.N))
        except (CapacityError, ValueError) as exc:
            raise CLIError(str(exc)) from exc
        info = DatasetInfo(ds.name, ds.fingerprint(), ds.N, ds.shape, args.data, args.subset,
                           args.subset_seed)
        ens = Ensemble.create(preset, book, info, seed=args.seed)
        cfg = TrainConfig(steps, args.batch_size or preset.batch_size, args.lr or preset.lr,
                          args.seed, args.checkpoint_every)
        _log(f"training {n} members (k={k}, {book.num_sources} {args.granularity} sources, "
             f"{num_parameters(ens.net):,} parameters each) on {ds.N} items of {ds.name} "
             f"{ds.shape}, preset {preset.name}, {steps} steps, device {device}")
    ens.net.to(device)
    bar = _progress_bar(steps, (ens.train_state or {}).get("step", 0), args.json)
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
    seconds = time.perf_counter() - t0
    _emit(args, {"checkpoint": str(out), "steps": steps, "seconds": round(seconds, 2),
                 "n": ens.n, "k": ens.k, "sources": ens.codebook.num_sources},
          f"saved {out} ({steps} steps, {seconds:.1f} s)")


def _progress_bar(total: int, initial: int, quiet: bool) -> Any:
    if quiet:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr)


# ------------------------------------------------------------------------ generate
def cmd_generate(args: argparse.Namespace) -> None:
    device = _device(args.device)
    ens = _load_ensemble(args.ckpt, device)
    seeds = _parse_seeds(args)
    steps = _steps(args, ens)
    t0 = time.perf_counter()
    x = sample(ens.net, ens.schedule, make_tape(seeds, ens.shape, steps))
    seconds = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    grid(x, ncol=min(8, len(seeds)), scale=args.scale).save(args.out)
    _emit(args, {"png": args.out, "seeds": seeds, "steps": steps, "seconds": round(seconds, 3)},
          f"wrote {args.out} ({len(seeds)} samples, {steps} steps, {seconds:.1f} s)")


# ----------------------------------------------------------------------- attribute
def cmd_attribute(args: argparse.Namespace) -> None:
    device = _device(args.device)
    ens = _load_ensemble(args.ckpt, device)
    seeds = _parse_seeds(args)
    steps = _steps(args, ens)
    spec = args.data or ens.dataset.spec
    ds = _load_data(spec, ens.dataset.subset, ens.dataset.subset_seed)
    if ds.fingerprint() != ens.dataset.fingerprint:
        raise CLIError(f"--data {spec!r} is not the data {args.ckpt} was trained on "
                       f"(fingerprint mismatch)")
    try:
        cfg = AttributionConfig(args.top_k, args.metric, max(args.rerank, args.top_k),
                                args.verify_top_k)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    lpips: LPIPSMetric | None = None
    if args.metric == "lpips" or args.lpips_random_trunk:
        try:
            lpips = load_lpips(random_trunk=args.lpips_random_trunk, device=device)
        except LPIPSUnavailable as exc:
            raise CLIError(str(exc)) from exc
    t0 = time.perf_counter()
    results = attribute(ens, make_tape(seeds, ens.shape, steps), cfg, lpips)
    seconds = time.perf_counter() - t0
    report = _report(ens, ds, results, cfg, steps, seconds, lpips)
    if args.out_json:
        Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_json).write_text(json.dumps(report, indent=2))
    if args.out_png:
        _figure(ens, ds, results, cfg, args.figure_top).save(args.out_png)
    summary = (f"attributed {len(seeds)} samples over {ens.codebook.num_sources} sources in "
               f"{seconds:.1f} s" + (f"; wrote {args.out_json}" if args.out_json else "")
               + (f", {args.out_png}" if args.out_png else ""))
    _emit(args, report, summary)


def _source_items(ens: Ensemble, ds: ImageDataset, s: int, limit: int = 10) -> dict[str, Any]:
    items = ens.codebook.source_items(s)
    return {"items": [int(i) for i in items[:limit]], "refs": [ds.refs[i] for i in items[:limit]],
            "num_items": len(items)}


def _report(ens: Ensemble, ds: ImageDataset, results: list[SampleAttribution],
            cfg: AttributionConfig, steps: int, seconds: float,
            lpips: LPIPSMetric | None) -> dict[str, Any]:
    keys = ens.codebook.source_keys
    samples = []
    for res in results:
        ranking = []
        for rank, e in enumerate(res.ranking, 1):
            entry: dict[str, Any] = {"rank": rank, "source": keys[e.source],
                                     "score": e.score(cfg.metric), "l2": e.l2}
            if e.lpips is not None:
                entry["lpips"] = e.lpips
            if e.exact_l2 is not None:
                entry["exact_score"] = e.exact_score(cfg.metric)
                entry["exact_l2"] = e.exact_l2
            entry.update(_source_items(ens, ds, e.source))
            ranking.append(entry)
        samples.append({"seed": res.seed, "ranking": ranking, "verification": res.agreement})
    return {
        "ensemble": {"n": ens.n, "k": ens.k, "T": ens.schedule.T, "preset": ens.preset,
                     "granularity": ens.codebook.granularity,
                     "sources": ens.codebook.num_sources, "dataset": ens.dataset.name},
        "method": "synthetic", "metric": cfg.metric, "top_k": cfg.top_k, "steps": steps,
        "verify_top_k": cfg.verify_top_k,
        "lpips_random_trunk": None if lpips is None else lpips.random_trunk,
        "seconds": round(seconds, 3), "samples": samples,
    }


def _figure(ens: Ensemble, ds: ImageDataset, results: list[SampleAttribution],
            cfg: AttributionConfig, top: int) -> Any:
    x_train = ds.to_tensor()
    samples = torch.stack([r.image.cpu().float() for r in results])
    attributed, captions = [], []
    for r in results:
        firsts = [int(ens.codebook.source_items(e.source)[0]) for e in r.ranking[:top]]
        attributed.append(x_train[firsts])
        captions.append([f"{e.score(cfg.metric):.3f}" for e in r.ranking[:top]])
    titles = [f"seed {r.seed}" for r in results]
    return attribution_figure(samples, attributed, captions, titles)


# ---------------------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> None:
    ens = _load_ensemble(args.ckpt, torch.device("cpu"))
    loads = ens.codebook.bits()[ens.codebook.item_source].sum(axis=0)
    info = {"checkpoint": args.ckpt, "preset": ens.preset, "n": ens.n, "k": ens.k,
            "T": ens.schedule.T, "granularity": ens.codebook.granularity,
            "sources": ens.codebook.num_sources, "dataset": ens.dataset.name,
            "items": ens.dataset.num_items, "shape": list(ens.shape),
            "parameters_per_member": num_parameters(ens.net),
            "trained_steps": (ens.train_state or {}).get("step"),
            "items_per_member": [int(v) for v in np.asarray(loads)]}
    _emit(args, info, json.dumps(info, indent=2))


# -------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="attrib",
        description="Attributable diffusion models (encoded ensembles): train an ensemble, "
                    "generate from it, and attribute each sample to its training data.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N, or auto (CUDA when present; default)")
        sp.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    def seeds(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--ckpt", default=DEFAULT_CKPT, help=f"checkpoint (default {DEFAULT_CKPT})")
        sp.add_argument("--seeds", help="seeds, e.g. '0,3,9' or '0-15' (overrides --count)")
        sp.add_argument("--count", type=int, default=16, help="number of samples (default 16)")
        sp.add_argument("--seed-start", type=int, default=0, help="first seed with --count")
        sp.add_argument("--steps", type=int, default=None,
                        help="sampling steps (default: the ensemble's T; fewer are respaced)")

    t = sub.add_parser("train", help="train an encoded ensemble",
                       description="Train n DDPM members at once, each on the items whose "
                                   "source code has its bit set. Saves a resumable checkpoint.")
    t.add_argument("--data", default="digits",
                   help="'digits' (sklearn, default), an .npz with images/labels, an MNIST IDX "
                        "images file, or a folder of PNG/JPEG images (subfolders = labels)")
    t.add_argument("--subset", type=int, default=None, help="train on a random subset of N items")
    t.add_argument("--subset-seed", type=int, default=0, help="seed of that subset")
    t.add_argument("--preset", choices=sorted(PRESETS), default="digits",
                   help="; ".join(f"{k}: {v.description}" for k, v in PRESETS.items()))
    t.add_argument("--n", type=int, default=16, help="ensemble size (default 16)")
    t.add_argument("--k", type=int, default=None, help="code weight (default n/2)")
    t.add_argument("--granularity", choices=GRANULARITIES, default="item",
                   help="what one code stands for: an item, a class (label) or an owner")
    t.add_argument("--owners", help="CSV of item_index,owner lines (for --granularity owner)")
    t.add_argument("--steps", type=int, default=None, help="training steps (default: preset's)")
    t.add_argument("--batch-size", type=int, default=None, help="items per member per step")
    t.add_argument("--lr", type=float, default=None, help="Adam learning rate")
    t.add_argument("--seed", type=int, default=0, help="seed for codes, init and minibatches")
    t.add_argument("--checkpoint-every", type=int, default=200, help="save every N steps")
    t.add_argument("--out", default=DEFAULT_CKPT, help=f"checkpoint path (default {DEFAULT_CKPT})")
    t.add_argument("--resume", action="store_true", help="continue training --out to --steps")
    common(t)
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="sample a PNG grid",
                       description="Sample from the full ensemble (w = 1/n); each seed fixes "
                                   "the whole noise tape, so output is reproducible.")
    seeds(g)
    g.add_argument("--out", default="runs/samples.png", help="PNG grid path")
    g.add_argument("--scale", type=int, default=4, help="pixel upscaling in the grid")
    common(g)
    g.set_defaults(func=cmd_generate)

    a = sub.add_parser("attribute", help="rank training sources for generated samples",
                       description="Synthetic ablation: one forward-mode Jacobian per sample "
                                   "ranks every source; optional LPIPS re-ranking and exact "
                                   "verification of the top-k.")
    seeds(a)
    a.add_argument("--data", default=None,
                   help="training data (default: the spec stored in the checkpoint)")
    a.add_argument("--top-k", type=int, default=10, help="sources reported per sample")
    a.add_argument("--metric", choices=METRICS, default="l2", help="distance (default l2)")
    a.add_argument("--rerank", type=int, default=50, help="candidates LPIPS re-ranks")
    a.add_argument("--verify-top-k", type=int, default=0,
                   help="exact counterfactuals for the top K (agreement in the report)")
    a.add_argument("--lpips-random-trunk", action="store_true",
                   help="TESTING ONLY: LPIPS with a random trunk (no ImageNet weights)")
    a.add_argument("--out-json", default=None, help="write the JSON report here")
    a.add_argument("--out-png", default=None, help="write a Figure-2-style PNG here")
    a.add_argument("--figure-top", type=int, default=3, help="training images per sample in PNG")
    common(a)
    a.set_defaults(func=cmd_attribute)

    i = sub.add_parser("info", help="describe a checkpoint")
    i.add_argument("--ckpt", default=DEFAULT_CKPT)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    from app.validate_cli import add_parser as add_validate_parser  # imports this module: not at top
    add_validate_parser(sub)

    from app.service_cli import add_parsers as add_service_parsers

    add_service_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from app.service_cli import ServiceError

    args = build_parser().parse_args(argv)
    tune_malloc()
    try:
        args.func(args)
    except (CLIError, DatasetError, ServiceError) as exc:
        print(f"attrib {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
