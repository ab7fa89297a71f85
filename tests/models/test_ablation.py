"""Tests for models.ablation: the forward-mode Jacobian, Gram ranking, predicted
counterfactuals and the agreement statistics."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest
import torch
from scipy import stats

from models.ablation import (
    ablation_weights,
    agreement,
    delta_w,
    gram,
    influence,
    jacobian,
    predicted_counterfactuals,
    rank_codes,
)
from models.codes import unpack_bits
from models.ensemble import Ensemble
from models.sampler import full_weights, make_tape, sample
from models.unet import WideUNet

SHAPE = (1, 8, 8)
STEPS = 12


@pytest.fixture(scope="module")
def jac(tiny_ensemble: Ensemble, tiny_net64: WideUNet) -> tuple[torch.Tensor, torch.Tensor]:
    """f (2, 1, 8, 8) and J (2, 64, 8) of the float64 tiny ensemble, seeds 3 and 4."""
    tape = make_tape([3, 4], SHAPE, STEPS)
    return jacobian(tiny_net64, tiny_ensemble.schedule, tape)


def all_codes(n: int, k: int) -> np.ndarray:
    return np.array([sum(1 << b for b in c) for c in combinations(range(n), k)], dtype=np.int64)


# ----------------------------------------------------------------------------- weights


def test_ablation_weights_and_delta() -> None:
    bits = torch.from_numpy(unpack_bits(all_codes(6, 3), 6))
    W = ablation_weights(bits, 3)
    assert W.dtype == torch.float64
    torch.testing.assert_close(W.sum(1), torch.ones(20, dtype=torch.float64))
    assert torch.all((W == 0) == (bits == 1))
    torch.testing.assert_close(delta_w(bits, 3), (1.0 - 2.0 * bits.double()) / 6)
    bits5 = torch.from_numpy(unpack_bits(all_codes(5, 2), 5))
    torch.testing.assert_close(delta_w(bits5, 2), (1 - bits5.double()) / 3 - 0.2)
    # uint8, bool and float bits give exactly the float64 formula; float32 is its rounding
    formula = (1.0 - bits5.double()) / 3 - 1.0 / 5
    for b in (bits5, bits5.bool(), bits5.long(), bits5.double()):
        assert torch.equal(delta_w(b, 2), formula), b.dtype
        assert torch.equal(delta_w(b, 2, torch.float32), formula.float()), b.dtype


# ----------------------------------------------------------------------------- Jacobian


def test_jacobian_primal_is_the_sample(tiny_ensemble: Ensemble, tiny_net64: WideUNet,
                                       jac: tuple[torch.Tensor, torch.Tensor]) -> None:
    f, J = jac
    assert f.shape == (2, *SHAPE) and f.dtype == torch.float64
    assert J.shape == (2, 64, tiny_net64.n) and J.dtype == torch.float64
    tape = make_tape([3, 4], SHAPE, STEPS)
    torch.testing.assert_close(f, sample(tiny_net64, tiny_ensemble.schedule, tape),
                               atol=1e-12, rtol=0)
    # the tangent is 0 wherever the final clip saturates
    saturated = (f.abs() >= 1.0).flatten(1)
    assert torch.all(J[saturated] == 0)
    assert J.abs().max() > 1e-2


def _fd_column(net: WideUNet, ens: Ensemble, tape_seeds: list[int], w: torch.Tensor, j: int,
               h: float = 1e-5) -> torch.Tensor:
    tape = make_tape(tape_seeds, SHAPE, STEPS)
    e = torch.zeros_like(w)
    e[j] = h
    plus = sample(net, ens.schedule, tape, w + e)
    minus = sample(net, ens.schedule, tape, w - e)
    return ((plus - minus) / (2 * h)).flatten(1)  # (B, D)


@pytest.mark.parametrize("j", [0, 3, 7])
def test_jacobian_matches_finite_differences(tiny_ensemble: Ensemble, tiny_net64: WideUNet,
                                             jac: tuple[torch.Tensor, torch.Tensor],
                                             j: int) -> None:
    _, J = jac
    w = full_weights(tiny_net64.n)
    fd = _fd_column(tiny_net64, tiny_ensemble, [3, 4], w, j)
    err = (fd - J[:, :, j]).norm() / J[:, :, j].norm()
    assert err < 1e-6, float(err)  # measured ~3e-11


def test_jacobian_at_other_weights(tiny_ensemble: Ensemble, tiny_net64: WideUNet) -> None:
    n = tiny_net64.n
    w = torch.softmax(torch.randn(n, generator=torch.Generator().manual_seed(1),
                                  dtype=torch.float64), 0)
    tape = make_tape([9], SHAPE, STEPS)
    f, J = jacobian(tiny_net64, tiny_ensemble.schedule, tape, w)
    torch.testing.assert_close(f, sample(tiny_net64, tiny_ensemble.schedule, tape, w),
                               atol=1e-12, rtol=0)
    for j in (1, 6):
        fd = _fd_column(tiny_net64, tiny_ensemble, [9], w, j)
        assert (fd - J[:, :, j]).norm() / J[:, :, j].norm() < 1e-6


def test_chunked_jacobian_equals_unchunked(tiny_ensemble: Ensemble, tiny_net64: WideUNet,
                                           jac: tuple[torch.Tensor, torch.Tensor]) -> None:
    f, J = jac
    tape = make_tape([3, 4], SHAPE, STEPS)
    # 4 rows: 3 tangents per chunk (3 + 3 + 2 of n = 8) and one sample per chunk
    for max_rows in (4, 7, 20):
        fc, Jc = jacobian(tiny_net64, tiny_ensemble.schedule, tape, max_rows=max_rows)
        torch.testing.assert_close(fc, f, atol=1e-12, rtol=0)
        torch.testing.assert_close(Jc, J, atol=1e-11, rtol=1e-10)


def test_jacobian_float32_close_to_float64(tiny_ensemble: Ensemble,
                                           jac: tuple[torch.Tensor, torch.Tensor]) -> None:
    f, J = jac
    tape = make_tape([3, 4], SHAPE, STEPS)
    f32, J32 = jacobian(tiny_ensemble.net, tiny_ensemble.schedule, tape)
    assert J32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), f, atol=1e-4, rtol=0)
    assert (J32.double() - J).norm() / J.norm() < 1e-3


# ----------------------------------------------------------------------------- Gram ranking


def _brute_influence(J: torch.Tensor, dW: torch.Tensor) -> torch.Tensor:
    """||J dw|| for every sample and code, one matrix-vector product at a time. (B, M)."""
    out = torch.empty(J.shape[0], dW.shape[0], dtype=torch.float64)
    for b in range(J.shape[0]):
        for m in range(dW.shape[0]):
            out[b, m] = torch.linalg.vector_norm(J[b].double() @ dW[m])
    return out


def test_gram_influence_equals_brute_force(tiny_ensemble: Ensemble,
                                           jac: tuple[torch.Tensor, torch.Tensor]) -> None:
    _, J = jac
    book = tiny_ensemble.codebook
    G = gram(J)
    assert G.shape == (2, 8, 8) and G.dtype == torch.float64
    torch.testing.assert_close(G, G.transpose(1, 2))
    dW = delta_w(torch.from_numpy(book.bits()), book.k)
    brute = _brute_influence(J, dW)
    torch.testing.assert_close(influence(G, dW), brute, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize(("n", "k", "only_with_top_bit"), [(8, 4, True), (8, 3, False)])
def test_rank_codes_equals_argsort_of_brute_force(jac: tuple[torch.Tensor, torch.Tensor],
                                                  n: int, k: int,
                                                  only_with_top_bit: bool) -> None:
    """Every code ranked; for k = n/2 the complement of c has the same score (dw flips sign),
    so only codes with bit n-1 set are used there to avoid exact ties."""
    _, J = jac
    codes = all_codes(n, k)
    if only_with_top_bit:
        codes = codes[(codes >> (n - 1)) & 1 == 1]
    bits = torch.from_numpy(unpack_bits(codes, n))
    brute = _brute_influence(J, delta_w(bits, k))
    top = 10
    for chunk in (1 << 18, 7):
        scores, index = rank_codes(gram(J), bits, k, top, chunk=chunk)
        assert scores.shape == index.shape == (2, top)
        for b in range(2):
            order = torch.argsort(brute[b], descending=True)[:top]
            assert index[b].tolist() == order.tolist()
            torch.testing.assert_close(scores[b], brute[b, order], atol=1e-12, rtol=1e-9)


def test_rank_codes_with_complement_ties(tiny_ensemble: Ensemble,
                                         jac: tuple[torch.Tensor, torch.Tensor]) -> None:
    _, J = jac
    book = tiny_ensemble.codebook
    bits = torch.from_numpy(book.bits())
    dW = delta_w(bits, book.k)
    brute = _brute_influence(J, dW)
    scores, index = rank_codes(gram(J), bits, book.k, 2 * len(dW))  # top > M is clipped to M
    assert scores.shape == (2, len(dW))
    for b in range(2):
        assert sorted(index[b].tolist()) == list(range(len(dW)))
        torch.testing.assert_close(scores[b], brute[b].sort(descending=True).values,
                                   atol=1e-12, rtol=1e-9)
        torch.testing.assert_close(brute[b, index[b]], scores[b], atol=1e-12, rtol=1e-9)


# ----------------------------------------------------------------------------- predictions


def test_predicted_counterfactuals_by_hand(tiny_ensemble: Ensemble,
                                           jac: tuple[torch.Tensor, torch.Tensor]) -> None:
    f, J = jac
    book = tiny_ensemble.codebook
    dW_all = delta_w(torch.from_numpy(book.bits()), book.k)
    dW = torch.stack([dW_all[[0, 5, 9]], dW_all[[1, 2, 59]]])  # (B=2, M=3, n)
    pred = predicted_counterfactuals(f, J, dW)
    assert pred.shape == (2, 3, *SHAPE)
    for b in range(2):
        for m in range(3):
            by_hand = f[b] + (J[b] @ dW[b, m]).reshape(SHAPE)
            torch.testing.assert_close(pred[b, m], by_hand, atol=1e-12, rtol=0)


def test_prediction_is_first_order_accurate(tiny_ensemble: Ensemble, tiny_net64: WideUNet,
                                            jac: tuple[torch.Tensor, torch.Tensor]) -> None:
    """For a small step along dw the prediction matches the sampled image to O(step^2)."""
    f, J = jac
    book = tiny_ensemble.codebook
    dw = delta_w(torch.from_numpy(book.bits()[:1]), book.k)[0]
    tape = make_tape([3, 4], SHAPE, STEPS)
    errs = []
    for scale in (1e-2, 5e-3):
        exact = sample(tiny_net64, tiny_ensemble.schedule, tape, full_weights(8) + scale * dw)
        pred = predicted_counterfactuals(f, J, (scale * dw).expand(2, 1, 8))[:, 0]
        errs.append(float((exact - pred).norm()))
        # the linear term predicts the change to within 1 %
        assert errs[-1] < 1e-2 * float((exact - f).norm())
    assert errs[1] < errs[0] / 3  # quadratic: halving the step quarters the error


def test_agreement_against_scipy() -> None:
    syn = np.array([0.1, 0.5, 0.3, 0.9, 0.7])
    ex = np.array([0.2, 0.4, 0.35, 0.8, 0.9])
    out = agreement(syn, ex)
    # ranks 1 3 2 5 4 vs 1 3 2 4 5: sum d^2 = 2, rho = 1 - 6 * 2 / (5 * 24) = 0.9
    assert out["spearman"] == pytest.approx(0.9, abs=1e-12)
    assert out["spearman"] == pytest.approx(stats.spearmanr(syn, ex).statistic, abs=1e-12)
    assert out["pearson"] == pytest.approx(stats.pearsonr(syn, ex).statistic, abs=1e-12)
    assert out["pearson"] == pytest.approx(np.corrcoef(syn, ex)[0, 1], abs=1e-12)
    assert out["median_rel_err"] == pytest.approx(0.2 / 0.9, abs=1e-12)
    assert out["top1_agrees"] == 0.0


def test_agreement_edge_cases() -> None:
    same = agreement(np.array([3.0, 1.0, 2.0]), np.array([3.0, 1.0, 2.0]))
    assert same == {"median_rel_err": 0.0, "top1_agrees": 1.0, "spearman": pytest.approx(1.0),
                    "pearson": pytest.approx(1.0)}
    reversed_ = agreement(np.array([1.0, 2.0, 3.0, 4.0]), np.array([8.0, 6.0, 4.0, 2.0]))
    assert reversed_["spearman"] == pytest.approx(-1.0)
    assert reversed_["top1_agrees"] == 0.0
    two = agreement(np.array([1.0, 2.0]), np.array([1.0, 2.5]))
    assert math.isnan(two["spearman"]) and math.isnan(two["pearson"])
    assert two["top1_agrees"] == 1.0
    assert two["median_rel_err"] == pytest.approx((0.0 + 0.2) / 2)
    flat = agreement(np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 2.0]))
    assert math.isnan(flat["spearman"])
