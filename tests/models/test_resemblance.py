"""Tests for models.resemblance: the closed forms against brute force on predicted
counterfactual images, decoy codes, and decoy p-values (planted and shuffled sources)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from models.ablation import delta_w, gram, jacobian, predicted_counterfactuals
from models.codes import make_codebook, unpack_bits
from models.ensemble import Ensemble
from models.resemblance import (
    decoy_codes,
    decoy_pvalues,
    decoy_resemblance,
    exact_resemblance,
    image_terms,
    predicted_distances,
    resemblance,
    squared_norms,
)
from models.sampler import make_tape
from models.unet import WideUNet
from tests.conftest import TinyData

SHAPE = (1, 8, 8)
STEPS = 12


@pytest.fixture(scope="module")
def jac(tiny_ensemble: Ensemble, tiny_net64: WideUNet) -> tuple[torch.Tensor, torch.Tensor]:
    """f (1, 1, 8, 8) and J (1, 64, 8) of the float64 tiny ensemble, seed 5."""
    return jacobian(tiny_net64, tiny_ensemble.schedule, make_tape([5], SHAPE, STEPS))


def _brute_resemblance(f: torch.Tensor, J: torch.Tensor, dW: torch.Tensor, images: torch.Tensor,
                       item_source: np.ndarray, num_sources: int) -> torch.Tensor:
    """d(f + J dw_s, X_s) - d(f, X_s) from the predicted counterfactual images themselves."""
    cf = predicted_counterfactuals(f[None], J[None], dW[None])[0]  # (S, C, H, W)
    out = torch.empty(num_sources, dtype=torch.float64)
    for s in range(num_sources):
        X = images[torch.from_numpy(np.flatnonzero(item_source == s))].to(torch.float64)
        d_cf = (cf[s].to(torch.float64) - X).flatten(1).norm(dim=1).min()
        d_f = (f.to(torch.float64) - X).flatten(1).norm(dim=1).min()
        out[s] = d_cf - d_f
    return out


def test_item_resemblance_equals_brute_force(jac: tuple[torch.Tensor, torch.Tensor],
                                             tiny_ensemble: Ensemble, tiny_data: TinyData) -> None:
    f, J = jac[0][0], jac[1][0]
    book = tiny_ensemble.codebook
    bits = torch.from_numpy(book.bits())
    terms = image_terms(f, J, tiny_data.x)
    r = resemblance(terms, gram(J[None])[0], delta_w(bits, book.k), book.item_source)
    brute = _brute_resemblance(f, J, delta_w(bits, book.k), tiny_data.x, book.item_source, book.num_sources)
    torch.testing.assert_close(r, brute, rtol=1e-5, atol=1e-5)


def test_set_sources_use_the_nearest_image(jac: tuple[torch.Tensor, torch.Tensor],
                                           tiny_ensemble: Ensemble, tiny_data: TinyData) -> None:
    """A source of several images (a class, an owner): the distance to its nearest image."""
    f, J = jac[0][0], jac[1][0]
    item_source = tiny_data.labels % 4  # four sources of ~15 images each
    codes = tiny_ensemble.codebook.codes[:4]
    bits = torch.from_numpy(unpack_bits(codes, tiny_ensemble.n))
    r = resemblance(image_terms(f, J, tiny_data.x), gram(J[None])[0], delta_w(bits, tiny_ensemble.k),
                   item_source)
    brute = _brute_resemblance(f, J, delta_w(bits, tiny_ensemble.k), tiny_data.x, item_source, 4)
    torch.testing.assert_close(r, brute, rtol=1e-5, atol=1e-5)


def _set_sources(kind: str, data: TinyData) -> np.ndarray:
    """(N,) item -> source of a class or owner code book over the 60 digits: ten classes of 4 to 8
    images each, or seven owners of 1, 2, 3, 6, 10, 15 and 23 images, interleaved."""
    if kind == "class":
        return make_codebook(len(data.labels), 8, 4, granularity="class", labels=data.labels).item_source
    owners = np.repeat([f"owner{j}" for j in range(7)], [1, 2, 3, 6, 10, 15, 23])
    owners = owners[np.random.default_rng(0).permutation(len(owners))]
    return make_codebook(len(owners), 8, 4, granularity="owner", owners=list(owners)).item_source


@pytest.mark.parametrize("kind", ["class", "owner"])
def test_decoy_resemblance_of_set_sources_equals_brute_force(jac: tuple[torch.Tensor, torch.Tensor],
                                                             tiny_ensemble: Ensemble, tiny_data: TinyData,
                                                             kind: str) -> None:
    """Decoys scored with a source of several images: d(f + J dw_m, X_s) - d(f, X_s), the distance to a
    set being the distance to its nearest image, for a few sources listed out of order (as a ranking
    lists its candidates) -- checked against a plain loop over sources, decoys and images."""
    f, J = jac[0][0], jac[1][0]
    n, k = tiny_ensemble.n, tiny_ensemble.k
    item_source = _set_sources(kind, tiny_data)
    assert sorted(np.bincount(item_source)) == ([4, 5, 5, 6, 6, 6, 6, 7, 7, 8] if kind == "class"
                                                else [1, 2, 3, 6, 10, 15, 23])
    sources = torch.tensor([5, 0, 3, 6])  # not sorted, not every source
    items = torch.from_numpy(np.flatnonzero(np.isin(item_source, sources.numpy())))
    items = items[torch.randperm(len(items), generator=torch.Generator().manual_seed(0))]
    decoys = decoy_codes([], n, k, 12, seed=3)
    dW = _dw(decoys, n, k)
    got = decoy_resemblance(image_terms(f, J, tiny_data.x), gram(J[None])[0], dW, items, item_source, sources)

    f_np = f.to(torch.float64).numpy().ravel()
    J_np = J.to(torch.float64).numpy()
    X = tiny_data.x.to(torch.float64).numpy().reshape(len(item_source), -1)
    want = np.empty((len(sources), len(decoys)))
    not_first = 0  # sources whose nearest image to f is not their first one
    for r, s in enumerate(sources.tolist()):
        own = [X[i] for i in range(len(item_source)) if item_source[i] == s]
        d_f = [float(np.linalg.norm(f_np - x)) for x in own]
        for m in range(len(decoys)):
            cf = f_np + J_np @ dW[m].numpy()
            d_cf = [float(np.linalg.norm(cf - x)) for x in own]
            want[r, m] = min(d_cf) - min(d_f)
        not_first += int(np.argmin(d_f) != 0)
    assert got.shape == (len(sources), len(decoys))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    assert not_first >= 2


def test_uint8_images_and_chunks_give_the_same_terms(jac: tuple[torch.Tensor, torch.Tensor],
                                                     tiny_data: TinyData) -> None:
    f, J = jac[0][0], jac[1][0]
    u8 = np.round((tiny_data.x.numpy() + 1.0) * 127.5).astype(np.uint8)
    as_float = torch.from_numpy(u8).to(torch.float32) / 127.5 - 1.0
    ref = image_terms(f, J, as_float)
    norms_sq = (as_float.to(torch.float64) ** 2).flatten(1).sum(1)
    exact = (torch.from_numpy(u8).to(torch.float64) / 127.5 - 1.0).pow(2).flatten(1).sum(1)
    torch.testing.assert_close(squared_norms(u8, chunk=7), exact, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(squared_norms(as_float), norms_sq, rtol=1e-6, atol=1e-6)
    for terms in (image_terms(f, J, u8, chunk=7), image_terms(f, J, torch.from_numpy(u8), chunk=1000),
                  image_terms(f, J, u8, chunk=16, norms_sq=norms_sq)):
        torch.testing.assert_close(terms.base_sq, ref.base_sq, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(terms.lin, ref.lin, rtol=1e-5, atol=1e-4)


def test_predicted_distances_by_hand(jac: tuple[torch.Tensor, torch.Tensor], tiny_data: TinyData) -> None:
    f, J = jac[0][0], jac[1][0]
    dW = torch.randn(5, J.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(0)) / 8
    d = predicted_distances(image_terms(f, J, tiny_data.x[:9]), gram(J[None])[0], dW)
    cf = f.flatten()[None] + dW @ J.T  # (5, D)
    brute = (cf[None] - tiny_data.x[:9].to(torch.float64).flatten(1)[:, None]).norm(dim=-1)
    torch.testing.assert_close(d, brute, rtol=1e-6, atol=1e-6)


def test_exact_resemblance_by_hand() -> None:
    g = torch.Generator().manual_seed(1)
    f = torch.randn(1, 4, 4, generator=g, dtype=torch.float64)
    cfs = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    images = torch.randn(3, 2, 1, 4, 4, generator=g, dtype=torch.float64)
    r = exact_resemblance(cfs, f, images)
    for m in range(3):
        nearest_cf = min(float((cfs[m] - x).norm()) for x in images[m])
        want = nearest_cf - min(float((f - x).norm()) for x in images[m])
        assert r[m].item() == pytest.approx(want, rel=1e-12)


def test_decoys_are_unused_distinct_weight_k_codes() -> None:
    used = [0b0011, 0b0101, 0b1001]
    everything = decoy_codes(used, 4, 2, 100)
    assert sorted(everything.tolist()) == [0b0110, 0b1010, 0b1100]  # all C(4, 2) - 3
    cases: list[tuple[int, int, np.ndarray, int]] = [
        (16, 8, decoy_codes([], 16, 8, 300, seed=3), 500),  # few free codes: enumerated
        (20, 10, np.zeros(0, dtype=np.int64), 1000), (30, 15, np.zeros(0, dtype=np.int64), 2000)]  # sampled
    for n, k, used_codes, count in cases:
        d = decoy_codes(used_codes, n, k, count, seed=1)
        assert len(d) == count and len(set(d.tolist())) == count
        assert (unpack_bits(d, n).sum(axis=1) == k).all()
        assert not np.isin(d, np.asarray(used_codes, dtype=np.int64)).any()
    assert np.array_equal(decoy_codes([], 20, 10, 50, seed=7), decoy_codes([], 20, 10, 50, seed=7))


def test_pvalues_count_decoys_at_least_as_high() -> None:
    scores = torch.tensor([5.0, 0.0, 2.0], dtype=torch.float64)
    decoys = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 1.0, 0.0]],
                          dtype=torch.float64)
    assert decoy_pvalues(scores, decoys).tolist() == [1 / 5, 5 / 5, 3 / 5]


def _dw(codes: np.ndarray, n: int, k: int) -> torch.Tensor:
    return delta_w(torch.from_numpy(unpack_bits(codes, n)), k)


def _planted(seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, torch.Tensor]:
    """A synthetic linear 'ensemble' (f, J: n = 12 members) whose members in ``code`` pulled the
    sample towards image x0: removing them moves f away from x0, removing others does not."""
    n, D = 12, 64
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(D, generator=g, dtype=torch.float64)
    f = x0 + 0.1 * torch.randn(D, generator=g, dtype=torch.float64)
    J = 0.3 * torch.randn(D, n, generator=g, dtype=torch.float64)
    planted = np.array([0b000000111111], dtype=np.int64)
    member = torch.from_numpy(unpack_bits(planted, n)[0]).to(torch.float64)
    J += 4.0 * (f - x0 + 0.2 * torch.randn(D, generator=g, dtype=torch.float64))[:, None] * member[None, :]
    return f.reshape(1, 8, 8), J, planted, x0.reshape(1, 1, 8, 8)


def test_planted_source_has_a_small_pvalue_and_shuffled_ones_are_uniform() -> None:
    n, k = 12, 6
    small, shuffled = [], []
    for seed in range(40):
        f, J, planted, x0 = _planted(seed)
        G = gram(J[None])[0]
        terms = image_terms(f, J, x0)
        decoys = decoy_codes(planted.tolist(), n, k, 400, seed=seed)
        bits = torch.from_numpy(unpack_bits(planted, n))
        r = resemblance(terms, G, delta_w(bits, k), np.zeros(1, dtype=np.int64))
        null = decoy_resemblance(terms, G, _dw(decoys, n, k), torch.tensor([0]), np.zeros(1, dtype=np.int64),
                                 torch.tensor([0]))
        small.append(float(decoy_pvalues(r, null)[0]))
        # The same image paired with a random other code: a draw from its own null.
        other = decoy_codes(planted.tolist(), n, k, 1, seed=1000 + seed)
        one = np.zeros(1, dtype=np.int64)
        r_other = resemblance(terms, G, _dw(other, n, k), one)
        null_other = decoy_resemblance(terms, G, _dw(decoy_codes(np.r_[planted, other].tolist(), n, k, 400,
                                                                 seed=seed), n, k), torch.tensor([0]), one,
                                       torch.tensor([0]))
        shuffled.append(float(decoy_pvalues(r_other, null_other)[0]))
    # Decoys sharing most of the planted members move the sample away from x0 too: small, not minimal.
    assert np.median(small) <= 0.01 and max(small) <= 0.05
    assert stats.kstest(shuffled, "uniform").pvalue > 0.01
