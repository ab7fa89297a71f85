"""Synthetic-ablation Jacobian: its cost, its accuracy, and what it saves over exact reruns.

On the real 8x8 digits with the "digits" preset (n=16, k=8, random-init weights unless
--train-steps):

* jacobian_over_sample = time(models.ablation.jacobian, 16 samples) /
  time(models.sampler.sample, the same 16 samples). Target <= 21.
* fd_rel_err = max over checked columns j of ||J[:, :, j] - FD_j|| / ||FD_j||, FD_j the
  central difference (f(w + h e_j) - f(w - h e_j)) / 2h, on a float64 copy of the net
  (net.double()), 2 samples. Target < 1e-3. Also reports how far the float32 Jacobian is
  from the float64 one.
* speedup_vs_exact_all = cost of exact counterfactuals (models.sampler.exact_counterfactuals,
  member-skipping) of ALL 1,797 digits codes for the 16 samples, extrapolated linearly from
  a measured batch of R codes (t_batch * 1797 / R), divided by the synthetic cost
  (jacobian + gram + models.ablation.rank_codes over all 1,797 codes). Target >= 25.
* Per exact counterfactual (one code, all 16 samples), three strategies are timed:
  member-skipping (models), dense per row (sample(net, ..., w=row)), and dense batched
  (this file: the wide net on R*B rows, eps = sum_i W[r, i] eps_i), so we learn which is
  faster; their outputs are checked against each other.
* exact_top50_over_sample = time(the service's exact re-ranking: models.sampler.exact_counterfactuals
  of 50 codes per sample, each sample its own 50, one batched member-skipping pass) /
  time(sample, the same samples). Target <= 25.

Prints one JSON object as the last stdout line; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import copy
import math

import _common as C
import torch
from torch import Tensor

from models.ablation import ablation_weights, gram, jacobian, rank_codes
from models.codes import unpack_bits
from models.sampler import NoiseTape, exact_counterfactuals, full_weights, make_tape, run_sampler, sample
from models.schedule import NoiseSchedule
from models.unet import WideUNet

TARGET_RATIO = 21.0
TARGET_FD = 1e-3
TARGET_SPEEDUP = 25.0
TARGET_TOP50 = 25.0
VERIFY = 50


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=C.HelpFormatter)
    C.add_common_args(p)
    p.add_argument("--samples", type=int, default=16, help="samples in the timed runs")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps of the timed runs (default 100 = T, 20 with --quick)")
    p.add_argument("--max-rows", type=int, default=2048, help="jacobian(..., max_rows=)")
    p.add_argument("--fd-steps", type=int, default=None,
                   help="steps of the finite-difference check (default 100, 10 with --quick)")
    p.add_argument("--fd-samples", type=int, default=2, help="samples in the FD check")
    p.add_argument("--fd-cols", type=str, default=None,
                   help="comma-separated columns j to check (default all n, 0,7,15 --quick)")
    p.add_argument("--fd-h", type=float, default=1e-5, help="central-difference step")
    p.add_argument("--codes", type=int, default=None,
                   help="R: codes in the measured exact batch (default 128, 16 with --quick)")
    p.add_argument("--dense-rows", type=int, default=None,
                   help="rows timed with sample(net, w=row) (default 4, 1 with --quick)")
    p.add_argument("--dense-max-rows", type=int, default=1024,
                   help="trajectories per chunk of the dense batched variant")
    p.add_argument("--top", type=int, default=None,
                   help="rank_codes top (default: all codes, i.e. a full ranking)")
    p.add_argument("--train-steps", type=int, default=0,
                   help="train the ensemble this many steps first (0 = random init)")
    return p.parse_args()


def dense_batched_counterfactuals(net: WideUNet, schedule: NoiseSchedule, tape: NoiseTape,
                                  W: Tensor, max_rows: int = 1024) -> Tensor:
    """Every row of W (R, n) against every tape sample with the wide net on R*B rows.

    eps_r(x_t) = sum_i W[r, i] eps_i(x_t): all n members run on every trajectory (twice the
    member-skipping FLOPs for k = n/2) but in one grouped-convolution pass.
    Returns (R, B, C, H, W), like exact_counterfactuals without sample_index.
    """
    p = next(net.parameters())
    B = tape.x_T.shape[0]
    rows_w = W.repeat_interleave(B, dim=0)
    idx = torch.arange(B).repeat(W.shape[0])
    outs = []
    for start in range(0, rows_w.shape[0], max_rows):
        Wc = rows_w[start : start + max_rows].to(device=p.device, dtype=p.dtype)

        def eps_fn(x: Tensor, t: Tensor, Wc: Tensor = Wc) -> Tensor:
            return torch.einsum("ri,irchw->rchw", Wc, net(x, t))

        outs.append(run_sampler(eps_fn, schedule, tape.select(idx[start : start + max_rows]),
                                p.device, p.dtype))
    out = torch.cat(outs)
    return out.reshape(W.shape[0], B, *out.shape[1:])


def fd_check(net: WideUNet, schedule: NoiseSchedule, seeds: list[int], steps: int,
             cols: list[int], h: float, max_rows: int) -> dict:
    """Central differences on a float64 copy of the net against its forward-mode Jacobian."""
    net64 = copy.deepcopy(net).double()
    tape = make_tape(seeds, (net.config.image_channels, net.config.image_size,
                             net.config.image_size), steps)
    f64, J64 = jacobian(net64, schedule, tape, max_rows=max_rows)
    _, J32 = jacobian(net, schedule, tape, max_rows=max_rows)
    w0 = full_weights(net.n)
    errs = {}
    for j in cols:
        e = torch.zeros(net.n, dtype=torch.float64)
        e[j] = h
        fd = (sample(net64, schedule, tape, w0 + e) - sample(net64, schedule, tape, w0 - e))
        fd = fd.flatten(1) / (2 * h)  # (B, D)
        denom = float(fd.norm())
        errs[j] = float((J64[:, :, j] - fd).norm()) / denom if denom > 0 else float("nan")
    sat = float(((f64 <= -1.0) | (f64 >= 1.0)).double().mean())
    return {
        "fd_rel_err": max(errs.values()),
        "fd_rel_err_per_col": {str(j): float(f"{v:.3g}") for j, v in errs.items()},
        "fd_saturated_fraction": round(sat, 4),
        "jacobian_f32_vs_f64_rel_err": float((J32.double() - J64).norm() / J64.norm()),
        "fd_config": {"samples": len(seeds), "steps": steps, "h": h, "dtype": "float64"},
    }


def main() -> None:
    args = parse_args()
    env = C.configure(args)
    q = args.quick
    steps = args.steps or (20 if q else 100)
    fd_steps = args.fd_steps or (10 if q else 100)
    R = args.codes or (16 if q else 128)
    dense_rows = args.dense_rows or (1 if q else 4)
    repeats = args.repeats if args.repeats is not None else 3
    ens, ds = C.digits_ensemble(args.seed, args.train_steps)
    ens.for_inference()
    net, sch = ens.net, ens.schedule
    n, k = ens.n, ens.k
    seeds = list(range(args.seed, args.seed + args.samples))
    tape = make_tape(seeds, ens.shape, steps)
    out: dict = {"bench": "jacobian", "quick": q}

    # 1) Jacobian vs one sampling run, interleaved.
    C.log(f"jacobian vs sample: {args.samples} samples x {steps} steps")
    warm = make_tape(seeds, ens.shape, 2)
    sample(net, sch, warm)
    jacobian(net, sch, warm, max_rows=args.max_rows)
    tm, res = C.interleaved(
        {"sample": lambda: sample(net, sch, tape),
         "jacobian": lambda: jacobian(net, sch, tape, max_rows=args.max_rows)},
        repeats, max_repeats=repeats if q else None, budget_s=30.0 if q else None)
    t_s, t_j = tm["sample"], tm["jacobian"]
    f, J = res["jacobian"]
    out["jacobian_over_sample"] = C.ratio(t_j.wall, t_s.wall)
    out["jacobian_over_sample_cpu"] = C.ratio(t_j.cpu, t_s.cpu)
    out["jacobian_f_vs_sample_max_abs_diff"] = float((f - res["sample"]).abs().max())
    out["sample"] = t_s.as_dict()
    out["jacobian"] = t_j.as_dict()

    # 2) Finite differences in float64.
    cols = ([int(c) for c in args.fd_cols.split(",")] if args.fd_cols
            else ([0, n // 2 - 1, n - 1] if q else list(range(n))))
    C.log(f"finite differences: {args.fd_samples} samples x {fd_steps} steps, columns {cols}")
    out.update(fd_check(net, sch, seeds[: args.fd_samples], fd_steps, cols, args.fd_h,
                        args.max_rows))

    # 3) Synthetic ranking of every code: gram + rank_codes.
    codes = ens.codebook.codes
    N = len(codes)
    bits = torch.from_numpy(unpack_bits(codes, n))
    top = min(args.top or N, N)
    t_gram, G = C.measure(lambda: gram(J), repeats)
    t_rank, _ = C.measure(lambda: rank_codes(G, bits, k, top), repeats)
    synthetic = t_j.wall + t_gram.wall + t_rank.wall
    out["synthetic_all_seconds"] = round(synthetic, 4)
    out["gram_seconds"] = round(t_gram.wall, 5)
    out["rank_all_seconds"] = round(t_rank.wall, 5)

    # 4) Exact counterfactuals: three strategies, one measured batch each.
    W = ablation_weights(bits, k)  # (N, n)
    Wb = W[:R]
    members = [net.member(i) for i in range(n)]
    for m in members:
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
    exact_counterfactuals(net, sch, warm, Wb[:2], members=members)  # warm-up
    dense_batched_counterfactuals(net, sch, warm, Wb[:2], args.dense_max_rows)
    C.log(f"exact counterfactuals: {R} codes x {args.samples} samples x {steps} steps")
    strategies = {
        "member_skipping": lambda: exact_counterfactuals(net, sch, tape, Wb, members=members),
        "dense_batched": lambda: dense_batched_counterfactuals(net, sch, tape, Wb,
                                                               args.dense_max_rows),
        "dense_row": lambda: torch.stack([sample(net, sch, tape, Wb[r])
                                          for r in range(dense_rows)]),
    }
    n_rep = 1 if q else max(1, repeats - 1)
    tm_e, res_e = C.interleaved(strategies, n_rep, max_repeats=n_rep)
    per_code = {
        "member_skipping": tm_e["member_skipping"].wall / R,
        "dense_batched": tm_e["dense_batched"].wall / R,
        "dense_row": tm_e["dense_row"].wall / dense_rows,
    }
    ref = res_e["member_skipping"]
    out["exact_agreement_max_abs_diff"] = {
        "dense_batched_vs_member_skipping": float((res_e["dense_batched"] - ref).abs().max()),
        "dense_row_vs_member_skipping": float(
            (res_e["dense_row"] - ref[:dense_rows]).abs().max()),
    }
    exact_all = {s: t * N for s, t in per_code.items()}
    out["speedup_vs_exact_all"] = C.ratio(exact_all["member_skipping"], synthetic, 2)
    out["speedup_vs_best_exact_all"] = C.ratio(min(exact_all.values()), synthetic, 2)
    out["exact_seconds_per_code"] = {s: round(t, 5) for s, t in per_code.items()}
    out["exact_all_seconds_est"] = {s: round(t, 2) for s, t in exact_all.items()}
    out["fastest_exact_strategy"] = min(per_code, key=per_code.__getitem__)
    out["exact_batch_seconds"] = {s: round(t.wall, 4) for s, t in tm_e.items()}
    out["exact_per_code_over_sample"] = {s: round(t / t_s.wall, 3) for s, t in per_code.items()}

    # 5) The exact re-ranking of each sample's top 50 (models.attribute.verify's pass).
    g = torch.Generator().manual_seed(args.seed)
    picks = torch.stack([torch.randperm(N, generator=g)[:VERIFY] for _ in seeds])  # (B, 50)
    W50 = ablation_weights(bits[picks.flatten()], k)
    rows = torch.arange(len(seeds)).repeat_interleave(VERIFY)
    C.log(f"exact top {VERIFY}: {VERIFY} codes per sample x {args.samples} samples, one pass")
    t_top, _ = C.measure(lambda: exact_counterfactuals(net, sch, tape, W50, rows, members=members,
                                                       max_rows=args.max_rows), n_rep)
    out["exact_top50_over_sample"] = C.ratio(t_top.wall, t_s.wall)
    out["exact_top50_seconds"] = round(t_top.wall, 4)

    out["targets"] = {"jacobian_over_sample": f"<= {TARGET_RATIO}", "fd_rel_err": f"< {TARGET_FD}",
                      "speedup_vs_exact_all": f">= {TARGET_SPEEDUP}",
                      "exact_top50_over_sample": f"<= {TARGET_TOP50}"}
    out["meets_targets"] = {
        "jacobian_over_sample": out["jacobian_over_sample"] <= TARGET_RATIO,
        "fd_rel_err": bool(out["fd_rel_err"] < TARGET_FD),
        "speedup_vs_exact_all": out["speedup_vs_exact_all"] >= TARGET_SPEEDUP,
        "exact_top50_over_sample": out["exact_top50_over_sample"] <= TARGET_TOP50,
    }
    out["config"] = {
        "preset": "digits", "n": n, "k": k, "T": sch.T, "samples": args.samples,
        "steps": steps, "max_rows": args.max_rows, "codes_total": N, "codes_measured": R,
        "dense_rows_measured": dense_rows, "rank_top": top, "repeats": repeats,
        "extrapolation": f"t_batch * {N} / {R}", "params_per_member": C.params_per_member(net),
        "weights": C.weights_label(args.train_steps), "dataset": f"digits N={ds.N}",
        "log2_C(n,k)": round(math.log2(math.comb(n, k)), 2), **env,
    }
    C.emit(out, t_s, t_j)


if __name__ == "__main__":
    main()
