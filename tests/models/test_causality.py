"""Tests for models.causality: FAR and the counterfactual radius against a brute-force count
(each counterfactual sampled on its own with hand-built member weights, nearest images by numpy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.causality import (
    FalseAttribution,
    counterfactual_radius,
    false_attribution_rates,
    nearest_item,
    random_sources,
)
from models.ensemble import Ensemble
from models.sampler import make_tape, sample
from tests.conftest import TinyData

STEPS = 6


def _brute_nearest(x: torch.Tensor, data: np.ndarray) -> int:
    return int(np.argmin(((data - x.double().numpy().reshape(1, -1)) ** 2).sum(axis=1)))


def test_far_equals_a_brute_force_count(tiny_ensemble: Ensemble, tiny_data: TinyData) -> None:
    ens = tiny_ensemble
    seeds = list(range(6))
    tape = make_tape(seeds, ens.shape, STEPS)
    f = sample(ens.net, ens.schedule, tape)
    data = tiny_data.x.double().numpy().reshape(tiny_data.x.shape[0], -1)
    nearest = [_brute_nearest(f[b], data) for b in range(len(seeds))]
    # three methods: the nearest image's own source, a fixed other source, and one naming none for
    # odd samples (those count neither in u nor u_r)
    item_source = ens.codebook.item_source
    by_nearest = np.array([item_source[i] for i in nearest])
    fixed = np.full(len(seeds), 7)
    partial = np.where(np.arange(len(seeds)) % 2 == 0, by_nearest, -1)
    rates = false_attribution_rates(ens, tape, f, {"nearest": by_nearest, "fixed": fixed, "partial": partial},
                                    tiny_data.x, draws=3, seed=5)
    bits = ens.codebook.bits().astype(np.float64)
    n, k = ens.n, ens.k

    def survives(b: int, source: int) -> bool:
        w = torch.from_numpy((1.0 - bits[source]) / (n - k))
        cf = sample(ens.net, ens.schedule, make_tape([seeds[b]], ens.shape, STEPS), w)[0]
        return _brute_nearest(cf, data) == nearest[b]

    rand = np.random.default_rng(5).integers(0, ens.codebook.num_sources, size=(len(seeds), 3))
    for name, named in (("nearest", by_nearest), ("fixed", fixed), ("partial", partial)):
        counted = [b for b in range(len(seeds)) if named[b] >= 0]
        u = sum(survives(b, int(named[b])) for b in counted)
        u_r = sum(survives(b, int(s)) for b in counted for s in rand[b])
        got = rates[name]
        want = (len(counted), 3, u, u_r)
        assert (got.samples, got.draws, got.unchanged, got.unchanged_random) == want, name
        assert got.rate == (None if u_r == 0 else (u / len(counted)) / (u_r / (3 * len(counted))))
    assert rates["partial"].samples == 3
    np.testing.assert_array_equal(random_sources(ens.codebook.num_sources, len(seeds), 3, 5), rand)


def test_far_of_an_attribution_that_always_names_the_cause_is_zero() -> None:
    far = FalseAttribution(samples=10, draws=2, unchanged=0, unchanged_random=9)
    assert far.rate == 0.0 and far.u == 0.0 and far.u_random == pytest.approx(0.45)
    assert FalseAttribution(samples=10, draws=1, unchanged=4, unchanged_random=0).rate is None
    assert FalseAttribution(10, 1, 5, 5).to_json()["far"] == pytest.approx(1.0)


def test_attributed_sources_of_the_wrong_length_are_refused(tiny_ensemble: Ensemble,
                                                           tiny_data: TinyData) -> None:
    tape = make_tape([0, 1], tiny_ensemble.shape, STEPS)
    f = sample(tiny_ensemble.net, tiny_ensemble.schedule, tape)
    with pytest.raises(ValueError, match=r"one source per sample \(2\)"):
        false_attribution_rates(tiny_ensemble, tape, f, {"m": np.array([1])}, tiny_data.x)


def test_radius_and_nearest_item_against_numpy(tiny_data: TinyData) -> None:
    f = tiny_data.x[3] * 0.5
    cfs = torch.stack([tiny_data.x[1], tiny_data.x[2], f])
    want = max(float(np.linalg.norm(c.double().numpy() - f.double().numpy())) for c in cfs)
    assert counterfactual_radius(f, cfs) == pytest.approx(want, rel=1e-12)
    assert counterfactual_radius(f, cfs[2:]) == 0.0 and counterfactual_radius(f, cfs[:0]) == 0.0
    data = tiny_data.x.double().numpy().reshape(tiny_data.x.shape[0], -1)
    queries = torch.stack([tiny_data.x[5], tiny_data.x[9] + 0.01, -tiny_data.x[0]])
    assert nearest_item(queries, tiny_data.x).tolist() == [_brute_nearest(q, data) for q in queries]
    uint8 = ((tiny_data.x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    assert nearest_item(queries[:2], uint8).tolist() == [5, 9]
