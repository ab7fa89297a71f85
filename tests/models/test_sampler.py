"""Tests for models.sampler: reproducible noise, weighted ensembles, exact counterfactuals."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from models.ablation import ablation_weights
from models.ensemble import Ensemble
from models.sampler import (
    exact_counterfactuals,
    full_weights,
    make_tape,
    run_sampler,
    sample,
    sample_loop,
)
from models.schedule import NoiseSchedule
from models.unet import WideUNet, member_state, stack_states

SHAPE = (1, 8, 8)


def sub_ensemble(net: WideUNet, keep: list[int]) -> WideUNet:
    """The members ``keep`` as their own wide ensemble (from their stacked state dicts)."""
    state = net.state_dict()
    sub = WideUNet(net.config, len(keep), torch.Generator().manual_seed(123))
    sub.load_state_dict(stack_states([member_state(state, i) for i in keep]))
    return sub.to(next(net.parameters()).dtype)


# ----------------------------------------------------------------------------- noise tape


def test_tape_shapes_and_seeds() -> None:
    tape = make_tape([4, 9, 4], SHAPE, 6)
    assert tape.seeds == (4, 9, 4)
    assert tape.x_T.shape == (3, *SHAPE)
    assert tape.z.shape == (5, 3, *SHAPE)
    assert tape.steps == 6
    assert torch.equal(tape.x_T[0], tape.x_T[2])
    assert torch.equal(tape.z[:, 0], tape.z[:, 2])
    assert not torch.equal(tape.x_T[0], tape.x_T[1])
    sel = tape.select(torch.tensor([1, 1, 0]))
    assert sel.seeds == (9, 9, 4)
    assert torch.equal(sel.x_T[2], tape.x_T[0])
    assert torch.equal(sel.z[:, 0], tape.z[:, 1])


def test_tape_validation() -> None:
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        make_tape([1], SHAPE, 0)
    with pytest.raises(ValueError, match="seed"):
        make_tape([-1], SHAPE, 3)
    with pytest.raises(ValueError, match="seed"):
        make_tape([2**63], SHAPE, 3)
    make_tape([2**63 - 1], SHAPE, 3)


def test_tape_does_not_depend_on_batch() -> None:
    alone = make_tape([5], SHAPE, 20)
    together = make_tape([3, 5], SHAPE, 20)
    assert torch.equal(alone.x_T[0], together.x_T[1])
    assert torch.equal(alone.z[:, 0], together.z[:, 1])
    assert not torch.equal(together.x_T[0], together.x_T[1])


# ----------------------------------------------------------------------------- sampling


def test_sampling_is_deterministic(tiny_ensemble: Ensemble) -> None:
    net, sch = tiny_ensemble.net, tiny_ensemble.schedule
    a = sample(net, sch, make_tape([11, 12], SHAPE, sch.T))
    b = sample(net, sch, make_tape([11, 12], SHAPE, sch.T))
    assert a.shape == (2, *SHAPE)
    assert a.dtype == torch.float32
    assert torch.equal(a, b)
    assert a.min() >= -1.0 and a.max() <= 1.0
    c = sample(net, sch, make_tape([13, 12], SHAPE, sch.T))
    assert not torch.equal(a[0], c[0])
    # fewer (respaced) steps are reproducible too, and give another image
    d = sample(net, sch, make_tape([11], SHAPE, 7))
    assert torch.equal(d, sample(net, sch, make_tape([11], SHAPE, 7)))
    assert not torch.equal(d[0], a[0])


def test_sample_does_not_depend_on_batch(tiny_ensemble: Ensemble) -> None:
    net, sch = tiny_ensemble.net, tiny_ensemble.schedule
    alone = sample(net, sch, make_tape([5], SHAPE, sch.T))
    together = sample(net, sch, make_tape([3, 5], SHAPE, sch.T))
    torch.testing.assert_close(alone[0], together[1], atol=1e-6, rtol=0)
    assert (together[0] - together[1]).abs().max() > 1e-2


def test_sample_matches_loop(tiny_ensemble: Ensemble) -> None:
    net, sch = tiny_ensemble.net, tiny_ensemble.schedule
    tape = make_tape([1, 2, 3], SHAPE, sch.T)
    members = [net.member(i) for i in range(net.n)]
    torch.testing.assert_close(sample(net, sch, tape), sample_loop(members, sch, tape),
                               atol=1e-5, rtol=0)
    w = torch.softmax(torch.randn(net.n, generator=torch.Generator().manual_seed(0)), 0)
    torch.testing.assert_close(sample(net, sch, tape, w), sample_loop(members, sch, tape, w),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("i", [0, 5])
def test_one_hot_weight_is_the_member_alone(tiny_ensemble: Ensemble, i: int) -> None:
    net, sch = tiny_ensemble.net, tiny_ensemble.schedule
    tape = make_tape([7, 8], SHAPE, sch.T)
    w = torch.zeros(net.n, dtype=torch.float64)
    w[i] = 1.0
    wide = sample(net, sch, tape, w)
    single = net.member(i)
    torch.testing.assert_close(wide, sample(single, sch, tape), atol=1e-5, rtol=0)
    torch.testing.assert_close(wide, sample_loop([single], sch, tape, torch.tensor([1.0])),
                               atol=1e-5, rtol=0)
    assert (wide - sample(net, sch, tape)).abs().max() > 1e-3


def test_sampler_is_ho_algorithm_2(tiny_ensemble: Ensemble) -> None:
    """A hand-written ancestral loop with the full T steps gives the same sample."""
    net, sch = tiny_ensemble.net, tiny_ensemble.schedule
    tape = make_tape([21], SHAPE, sch.T)
    x = tape.x_T.clone().double()
    betas, ab = sch.betas, sch.alpha_bar
    net64 = sub_ensemble(net, list(range(net.n))).double()
    with torch.no_grad():
        for s, t in enumerate(range(sch.T - 1, -1, -1)):
            eps = net64(x, torch.tensor([t])).mean(0)
            x = (x - betas[t] / (1 - ab[t]).sqrt() * eps) / (1 - betas[t]).sqrt()
            if t > 0:
                x = x + betas[t].sqrt() * tape.z[s].double()
    torch.testing.assert_close(sample(net64, sch, tape), x.clamp(-1, 1), atol=1e-10, rtol=0)


# ----------------------------------------------------------------------------- counterfactuals


def test_exact_counterfactual_is_the_remaining_members(tiny_ensemble: Ensemble) -> None:
    net, sch, book = tiny_ensemble.net, tiny_ensemble.schedule, tiny_ensemble.codebook
    tape = make_tape([31, 32], SHAPE, sch.T)
    sources = [0, 17, 42]
    bits = torch.from_numpy(book.bits()[sources])
    W = ablation_weights(bits, book.k)
    torch.testing.assert_close(W.sum(1), torch.ones(len(sources), dtype=torch.float64))
    cross = exact_counterfactuals(net, sch, tape, W)
    assert cross.shape == (len(sources), 2, *SHAPE)
    for r, s in enumerate(sources):
        keep = [i for i in range(net.n) if not bits[r, i]]
        assert len(keep) == net.n - book.k
        ref = sample(sub_ensemble(net, keep), sch, tape)  # uniform 1/(n - k) weights
        torch.testing.assert_close(cross[r], ref, atol=1e-5, rtol=0)
        # dense: the full wide net with the weight row
        torch.testing.assert_close(cross[r], sample(net, sch, tape, W[r]), atol=1e-5, rtol=0)
        # removing S(x) changes the sample
        assert (cross[r] - sample(net, sch, tape)).abs().max() > 1e-3, s


def test_exact_counterfactual_modes_agree(tiny_ensemble: Ensemble) -> None:
    net, sch, book = tiny_ensemble.net, tiny_ensemble.schedule, tiny_ensemble.codebook
    tape = make_tape([40, 41, 42], SHAPE, 10)
    W = torch.cat([ablation_weights(torch.from_numpy(book.bits()[:3]), book.k),
                   full_weights(net.n)[None]])
    R, B = W.shape[0], 3
    cross = exact_counterfactuals(net, sch, tape, W)
    assert cross.shape == (R, B, *SHAPE)
    # the full-weight row reproduces the ordinary sample
    torch.testing.assert_close(cross[-1], sample(net, sch, tape), atol=1e-5, rtol=0)
    # row r against sample b, in an arbitrary order, with repeats
    pairs = [(2, 1), (0, 0), (3, 2), (2, 1), (1, 2), (0, 1)]
    Wi = torch.stack([W[r] for r, _ in pairs])
    idx = torch.tensor([b for _, b in pairs])
    members = [net.member(i) for i in range(net.n)]
    paired = exact_counterfactuals(net, sch, tape, Wi, idx, members=members)
    assert paired.shape == (len(pairs), *SHAPE)
    for j, (r, b) in enumerate(pairs):
        torch.testing.assert_close(paired[j], cross[r, b], atol=1e-6, rtol=0)
    # chunking does not change anything
    chunked = exact_counterfactuals(net, sch, tape, Wi, idx, members=members, max_rows=2)
    torch.testing.assert_close(chunked, paired, atol=1e-6, rtol=0)
    cross_chunked = exact_counterfactuals(net, sch, tape, W, max_rows=5)
    torch.testing.assert_close(cross_chunked, cross, atol=1e-6, rtol=0)


def test_exact_counterfactual_rejects_bad_weights(tiny_ensemble: Ensemble) -> None:
    net, sch = tiny_ensemble.net, tiny_ensemble.schedule
    tape = make_tape([1], SHAPE, 3)
    with pytest.raises(ValueError, match="W must be"):
        exact_counterfactuals(net, sch, tape, torch.ones(2, net.n - 1))
    with pytest.raises(ValueError, match="W must be"):
        exact_counterfactuals(net, sch, tape, torch.ones(net.n))


def test_schedule_respacing() -> None:
    sch = NoiseSchedule(20)
    assert sch.timesteps(20) == list(range(19, -1, -1))
    assert sch.timesteps(1) == [19]
    ts = sch.timesteps(5)
    assert ts[0] == 19 and ts[-1] == 0 and ts == sorted(set(ts), reverse=True)
    coefs = sch.sampling_coefficients(20)
    for (t, a, b, sigma), beta in zip(coefs, sch.betas.flip(0).tolist(), strict=True):
        assert a == pytest.approx((1 - beta) ** -0.5)
        assert b == pytest.approx(beta / (1 - float(sch.alpha_bar[t])) ** 0.5)
        assert sigma == pytest.approx(beta**0.5 if t > 0 else 0.0)
    # without the check, linspace(0, 19, 21) rounds to 20 distinct steps and nothing is raised
    with pytest.raises(ValueError, match=re.escape("steps must be in 1..20 (the schedule's T), got 21")):
        sch.timesteps(21)
    with pytest.raises(ValueError, match=re.escape("steps must be in 1..20 (the schedule's T), got 0")):
        sch.timesteps(0)


# The DDPM posterior, computed here from the betas alone (numpy, float64), for any grid of
# visited timesteps: the respaced sampler must be Ho et al.'s ancestral step on that grid.
def ddpm_alpha_bar(T: int) -> np.ndarray:
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))


def posterior_step(ab_t: float, ab_s: float, x_t: np.ndarray, eps: np.ndarray) -> tuple[np.ndarray, float]:
    """Mean and variance of q(x_s | x_t, x_0) at x_0 = the x_0 that eps predicts (s < t on the grid;
    ab_s = 1 past the last step): Ho et al. eqs. (6)-(7) with beta = 1 - ab_t / ab_s."""
    x0 = (x_t - np.sqrt(1 - ab_t) * eps) / np.sqrt(ab_t)
    beta = 1 - ab_t / ab_s
    mean = np.sqrt(ab_s) * beta / (1 - ab_t) * x0 + np.sqrt(1 - beta) * (1 - ab_s) / (1 - ab_t) * x_t
    return mean, (1 - ab_s) / (1 - ab_t) * beta


@pytest.mark.parametrize(("T", "steps", "grid"), [(20, 5, [19, 14, 10, 5, 0]), (20, 2, [19, 0]),
                                                  (20, 20, list(range(19, -1, -1)))])
def test_respaced_steps_are_the_ddpm_posterior_of_their_grid(T: int, steps: int, grid: list[int]) -> None:
    sch = NoiseSchedule(T)
    assert sch.timesteps(steps) == grid
    ab = ddpm_alpha_bar(T)
    rng = np.random.default_rng(0)
    coefs = sch.sampling_coefficients(steps)
    for j, (t, a, b, sigma) in enumerate(coefs):
        assert t == grid[j]
        ab_s = ab[grid[j + 1]] if j + 1 < len(grid) else 1.0
        x_t, eps = rng.standard_normal(64), rng.standard_normal(64)
        mean, var = posterior_step(ab[t], ab_s, x_t, eps)
        np.testing.assert_allclose(a * (x_t - b * eps), mean, rtol=0, atol=1e-9)
        # Ho's sigma^2 = beta of the step (the posterior's upper bound); none on the last step.
        beta = 1 - ab[t] / ab_s
        assert sigma**2 == pytest.approx(beta if j + 1 < len(grid) else 0.0, rel=1e-9, abs=1e-15)
        assert var <= beta + 1e-15
    if steps == T:  # the respaced step over the full grid is the plain DDPM step
        for (t, a, b, sigma), beta in zip(coefs, np.linspace(1e-4, 0.02, T)[::-1], strict=True):
            assert (a, b) == pytest.approx(((1 - beta) ** -0.5, beta / np.sqrt(1 - ab[t])), rel=1e-9)
            assert sigma == pytest.approx(np.sqrt(beta) if t > 0 else 0.0, rel=1e-9)


def test_respaced_sampler_follows_the_posterior() -> None:
    """run_sampler over 4 of 20 steps, with a fixed (toy) noise predictor, against the ancestral
    loop written from the posterior above, fed the same noise tape."""
    T, grid = 20, [19, 13, 6, 0]
    assert NoiseSchedule(T).timesteps(len(grid)) == grid
    tape = make_tape([3, 4], SHAPE, len(grid))

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.3 * x + 0.01 * t.to(x.dtype) - 0.2

    got = run_sampler(eps_fn, NoiseSchedule(T), tape, torch.device("cpu"), torch.float64)
    ab = ddpm_alpha_bar(T)
    x = tape.x_T.double().numpy()
    for j, t in enumerate(grid):
        ab_s = ab[grid[j + 1]] if j + 1 < len(grid) else 1.0
        x, _ = posterior_step(ab[t], ab_s, x, 0.3 * x + 0.01 * t - 0.2)
        if j + 1 < len(grid):
            x = x + np.sqrt(1 - ab[t] / ab_s) * tape.z[j].double().numpy()
    np.testing.assert_allclose(got.numpy(), np.clip(x, -1, 1), rtol=0, atol=1e-10)
