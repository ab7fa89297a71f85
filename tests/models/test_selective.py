"""The selective test (models.attribute.Significance): candidates chosen by content, blind to the
codes, keep their level when the codes are shuffled after training -- their p-values are uniform
(Kolmogorov-Smirnov) where the synthetic top's, which the codes chose, are not -- and a named
candidate ranks first."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy import stats

from models.ablation import jacobian
from models.attribute import AttributionConfig, SampleAttribution, attribute, conclude, rank_sources
from models.codes import make_codebook
from models.ensemble import PRESETS, Ensemble
from models.resemblance import pixels
from models.sampler import make_tape
from models.train import TrainConfig, train
from tests.conftest import TinyData

N_SAMPLES = 40
STEPS = 10


@pytest.fixture(scope="module")
def wide_null(tiny_data: TinyData) -> tuple[Ensemble, list[SampleAttribution]]:
    """n = 12, k = 6 (864 free codes: decoy p-values down to 1/865 < 0.05/5), trained, then its
    codes shuffled: no image is paired with the members that saw it, so no work may be named."""
    book = make_codebook(tiny_data.info.num_items, 12, 6, seed=0)
    ens = Ensemble.create(PRESETS["tiny"], book, tiny_data.info, seed=0)
    train(ens, tiny_data.x, TrainConfig(40, 8, 2e-3, seed=0))
    perm = np.random.default_rng(1).permutation(book.num_sources)
    shuffled = dataclasses.replace(ens.for_inference(),
                                   codebook=dataclasses.replace(book, codes=book.codes[perm].copy()))
    tape = make_tape(list(range(N_SAMPLES)), shuffled.shape, STEPS)
    return shuffled, attribute(shuffled, tape, AttributionConfig(top_k=5), images=tiny_data.x)


def test_candidates_are_the_works_nearest_the_sample(wide_null: tuple[Ensemble, list[SampleAttribution]],
                                                     tiny_data: TinyData) -> None:
    _, results = wide_null
    data = pixels(tiny_data.x, np.arange(tiny_data.x.shape[0]))
    for res in results:
        sig = res.significance
        assert sig is not None and sig.decoys == 864 and sig.tested == 5
        assert sig.threshold == pytest.approx(0.01) and sig.catalogue_threshold == pytest.approx(0.05 / 60)
        d = (data - res.image.double().flatten()).norm(dim=1)
        nearest = torch.argsort(d, stable=True)[:5].tolist()  # item granularity: source = item
        assert [c.source for c in sig.candidates] == nearest
        np.testing.assert_allclose([c.distance for c in sig.candidates], d[nearest].numpy(), rtol=1e-6)


def test_the_selective_test_keeps_its_level_on_shuffled_codes(
        wide_null: tuple[Ensemble, list[SampleAttribution]]) -> None:
    _, results = wide_null
    sigs = [r.significance for r in results]
    assert all(s is not None for s in sigs)
    p_candidates = np.array([c.p for s in sigs if s is not None for c in s.candidates])
    assert len(p_candidates) == 5 * N_SAMPLES
    assert stats.kstest(p_candidates, "uniform").pvalue > 0.01  # content-chosen: uniform under the null
    p_top = np.array([r.ranking[0].p for r in results])  # the codes' choice: the maximum of many
    assert stats.kstest(p_top, "uniform").pvalue < 1e-10
    attributable = sum(bool(s is not None and s.attributable) for s in sigs)
    # level 0.05: P(Binomial(40, 0.05) >= 7) < 0.004
    assert attributable <= 6, attributable


def test_a_named_candidate_ranks_first_and_only_it_is_named(
        wide_null: tuple[Ensemble, list[SampleAttribution]], tiny_data: TinyData) -> None:
    """On the same ranking, two candidates' p-values planted below alpha / m (the 4th nearest the
    lower): conclude names the nearer survivor, puts it first (its counterfactual with it), and
    names the survivors only."""
    ens, _ = wide_null
    tape = make_tape([3], ens.shape, STEPS)
    f, J = jacobian(ens.net, ens.schedule, tape)
    cfg = AttributionConfig(top_k=60, rerank=60)  # every work reported: the survivors among them
    [res] = rank_sources(ens, [3], f, J, cfg, images=tiny_data.x)
    sig = res.significance
    assert sig is not None and all(c.p > 0.01 for c in sig.candidates)  # none survives as it is
    second, fourth = sig.candidates[1], sig.candidates[3]
    candidates = (sig.candidates[0], dataclasses.replace(second, p=5e-3), sig.candidates[2],
                  dataclasses.replace(fourth, p=1e-5), sig.candidates[4])
    res.significance = dataclasses.replace(sig, candidates=candidates)
    j = next(i for i, e in enumerate(res.ranking) if e.source == second.source)
    cf = res.counterfactuals[j].clone()
    conclude(res, cfg)
    out = res.significance
    assert out is not None and out.attributable and out.named == second.source and out.reason == ""
    assert res.ranking[0].source == second.source and torch.equal(res.counterfactuals[0], cf)
    named = {e.source for e in res.ranking if out.names(e)}
    assert named == {second.source, fourth.source}
    assert out.to_json()["named_source"] == second.source and out.to_json()["test"] == "selective"


def test_candidates_outside_the_screen_are_ranked_with_their_counterfactuals() -> None:
    """150 works: the synthetic screen keeps 100 (P_SCREEN), and a candidate nearest the sample
    but outside it joins the ranking, so samples' lists differ in length; each ranked work's
    predicted counterfactual is f + J dw of its own code."""
    from models.ablation import delta_w
    from models.data import load_digits
    from models.ensemble import DatasetInfo
    from models.scores import P_SCREEN

    ds = load_digits().subset(np.arange(150))
    book = make_codebook(ds.N, 12, 6, seed=0)
    ens = Ensemble.create(PRESETS["tiny"], book, DatasetInfo(ds.name, ds.fingerprint(), ds.N, ds.shape),
                          seed=0).for_inference()
    x = ds.to_tensor()
    seeds = list(range(6))
    tape = make_tape(seeds, ens.shape, STEPS)
    f, J = jacobian(ens.net, ens.schedule, tape)
    results = rank_sources(ens, seeds, f, J, AttributionConfig(top_k=5), images=x)
    lengths = [len(r.ranking) for r in results]
    assert min(lengths) >= P_SCREEN and max(lengths) > P_SCREEN  # some candidate lay outside the screen
    bits = torch.from_numpy(book.bits())
    for b, res in enumerate(results):
        sig = res.significance
        assert sig is not None
        ranked = [e.source for e in res.ranking]
        assert all(c.source in ranked for c in sig.candidates)
        assert res.counterfactuals.shape[0] == len(ranked)
        j = ranked.index(sig.candidates[0].source)
        dw = delta_w(bits[[sig.candidates[0].source]], book.k)[0]
        want = (f[b].double().flatten() + J[b].double() @ dw).clamp(-1, 1).reshape(f[b].shape)
        assert torch.allclose(res.counterfactuals[j].double(), want, atol=1e-5)


def test_the_evidence_orders_the_ranking() -> None:
    from models.attribute import _evidence_order

    order, sources = [0, 1, 2, 3, 4, 5], [10, 11, 12, 13, 14, 15]
    assert _evidence_order(order, sources, None, 15, 3) == [0, 1, 5, 2, 3, 4]  # into the last verified place
    assert _evidence_order(order, sources, None, 11, 3) == order  # verified already
    assert _evidence_order(order, sources, 14, 15, 3) == [4, 0, 5, 1, 2, 3]  # the named first
    assert _evidence_order(order, sources, 14, 15, 1) == [4, 0, 1, 2, 3, 5]  # one verified place: the named's
    assert _evidence_order(order, sources, None, 15, 1) == order  # ... or the screen's top
    assert _evidence_order(order, sources, None, 15, 0) == order  # nothing verified: nothing moves
    assert _evidence_order(order, sources, None, None, 3) == order


def test_an_exactly_confirmed_nearest_work_ranks_first_when_none_is_named(
        wide_null: tuple[Ensemble, list[SampleAttribution]], tiny_data: TinyData) -> None:
    """verify runs the nearest candidate exactly (rank_sources moved it into the verified places) and
    says whether dropping it changes the sample's nearest image (against a brute-force rerun); when
    it does and no work is named, conclude puts it first -- without calling the sample attributable;
    a named work stays first."""
    from models.ablation import ablation_weights
    from models.attribute import verify
    from models.sampler import sample

    ens, _ = wide_null
    seeds = list(range(N_SAMPLES))
    tape = make_tape(seeds, ens.shape, STEPS)
    f, J = jacobian(ens.net, ens.schedule, tape)
    cfg = AttributionConfig(top_k=5, verify_top_k=3)
    results = rank_sources(ens, seeds, f, J, cfg, images=tiny_data.x)
    verify(ens, tape, results, cfg, images=tiny_data.x)
    data = tiny_data.x.double().flatten(1)
    bits = torch.from_numpy(ens.codebook.bits())
    confirmed = []
    for b, res in enumerate(results):
        sig = res.significance
        assert sig is not None
        named = next((c.source for c in sig.candidates if c.p <= sig.threshold), None)  # the nearest survivor
        nearest = sig.candidates[0].source
        assert nearest in [e.source for e in res.ranking[:3]]
        w = ablation_weights(bits[[nearest]], ens.k)[0]
        cf = sample(ens.net, ens.schedule, make_tape([seeds[b]], ens.shape, STEPS), w)[0]
        want = int(torch.argmin((data - cf.double().flatten()).norm(dim=1))) != nearest
        assert res.nearest_confirmed is want, b
        confirmed.append(want)
        conclude(res, cfg)
        assert res.significance is not None and res.significance.attributable is (named is not None)
        if named is not None:
            assert res.ranking[0].source == named
        elif want:
            assert res.ranking[0].source == nearest
    assert 0 < sum(confirmed) < len(confirmed)  # both cases occur on these seeds
