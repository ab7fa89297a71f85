"""Attribution of generated samples to training sources, end to end.

synthetic ranking of every source (one Jacobian, Gram matrix) -> optional LPIPS re-ranking
of the top candidates -> optional exact verification of the top-k, with agreement figures.
This is the one function the CLI and the service workers call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from models.ablation import (
    ablation_weights,
    agreement,
    delta_w,
    gram,
    jacobian,
    predicted_counterfactuals,
    rank_codes,
)
from models.distances import LPIPSMetric, l2_distance
from models.ensemble import Ensemble
from models.sampler import NoiseTape, exact_counterfactuals
from models.unet import WideUNet

METRICS = ("l2", "lpips")


@dataclass(frozen=True)
class AttributionConfig:
    """top_k: sources reported; metric: "l2" or "lpips"; rerank: candidates LPIPS re-ranks;
    verify_top_k: how many of the reported sources get an exact counterfactual."""

    top_k: int = 10
    metric: str = "l2"
    rerank: int = 50
    verify_top_k: int = 0
    max_rows: int = 2048

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, not '{self.metric}'")
        if self.top_k < 1 or self.verify_top_k < 0 or self.verify_top_k > self.top_k:
            raise ValueError("need top_k >= 1 and 0 <= verify_top_k <= top_k")
        if self.rerank < self.top_k:
            raise ValueError("rerank must be >= top_k")


@dataclass
class SourceScore:
    """One ranked source. Scores are distances between the sample and its counterfactual."""

    source: int
    l2: float
    lpips: float | None = None
    exact_l2: float | None = None
    exact_lpips: float | None = None

    def score(self, metric: str) -> float:
        v = self.lpips if metric == "lpips" else self.l2
        assert v is not None
        return v

    def exact_score(self, metric: str) -> float | None:
        return self.exact_lpips if metric == "lpips" else self.exact_l2


@dataclass
class SampleAttribution:
    """Attribution of one generated sample.

    image: (C, H, W) the sample; gram: (n, n); counterfactuals: (top_k, C, H, W) predicted
    counterfactual images of the ranked sources (clipped), exact ones where verified.
    """

    seed: int
    image: Tensor
    gram: Tensor
    ranking: list[SourceScore]
    counterfactuals: Tensor
    exact_counterfactuals: Tensor | None = None
    agreement: dict[str, float] | None = field(default=None)


def attribute(ens: Ensemble, tape: NoiseTape, cfg: AttributionConfig,
              lpips: LPIPSMetric | None = None,
              members: Sequence[WideUNet] | None = None) -> list[SampleAttribution]:
    """Rank every source of ``ens`` for each sample of ``tape``.

    Synthetic ablation ranks all S sources by ||J dw(c)|| through the Gram matrix; with
    metric "lpips" the top ``rerank`` candidates' predicted counterfactuals are re-ranked by
    LPIPS. The top ``verify_top_k`` then get exact counterfactuals (same noise, members of
    S(x) dropped) and the agreement of both scores.
    """
    f, J = jacobian(ens.net, ens.schedule, tape, max_rows=cfg.max_rows)
    results = rank_sources(ens, tape.seeds, f, J, cfg, lpips)
    if cfg.verify_top_k:
        verify(ens, tape, results, cfg, lpips, members)
    return results


def rank_sources(ens: Ensemble, seeds: Sequence[int], f: Tensor, J: Tensor, cfg: AttributionConfig,
                 lpips: LPIPSMetric | None = None, *, served: Tensor | None = None,
                 sources: Tensor | None = None) -> list[SampleAttribution]:
    """Synthetic ranking from an already computed Jacobian (e.g. one stored by the service).

    f: (B, C, H, W) samples; J: (B, D, n) their Jacobians with respect to the weights (D = C*H*W),
    taken at the serving weights; served: (n,) bits of the served members (None: all);
    sources: (S',) long, the sources that may be ranked (None: all of the code book).
    """
    if cfg.metric == "lpips" and lpips is None:
        raise ValueError("metric 'lpips' needs an LPIPS network (models.distances.load_lpips)")
    book = ens.codebook
    src = torch.arange(book.num_sources) if sources is None else sources.long().cpu()
    bits = torch.from_numpy(book.bits())[src].to(J.device)  # (S', n)
    G = gram(J)
    n_cand = min(cfg.rerank if cfg.metric == "lpips" else cfg.top_k, len(src))
    cand_scores, cand_pos = rank_codes(G, bits, book.k, n_cand, served=served)
    cand_idx = src[cand_pos.cpu()]
    dW = delta_w(bits[cand_pos], book.k, served=served)
    preds = predicted_counterfactuals(f, J, dW).clamp(-1, 1)  # (B, R, C, H, W)

    results = []
    for b in range(f.shape[0]):
        idx, l2s = cand_idx[b], cand_scores[b]
        if cfg.metric == "lpips":
            assert lpips is not None
            lp = lpips(preds[b], f[b][None].expand_as(preds[b])).cpu().to(torch.float64)
            order = torch.argsort(lp, descending=True)[: cfg.top_k]
            ranking = [SourceScore(int(idx[o]), float(l2s[o]), float(lp[o])) for o in order]
            cf = preds[b][order]
        else:
            ranking = [SourceScore(int(i), float(s)) for i, s in zip(idx, l2s, strict=True)]
            cf = preds[b][: cfg.top_k]
        results.append(SampleAttribution(seeds[b], f[b], G[b], ranking, cf))
    return results


def attribute_exact(ens: Ensemble, tape: NoiseTape, f: Tensor, cfg: AttributionConfig,
                    lpips: LPIPSMetric | None = None, members: Sequence[WideUNet] | None = None,
                    chunk: int = 512, progress: Callable[[float], None] | None = None, *,
                    served: Tensor | None = None, sources: Tensor | None = None) -> SampleAttribution:
    """Rank every source of one sample by its *exact* counterfactual distance (no Jacobian).

    One sampling run per source (members of S(x) dropped, same noise), ``chunk`` sources at a
    time with member skipping. tape: one seed; f: (C, H, W) the sample. The ranking's ``l2``
    (and ``lpips``) hold the exact distances, as do exact_l2 / exact_lpips. served and
    sources as for ``rank_sources``.
    """
    if tape.x_T.shape[0] != 1:
        raise ValueError("attribute_exact ranks one sample at a time")
    if cfg.metric == "lpips" and lpips is None:
        raise ValueError("metric 'lpips' needs an LPIPS network (models.distances.load_lpips)")
    src = torch.arange(ens.codebook.num_sources) if sources is None else sources.long().cpu()
    bits = torch.from_numpy(ens.codebook.bits())[src]
    S = bits.shape[0]
    scores = torch.empty(S, dtype=torch.float64)
    top_images: dict[int, Tensor] = {}
    for lo in range(0, S, chunk):
        hi = min(S, lo + chunk)
        W = ablation_weights(bits[lo:hi], ens.k, served)
        x = exact_counterfactuals(ens.net, ens.schedule, tape, W, torch.zeros(hi - lo, dtype=torch.long),
                                  members=members, max_rows=cfg.max_rows)
        ref = f[None].expand_as(x)
        d = (lpips(x, ref) if cfg.metric == "lpips" and lpips is not None else l2_distance(x, ref))
        scores[lo:hi] = d.cpu().to(torch.float64)
        # Keep only the images that can still make the top k.
        order = torch.argsort(scores[:hi], descending=True)[: cfg.top_k].tolist()
        keep = {i: (top_images[i] if i in top_images else x[i - lo]) for i in order}
        top_images = keep
        if progress is not None:
            progress(hi / S)
    order = torch.argsort(scores, descending=True)[: cfg.top_k].tolist()
    ranking = []
    for i in order:
        s = float(scores[i])
        if cfg.metric == "lpips":
            x_i = top_images[i][None]
            l2 = float(l2_distance(x_i, f[None]).cpu()[0])
            ranking.append(SourceScore(int(src[i]), l2, s, exact_l2=l2, exact_lpips=s))
        else:
            ranking.append(SourceScore(int(src[i]), s, exact_l2=s))
    cfs = torch.stack([top_images[i] for i in order])
    n = ens.n
    return SampleAttribution(tape.seeds[0], f, torch.zeros(n, n, dtype=torch.float64), ranking, cfs,
                             exact_counterfactuals=cfs)


def verify(ens: Ensemble, tape: NoiseTape, results: list[SampleAttribution],
           cfg: AttributionConfig, lpips: LPIPSMetric | None = None,
           members: Sequence[WideUNet] | None = None, *, served: Tensor | None = None) -> None:
    """Exact counterfactuals of each sample's top ``verify_top_k`` sources, in one batched pass.

    Fills exact_l2 / exact_lpips of those entries, exact_counterfactuals and agreement.
    served: (n,) bits of the served members (None: all).
    """
    K = cfg.verify_top_k
    bits = torch.from_numpy(ens.codebook.bits())
    src = torch.tensor([[r.source for r in res.ranking[:K]] for res in results])  # (B, K)
    W = ablation_weights(bits[src.flatten()], ens.k, served)
    sample_index = torch.arange(len(results)).repeat_interleave(src.shape[1])
    exact = exact_counterfactuals(ens.net, ens.schedule, tape, W, sample_index,
                                  members=members, max_rows=cfg.max_rows)
    exact = exact.reshape(len(results), src.shape[1], *exact.shape[1:])
    for b, res in enumerate(results):
        ref = res.image[None].expand_as(exact[b])
        d_l2 = l2_distance(exact[b], ref).cpu()
        d_lp = lpips(exact[b], ref).cpu() if lpips is not None else None
        for j, entry in enumerate(res.ranking[:K]):
            entry.exact_l2 = float(d_l2[j])
            entry.exact_lpips = float(d_lp[j]) if d_lp is not None else None
        res.exact_counterfactuals = exact[b]
        verified = res.ranking[:K]
        syn = np.array([e.score(cfg.metric) for e in verified])
        exa = np.array([e.exact_score(cfg.metric) for e in verified], dtype=float)
        res.agreement = agreement(syn, exa)
