"""Ancestral DDPM sampling from a weighted ensemble, with a reproducible noise tape.

The ensemble's noise prediction is eps(x_t, t; w) = sum_i w_i eps_i(x_t, t) (paper,
Section 3: "averaging the outputs of the models at each denoising step"), w = 1/n for the
full ensemble. The exogenous noise -- x_T and every z_t -- is the *noise tape*, drawn from
one torch.Generator per seed, so a sample is reproducible from (ensemble, seed, steps) and
a counterfactual reruns exactly the same noise with other weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from models.schedule import NoiseSchedule
from models.unet import WideUNet

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class NoiseTape:
    """Exogenous noise for B samples.

    Attributes:
        seeds: the B seeds, one per sample.
        x_T: (B, C, H, W) initial noise.
        z: (S - 1, B, C, H, W) the z of every step but the last (which adds no noise).
    """

    seeds: tuple[int, ...]
    x_T: Tensor
    z: Tensor

    @property
    def steps(self) -> int:
        return self.z.shape[0] + 1

    def select(self, index: Tensor) -> NoiseTape:
        """The tape of samples ``index`` (R,) (repeats allowed): x_T (R, ...), z (S-1, R, ...)."""
        return NoiseTape(
            tuple(self.seeds[int(i)] for i in index), self.x_T[index], self.z[:, index]
        )


def make_tape(seeds: Sequence[int], shape: tuple[int, int, int], steps: int) -> NoiseTape:
    """Draw each sample's noise from its own CPU torch.Generator seeded by its seed.

    A sample's noise depends on its seed and ``steps`` only, never on the batch it is in
    or on the device the model runs on. shape: (C, H, W).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    xs, zs = [], []
    for seed in seeds:
        if not 0 <= int(seed) <= MAX_SEED:
            raise ValueError(f"seed {seed} is outside 0..2**63-1")
        g = torch.Generator().manual_seed(int(seed))
        xs.append(torch.randn(shape, generator=g))
        zs.append(torch.randn((steps - 1, *shape), generator=g))
    return NoiseTape(tuple(int(s) for s in seeds), torch.stack(xs), torch.stack(zs, dim=1))


EpsFn = Callable[[Tensor, Tensor], Tensor]
"""(x_t (R, C, H, W), t (1,) long) -> combined eps (R, C, H, W)."""


def run_sampler(eps_fn: EpsFn, schedule: NoiseSchedule, tape: NoiseTape, device: torch.device,
                dtype: torch.dtype = torch.float32) -> Tensor:
    """Ho et al. Algorithm 2 over the respaced steps; returns x_0 clipped to [-1, 1], (B, C, H, W)."""
    coefs = schedule.sampling_coefficients(tape.steps)
    x = tape.x_T.to(device=device, dtype=dtype)
    with torch.no_grad():
        for s, (t, a, b, sigma) in enumerate(coefs):
            eps = eps_fn(x, torch.full((1,), t, dtype=torch.long, device=device))
            x = a * (x - b * eps)
            if sigma > 0.0:
                x = x + sigma * tape.z[s].to(device=device, dtype=dtype)
    return x.clamp(-1.0, 1.0)


def _params(net: WideUNet) -> tuple[torch.device, torch.dtype]:
    p = next(net.parameters())
    return p.device, p.dtype


def full_weights(n: int) -> Tensor:
    """w = 1/n for every member: (n,)."""
    return torch.full((n,), 1.0 / n, dtype=torch.float64)


def served_weights(served: Tensor) -> Tensor:
    """w = m / |m| over the served members: (n,) bits m in {0, 1} -> (n,) float64. An ensemble
    whose members S(x) were dropped for an opt-out serves with these weights, so nothing it
    generates depends on x."""
    m = served.to(torch.float64)
    return m / m.sum()


def sample(net: WideUNet, schedule: NoiseSchedule, tape: NoiseTape, w: Tensor | None = None) -> Tensor:
    """Sample with member weights w (n,) (default 1/n), all members batched in one wide pass.

    Returns x_0: (B, C, H, W) in [-1, 1].
    """
    device, dtype = _params(net)
    w = (full_weights(net.n) if w is None else w).to(device=device, dtype=dtype)

    def eps_fn(x: Tensor, t: Tensor) -> Tensor:
        return torch.einsum("i,ibchw->bchw", w, net(x, t))

    return run_sampler(eps_fn, schedule, tape, device, dtype)


def sample_loop(members: Sequence[WideUNet], schedule: NoiseSchedule, tape: NoiseTape,
                w: Tensor | None = None) -> Tensor:
    """Reference sampler: a plain Python loop over single-member networks. (B, C, H, W)."""
    device, dtype = _params(members[0])
    w = (full_weights(len(members)) if w is None else w).to(device=device, dtype=dtype)

    def eps_fn(x: Tensor, t: Tensor) -> Tensor:
        return sum((w[i] * m(x, t)[0] for i, m in enumerate(members)), torch.zeros_like(x))

    return run_sampler(eps_fn, schedule, tape, device, dtype)


def exact_counterfactuals(net: WideUNet, schedule: NoiseSchedule, tape: NoiseTape, W: Tensor,
                          sample_index: Tensor | None = None, *,
                          members: Sequence[WideUNet] | None = None,
                          max_rows: int = 4096) -> Tensor:
    """Rerun the sampler with other member weights against the same noise tape.

    Each trajectory r uses weights W[r] (e.g. w'_i = (1 - c_i)/(n - k) to ablate a source
    with code c). Members are looped over, each run only on the trajectories where its
    weight is non-zero (an ablated member costs nothing there).

    Args:
        W: (R, n) weights.
        sample_index: (R,) which tape sample each row uses; None means every row against
            every sample.
        members: single-member networks (``net.member(i)``), to reuse across calls.
        max_rows: trajectories per chunk, to bound memory.
    Returns:
        (R, C, H, W) with sample_index, else (R, B, C, H, W).
    """
    n = net.n
    if W.dim() != 2 or W.shape[1] != n:
        raise ValueError(f"W must be (R, {n}), got {tuple(W.shape)}")
    B = tape.x_T.shape[0]
    cross = sample_index is None
    if cross:
        rows_w = W.repeat_interleave(B, dim=0)
        idx = torch.arange(B).repeat(W.shape[0])
    else:
        assert sample_index is not None
        rows_w, idx = W, sample_index.long().cpu()
    members = list(members) if members is not None else [net.member(i) for i in range(n)]
    device, dtype = _params(net)
    outs = []
    for start in range(0, rows_w.shape[0], max_rows):
        Wc = rows_w[start : start + max_rows].to(device=device, dtype=dtype)
        active = [torch.nonzero(Wc[:, i]).flatten() for i in range(n)]

        def eps_fn(x: Tensor, t: Tensor, Wc: Tensor = Wc, active: list[Tensor] = active) -> Tensor:
            eps = torch.zeros_like(x)
            for i, rows in enumerate(active):
                if len(rows):
                    e = members[i](x[rows], t)[0]
                    eps.index_add_(0, rows, Wc[rows, i, None, None, None] * e)
            return eps

        outs.append(run_sampler(eps_fn, schedule, tape.select(idx[start : start + max_rows]),
                                device, dtype))
    out = torch.cat(outs)
    return out.reshape(W.shape[0], B, *out.shape[1:]) if cross else out
