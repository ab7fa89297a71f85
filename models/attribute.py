"""Attribution of generated samples to training sources, end to end.

synthetic scores of every source (one Jacobian: influence from the Gram matrix, resemblance
from the training images) -> decoy p-values of the top candidates and of the selective test's
candidates (the works nearest the sample by content) -> optional LPIPS re-ranking -> exact
counterfactuals of the top ``verify_top_k``, re-ranked by their exact values -> ``conclude``: the
top k, whether the sample is attributable (the selective test) and, when it is, the named work
first; ``copy_checks``: near-copies.
These are the functions the CLI, the experiments and the service workers call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor

from models.ablation import (
    ablation_weights,
    agreement,
    delta_w,
    gram,
    influence,
    jacobian,
    measurable,
    predicted_counterfactuals,
    rank_codes,
)
from models.causality import counterfactual_radius, nearest_item
from models.codes import unpack_bits
from models.copies import COPY_RATIO, CopyCheck, copy_check, nearest_neighbour_median
from models.distances import LPIPSMetric, l2_distance
from models.ensemble import Ensemble
from models.resemblance import (
    ImageTerms,
    decoy_codes,
    decoy_pvalues,
    decoy_resemblance,
    gaussian_tail_pvalues,
    image_terms,
    pixels,
    resemblance,
    set_distance,
    source_distances,
)
from models.sampler import NoiseTape, exact_counterfactuals
from models.scores import (  # noqa: F401 - re-exported: what callers of the engine also read
    ALPHA,
    CANDIDATES,
    DECOYS,
    DEFAULT_SCORE,
    METRICS,
    P_SCREEN,
    SCORES,
    SET_SOURCE_SCORE,
    default_score,
)
from models.unet import WideUNet

DECOY_SEED = 0

TrainingImages = Tensor | np.ndarray
"""(N, C, H, W) the training images in code-book item order: float in [-1, 1], or uint8 in
[0, 255] (a numpy memmap is read in chunks)."""


@dataclass(frozen=True)
class AttributionConfig:
    """top_k: sources reported; metric: "l2" or "lpips" (influence's distance); rerank: candidates
    LPIPS re-ranks; verify_top_k: how many of the synthetic top get an exact counterfactual and are
    re-ranked by their exact values (may exceed top_k); score: what ranks, "influence" (the paper's
    ||cf_s - f||) or "resemblance" (d(cf_s, X_s) - d(f, X_s), pixel L2); decoys, alpha, candidates:
    the significance test (``Significance``)."""

    top_k: int = 10
    metric: str = "l2"
    rerank: int = 50
    verify_top_k: int = 0
    max_rows: int = 2048
    score: str = DEFAULT_SCORE
    decoys: int = DECOYS
    alpha: float = ALPHA
    exact_decoys: int = 0
    candidates: int = CANDIDATES

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, not '{self.metric}'")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, not '{self.score}'")
        if self.score == "resemblance" and self.metric != "l2":
            raise ValueError("score 'resemblance' is measured in pixel L2: use metric 'l2' "
                             "(or score 'influence' with metric 'lpips')")
        if self.top_k < 1 or self.verify_top_k < 0:
            raise ValueError("need top_k >= 1 and verify_top_k >= 0")
        if self.rerank < self.top_k:
            raise ValueError("rerank must be >= top_k")
        if self.decoys < 0 or not 0.0 < self.alpha < 1.0:
            raise ValueError("need decoys >= 0 and 0 < alpha < 1")
        if not 0 <= self.exact_decoys <= self.decoys:
            raise ValueError("need 0 <= exact_decoys <= decoys")
        if self.candidates < 1:
            raise ValueError(f"need candidates >= 1 (the works the selective test asks about), "
                             f"not {self.candidates}")


@dataclass
class SourceScore:
    """One ranked source: both scores, synthetic and exact (where verified), and the decoy p-value
    of its resemblance. Influence is the distance between the sample and its counterfactual (l2,
    and lpips where measured); resemblance how much further from the source's own images the
    counterfactual is than the sample (``models.resemblance``). p_value is empirical (it decides);
    tail_p_value the normal-tail fit of the same decoys (the catalogue test's figure only);
    distance d(f, X_s), how near the sample the source's own images are."""

    source: int
    l2: float
    lpips: float | None = None
    exact_l2: float | None = None
    exact_lpips: float | None = None
    resemblance: float | None = None
    exact_resemblance: float | None = None
    p_value: float | None = None
    exact_p_value: float | None = None
    tail_p_value: float | None = None
    distance: float | None = None

    def score(self, metric: str) -> float:
        """Influence in ``metric`` (synthetic, or exact for method exact)."""
        v = self.lpips if metric == "lpips" else self.l2
        assert v is not None
        return v

    def exact_score(self, metric: str) -> float | None:
        return self.exact_lpips if metric == "lpips" else self.exact_l2

    def value(self, score: str, metric: str) -> float:
        """The synthetic value of the ranking score."""
        if score == "resemblance":
            assert self.resemblance is not None
            return self.resemblance
        return self.score(metric)

    def exact_value(self, score: str, metric: str) -> float | None:
        return self.exact_resemblance if score == "resemblance" else self.exact_score(metric)

    @property
    def p(self) -> float | None:
        """The p-value that decides: the synthetic one, a synthetic statistic against synthetic
        decoys, empirical. The copies validation's shuffled control measured the others
        miscalibrated: an exact resemblance against synthetic decoys, and a normal fit of a
        hundred exact decoys, called a quarter or more of the shuffled samples attributable
        (docs/validation.md "Trust")."""
        return self.p_value


@dataclass(frozen=True)
class Candidate:
    """A work the selective test asks about: its source, d(f, X_s) and its empirical decoy p."""

    source: int
    distance: float
    p: float


@dataclass(frozen=True)
class Significance:
    """Whether one attribution names a work, by the selective test.

    Its ``candidates`` are the sources of the training images nearest the sample (pixel L2; m =
    ``AttributionConfig.candidates``), chosen by content and blind to the codes, so each one's
    p-value is a fair draw under the null -- unlike the synthetic top's, which the codes chose
    (the maximum of many). Each is tested against the decoys with an empirical p-value,
    (1 + #decoys at least as high) / (1 + M), Bonferroni over them: the sample is attributable
    when the best has p <= alpha / tested (tested = len(candidates)); the nearest of those that
    survive is ``named`` and ranks first. reason: why not, when not attributable.

    The catalogue test stays as a second, stricter figure, never deciding: the ranking's top
    source against alpha / catalogue_sources (every source ranked), with ``catalogue_method``
    "empirical" when M decoys can reach that threshold, else "gaussian tail" (a normal fit of the
    decoys; 1 / (1 + M) cannot be small enough)."""

    attributable: bool
    reason: str
    alpha: float
    tested: int
    decoys: int
    threshold: float
    method: str
    top_p: float | None
    candidates: tuple[Candidate, ...] = ()
    named: int | None = None
    catalogue_sources: int = 0
    catalogue_method: str = "empirical"
    catalogue_p: float | None = None
    catalogue_attributable: bool = False

    @property
    def catalogue_threshold(self) -> float:
        return self.alpha / max(self.catalogue_sources, 1)

    def names(self, entry: SourceScore) -> bool:
        """Whether this attribution names ``entry``'s source: it is attributable and the source is
        a candidate whose p-value survives the same correction."""
        return self.attributable and any(c.source == entry.source and c.p <= self.threshold
                                         for c in self.candidates)

    def to_json(self) -> dict[str, object]:
        return {"attributable": self.attributable, "reason": self.reason, "alpha": self.alpha,
                "test": "selective", "sources_tested": self.tested, "decoys": self.decoys,
                "threshold": self.threshold, "p_method": self.method, "top_p": self.top_p,
                "candidates": [{"source": c.source, "distance": c.distance, "p_value": c.p}
                               for c in self.candidates],
                "named_source": self.named,
                "catalogue": {"sources": self.catalogue_sources, "threshold": self.catalogue_threshold,
                              "p_method": self.catalogue_method, "top_p": self.catalogue_p,
                              "attributable": self.catalogue_attributable}}


@dataclass
class SampleAttribution:
    """Attribution of one generated sample.

    image: (C, H, W) the sample; gram: (n, n); ranking: the reported sources, best first (until
    ``conclude``, every candidate); counterfactuals: (len(ranking), C, H, W) predicted
    counterfactual images of the ranked sources (clipped), exact ones where verified.
    """

    seed: int
    image: Tensor
    gram: Tensor
    ranking: list[SourceScore]
    counterfactuals: Tensor
    exact_counterfactuals: Tensor | None = None
    agreement: dict[str, float] | None = field(default=None)
    significance: Significance | None = None
    exact: list[bool] = field(default_factory=list)  # per ranked source: its counterfactual is exact
    radius: float | None = None  # the authors' counterfactual radius over the sources run exactly
    radius_over: int = 0  # how many sources that is (models.causality)
    # whether dropping the nearest candidate (the work of the sample's nearest image) changes the
    # sample's nearest training image, by its exact counterfactual (None: not run exactly)
    nearest_confirmed: bool | None = None


def attribute(ens: Ensemble, tape: NoiseTape, cfg: AttributionConfig,
              lpips: LPIPSMetric | None = None,
              members: Sequence[WideUNet] | None = None, *,
              images: TrainingImages | None = None) -> list[SampleAttribution]:
    """Rank every source of ``ens`` for each sample of ``tape``.

    Synthetic ablation scores all S sources through the Jacobian (influence from the Gram matrix,
    resemblance from the training ``images``); with metric "lpips" the top ``rerank`` candidates'
    predicted counterfactuals are re-ranked by LPIPS. The top ``verify_top_k`` then get exact
    counterfactuals (same noise, members of S(x) dropped) and are re-ranked by their exact values;
    the top ``top_k`` are reported with decoy p-values and the sample's ``Significance``.
    """
    f, J = jacobian(ens.net, ens.schedule, tape, max_rows=cfg.max_rows)
    results = rank_sources(ens, tape.seeds, f, J, cfg, lpips, images=images)
    if cfg.verify_top_k:
        verify(ens, tape, results, cfg, lpips, members, images=images)
    for res in results:
        conclude(res, cfg)
    return results


@dataclass(frozen=True)
class _Decoys:
    """The decoy codes' bits and weight changes, and how many sources the attribution tests."""

    bits: Tensor  # (M, n)
    dW: Tensor  # (M, n) float64
    tested: int


def _decoys(ens: Ensemble, cfg: AttributionConfig, served: Tensor | None, tested: int) -> _Decoys:
    """Weight-k codes no source holds (withdrawn ones included), each leaving a served member."""
    book = ens.codebook
    codes = decoy_codes(book.codes, book.n, book.k, cfg.decoys, seed=DECOY_SEED)
    bits = torch.from_numpy(unpack_bits(codes, book.n))
    if served is not None:
        bits = bits[measurable(bits, served)]
    return _Decoys(bits, delta_w(bits, book.k, served=served), tested)


def rank_sources(ens: Ensemble, seeds: Sequence[int], f: Tensor, J: Tensor, cfg: AttributionConfig,
                 lpips: LPIPSMetric | None = None, *, served: Tensor | None = None,
                 sources: Tensor | None = None, images: TrainingImages | None = None,
                 norms_sq: Tensor | None = None) -> list[SampleAttribution]:
    """Synthetic ranking from an already computed Jacobian (e.g. one stored by the service).

    f: (B, C, H, W) samples; J: (B, D, n) their Jacobians with respect to the weights (D = C*H*W),
    taken at the serving weights; served: (n,) bits of the served members (None: all);
    sources: (S',) long, the sources that may be ranked (None: all of the code book); images:
    the training images (``TrainingImages``), needed for resemblance and p-values (without them
    only influence ranks, and no p-value is given); norms_sq: their squared norms
    (``models.resemblance.squared_norms``), which a caller ranking many samples computes once.

    The ranking holds every candidate (the top max(top_k, verify_top_k, P_SCREEN), or rerank for
    LPIPS); ``conclude`` cuts it to top_k.
    """
    if cfg.metric == "lpips" and lpips is None:
        raise ValueError("metric 'lpips' needs an LPIPS network (models.distances.load_lpips)")
    if cfg.score == "resemblance" and images is None:
        raise ValueError("score 'resemblance' needs the training images")
    book = ens.codebook
    src = torch.arange(book.num_sources) if sources is None else sources.long().cpu()
    S = len(src)
    bits = torch.from_numpy(book.bits())
    G = gram(J)
    n_cand = min(S, max(cfg.top_k, cfg.verify_top_k, cfg.rerank if cfg.metric == "lpips" else 0,
                        P_SCREEN if images is not None else 0))
    if images is None:  # influence alone: the Gram matrix ranks without touching pixels
        cand_scores, cand_pos = rank_codes(G, bits[src].to(J.device), book.k, n_cand, served=served)
        influences = [cand_scores[b].cpu() for b in range(len(seeds))]
        cand_idx = [src[cand_pos[b].cpu()] for b in range(len(seeds))]
        resemblances: list[Tensor | None] = [None] * len(seeds)
        pvalues: list[Tensor | None] = [None] * len(seeds)
        tails: list[Tensor | None] = [None] * len(seeds)
        distances: list[Tensor | None] = [None] * len(seeds)
        nearest_sources: list[Tensor] = [torch.zeros(0, dtype=torch.long)] * len(seeds)
        decoys = None
    else:
        dW_book = delta_w(bits, book.k, served=served)  # (S, n); NaN rows are never ranked (measurable)
        decoys = _decoys(ens, cfg, served, S)
        influences, cand_idx, resemblances, pvalues = [], [], [], []
        tails, distances, nearest_sources = [], [], []
        for b in range(len(seeds)):
            terms = image_terms(f[b], J[b], images, norms_sq=norms_sq)
            r_all = resemblance(terms, G[b].cpu(), dW_book, book.item_source)
            infl = influence(G[b : b + 1].cpu(), dW_book[src])[0]
            d_all = source_distances(terms, book.item_source, book.num_sources)
            ranked_by = r_all[src] if cfg.score == "resemblance" else infl
            top = torch.topk(ranked_by, n_cand).indices
            # the selective test's candidates, by content alone; ranked with the rest
            near = _nearest_positions(d_all[src], r_all[src], cfg.candidates)
            pos = torch.cat([top, near[~torch.isin(near, top)]])
            idx = src[pos]
            influences.append(infl[pos])
            cand_idx.append(idx)
            resemblances.append(r_all[idx])
            distances.append(d_all[idx])
            nearest_sources.append(src[near])
            if decoys.dW.shape[0]:
                null = _null(terms, G[b].cpu(), decoys, idx, book.item_source)
                pvalues.append(decoy_pvalues(r_all[idx], null))
                tails.append(gaussian_tail_pvalues(r_all[idx], null))
            else:
                pvalues.append(torch.full((len(idx),), float("nan"), dtype=torch.float64))
                tails.append(torch.full((len(idx),), float("nan"), dtype=torch.float64))
    # one sample at a time: the selective test's candidates make each sample's list its own length
    preds = [predicted_counterfactuals(f[b : b + 1], J[b : b + 1],
                                       delta_w(bits[idx].to(J.device), book.k, served=served)[None])
             .clamp(-1, 1)[0] for b, idx in enumerate(cand_idx)]  # B x (R_b, C, H, W)

    results = []
    for b in range(f.shape[0]):
        entries = [SourceScore(int(i), float(v)) for i, v in zip(cand_idx[b], influences[b], strict=True)]
        for j, e in enumerate(entries):
            r_b, p_b, t_b, d_b = resemblances[b], pvalues[b], tails[b], distances[b]
            e.resemblance = None if r_b is None else float(r_b[j])
            e.p_value = None if p_b is None or bool(torch.isnan(p_b[j])) else float(p_b[j])
            e.tail_p_value = None if t_b is None or bool(torch.isnan(t_b[j])) else float(t_b[j])
            e.distance = None if d_b is None else float(d_b[j])
        if cfg.metric == "lpips":
            assert lpips is not None
            lp = lpips(preds[b], f[b][None].expand_as(preds[b])).cpu().to(torch.float64)
            for e, v in zip(entries, lp.tolist(), strict=True):
                e.lpips = v
        order = sorted(range(len(entries)), key=lambda j: -entries[j].value(cfg.score, cfg.metric))
        sig = None
        if decoys is not None:
            by_source = {e.source: e for e in entries}
            candidates = tuple(Candidate(int(s), float(by_source[int(s)].distance or 0.0), p)
                               for s in nearest_sources[b].tolist()
                               if (p := by_source[int(s)].p_value) is not None)
            sig = _untested(cfg, decoys, candidates)  # decided by conclude
            # the nearest work's exact run is evidence about content: resemblance rankings only
            nearest = candidates[0].source if candidates and cfg.score == "resemblance" else None
            order = _evidence_order(order, [e.source for e in entries], _named(sig), nearest,
                                    cfg.verify_top_k)
        res = SampleAttribution(seeds[b], f[b], G[b], [entries[j] for j in order], preds[b][order])
        res.exact = [False] * len(order)
        res.significance = sig
        results.append(res)
    return results


def _evidence_order(order: list[int], sources: list[int], named: int | None, nearest: int | None,
                    verified: int) -> list[int]:
    """The ranking follows the evidence: the named work first; the nearest candidate moved up into
    the last of the ``verified`` first places if it is not among them (verify runs it exactly, and
    conclude puts it first when that run confirms it as the cause) -- never over the screen's top
    or the named work, so with fewer than two verified places it stays; the rest in their order."""
    def at(source: int) -> int:
        return next(j for j in order if sources[j] == source)

    if named is not None:
        first = at(named)
        order = [first] + [j for j in order if j != first]
    slot = verified - 1  # the last verified place; the first stays the screen's (or the named work)
    if nearest is not None and slot >= 1:
        j = at(nearest)
        if order.index(j) > slot:
            rest = [i for i in order if i != j]
            order = [*rest[:slot], j, *rest[slot:]]
    return order


def _nearest_positions(distance: Tensor, r: Tensor, m: int) -> Tensor:
    """Positions of the m smallest ``distance`` (S',) among the sources whose resemblance ``r`` is
    measurable (finite), nearest first: the selective test's candidates."""
    finite = torch.nonzero(torch.isfinite(r) & torch.isfinite(distance)).flatten()
    order = torch.argsort(distance[finite], stable=True)[:m]
    return finite[order]


def _named(sig: Significance) -> int | None:
    """The candidate the selective test names: the nearest of those whose p survives
    alpha / len(candidates) (the test itself -- does any survive -- is Bonferroni's; which survivor
    is the work is a question of content, and the copies validation measured the nearest survivor
    the cause more often than the lowest p); None when none survives."""
    if sig.decoys == 0:
        return None
    survivors = [c for c in sig.candidates if c.p <= sig.threshold]
    return min(survivors, key=lambda c: c.distance).source if survivors else None


def _null(terms: ImageTerms, G: Tensor, decoys: _Decoys, idx: Tensor, item_source: np.ndarray) -> Tensor:
    """(len(idx), M) the decoys' resemblance with each candidate's images."""
    items = torch.from_numpy(np.flatnonzero(np.isin(item_source, idx.numpy())))
    return decoy_resemblance(terms, G, decoys.dW, items, item_source, idx)


def _p_method(decoys: int, tested: int, alpha: float) -> str:
    """Empirical where M decoys can reach alpha / tested, else the Gaussian tail: the catalogue
    test's method (``Significance``)."""
    return "empirical" if alpha / max(tested, 1) >= 1.0 / (1.0 + decoys) else "gaussian tail"


def _untested(cfg: AttributionConfig, decoys: _Decoys, candidates: tuple[Candidate, ...]) -> Significance:
    M, m = decoys.dW.shape[0], len(candidates)
    return Significance(False, "not concluded", cfg.alpha, m, M, cfg.alpha / max(m, 1), "empirical", None,
                        candidates=candidates, catalogue_sources=decoys.tested,
                        catalogue_method=_p_method(M, decoys.tested, cfg.alpha))


def _move_first(res: SampleAttribution, source: int) -> None:
    """Put ``source``'s entry first, the rest in their order (its counterfactuals with it)."""
    j = next((i for i, e in enumerate(res.ranking) if e.source == source), None)
    if j is None:
        raise ValueError(f"the named source {source} is not in the ranking "
                         f"(conclude runs once, before any cut)")
    if j == 0:
        return
    perm = [j, *range(j), *range(j + 1, len(res.ranking))]
    if res.exact_counterfactuals is not None:
        K = res.exact_counterfactuals.shape[0]
        # rank_sources put the named work first, so verify ran it exactly (within the first K)
        assert j < K, f"the named source {source} was not verified (rank {j + 1} of {K} verified)"
        res.exact_counterfactuals = res.exact_counterfactuals[perm[:K]]
    res.ranking = [res.ranking[i] for i in perm]
    res.counterfactuals = res.counterfactuals[perm]
    res.exact = [res.exact[i] for i in perm]


def conclude(res: SampleAttribution, cfg: AttributionConfig) -> None:
    """Decide the selective test, put the work the evidence names first, cut the ranking to top_k
    and give the catalogue test's figure (``Significance``). The evidence: the work the test names;
    else the nearest candidate when its exact counterfactual confirms it as the cause (dropping it
    changes the sample's nearest image, ``nearest_confirmed``: not a significance test -- a random
    drop does that too, often -- so it orders the ranking and never makes it attributable)."""
    sig = res.significance
    named = None if sig is None else _named(sig)
    if named is not None:
        _move_first(res, named)
    elif sig is not None and sig.candidates and res.nearest_confirmed and cfg.score == "resemblance":
        _move_first(res, sig.candidates[0].source)  # no work named, but the exact run names the cause
    k = min(cfg.top_k, len(res.ranking))
    res.ranking, res.counterfactuals, res.exact = res.ranking[:k], res.counterfactuals[:k], res.exact[:k]
    if res.exact_counterfactuals is not None:
        res.exact_counterfactuals = res.exact_counterfactuals[:k]
    if sig is None:
        return
    top = res.ranking[0] if res.ranking else None
    top_p = None if top is None else top.p
    catalogue_p = None if top is None else (top.tail_p_value if sig.catalogue_method == "gaussian tail"
                                            else top.p)
    sig = replace(sig, top_p=top_p, named=named, catalogue_p=catalogue_p,
                  catalogue_attributable=catalogue_p is not None and catalogue_p <= sig.catalogue_threshold)
    if sig.decoys == 0:
        why = "no decoy codes: every code of weight k is held by a source, so there is no null to test"
        res.significance = replace(sig, attributable=False, reason=why, top_p=None, catalogue_p=None,
                                   catalogue_attributable=False)
        return
    if named is not None:
        res.significance = replace(sig, attributable=True, reason="")
        return
    if not sig.candidates:
        why = "no work near the generation could be tested (none has a measurable counterfactual)"
        res.significance = replace(sig, attributable=False, reason=why)
        return
    best = min(c.p for c in sig.candidates)
    why = (f"the best of the {sig.tested} works nearest the generation has p-value {best:.3g} (empirical, "
           f"{sig.decoys} decoys), above {sig.alpha:g}/{sig.tested} = {sig.threshold:.3g}: removing none of "
           f"them moves the generation away from it more than removing random members does, so no single "
           f"work is named")
    res.significance = replace(sig, attributable=False, reason=why)


def attribute_exact(ens: Ensemble, tape: NoiseTape, f: Tensor, cfg: AttributionConfig,
                    lpips: LPIPSMetric | None = None, members: Sequence[WideUNet] | None = None,
                    chunk: int = 512, progress: Callable[[float], None] | None = None, *,
                    served: Tensor | None = None, sources: Tensor | None = None,
                    images: TrainingImages | None = None) -> SampleAttribution:
    """Rank every source of one sample by its *exact* counterfactual (no Jacobian).

    One sampling run per source (members of S(x) dropped, same noise), ``chunk`` sources at a
    time with member skipping. tape: one seed; f: (C, H, W) the sample. The ranking's ``l2``
    (and ``lpips``, ``resemblance`` with ``images``) hold the exact values, as do exact_l2 /
    exact_lpips / exact_resemblance. No decoy p-values (they come from the Jacobian): its
    significance is None. served and sources as for ``rank_sources``.
    """
    if tape.x_T.shape[0] != 1:
        raise ValueError("attribute_exact ranks one sample at a time")
    if cfg.metric == "lpips" and lpips is None:
        raise ValueError("metric 'lpips' needs an LPIPS network (models.distances.load_lpips)")
    if cfg.score == "resemblance" and images is None:
        raise ValueError("score 'resemblance' needs the training images")
    src = torch.arange(ens.codebook.num_sources) if sources is None else sources.long().cpu()
    bits = torch.from_numpy(ens.codebook.bits())[src]
    S = bits.shape[0]
    influences = torch.empty(S, dtype=torch.float64)
    l2s = torch.empty(S, dtype=torch.float64)
    resemblances = torch.full((S,), float("nan"), dtype=torch.float64)
    top_images: dict[int, Tensor] = {}
    for lo in range(0, S, chunk):
        hi = min(S, lo + chunk)
        W = ablation_weights(bits[lo:hi], ens.k, served)
        x = exact_counterfactuals(ens.net, ens.schedule, tape, W, torch.zeros(hi - lo, dtype=torch.long),
                                  members=members, max_rows=cfg.max_rows)
        ref = f[None].expand_as(x)
        l2s[lo:hi] = l2_distance(x, ref).cpu().to(torch.float64)
        lp = lpips(x, ref).cpu().to(torch.float64) if cfg.metric == "lpips" and lpips is not None else None
        influences[lo:hi] = l2s[lo:hi] if lp is None else lp
        if images is not None:
            resemblances[lo:hi] = _exact_resemblance(x, f, images, ens.codebook.item_source, src[lo:hi])
        ranked_by = resemblances if cfg.score == "resemblance" else influences
        # Keep only the images that can still make the top k.
        order = torch.argsort(ranked_by[:hi], descending=True)[: cfg.top_k].tolist()
        top_images = {i: (top_images[i] if i in top_images else x[i - lo]) for i in order}
        if progress is not None:
            progress(hi / S)
    ranked_by = resemblances if cfg.score == "resemblance" else influences
    order = torch.argsort(ranked_by, descending=True)[: cfg.top_k].tolist()
    ranking = []
    for i in order:
        l2, r = float(l2s[i]), (None if images is None else float(resemblances[i]))
        lp_i = float(influences[i]) if cfg.metric == "lpips" else None
        ranking.append(SourceScore(int(src[i]), l2, lp_i, exact_l2=l2, exact_lpips=lp_i, resemblance=r,
                                   exact_resemblance=r))
    cfs = torch.stack([top_images[i] for i in order])
    n = ens.n
    return SampleAttribution(tape.seeds[0], f, torch.zeros(n, n, dtype=torch.float64), ranking, cfs,
                             exact_counterfactuals=cfs, exact=[True] * len(order),
                             radius=float(l2s.max()) if S else 0.0, radius_over=S)


def verify(ens: Ensemble, tape: NoiseTape, results: list[SampleAttribution],
           cfg: AttributionConfig, lpips: LPIPSMetric | None = None,
           members: Sequence[WideUNet] | None = None, *, served: Tensor | None = None,
           images: TrainingImages | None = None) -> None:
    """Exact counterfactuals of each sample's top ``verify_top_k`` candidates, in one batched pass,
    then those re-ranked by their exact values (the rest keep their synthetic order below them).

    Fills exact_l2 / exact_lpips, and with ``images`` exact_resemblance, exact_counterfactuals and
    agreement (of the ranking score), and the counterfactual radius over the verified sources
    (``radius``, ``radius_over``). With ``cfg.exact_decoys`` (and images), that many decoys are
    run exactly too, in the same pass, and give the verified sources empirical exact p-values
    (floor 1 / (1 + exact_decoys); reported beside the synthetic ones, which decide).
    served: (n,) bits of the served members (None: all).
    """
    K = min([cfg.verify_top_k, *(len(res.ranking) for res in results)])
    if K == 0:
        return
    if cfg.score == "resemblance" and images is None:
        raise ValueError("score 'resemblance' needs the training images")
    book = ens.codebook
    bits = torch.from_numpy(book.bits())
    src = torch.tensor([[r.source for r in res.ranking[:K]] for res in results])  # (B, K)
    rows = bits[src]  # (B, K, n)
    E = 0
    if cfg.exact_decoys and images is not None:
        tested = next((r.significance.tested for r in results if r.significance is not None), len(bits))
        decoy_bits = _decoys(ens, cfg, served, tested).bits[: cfg.exact_decoys]
        E = decoy_bits.shape[0]
        rows = torch.cat([rows, decoy_bits[None].expand(len(results), -1, -1).to(rows.dtype)], dim=1)
    W = ablation_weights(rows.flatten(0, 1), ens.k, served)
    sample_index = torch.arange(len(results)).repeat_interleave(K + E)
    ran = exact_counterfactuals(ens.net, ens.schedule, tape, W, sample_index,
                                members=members, max_rows=cfg.max_rows)
    ran = ran.reshape(len(results), K + E, *ran.shape[1:])
    exact, exact_decoys = ran[:, :K], ran[:, K:]
    for b, res in enumerate(results):
        ref = res.image[None].expand_as(exact[b])
        d_l2 = l2_distance(exact[b], ref).cpu()
        d_lp = lpips(exact[b], ref).cpu() if lpips is not None else None
        r_exact = None
        if images is not None:
            r_exact = _exact_resemblance(exact[b], res.image, images, book.item_source, src[b])
        for j, entry in enumerate(res.ranking[:K]):
            entry.exact_l2 = float(d_l2[j])
            entry.exact_lpips = float(d_lp[j]) if d_lp is not None else None
            if r_exact is not None:
                entry.exact_resemblance = float(r_exact[j])
        if r_exact is not None and E and images is not None:  # (K, E): every decoy against each source
            null = torch.stack([set_distance(exact_decoys[b], images, book.item_source, s)
                                - set_distance(res.image[None], images, book.item_source, s)
                                for s in src[b].tolist()])
            p = decoy_pvalues(r_exact, null)  # empirical: reported, never deciding (``SourceScore.p``)
            for j, entry in enumerate(res.ranking[:K]):
                entry.exact_p_value = float(p[j])
        verified = res.ranking[:K]
        syn = np.array([e.value(cfg.score, cfg.metric) for e in verified])
        exa = np.array([e.exact_value(cfg.score, cfg.metric) for e in verified], dtype=float)
        res.agreement = agreement(syn, exa)
        order = sorted(range(K), key=lambda j: -float(exa[j]))
        rest = list(range(K, len(res.ranking)))
        res.ranking = [res.ranking[j] for j in order] + [res.ranking[j] for j in rest]
        res.exact_counterfactuals = exact[b][order]
        res.radius, res.radius_over = counterfactual_radius(res.image, exact[b]), K
        res.counterfactuals = torch.cat([exact[b][order].to(res.counterfactuals.dtype).cpu().clamp(-1, 1),
                                         res.counterfactuals[K:]])
        res.exact = [True] * K + [False] * len(rest)
        if images is not None and res.significance is not None and res.significance.candidates:
            res.nearest_confirmed = _nearest_confirmed(res, images, book.item_source)


def _nearest_confirmed(res: SampleAttribution, images: TrainingImages,
                       item_source: np.ndarray) -> bool | None:
    """The authors' test on the nearest candidate: its verified exact counterfactual's nearest
    training image is not the sample's (None when it was not verified)."""
    assert res.significance is not None and res.exact_counterfactuals is not None
    source = res.significance.candidates[0].source
    verified = res.ranking[: res.exact_counterfactuals.shape[0]]
    j = next((i for i, e in enumerate(verified) if e.source == source), None)
    if j is None:
        return None
    [after] = nearest_item(res.exact_counterfactuals[j][None], images)
    return bool(item_source[after] != source)


def _exact_resemblance(counterfactuals: Tensor, f: Tensor, images: TrainingImages, item_source: np.ndarray,
                       sources: Tensor) -> Tensor:
    """d(cf_s, X_s) - d(f, X_s) of computed counterfactuals (K, C, H, W) of ``sources`` (K,)."""
    return torch.stack([(set_distance(counterfactuals[j : j + 1], images, item_source, s)
                         - set_distance(f[None], images, item_source, s))[0]
                        for j, s in enumerate(sources.tolist())])


def copy_checks(ens: Ensemble, tape: NoiseTape, results: list[SampleAttribution], images: TrainingImages, *,
                nn_median: float | None = None, ratio: float = COPY_RATIO, served: Tensor | None = None,
                sources: Tensor | None = None, members: Sequence[WideUNet] | None = None) -> list[CopyCheck]:
    """The copy check of every attributed sample (``models.copies``), each near-copy confirmed by
    the exact counterfactual without its nearest image's source: the ranking's own where that
    source was verified, else one more sampling run (all of them in one batched pass). A source
    that may not be ranked (``sources``) stays unconfirmed.

    nn_median: the training images' median nearest-neighbour distance (computed when None)."""
    if nn_median is None:
        nn_median = nearest_neighbour_median(images)
    book = ens.codebook
    allowed = None if sources is None else set(sources.tolist())
    checks = [copy_check(res.image, images, nn_median, ratio=ratio) for res in results]
    todo: list[tuple[int, int]] = []  # (sample, source) still to run
    bits_all = torch.from_numpy(book.bits())
    for b, (res, check) in enumerate(zip(results, checks, strict=True)):
        if not check.near_copy:
            continue
        source = int(book.item_source[int(check.items[0])])
        verified = [e.exact_resemblance for e in res.ranking if e.source == source]
        if served is not None and not bool((bits_all[source].bool() & served.bool().cpu()).any()):
            # none of its members is served: dropping it changes nothing (exactly 0, not the
            # rounding noise of re-running the same ensemble), so it did not cause the copy
            checks[b] = check.confirm(0.0)
        elif verified and verified[0] is not None:
            checks[b] = check.confirm(verified[0])
        elif allowed is None or source in allowed:
            todo.append((b, source))
    if todo:
        rows = torch.tensor([b for b, _ in todo])
        bits = torch.from_numpy(book.bits())[[s for _, s in todo]]
        cf = exact_counterfactuals(ens.net, ens.schedule, tape, ablation_weights(bits, ens.k, served), rows,
                                   members=members)
        for j, (b, _) in enumerate(todo):
            x = pixels(images, checks[b].items[:1])[0]
            f64 = results[b].image.detach().to(torch.float64).cpu().flatten()
            cf_j = cf[j].detach().to(torch.float64).cpu().flatten()
            checks[b] = checks[b].confirm(float((cf_j - x).norm() - (f64 - x).norm()))
    return checks
