"""Fidelity of synthetic ablation: synthetic influence ||J dw(c)|| against the exact
counterfactual distance, per sample over many sources (Spearman, Pearson, recall@k, whether the
synthetic top-1 is in the exact top-k, relative error of the predicted image), and the same
ranking figures for a pixel-similarity baseline. The same for resemblance (d(cf, X_s) - d(f, X_s),
``models.resemblance``): its synthetic values against the exact ones, and screen-then-verify
recall of both scores at the service's depth.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import PositiveInt
from torch import Tensor

from experiments.common import (
    Comparison,
    ExperimentError,
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
from experiments.configs import FidelityConfig
from experiments.figures import image_table, scatter, stack
from experiments.statistics import ranking_agreement, top_indices, verified_recall
from models.ablation import delta_w, gram
from models.codes import CodeBook
from models.data import ImageDataset
from models.distances import l2_distance
from models.ensemble import Ensemble
from models.resemblance import image_terms, resemblance
from models.sampler import NoiseTape

MEDIAN_SPEARMAN = Target(">=", 0.95)
"""Median over samples of the synthetic scores' Spearman correlation with the exact influence."""
MEDIAN_RECALL = Target(">=", 0.8)
"""Median over samples of the synthetic scores' recall@k of the exact top k."""
RESEMBLANCE_SPEARMAN = Target(">=", 0.95)
"""Median over samples of synthetic resemblance's Spearman correlation with the exact resemblance."""
VERIFIED_RECALL = Target(">=", 0.95)
"""Median recall@k of the exact top k by screen-then-verify at depth ``VERIFY_DEPTH``, for both scores."""
VERIFY_DEPTH = 50
BEATS_PIXEL = Comparison("synthetic", ">", "pixel")
"""Synthetic ablation strictly better than the pixel-similarity baseline (on each median)."""


@dataclass
class Fidelity:
    """Raw results of the fidelity experiment, per sample over its candidate sources.

    For sample b, ``candidates[b]`` (M_b,) are the source indices evaluated, and the arrays
    beside it are aligned with them:

    Attributes:
        synthetic: synthetic influence ||J dw(c)|| (Euclidean, predicted).
        exact: ||exact counterfactual - sample||.
        pixel: pixel-similarity baseline score, -min over the source's items of
            ||training image - sample|| (higher = more "influential").
        rel_err: ||clip(f + J dw(c)) - exact counterfactual|| / ||exact counterfactual - f||.
        all_sources: True when every source was evaluated.
        synthetic_resemblance, exact_resemblance: d(cf, X_s) - d(f, X_s), predicted and exact.
    """

    seeds: list[int]
    images: Tensor
    candidates: list[np.ndarray]
    synthetic: list[np.ndarray]
    exact: list[np.ndarray]
    pixel: list[np.ndarray]
    rel_err: list[np.ndarray]
    all_sources: bool
    examples: dict[str, Tensor] = field(default_factory=dict)
    synthetic_resemblance: list[np.ndarray] = field(default_factory=list)
    exact_resemblance: list[np.ndarray] = field(default_factory=list)


def pixel_scores(images: Tensor, x_train: Tensor, item_source: np.ndarray, num_sources: int) -> Tensor:
    """Pixel-similarity baseline: -min_{items of s} ||x_item - sample||, (B, S) float64.

    images: (B, C, H, W); x_train: (N, C, H, W); item_source: (N,).
    """
    d = torch.cdist(images.flatten(1).double(), x_train.flatten(1).double().to(images.device))  # (B, N)
    idx = torch.from_numpy(np.asarray(item_source, np.int64)).to(d.device).expand_as(d)
    best = torch.full((d.shape[0], num_sources), float("inf"), dtype=d.dtype, device=d.device)
    best = best.scatter_reduce(1, idx, d, reduce="amin")
    return -best.cpu()


def fidelity(ens: Ensemble, tape: NoiseTape, x_train: Tensor, *, subset: int | None = None,
             top: PositiveInt = 50, seed: int = 0, chunk: int = 1024, jacobian_batch: int = 8,
             progress: ProgressFn = ignore_progress,
             score_fn: Callable[[Tensor], Tensor] | None = None) -> Fidelity:
    """Synthetic against exact influence for each sample of ``tape``.

    Candidates: every source when ``subset`` is None or >= S; otherwise, per sample, a
    random ``subset`` of sources (torch.Generator(seed)) plus the synthetic top ``top`` and
    the pixel baseline's top ``top`` (so neither method is favoured by the candidate set).

    ``score_fn`` replaces the synthetic scores, influence and resemblance, (B, S) -> (B, S) (e.g.
    random scores, to show that a broken attribution fails the thresholds); the predicted images
    stay f + J dw.
    """
    book = ens.codebook
    S = book.num_sources
    f, J, syn = synthetic_scores(ens, tape, batch=jacobian_batch, progress=progress)
    if score_fn is not None:
        syn = score_fn(syn)
    pix = pixel_scores(f, x_train, book.item_source, S)
    B = f.shape[0]
    dW64 = delta_w(torch.from_numpy(book.bits()), book.k)
    syn_res = torch.stack([resemblance(image_terms(f[b], J[b], x_train), gram(J[b : b + 1])[0], dW64,
                                       book.item_source) for b in range(B)])
    if score_fn is not None:
        syn_res = score_fn(syn_res)
    g = torch.Generator().manual_seed(seed)
    all_sources = subset is None or subset >= S
    cands: list[np.ndarray] = []
    for b in range(B):
        if all_sources:
            c = torch.arange(S)
        else:
            assert subset is not None
            c = torch.cat([torch.randperm(S, generator=g)[:subset],
                           torch.topk(syn[b], min(top, S)).indices, torch.topk(pix[b], min(top, S)).indices,
                           torch.topk(syn_res[b], min(top, S)).indices])
            c = torch.unique(c)
        cands.append(c.numpy())
    sample_index = torch.cat([torch.full((len(c),), b, dtype=torch.long) for b, c in enumerate(cands)])
    sources = torch.from_numpy(np.concatenate(cands)).long()
    dW = delta_w(torch.from_numpy(book.bits()), book.k, torch.float32)
    exact = np.zeros(len(sources))
    exact_res = np.zeros(len(sources))
    rel = np.zeros(len(sources))
    x_flat = x_train.flatten(1).double()
    item_source = torch.from_numpy(np.asarray(book.item_source, np.int64))
    best: dict[int, tuple[float, int, Tensor, Tensor]] = {}

    def consume(sl: slice, x: Tensor) -> None:
        bi, si = sample_index[sl], sources[sl]
        ref = f[bi]
        d = l2_distance(x, ref)
        pred = (ref + torch.einsum("rdn,rn->rd", J[bi], dW[si]).reshape(ref.shape)).clamp(-1, 1)
        exact[sl] = d.double().numpy()
        rel[sl] = (l2_distance(pred, x) / d.clamp_min(1e-12)).double().numpy()
        for j in range(len(bi)):  # d(cf, X_s) - d(f, X_s), X_s the source's own images
            own = x_flat[item_source == int(si[j])]
            exact_res[sl.start + j] = float((own - x[j].double().flatten()).norm(dim=1).min()
                                            - (own - ref[j].double().flatten()).norm(dim=1).min())
        for j in range(len(bi)):  # the exact top-1 counterfactual of the first samples, for the figure
            b = int(bi[j])
            if b < 8 and (b not in best or float(d[j]) > best[b][0]):
                best[b] = (float(d[j]), int(si[j]), x[j].clone(), pred[j].clone())

    exact_ablations(ens, tape, sample_index, sources, chunk=chunk, progress=progress, consume=consume)
    bounds = np.cumsum([0] + [len(c) for c in cands])
    split = [slice(bounds[b], bounds[b + 1]) for b in range(B)]
    examples: dict[str, Tensor] = {}
    if best:
        order = sorted(best)
        examples = {"sample": f[order], "source": torch.tensor([best[b][1] for b in order]),
                    "exact": torch.stack([best[b][2] for b in order]),
                    "predicted": torch.stack([best[b][3] for b in order])}
    per = [torch.from_numpy(c) for c in cands]
    return Fidelity(list(tape.seeds), f, cands, [syn[b, c].numpy() for b, c in enumerate(per)],
                    [exact[s] for s in split], [pix[b, c].numpy() for b, c in enumerate(per)],
                    [rel[s] for s in split], all_sources, examples,
                    [syn_res[b, c].numpy() for b, c in enumerate(per)], [exact_res[s] for s in split])


def fidelity_stats(res: Fidelity, k: int = 10, verify_depths: Sequence[int] = (20, 50)) -> dict[str, Any]:
    """Per-sample agreement of synthetic and pixel-baseline scores with the exact ranking, and
    their medians (``summary``, which ``targets`` judges).

    Besides (not instead of) the targets: ``verified`` gives, per depth m of
    ``verify_depths``, the recall@k of the synthetic top m re-ranked by exact counterfactuals
    (how deep an exact verification must go to recover the exact top k). The synthetic top
    ``top`` of ``fidelity`` are always among the candidates, so depths up to it are exact.
    """
    per_sample: list[dict[str, Any]] = []
    for b in range(len(res.seeds)):
        syn = ranking_agreement(res.synthetic[b], res.exact[b], k)
        pix = ranking_agreement(res.pixel[b], res.exact[b], k)
        order = top_indices(res.exact[b], k)
        ver = {str(m): verified_recall(res.synthetic[b], res.exact[b], k, m) for m in verify_depths}
        res_syn, res_ex = res.synthetic_resemblance[b], res.exact_resemblance[b]
        resem = ranking_agreement(res_syn, res_ex, k)
        resem_ver = {str(m): verified_recall(res_syn, res_ex, k, m) for m in verify_depths}
        per_sample.append({"seed": res.seeds[b], "candidates": len(res.candidates[b]), "synthetic": syn,
                           "pixel": pix, "verified_recall_at_k": ver, "resemblance": resem,
                           "resemblance_verified_recall_at_k": resem_ver,
                           "median_rel_err": float(np.median(res.rel_err[b])),
                           "median_rel_err_exact_topk": float(np.median(res.rel_err[b][order]))})

    def med(method: str, key: str) -> float:
        return float(np.nanmedian([p[method][key] for p in per_sample]))

    def mean(method: str, key: str) -> float:
        return float(np.nanmean([p[method][key] for p in per_sample]))

    summary: dict[str, Any] = {}
    for m in ("synthetic", "pixel"):
        summary[m] = {"median_spearman": med(m, "spearman"), "median_pearson": med(m, "pearson"),
                      "median_recall_at_k": med(m, "recall_at_k"), "mean_recall_at_k": mean(m, "recall_at_k"),
                      "frac_top1_in_exact_topk": mean(m, "top1_in_exact_topk")}
    summary["verified"] = {str(m): {"median_recall_at_k": med("verified_recall_at_k", str(m)),
                                    "mean_recall_at_k": mean("verified_recall_at_k", str(m))}
                           for m in verify_depths}
    summary["resemblance"] = {"median_spearman": med("resemblance", "spearman"),
                              "median_recall_at_k": med("resemblance", "recall_at_k"),
                              "verified": {str(m): {
                                  "median_recall_at_k": med("resemblance_verified_recall_at_k", str(m)),
                                  "mean_recall_at_k": mean("resemblance_verified_recall_at_k", str(m))}
                                  for m in verify_depths}}
    summary["median_rel_err"] = float(np.median(np.concatenate(res.rel_err)))
    summary["median_rel_err_exact_topk"] = float(np.median([p["median_rel_err_exact_topk"]
                                                            for p in per_sample]))
    return {"k": k, "summary": summary, "per_sample": per_sample}


def targets(summary: dict[str, Any]) -> dict[str, Outcome]:
    """The targets of ``fidelity_stats(...)["summary"]``: synthetic medians at their thresholds,
    and better than the pixel baseline's."""
    s, p, r = summary["synthetic"], summary["pixel"], summary["resemblance"]
    out = {"median_spearman": MEDIAN_SPEARMAN.outcome(s["median_spearman"]),
           "median_recall_at_k": MEDIAN_RECALL.outcome(s["median_recall_at_k"]),
           "beats_pixel_spearman": BEATS_PIXEL.outcome(s["median_spearman"], p["median_spearman"]),
           "beats_pixel_recall": BEATS_PIXEL.outcome(s["median_recall_at_k"], p["median_recall_at_k"]),
           "resemblance_median_spearman": RESEMBLANCE_SPEARMAN.outcome(r["median_spearman"])}
    depth = str(VERIFY_DEPTH)
    if depth in summary["verified"]:
        out["verified_recall_influence"] = VERIFIED_RECALL.outcome(
            summary["verified"][depth]["median_recall_at_k"])
        out["verified_recall_resemblance"] = VERIFIED_RECALL.outcome(
            r["verified"][depth]["median_recall_at_k"])
    return out


def run(config: FidelityConfig, out_dir: Path, progress: ProgressFn = ignore_progress, *,
        device: torch.device | str = "cpu", log: LogFn = ignore_log) -> Report:
    """Train (or load) an ensemble, compare synthetic and pixel scores with exact counterfactuals
    for ``config.samples`` samples; write report.json, fidelity.png and (when there is an example
    to show) fidelity_images.png into ``out_dir``. ExperimentError (or DatasetError) for a bad
    config or data."""
    if config.sources != "all" and config.sources < 1:
        raise ExperimentError("--sources must be >= 1")
    subset = None if config.sources == "all" else config.sources
    t0 = time.perf_counter()
    setup = prepare(config, out_dir, granularity=config.granularity, device=torch.device(device),
                    progress=progress, log=log)
    ens, ds = setup.ensemble, setup.data
    t1 = time.perf_counter()
    score_fn = None
    if config.broken:
        g = torch.Generator().manual_seed(config.seed)
        score_fn = lambda s: torch.rand(s.shape, generator=g, dtype=s.dtype)  # noqa: E731
    res = fidelity(ens, setup.tape, ds.to_tensor(), subset=subset, top=config.top, seed=config.seed,
                   chunk=config.chunk, progress=progress, score_fn=score_fn)
    seconds = time.perf_counter() - t1
    k = config.recall_k
    # screen-then-verify depths (deeper than k; the synthetic top `top` are always candidates)
    depths = sorted({d for d in (2 * k, config.top, VERIFY_DEPTH)
                     if d > k and (res.all_sources or d <= config.top)})
    st = fidelity_stats(res, k, verify_depths=depths)
    checks = targets(st["summary"])
    numbers = {
        "ensemble": setup.info, "steps": setup.steps, "samples": len(res.seeds),
        "candidates": "all sources" if res.all_sources else
        f"random {subset} + synthetic top {config.top} + pixel top {config.top} per sample",
        "broken_scores": config.broken, **st,
        "seconds": round(seconds, 1), "total_seconds": round(time.perf_counter() - t0, 1),
    }
    _figures(out_dir, res, st, ds, ens.codebook)
    s, p = st["summary"]["synthetic"], st["summary"]["pixel"]
    met = all(o.met for o in checks.values())
    headline = (f"{len(res.seeds)} samples: synthetic median Spearman {s['median_spearman']:.3f}, "
                f"recall@{k} {s['median_recall_at_k']:.2f}, top-1 in exact top-{k} "
                f"{s['frac_top1_in_exact_topk']:.2f}; pixel baseline {p['median_spearman']:.3f} / "
                f"{p['median_recall_at_k']:.2f}; median relative image error "
                f"{st['summary']['median_rel_err']:.3f}; resemblance median Spearman "
                f"{st['summary']['resemblance']['median_spearman']:.3f}; " + "".join(
                    f"synthetic top {m} verified exactly: recall@{k} {v['median_recall_at_k']:.2f}; "
                    for m, v in st["summary"]["verified"].items()) +
                f"targets {'met' if met else 'NOT met'} ({seconds:.0f} s)")
    report = Report("fidelity of synthetic ablation (synthetic vs exact influence)", checks, numbers,
                    ("fidelity.png", "fidelity_images.png"), headline)
    report.write(out_dir)
    return report


def _figures(out_dir: Path, res: Fidelity, st: dict[str, Any], ds: ImageDataset, book: CodeBook) -> None:
    """Synthetic-vs-exact and pixel-vs-exact scatter per sample (exact top-k in red), and each
    sample beside the exact and predicted counterfactual of its exact top-1 source."""
    panels = []
    for b in range(min(8, len(res.seeds))):
        ps = st["per_sample"][b]
        top = np.zeros(len(res.exact[b]), bool)
        top[np.argsort(-res.exact[b], kind="stable")[: st["k"]]] = True
        panels.append(scatter(res.synthetic[b], res.exact[b],
                                      f"seed {res.seeds[b]} rho={ps['synthetic']['spearman']:.3f}",
                                      "synthetic", "exact", highlight=top))
        panels.append(scatter(res.pixel[b], res.exact[b],
                                      f"pixel rho={ps['pixel']['spearman']:.3f}", "-pixel dist",
                                      "exact", highlight=top))
    rows = [stack(panels[i : i + 4], horizontal=True) for i in range(0, len(panels), 4)]
    stack(rows).save(out_dir / "fidelity.png")
    ex = res.examples
    if ex:
        x_train = ds.to_tensor()
        items = [x_train[int(book.source_items(int(s))[0])] for s in ex["source"]]
        table = [torch.stack([ex["sample"][i], ex["exact"][i], ex["predicted"][i], items[i]])
                 for i in range(len(items))]
        image_table(table, ["sample", "exact cf", "synth cf", "source"],
                            [f"seed {res.seeds[i]}" for i in range(len(items))]).save(
            out_dir / "fidelity_images.png")
