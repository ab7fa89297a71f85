"""DDPM noise schedule (Ho et al. 2020): linear betas, q_sample, and respaced sampling steps."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class NoiseSchedule:
    """Linear beta schedule beta_1..beta_T from ``beta_start`` to ``beta_end``.

    Index convention: ``t`` in 0..T-1 stands for the paper's timestep t+1.
    Tensors are float64 on the CPU; callers cast to their dtype/device.
    """

    T: int
    beta_start: float = 1e-4
    beta_end: float = 0.02
    betas: Tensor = field(init=False, repr=False)
    alpha_bar: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.T < 1:
            raise ValueError(f"T must be >= 1, got {self.T}")
        betas = torch.linspace(self.beta_start, self.beta_end, self.T, dtype=torch.float64)
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alpha_bar", torch.cumprod(1.0 - betas, dim=0))

    def q_sample(self, x_0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Forward process, Ho et al. eq. (4): x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.

        Args:
            x_0, eps: (..., C, H, W); t: (...) long indices in 0..T-1.
        """
        ab = self.alpha_bar.to(device=x_0.device)[t].to(x_0.dtype)[..., None, None, None]
        return ab.sqrt() * x_0 + (1.0 - ab).sqrt() * eps

    def sampling_steps(self, requested: int | None) -> int:
        """The steps to sample with: T when none are asked for; fewer are respaced, and outside
        1..T is a ValueError."""
        steps = self.T if requested is None else requested
        if not 1 <= steps <= self.T:
            raise ValueError(f"steps must be in 1..{self.T} (the schedule's T), got {steps}")
        return steps

    def timesteps(self, steps: int) -> list[int]:
        """The ``steps`` timesteps (descending, T-1 ... 0) a respaced sampler visits."""
        self.sampling_steps(steps)
        if steps == 1:
            return [self.T - 1]
        ts = torch.linspace(0, self.T - 1, steps, dtype=torch.float64).round().long().tolist()
        return sorted(set(ts), reverse=True)

    def sampling_coefficients(self, steps: int) -> list[tuple[int, float, float, float]]:
        """Per-step (t, 1/sqrt(alpha_s), beta_s/sqrt(1 - alpha_bar_t), sigma_s), descending t.

        Respacing (Nichol & Dhariwal 2021): over the visited timesteps tau, beta_s =
        1 - alpha_bar_{tau_s} / alpha_bar_{tau_{s-1}}; with steps = T these are the betas.
        sigma_s^2 = beta_s (Ho et al.'s choice), and the last step adds no noise.
        Ancestral update, Ho et al. Algorithm 2:
        x_{t-1} = 1/sqrt(alpha_s) (x_t - beta_s / sqrt(1 - alpha_bar_t) eps) + sigma_s z.
        """
        ts = self.timesteps(steps)
        out = []
        for j, t in enumerate(ts):
            ab_t = float(self.alpha_bar[t])
            ab_prev = float(self.alpha_bar[ts[j + 1]]) if j + 1 < len(ts) else 1.0
            beta = 1.0 - ab_t / ab_prev
            sigma = beta**0.5 if j + 1 < len(ts) else 0.0
            out.append((t, (1.0 - beta) ** -0.5, beta / (1.0 - ab_t) ** 0.5, sigma))
        return out
