"""Exact and synthetic ablation (paper, Section 3 and 3.1).

Exact: ablating the source with code c reruns the sampler with w'_i = (1 - c_i)/(n - k).
An ensemble that serves only the members m (bits, after an opt-out dropped S(x) of a
withdrawn x) samples with w = m/|m| and ablates with w'_i = m_i (1 - c_i) / sum_j m_j (1 - c_j);
every function that takes ``served`` works in that setting (None: every member served).

Synthetic: let f(w) be the final image. J = df/dw at w = 1/n, (D, n) per sample, by
forward-mode AD through the whole sampling loop with all n tangent directions batched and
the primal computed once per step. The predicted counterfactual of code c is
f + J dw(c) with dw(c) = (1 - c)/(n - k) - 1/n, its Euclidean influence ||J dw(c)|| =
sqrt(dw^T G dw) with G = J^T J (n, n), so ranking every source never touches pixels.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from models.codes import delta_w_values
from models.sampler import NoiseTape, full_weights, served_weights
from models.schedule import NoiseSchedule
from models.unet import WideUNet


def ablation_weights(bits: Tensor, k: int, served: Tensor | None = None) -> Tensor:
    """Weights that drop the members trained on each source: (M, n) bits -> (M, n) float64.

    served: (n,) bits of the members the ensemble serves (None: all), renormalised over the
    served members each source leaves (a row with none left is NaN: see ``measurable``)."""
    n = bits.shape[-1]
    if served is None:
        return (1.0 - bits.to(torch.float64)) / (n - k)
    kept = served.to(device=bits.device, dtype=torch.float64) * (1.0 - bits.to(torch.float64))
    return kept / kept.sum(dim=-1, keepdim=True)


def measurable(bits: Tensor, served: Tensor) -> Tensor:
    """Whether ablating each source leaves a served member to sample with: (M, n) bits, (n,)
    served bits -> (M,) bool. Always true with every member served (k < n)."""
    return ((1 - bits.long()) * served.to(bits.device).long()).sum(dim=-1) > 0


def delta_w(bits: Tensor, k: int, dtype: torch.dtype = torch.float64, served: Tensor | None = None) -> Tensor:
    """dw(c) = (1 - c)/(n - k) - 1/n: (M, n) bits -> (M, n) ``dtype``. For k = n/2, (1 - 2c)/n.
    With ``served`` (n,): w'(c) - m/|m| (see ``ablation_weights``).

    Integer or bool bits take one pass that writes one of the two values (the same float64
    numbers the formula gives, rounded once to ``dtype``): at a million codes the float64
    formula's several passes over (M, n) doubles cost more than ranking them.
    """
    n = bits.shape[-1]
    if served is not None:
        base = served_weights(served).to(bits.device)
        return (ablation_weights(bits, k, served) - base).to(dtype)
    if bits.is_floating_point():
        return (ablation_weights(bits, k) - 1.0 / n).to(dtype)
    kept, dropped = (torch.tensor(v, dtype=dtype, device=bits.device) for v in delta_w_values(n, k))
    return torch.where(bits != 0, dropped, kept)


def jacobian(net: WideUNet, schedule: NoiseSchedule, tape: NoiseTape, w: Tensor | None = None,
             *, max_rows: int = 2048) -> tuple[Tensor, Tensor]:
    """Forward-mode Jacobian of the final sample with respect to the member weights.

    Propagates, alongside x_t, its n tangents dx_t = d x_t / d w_j through every step:
    d eps_j = eps_j(x_t) + sum_i w_i (d eps_i/d x) dx_t,j, and the update is linear in
    (x_t, eps). The first step's tangent is zero (x_T does not depend on w), so its tangent
    pass is skipped. Where the final clip to [-1, 1] saturates, the tangent is 0.

    Samples are processed in chunks of at most ``max_rows`` network rows (chunk * (m + 1));
    if even one sample with all n tangents exceeds that, tangents are split into chunks too
    (each such chunk recomputes the primal).

    Returns:
        f: (B, C, H, W) the sample at w; J: (B, D, n) with D = C*H*W, in the net's dtype.
    """
    device, dtype = next(net.parameters()).device, next(net.parameters()).dtype
    n = net.n
    w = (full_weights(n) if w is None else w).to(device=device, dtype=dtype)
    B, C, H, W = tape.x_T.shape
    coefs = schedule.sampling_coefficients(tape.steps)
    eye = torch.eye(n, device=device, dtype=dtype)
    m_chunk = max(1, min(n, max_rows - 1))
    b_chunk = max(1, max_rows // (m_chunk + 1))
    f = torch.empty(B, C, H, W, device=device, dtype=dtype)
    J = torch.empty(B, C * H * W, n, device=device, dtype=dtype)
    with torch.no_grad():
        for b0 in range(0, B, b_chunk):
            sl = slice(b0, min(B, b0 + b_chunk))
            for j0 in range(0, n, m_chunk):
                V = eye[j0 : j0 + m_chunk]  # (m, n) tangent directions in w-space
                x = tape.x_T[sl].to(device=device, dtype=dtype)
                dx = torch.zeros(V.shape[0], *x.shape, device=device, dtype=dtype)
                for s, (t, a, b, sigma) in enumerate(coefs):
                    tt = torch.full((1,), t, dtype=torch.long, device=device)
                    if s == 0:
                        eps_i = net(x, tt)
                        d_eps_x = None
                    else:
                        eps_i, d_eps_i = net.jvp(x, dx, tt)
                        d_eps_x = torch.einsum("i,mibchw->mbchw", w, d_eps_i)
                    eps = torch.einsum("i,ibchw->bchw", w, eps_i)
                    d_eps = torch.einsum("mi,ibchw->mbchw", V, eps_i)
                    if d_eps_x is not None:
                        d_eps = d_eps + d_eps_x
                    x = a * (x - b * eps)
                    dx = a * (dx - b * d_eps)
                    if sigma > 0.0:
                        x = x + sigma * tape.z[s, sl].to(device=device, dtype=dtype)
                inside = (x > -1.0) & (x < 1.0)
                f[sl] = x.clamp(-1.0, 1.0)
                J[sl, :, j0 : j0 + V.shape[0]] = (dx * inside).flatten(2).permute(1, 2, 0)
    return f, J


def gram(J: Tensor) -> Tensor:
    """G = J^T J per sample: (B, D, n) -> (B, n, n) float64."""
    J64 = J.to(torch.float64)
    return J64.transpose(1, 2) @ J64


def influence(G: Tensor, dW: Tensor) -> Tensor:
    """Euclidean influence sqrt(dw^T G dw) for every code: G (B, n, n), dW (M, n) -> (B, M)."""
    dW = dW.to(G.dtype)
    q = torch.einsum("mi,bij,mj->bm", dW, G, dW)
    return q.clamp_min(0.0).sqrt()


def rank_codes(G: Tensor, bits: Tensor, k: int, top: int, *, chunk: int = 1 << 18,
               served: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Top ``top`` codes by synthetic influence for every sample.

    Costs O(M n^2) per sample and never touches pixels. Scored in float32 chunks of ``chunk``
    codes, dw built per chunk straight from the bits (the quadratic form of a Gram matrix is
    well conditioned enough for ranking); the winners' scores are recomputed in float64.

    Args:
        G: (B, n, n); bits: (M, n) code bits c in {0, 1} (uint8, bool or integer); k: code weight;
        served: (n,) bits of the served members (None: all), G taken at w = m/|m|.
    Returns:
        scores (B, top) float64, descending; index (B, top) long into the rows of ``bits``.
    """
    M, B = bits.shape[0], G.shape[0]
    top = min(top, M)
    bits = bits.to(G.device)  # codes live on the CPU; G where its Jacobian was computed
    G32 = G.to(torch.float32)
    cand_s: list[list[Tensor]] = [[] for _ in range(B)]
    cand_i: list[list[Tensor]] = [[] for _ in range(B)]
    for m0 in range(0, M, chunk):
        d = delta_w(bits[m0 : m0 + chunk], k, torch.float32, served)  # built once for every sample
        for b in range(B):
            q = ((d @ G32[b]) * d).sum(dim=1)
            s, i = torch.topk(q, min(top, len(q)))
            cand_s[b].append(s)
            cand_i[b].append(i + m0)
    best_s, best_i = [], []
    for b in range(B):
        s, pos = torch.topk(torch.cat(cand_s[b]), top)
        idx = torch.cat(cand_i[b])[pos]
        exact = influence(G[b : b + 1], delta_w(bits[idx], k, served=served))[0]
        order = torch.argsort(exact, descending=True)
        best_s.append(exact[order])
        best_i.append(idx[order])
    return torch.stack(best_s), torch.stack(best_i)


def predicted_counterfactuals(f: Tensor, J: Tensor, dW: Tensor) -> Tensor:
    """f + J dw for each sample's codes: f (B, C, H, W), J (B, D, n), dW (B, M, n) -> (B, M, C, H, W).

    Not clipped: the caller clips for display.
    """
    delta = torch.einsum("bdn,bmn->bmd", J.to(dW.dtype), dW).to(f.dtype)
    return f[:, None] + delta.reshape(*delta.shape[:2], *f.shape[1:])


def agreement(synthetic: np.ndarray, exact: np.ndarray) -> dict[str, float]:
    """How well synthetic scores track exact ones for one sample's candidates.

    Returns Spearman and Pearson correlations (NaN with fewer than 3 candidates), the
    median relative error |s - e| / e, and whether both agree on the top candidate.
    """
    synthetic, exact = np.asarray(synthetic, float), np.asarray(exact, float)
    out = {
        "median_rel_err": float(np.median(np.abs(synthetic - exact) / np.maximum(exact, 1e-12))),
        "top1_agrees": float(np.argmax(synthetic) == np.argmax(exact)),
        "spearman": float("nan"),
        "pearson": float("nan"),
    }
    if len(exact) >= 3 and np.ptp(exact) > 0 and np.ptp(synthetic) > 0:
        out["spearman"] = float(stats.spearmanr(synthetic, exact).statistic)
        out["pearson"] = float(stats.pearsonr(synthetic, exact).statistic)
    return out
