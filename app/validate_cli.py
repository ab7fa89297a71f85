"""`attrib validate classes|fidelity|copies`: acceptance evidence for the attributions.

Each command trains the ensemble it needs (or takes ``--checkpoint``), runs one experiment
of models.validate, and writes ``report.json`` plus PNG figures into ``--out DIR``, with a
progress bar per stage on stderr. Sizes (data, subset, ensemble, samples, sources) are
flags, so the same commands run on 8x8 digits on a CPU or MNIST on a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.cli.common import CLIError
from app.cli.common import device as _device
from app.cli.common import load_data as _load_data
from app.cli.common import load_ensemble as _load_ensemble
from app.cli.common import log as _log
from models import plots
from models import validate as V
from models.codes import CapacityError, CodeBook, default_k, make_codebook
from models.data import DatasetError, ImageDataset
from models.distances import LPIPSMetric, LPIPSUnavailable, load_lpips
from models.ensemble import PRESETS, DatasetInfo, Ensemble
from models.sampler import make_tape
from models.train import TrainConfig, train

CLASS_TARGETS = {"log10_p": -30.0, "frac_largest": 0.6, "frac_largest_confident": 0.8, "min_samples": 1000}
COPY_TARGET = 0.9


class _Progress:
    """One tqdm bar per stage on stderr (none with --json); each report also goes to
    ``forward`` when given (a service job's progress)."""

    def __init__(self, quiet: bool, forward: V.ProgressFn | None = None) -> None:
        self.quiet = quiet
        self.forward = forward
        self.bars: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.forward is not None:
            self.forward(stage, done, total)
        if self.quiet:
            return
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, file=sys.stderr, leave=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            del self.bars[stage]


# ------------------------------------------------------------------------ ensemble
def _ensemble(args: argparse.Namespace, granularity: str, device: torch.device,
              progress: _Progress) -> tuple[Ensemble, ImageDataset, dict[str, Any]]:
    """Load --checkpoint (checking its granularity and data), or train one into OUT/ensemble.pt."""
    if args.checkpoint:
        ens = _load_ensemble(args.checkpoint, device)
        if ens.codebook.granularity != granularity:
            raise CLIError(f"{args.checkpoint} has {ens.codebook.granularity} granularity; this "
                           f"validation needs an ensemble trained with --granularity {granularity}")
        spec = args.data if args.data_given else ens.dataset.spec
        if not spec:
            raise CLIError(f"{args.checkpoint} does not record the data it was trained on; give --data")
        try:
            data = _load_data(spec, ens.dataset.subset, ens.dataset.subset_seed)
        except DatasetError as exc:
            raise CLIError(f"cannot load the training data of {args.checkpoint} ({spec!r}): {exc}") from exc
        ds = _without_classes(data, args)
        if ds.fingerprint() != ens.dataset.fingerprint:
            hint = " (and the same --exclude-classes)" if granularity == "class" else ""
            raise CLIError(f"data {spec!r}{hint} is not the data {args.checkpoint} was trained on")
        st = ens.train_state or {}
        return ens, ds, {"checkpoint": args.checkpoint, "trained_steps": st.get("step")}
    ds = _without_classes(_load_data(args.data, args.subset, args.subset_seed), args)
    preset = PRESETS[args.preset]
    k = args.k if args.k is not None else default_k(args.n)
    if granularity == "class" and ds.labels is None:
        raise CLIError(f"--data {args.data!r} has no labels; the class control needs them")
    try:
        book = make_codebook(ds.N, args.n, k, seed=args.seed, granularity=granularity,
                             labels=ds.labels if granularity == "class" else None,
                             label_names=ds.label_names)
        if getattr(args, "codes", "random") == "balanced":
            if k != args.n // 2:
                raise ValueError("--codes balanced needs k = n/2")
            book = dataclasses.replace(book, codes=V.balanced_codes(book.num_sources, args.n))
    except (CapacityError, ValueError) as exc:
        raise CLIError(str(exc)) from exc
    info = DatasetInfo(ds.name, ds.fingerprint(), ds.N, ds.shape, args.data, args.subset, args.subset_seed)
    ens = Ensemble.create(preset, book, info, seed=args.seed)
    steps = args.train_steps if args.train_steps is not None else preset.train_steps
    cfg = TrainConfig(steps, args.batch_size or preset.batch_size, args.lr or preset.lr, args.seed,
                      checkpoint_every=max(steps, 1))
    _log(f"training {args.n} members (k={k}, {book.num_sources} {granularity} sources, "
         f"{getattr(args, 'codes', 'random')} codes) on {ds.N} "
         f"items of {ds.name}, preset {preset.name}, {steps} steps, device {device}")
    ens.net.to(device)
    out = Path(args.out) / "ensemble.pt"
    t0 = time.perf_counter()
    train(ens, ds.to_tensor(), cfg, checkpoint=out,
          progress=lambda step, losses: progress("train", step, steps))
    return ens.for_inference(device), ds, {"checkpoint": str(out), "trained_steps": steps,
                                           "train_seconds": round(time.perf_counter() - t0, 1)}


def _without_classes(ds: ImageDataset, args: argparse.Namespace) -> ImageDataset:
    """The data without the classes named by --exclude-classes (the paper's Figure 1b leaves
    out 5, 7 and 9); as given when there is no such flag or it is empty."""
    wanted = [c.strip() for c in (getattr(args, "exclude_classes", None) or "").split(",") if c.strip()]
    if not wanted:
        return ds
    if ds.labels is None:
        raise CLIError(f"--exclude-classes: data {ds.name!r} has no labels")
    names = ds.label_names or tuple(str(i) for i in range(int(ds.labels.max()) + 1))
    unknown = [c for c in wanted if c not in names]
    if unknown:
        raise CLIError(f"--exclude-classes: no class {', '.join(unknown)} in {ds.name!r} "
                       f"(its classes: {', '.join(names)})")
    keep = ~np.isin(ds.labels, [names.index(c) for c in wanted])
    if not keep.any():
        raise CLIError("--exclude-classes leaves no item")
    return ds.subset(keep)


def _ensemble_info(ens: Ensemble, ds: ImageDataset, extra: dict[str, Any]) -> dict[str, Any]:
    info = {"n": ens.n, "k": ens.k, "T": ens.schedule.T, "preset": ens.preset,
            "granularity": ens.codebook.granularity, "sources": ens.codebook.num_sources,
            "dataset": ds.name, "items": ds.N, "shape": list(ds.shape), **extra}
    if ens.codebook.num_sources <= 64:  # class/owner sources: how many members pairs of codes share
        bits = ens.codebook.bits().astype(np.int64)
        ov = (bits @ bits.T)[~np.eye(len(bits), dtype=bool)]
        info["code_overlap"] = {"min": int(ov.min()), "max": int(ov.max()), "mean": float(ov.mean())}
    return info


def _tape(args: argparse.Namespace, ens: Ensemble) -> Any:
    steps = args.steps or ens.schedule.T
    if not 1 <= steps <= ens.schedule.T:
        raise CLIError(f"--steps must be in 1..{ens.schedule.T} (the ensemble's T)")
    if args.samples < 1:
        raise CLIError("--samples must be >= 1")
    return make_tape(range(args.seed_start, args.seed_start + args.samples), ens.shape, steps), steps


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _finish(args: argparse.Namespace, report: dict[str, Any], summary: str) -> dict[str, Any]:
    out = Path(args.out)
    report = _clean(report)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    if not getattr(args, "silent", False):
        print(json.dumps(report) if args.json else f"{summary}\nwrote {out / 'report.json'}")
    return report


def _start(args: argparse.Namespace) -> tuple[torch.device, _Progress, float]:
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return _device(args.device), _Progress(args.json, getattr(args, "forward", None)), time.perf_counter()


# ------------------------------------------------------------------------ classes
def cmd_classes(args: argparse.Namespace) -> dict[str, Any]:
    device, progress, t0 = _start(args)
    ens, ds, ens_extra = _ensemble(args, "class", device, progress)
    tape, steps = _tape(args, ens)
    lpips, lpips_note = _lpips(args, device)
    t1 = time.perf_counter()
    clf = V.train_classifier(ds.to_tensor(), ens.codebook.item_source, kind=args.classifier, seed=args.seed)
    _log(f"classifier {clf.kind}: held-out accuracy {clf.accuracy:.3f} ({clf.n_test} items)")
    res = V.class_ablation(ens, tape, clf, lpips=lpips, keep=args.grid_rows, chunk=args.chunk,
                           progress=progress)
    seconds = time.perf_counter() - t1
    pred, conf = res.predicted, res.confidence
    dists = {"l2": res.l2} | ({"lpips": res.lpips} if res.lpips is not None else {})
    stats = {name: V.class_ablation_stats(d, pred, conf, args.min_confidence) for name, d in dists.items()}
    targets: dict[str, Any] = {}
    for name in ("l2", "lpips"):
        st = stats.get(name)
        targets[f"p_{name}"] = (
            {"value": st["mann_whitney"]["p_value"], "log10": st["mann_whitney"]["log10_p"],
             "target": "< 1e-30", "met": st["mann_whitney"]["log10_p"] < CLASS_TARGETS["log10_p"]}
            if st else {"value": None, "target": "< 1e-30", "met": None, "note": lpips_note})
    for name in ("l2", "lpips"):
        st = stats.get(name)
        if st is None:
            continue
        targets[f"frac_largest_{name}"] = {"value": st["frac_largest"], "target": ">= 0.6",
                                           "met": st["frac_largest"] >= CLASS_TARGETS["frac_largest"]}
        targets[f"frac_largest_confident_{name}"] = {
            "value": st["frac_largest_confident"], "target": ">= 0.8",
            "met": bool(st["frac_largest_confident"] >= CLASS_TARGETS["frac_largest_confident"])}
    targets["samples"] = {"value": len(pred), "target": ">= 1000",
                          "met": len(pred) >= CLASS_TARGETS["min_samples"]}
    keys = ens.codebook.source_keys
    report = {
        "experiment": "class-ablation control (paper Figure 1c)",
        "ensemble": _ensemble_info(ens, ds, ens_extra), "steps": steps,
        "samples": len(pred), "seeds": [args.seed_start, args.seed_start + args.samples - 1],
        "classes": list(keys),
        "excluded_classes": args.exclude_classes,
        "classifier": {"kind": clf.kind, "held_out_accuracy": clf.accuracy, "n_train": clf.n_train,
                       "n_test": clf.n_test},
        "lpips": lpips_note,
        "min_confidence": args.min_confidence,
        "predicted_class_counts": np.bincount(pred, minlength=len(keys)).tolist(),
        "median_confidence": float(np.median(conf)),
        "counterfactual_changes_class": float((res.cf_pred != pred).mean()),
        "stats": stats, "targets": targets,
        "passed": all(t["met"] for t in targets.values() if t["met"] is not None),
        "seconds": round(seconds, 1), "total_seconds": round(time.perf_counter() - t0, 1),
        "figures": ["classes.png", "classes_grid.png"],
    }
    if args.raw:
        report["raw"] = {"predicted": pred.tolist(), "confidence": conf.tolist(),
                         **{name: d.tolist() for name, d in dists.items()}}
    _classes_figures(args, res, dists, stats, keys)
    l2 = stats["l2"]
    return _finish(args, report,
            f"{len(pred)} samples, classifier accuracy {clf.accuracy:.3f}: predicted class largest (L2) "
            f"in {l2['frac_largest']:.3f} (confident: {l2['frac_largest_confident']:.3f} of "
            f"{l2['n_confident']}), Mann-Whitney log10 p = {l2['mann_whitney']['log10_p']:.1f}"
            + (f"; LPIPS: largest {stats['lpips']['frac_largest']:.3f}, log10 p = "
               f"{stats['lpips']['mann_whitney']['log10_p']:.1f}" if "lpips" in stats else
               "; LPIPS unavailable") + f" ({seconds:.0f} s)")


def _lpips(args: argparse.Namespace, device: torch.device) -> tuple[LPIPSMetric | None, dict[str, Any]]:
    if args.no_lpips:
        return None, {"available": False, "reason": "--no-lpips"}
    try:
        m = load_lpips(random_trunk=args.lpips_random_trunk, device=device)
    except LPIPSUnavailable as exc:
        _log("LPIPS unavailable (Euclidean only): " + str(exc).splitlines()[0])
        return None, {"available": False, "reason": str(exc)}
    return m, {"available": True, "random_trunk": m.random_trunk,
               "backbone": None if m.backbone_path is None else str(m.backbone_path),
               "note": "TESTING ONLY: random trunk" if m.random_trunk else "ImageNet AlexNet trunk"}


def _classes_figures(args: argparse.Namespace, res: V.ClassAblation, dists: dict[str, np.ndarray],
                     stats: dict[str, Any], keys: tuple[str, ...]) -> None:
    pred, conf = res.predicted, res.confidence
    panels = []
    for name, d in dists.items():
        mask = np.ones_like(d, bool)
        mask[np.arange(len(pred)), pred] = False
        st = stats[name]
        title = (f"{name}: predicted class largest {st['frac_largest']:.2f}, "
                 f"log10 p = {st['mann_whitney']['log10_p']:.1f}")
        panels.append(plots.histogram({"predicted class ablated": d[np.arange(len(pred)), pred],
                                       "other class ablated": d[mask]}, title,
                                      f"{name} distance to the sample"))
    plots.stack(panels, horizontal=True).save(Path(args.out) / "classes.png")
    b = res.kept.shape[0]
    rows = [torch.cat([res.images[i : i + 1], res.kept[i]]) for i in range(b)]
    header = ["sample"] + [f"-{k.split(':', 1)[-1]}" for k in keys]
    labels = [f"{keys[pred[i]].split(':', 1)[-1]} p={conf[i]:.2f}" for i in range(b)]
    marks = [[False] + [j == pred[i] for j in range(len(keys))] for i in range(b)]
    plots.image_table(rows, header, labels, marks=marks).save(Path(args.out) / "classes_grid.png")


# ------------------------------------------------------------------------ fidelity
def cmd_fidelity(args: argparse.Namespace) -> dict[str, Any]:
    subset = None if args.sources == "all" else _positive_int(args.sources, "--sources")
    device, progress, t0 = _start(args)
    ens, ds, ens_extra = _ensemble(args, args.granularity, device, progress)
    tape, steps = _tape(args, ens)
    t1 = time.perf_counter()
    score_fn = None
    if args.broken:
        g = torch.Generator().manual_seed(args.seed)
        score_fn = lambda s: torch.rand(s.shape, generator=g, dtype=s.dtype)  # noqa: E731
    res = V.fidelity(ens, tape, ds.to_tensor(), subset=subset, top=args.top, seed=args.seed,
                     chunk=args.chunk, progress=progress, score_fn=score_fn)
    seconds = time.perf_counter() - t1
    # screen-then-verify depths (deeper than k; the synthetic top `top` are always candidates)
    depths = sorted({d for d in (2 * args.recall_k, args.top)
                     if d > args.recall_k and (res.all_sources or d <= args.top)})
    st = V.fidelity_stats(res, args.recall_k, verify_depths=depths)
    report = {
        "experiment": "fidelity of synthetic ablation (synthetic vs exact influence)",
        "ensemble": _ensemble_info(ens, ds, ens_extra), "steps": steps, "samples": len(res.seeds),
        "candidates": "all sources" if res.all_sources else
        f"random {subset} + synthetic top {args.top} + pixel top {args.top} per sample",
        "broken_scores": bool(args.broken), **st,
        "seconds": round(seconds, 1), "total_seconds": round(time.perf_counter() - t0, 1),
        "figures": ["fidelity.png", "fidelity_images.png"],
    }
    _fidelity_figures(args, res, st, ds, ens.codebook)
    s, p = st["summary"]["synthetic"], st["summary"]["pixel"]
    return _finish(args, report,
            f"{len(res.seeds)} samples: synthetic median Spearman {s['median_spearman']:.3f}, "
            f"recall@{args.recall_k} {s['median_recall_at_k']:.2f}, top-1 in exact top-{args.recall_k} "
            f"{s['frac_top1_in_exact_topk']:.2f}; pixel baseline {p['median_spearman']:.3f} / "
            f"{p['median_recall_at_k']:.2f}; median relative image error "
            f"{st['summary']['median_rel_err']:.3f}; " + "".join(
                f"synthetic top {m} verified exactly: recall@{args.recall_k} "
                f"{v['median_recall_at_k']:.2f}; " for m, v in st["summary"]["verified"].items()) +
            f"targets {'met' if st['passed'] else 'NOT met'} "
            f"({seconds:.0f} s)")


def _positive_int(v: str, flag: str) -> int:
    try:
        i = int(v)
    except ValueError:
        raise CLIError(f"{flag}: expected 'all' or a positive integer, got {v!r}") from None
    if i < 1:
        raise CLIError(f"{flag} must be >= 1")
    return i


def _fidelity_figures(args: argparse.Namespace, res: V.Fidelity, st: dict[str, Any],
                      ds: ImageDataset, book: CodeBook) -> None:
    """Synthetic-vs-exact and pixel-vs-exact scatter per sample (exact top-k in red), and each
    sample beside the exact and predicted counterfactual of its exact top-1 source."""
    panels = []
    for b in range(min(8, len(res.seeds))):
        ps = st["per_sample"][b]
        top = np.zeros(len(res.exact[b]), bool)
        top[np.argsort(-res.exact[b], kind="stable")[: st["k"]]] = True
        panels.append(plots.scatter(res.synthetic[b], res.exact[b],
                                    f"seed {res.seeds[b]} rho={ps['synthetic']['spearman']:.3f}",
                                    "synthetic", "exact", highlight=top))
        panels.append(plots.scatter(res.pixel[b], res.exact[b],
                                    f"pixel rho={ps['pixel']['spearman']:.3f}", "-pixel dist",
                                    "exact", highlight=top))
    rows = [plots.stack(panels[i : i + 4], horizontal=True) for i in range(0, len(panels), 4)]
    plots.stack(rows).save(Path(args.out) / "fidelity.png")
    ex = res.examples
    if ex:
        x_train = ds.to_tensor()
        items = [x_train[int(book.source_items(int(s))[0])] for s in ex["source"]]
        table = [torch.stack([ex["sample"][i], ex["exact"][i], ex["predicted"][i], items[i]])
                 for i in range(len(items))]
        plots.image_table(table, ["sample", "exact cf", "synth cf", "source"],
                          [f"seed {res.seeds[i]}" for i in range(len(items))]).save(
            Path(args.out) / "fidelity_images.png")


# ------------------------------------------------------------------------ copies
def cmd_copies(args: argparse.Namespace) -> dict[str, Any]:
    device, progress, t0 = _start(args)
    ens, ds, ens_extra = _ensemble(args, "item", device, progress)
    tape, steps = _tape(args, ens)
    t1 = time.perf_counter()
    x_train = ds.to_tensor()
    res = V.copy_detection(ens, tape, x_train, top=args.top, progress=progress)
    if args.exact != "none":
        rows = np.arange(len(res.seeds)) if args.exact == "all" else np.flatnonzero(
            V.near_copies(res, args.copy_ratio))
        res = V.exact_copy_check(ens, tape, res, rows, chunk=args.chunk, progress=progress)
    seconds = time.perf_counter() - t1
    st = V.copy_stats(res, args.copy_ratio)
    rate = st["top1_rate_copies"]
    targets = {"top1_rate_copies": {"value": rate, "target": f">= {COPY_TARGET}",
                                    "met": bool(rate >= COPY_TARGET) if st["n_copies"] else None}}
    report = {
        "experiment": "copy detection (paper Figure 2a)",
        "ensemble": _ensemble_info(ens, ds, ens_extra), "steps": steps, "samples": len(res.seeds),
        **{k: v for k, v in st.items() if k not in ("is_copy", "hit")},
        "targets": targets, "passed": targets["top1_rate_copies"]["met"] is True,
        "per_sample": [{"seed": res.seeds[i], "nn_item": int(res.nn_item[i]),
                        "nn_ref": ds.refs[int(res.nn_item[i])], "nn_dist": float(res.nn_dist[i]),
                        "is_copy": st["is_copy"][i],
                        "top_sources": [ens.codebook.source_keys[s] for s in res.top_sources[i]],
                        "top1_is_nearest": st["hit"][i]} for i in range(len(res.seeds))],
        "seconds": round(seconds, 1), "total_seconds": round(time.perf_counter() - t0, 1),
        "figures": ["copies.png"],
    }
    if "exact" in st:
        ex = st["exact"]
        for e in ex.pop("per_sample"):
            e["exact_top1"] = ens.codebook.source_keys[e["exact_top1"]]
            report["per_sample"][e.pop("sample")]["exact"] = e
        report["exact"] = ex
    _copies_figure(args, res, st, ens, x_train)
    exact_line = ""
    if "exact" in st and st["exact"]["copies"]["n"]:
        ec = st["exact"]["copies"]
        verified = ec[f"verified_top{args.top}_top1_rate"]
        exact_line = (f"; exact ablation of all {st['exact']['sources']} sources: its top source is the "
                      f"copied image in {ec['exact_top1_rate']:.3f} of the near-copies (median rank "
                      f"{ec['median_nn_exact_rank']:.0f}; synthetic {ec['median_nn_synthetic_rank']:.0f}), "
                      f"synthetic top {args.top} verified exactly: {verified:.3f}")
    return _finish(args, report,
            f"{len(res.seeds)} samples, {st['n_copies']} near-copies (nearest training image within "
            f"{st['threshold']:.3f}): top-1 attribution is the copied image in {rate:.3f} of them "
            f"({st['top1_rate_all']:.3f} of all samples){exact_line} ({seconds:.0f} s)")


def _copies_figure(args: argparse.Namespace, res: V.CopyDetection, st: dict[str, Any], ens: Ensemble,
                   x_train: torch.Tensor) -> None:
    book = ens.codebook
    order = sorted(range(len(res.seeds)), key=lambda i: (not st["is_copy"][i], res.nn_dist[i]))[: args.grid]
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
    tables = [plots.image_table(rows[j : j + 16], header, labels[j : j + 16], marks=marks[j : j + 16])
              for j in range(0, len(rows), 16)]
    plots.stack(tables, horizontal=True).save(Path(args.out) / "copies.png")


# ------------------------------------------------------------------------ parser
def add_parser(sub: Any) -> None:
    """Register `validate` with its sub-commands on the `attrib` sub-parser set ``sub``."""
    v = sub.add_parser("validate", help="acceptance experiments: class control, fidelity, copies",
                       description="Validation experiments. Each writes report.json and PNG "
                                   "figures into --out DIR. The service runs the same as jobs: "
                                   "POST /validations.")
    vs = v.add_subparsers(dest="experiment", required=True)

    def common(sp: argparse.ArgumentParser, *, data: str = "digits", subset: int | None = None,
               samples: int = 16) -> None:
        sp.add_argument("--out", required=True, help="folder for report.json and the figures")
        sp.add_argument("--checkpoint", default=None,
                        help="use this trained ensemble instead of training one (its data is "
                             "reloaded from the spec stored in it)")
        sp.add_argument("--data", default=None, help=f"training data (default {data!r}): digits, "
                        ".npz, MNIST IDX, or an image folder")
        sp.add_argument("--subset", type=int, default=subset,
                        help=f"train on a random subset of N items (default {subset})")
        sp.add_argument("--subset-seed", type=int, default=0, help="seed of that subset")
        sp.add_argument("--preset", choices=sorted(PRESETS), default="digits", help="network preset")
        sp.add_argument("--n", type=int, default=16, help="ensemble size (default 16)")
        sp.add_argument("--k", type=int, default=None, help="code weight (default n/2)")
        sp.add_argument("--train-steps", type=int, default=None, help="training steps (default: preset's)")
        sp.add_argument("--batch-size", type=int, default=None, help="items per member per step")
        sp.add_argument("--lr", type=float, default=None, help="Adam learning rate")
        sp.add_argument("--seed", type=int, default=0, help="seed for codes, training, subsets")
        sp.add_argument("--samples", type=int, default=samples, help=f"generated samples (default {samples})")
        sp.add_argument("--seed-start", type=int, default=0, help="first sample seed")
        sp.add_argument("--steps", type=int, default=None, help="sampling steps (default: T)")
        sp.add_argument("--chunk", type=int, default=256, help="counterfactual trajectories per pass")
        sp.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (default)")
        sp.add_argument("--json", action="store_true", help="print the report as one JSON object")
        sp.set_defaults(default_data=data)

    c = vs.add_parser("classes", help="class-ablation control (paper Figure 1c)",
                      description="Sources are whole classes. Classify each sample and ablate "
                                  "every class exactly: the predicted class should move it most.")
    common(c, samples=1000)
    c.add_argument("--codes", choices=("balanced", "random"), default="balanced",
                   help="class codes when training: 'balanced' (Hadamard rows, every pair of classes "
                        "shares exactly n/4 members; default; n a power of two) or 'random' "
                        "(make_codebook's)")
    c.add_argument("--exclude-classes", default=None, metavar="A,B,...",
                   help="leave these classes out of the data (the paper's Figure 1b: 5,7,9)")
    c.add_argument("--classifier", choices=V.CLASSIFIERS, default="svc",
                   help="svc (default), logreg, mlp (scikit-learn) or cnn (a small PyTorch CNN)")
    c.add_argument("--min-confidence", type=float, default=0.9, help="'confident' classification")
    c.add_argument("--no-lpips", action="store_true", help="Euclidean distance only")
    c.add_argument("--lpips-random-trunk", action="store_true",
                   help="TESTING ONLY: LPIPS with a random trunk (no ImageNet weights)")
    c.add_argument("--grid-rows", type=int, default=8, help="samples in the counterfactual grid")
    c.add_argument("--raw", action="store_true", help="include every distance in the report")
    c.set_defaults(func=_run(cmd_classes))

    f = vs.add_parser("fidelity", help="synthetic vs exact influence, and a pixel baseline",
                      description="Exact counterfactuals of every source (or a random subset "
                                  "plus the synthetic and pixel top candidates) against "
                                  "synthetic ablation.")
    common(f)
    f.add_argument("--granularity", choices=("item", "owner", "class"), default="item",
                   help=argparse.SUPPRESS)
    f.add_argument("--sources", default="300",
                   help="N (default 300): a random N sources per sample plus the synthetic and pixel "
                        "top --top (every source when there are at most N), or 'all'")
    f.add_argument("--top", type=int, default=50,
                   help="top candidates added with --sources N; also the deepest screen-then-verify "
                        "depth reported (recall@k of the synthetic top m re-ranked exactly, "
                        "m = 2k and --top)")
    f.add_argument("--recall-k", type=int, default=10, help="k of recall@k (default 10)")
    f.add_argument("--broken", action="store_true",
                   help="CONTROL: replace synthetic scores by random ones (must fail the targets)")
    f.set_defaults(func=_run(cmd_fidelity))

    p = vs.add_parser("copies", help="copy detection on a small training set (paper Figure 2a)",
                      description="Samples that nearly copy a training image should be attributed "
                                  "to that image first.")
    common(p, subset=300, samples=64)
    p.add_argument("--copy-ratio", type=float, default=0.5,
                   help="near-copy: nearest training image within this times the training set's "
                        "median nearest-neighbour distance (default 0.5)")
    p.add_argument("--top", type=int, default=5, help="synthetic top-K kept per sample")
    p.add_argument("--grid", type=int, default=48, help="samples shown in the figure")
    p.add_argument("--exact", choices=("none", "copies", "all"), default="none",
                   help="also ablate every source exactly for the near-copies (or all samples): "
                        "whether the exact top source is the copied image, i.e. whether a miss is "
                        "the estimate's or the model's (samples x sources diffusion runs)")
    p.set_defaults(func=_run(cmd_copies))


def _run(fn: Any) -> Any:
    """Resolve the --data default (remembering whether it was given) before ``fn``."""

    def wrapped(args: argparse.Namespace) -> dict[str, Any]:
        args.data_given = args.data is not None
        if args.data is None:
            args.data = args.default_data
        return fn(args)  # type: ignore[no-any-return]

    return wrapped


# ------------------------------------------------------------------------ in-process
STAGES = {"classes": ("sample", "exact"), "fidelity": ("jacobian", "exact"), "copies": ("jacobian", "exact")}
"""The progress stages each experiment may report after training ("train", when it trains)."""


def progress_stages(experiment: str, options: list[str]) -> tuple[str, ...]:
    """The stages ``run(experiment, options, ...)`` reports, in order."""
    args = _parse(experiment, options, Path("."), "cpu")
    stages = (() if args.checkpoint else ("train",)) + STAGES[experiment]
    if experiment == "copies" and args.exact == "none":
        stages = stages[:-1]
    return stages


def _parse(experiment: str, options: list[str], out: Path, device: str) -> argparse.Namespace:
    if experiment not in STAGES:
        raise CLIError(f"unknown experiment {experiment!r} (one of {', '.join(STAGES)})")
    try:
        argv = ["validate", experiment, "--out", str(out), "--device", device, "--json", *options]
        from app.cli.main import build_parser  # the parser registers this module's commands

        return build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse's way of refusing
        raise CLIError(f"invalid options {options!r} for validate {experiment}") from exc


def run(experiment: str, options: list[str], out: Path, device: str = "auto",
        progress: V.ProgressFn | None = None) -> dict[str, Any]:
    """``attrib validate EXPERIMENT --out OUT --device DEVICE OPTIONS...`` in this process,
    printing nothing: the service's validation jobs run exactly what the CLI runs. Returns the
    report (as written to OUT/report.json; its ``figures`` are files in OUT). Bad options or data
    raise CLIError (or DatasetError) with the CLI's message; ``progress(stage, done, total)``
    as in models.validate, "train" first when it trains."""
    args = _parse(experiment, options, out, device)
    args.silent, args.forward = True, progress
    report: dict[str, Any] = args.func(args)
    return report
