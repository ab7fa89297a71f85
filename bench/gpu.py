"""GPU benchmark: train the "paper" preset briefly, then time a long sampling run and its Jacobian.

Meant for one CUDA GPU (an H200) and < 8 minutes in all (bench/gpu.sh wraps it):

1. trains the "paper" preset (models.ensemble.PRESETS["paper"], n=16, 28x28) on the
   MNIST .npz with models.train.train / TrainConfig for --train-steps steps (fewer if
   they would not fit --train-budget-s; the rate is measured on the first steps and
   training resumes from the ensemble's train_state);
2. times one --sample-steps (1000) step sampling run of --samples (16) samples;
3. times its Jacobian (models.ablation.jacobian). If the full Jacobian would not fit the
   time left, it is measured on a shorter tape and extrapolated per step (said in the JSON).
   A CUDA out-of-memory halves max_rows (and the training batch) and retries.

--cpu-smoke (alias --quick) runs the same code path on the CPU with tiny sizes.
Prints one JSON object as the last stdout line; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any

import _common as C
import torch

from models.ablation import jacobian
from models.codes import default_k, make_codebook
from models.data import load_dataset
from models.ensemble import PRESETS, DatasetInfo, Ensemble
from models.sampler import make_tape, sample
from models.train import TrainConfig, train
from models.unet import UNetConfig, num_parameters

DEFAULT_DATA = "../shared/data/mnist10k.npz"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=C.HelpFormatter)
    C.add_common_args(p)
    p.add_argument("--cpu-smoke", action="store_true",
                   help="same code path on the CPU with tiny sizes (also --quick)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--data", default=os.environ.get("DATA", DEFAULT_DATA),
                   help="dataset spec for models.data.load_dataset (env DATA)")
    p.add_argument("--items", type=int, default=None, help="use only the first N items")
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    p.add_argument("--n", type=int, default=16, help="ensemble size")
    p.add_argument("--k", type=int, default=None, help="code weight (default n/2)")
    p.add_argument("--train-steps", type=int, default=int(os.environ.get("STEPS", "300")),
                   help="training steps (env STEPS)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per member per step (default: the preset's)")
    p.add_argument("--lr", type=float, default=None, help="default: the preset's")
    p.add_argument("--train-budget-s", type=float, default=150.0,
                   help="stop training early (fewer steps) to stay under this")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--sample-steps", type=int, default=1000)
    p.add_argument("--jac-max-rows", type=int, default=None,
                   help="jacobian max_rows (default samples * (n + 1): one chunk); halved "
                        "on out-of-memory")
    p.add_argument("--jac-probe-steps", type=int, default=6,
                   help="steps of the short Jacobian run that predicts the full one")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="whole-run budget; the Jacobian is extrapolated if it would exceed it")
    p.add_argument("--no-cudnn-benchmark", action="store_true")
    # Test hooks for the out-of-memory fallbacks (used by --cpu-smoke).
    p.add_argument("--fake-oom-jac-rows-above", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--fake-oom-train-batch-above", type=int, default=None,
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick or args.cpu_smoke:
        args.quick = args.cpu_smoke = True
        args.device = "cpu"
        args.items = args.items or 64
        args.n = 8 if args.n == 16 else args.n
        args.train_steps = min(args.train_steps, 3)
        args.batch_size = args.batch_size or 4
        args.samples = 2 if args.samples == 16 else args.samples
        args.sample_steps = 6 if args.sample_steps == 1000 else args.sample_steps
        args.jac_max_rows = args.jac_max_rows or 2 * (args.n + 1)
        args.jac_probe_steps = 3
        args.budget_s = min(args.budget_s, 50.0)
        args.train_budget_s = min(args.train_budget_s, 20.0)
        if args.fake_oom_jac_rows_above is None:
            args.fake_oom_jac_rows_above = args.n + 2  # exercise the halving path once
        if args.fake_oom_train_batch_above is None:
            args.fake_oom_train_batch_above = args.batch_size - 1
    return args


class Clock:
    """Wall clock that synchronises the device first, so GPU work is counted."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def smoke_unet(image_size: int) -> UNetConfig:
    """The paper preset's layout (3 levels, attention at 14x14) at toy width."""
    attn = (image_size // 2,) if image_size % 4 == 0 else ()
    return UNetConfig(1, image_size, 8, (1, 2, 2), 1, attn, 4, 1)


def build(args: argparse.Namespace, device: torch.device) -> tuple[Ensemble, torch.Tensor, dict]:
    ds = load_dataset(args.data)
    if args.items is not None and args.items < ds.N:
        ds = ds.subset(list(range(args.items)))
    k = args.k if args.k is not None else default_k(args.n)
    book = make_codebook(ds.N, args.n, k, seed=args.seed)
    info = DatasetInfo(ds.name, ds.fingerprint(), ds.N, ds.shape)
    preset = PRESETS[args.preset]
    unet = smoke_unet(ds.H) if args.cpu_smoke else None
    ens = Ensemble.create(preset, book, info, seed=args.seed, unet=unet)
    ens.net.to(device)
    return ens, ds.to_tensor(), {"name": ds.name, "items": ds.N, "shape": list(ds.shape),
                                 "path": args.data}


def run_training(ens: Ensemble, x_all: torch.Tensor, args: argparse.Namespace,
                 device: torch.device, clock: Clock) -> dict[str, Any]:
    preset = PRESETS[args.preset]
    lr = args.lr or preset.lr
    batch = args.batch_size or preset.batch_size
    init_state = {k: v.detach().clone() for k, v in ens.net.state_dict().items()}
    ooms = 0
    stamps: list[float] = []
    losses: list[float] = []

    def progress(step: int, member_losses: torch.Tensor) -> None:
        losses.append(float(member_losses.mean()))  # .item() synchronises
        stamps.append(clock.now())

    while True:
        stamps.clear()
        losses.clear()
        reset_peak(device)
        t0 = clock.now()
        try:
            fake = args.fake_oom_train_batch_above
            if fake is not None and batch > fake:
                raise torch.OutOfMemoryError(f"fake out-of-memory (batch {batch} > {fake})")
            warm = min(args.train_steps, 10)
            cfg = TrainConfig(warm, batch, lr, seed=args.seed, checkpoint_every=10**9)
            train(ens, x_all, cfg, progress=progress)
            # Steady-state rate from the warm-up steps after the first two (cuDNN autotune).
            if len(stamps) >= 4:
                rate = (len(stamps) - 3) / (stamps[-1] - stamps[2])
            else:
                rate = len(stamps) / max(stamps[-1] - t0, 1e-9) if stamps else 1.0
            left = args.train_budget_s - (clock.now() - t0)
            total = min(args.train_steps, warm + max(0, int(left * rate)))
            if total > warm:
                train(ens, x_all, TrainConfig(total, batch, lr, seed=args.seed,
                                              checkpoint_every=10**9), progress=progress)
            break
        except RuntimeError as exc:
            if not is_oom(exc) or batch <= 1:
                raise
            ooms += 1
            batch //= 2
            C.log(f"training: out of memory, retrying with batch {batch} per member")
            ens.net.load_state_dict(init_state)
            ens.train_state = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    seconds = stamps[-1] - t0
    steady = stamps[2:] if len(stamps) >= 4 else stamps
    sps = (len(steady) - 1) / (steady[-1] - steady[0]) if len(steady) >= 2 else float("nan")
    return {
        "train_steps_requested": args.train_steps,
        "train_steps_done": len(stamps),
        "train_stopped_by_budget": len(stamps) < args.train_steps,
        "train_seconds": round(seconds, 3),
        "train_first_step_seconds": round(stamps[0] - t0, 3),
        "train_steps_per_s": round(sps, 4),
        "train_images_per_s": round(sps * batch * ens.n, 1),
        "train_batch_per_member": batch,
        "train_oom_retries": ooms,
        "train_loss_first": round(losses[0], 5),
        "train_loss_last": round(losses[-1], 5),
        "train_max_memory_allocated": peak_bytes(device),
    }


def run_jacobian(ens: Ensemble, seeds: list[int], args: argparse.Namespace,
                 device: torch.device, clock: Clock, deadline: float,
                 ) -> tuple[dict[str, Any], tuple[torch.Tensor, torch.Tensor] | None]:
    net, sch = ens.net, ens.schedule
    max_rows = args.jac_max_rows or len(seeds) * (ens.n + 1)
    ooms = 0

    def jac(steps: int) -> tuple[float, tuple[torch.Tensor, torch.Tensor]]:
        nonlocal max_rows, ooms
        tape = make_tape(seeds, ens.shape, steps)
        while True:
            try:
                fake = args.fake_oom_jac_rows_above
                if fake is not None and max_rows > fake:
                    raise torch.OutOfMemoryError(f"fake out-of-memory ({max_rows} > {fake} rows)")
                t0 = clock.now()
                out = jacobian(net, sch, tape, max_rows=max_rows)
                return clock.now() - t0, out
            except RuntimeError as exc:
                if not is_oom(exc) or max_rows <= 2:
                    raise
                ooms += 1
                max_rows //= 2
                C.log(f"jacobian: out of memory, retrying with max_rows={max_rows}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    S = args.sample_steps
    P = min(args.jac_probe_steps, S)
    reset_peak(device)
    t_probe, _ = jac(P)  # also warms up kernels / cuDNN at the Jacobian's shapes
    per_step = t_probe / max(P - 1, 1)  # the first step has no tangent pass
    predicted = per_step * (S - 1)
    left = deadline - time.perf_counter()
    C.log(f"jacobian: probe {P} steps {t_probe:.2f} s, predicted {predicted:.1f} s for {S} "
          f"steps, {left:.0f} s left")
    steps = S if predicted <= left else max(P, min(S, int(left * 0.8 / per_step)))
    t, out = jac(steps)
    full = steps == S
    seconds = t if full else t * (S - 1) / max(steps - 1, 1)
    res = {
        "jacobian_seconds": round(seconds, 3),
        "jacobian_extrapolated": not full,
        "jacobian_steps_measured": steps,
        "jacobian_seconds_measured": round(t, 3),
        "jacobian_probe": {"steps": P, "seconds": round(t_probe, 3),
                           "predicted_full_seconds": round(predicted, 2)},
        "jacobian_max_rows": max_rows,
        "jacobian_oom_retries": ooms,
        "jacobian_max_memory_allocated": peak_bytes(device),
    }
    return res, (out if full else None)


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    env = C.configure(args)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("CUDA is not available: run with --device cpu or --cpu-smoke")
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    clock = Clock(device)
    deadline = start + args.budget_s

    C.log(f"loading {args.data}")
    ens, x_all, data = build(args, device)
    C.log(f"training {args.preset}: n={ens.n}, {num_parameters(ens.net)} params/member")
    out: dict[str, Any] = {"bench": "gpu", "quick": args.quick}
    out.update(run_training(ens, x_all, args, device, clock))

    ens.for_inference(device)
    seeds = list(range(args.seed, args.seed + args.samples))
    tape = make_tape(seeds, ens.shape, args.sample_steps)
    sample(ens.net, ens.schedule, make_tape(seeds, ens.shape, 2))  # warm-up
    reset_peak(device)
    C.log(f"sampling: {args.samples} samples x {args.sample_steps} steps")
    t0 = clock.now()
    x0 = sample(ens.net, ens.schedule, tape)
    t_sample = clock.now() - t0
    out["sample_seconds"] = round(t_sample, 3)
    out["sample_steps_per_s"] = round(args.sample_steps / t_sample, 2)
    out["sample_max_memory_allocated"] = peak_bytes(device)

    jres, jout = run_jacobian(ens, seeds, args, device, clock, deadline)
    out.update(jres)
    out["jacobian_over_sample"] = C.ratio(jres["jacobian_seconds"], t_sample)
    if jout is not None:
        f, J = jout
        out["jacobian_f_vs_sample_max_abs_diff"] = float((f - x0).abs().max())
        out["jacobian_shape"] = list(J.shape)
        out["jacobian_finite"] = bool(torch.isfinite(J).all())
    out["max_memory_allocated"] = peak_bytes(device)
    if device.type == "cuda":
        out["max_memory_allocated_gib"] = round(out["max_memory_allocated"] / 2**30, 2)
        out["device_name"] = torch.cuda.get_device_name(device)
    out["total_seconds"] = round(time.perf_counter() - start, 2)
    out["config"] = {
        "preset": args.preset, "n": ens.n, "k": ens.k, "T": ens.schedule.T,
        "unet": ens.net.config.to_dict(), "params_per_member": num_parameters(ens.net),
        "params_total": sum(p.numel() for p in ens.net.parameters()),
        "samples": args.samples, "sample_steps": args.sample_steps,
        "device": str(device), "data": data, "cpu_smoke": args.cpu_smoke,
        "budget_s": args.budget_s, "train_budget_s": args.train_budget_s,
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "tf32_conv": bool(torch.backends.cudnn.allow_tf32),
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "weights": f"trained {out['train_steps_done']} steps from random init",
        "log2_capacity": round(math.log2(math.comb(ens.n, ens.k)), 2), **env,
    }
    C.emit(out)


if __name__ == "__main__":
    main()
