"""The paper-scale copies run, for one CUDA GPU (an H100; < 10 minutes in all; bench/gpu_copies.sh).

1. A 300-image MNIST subset (paper Figure 2a), n = 16, k = 8 item codes.
2. The member size: the paper preset's layout (3 levels, attention at 14x14, T = 1000) at each
   of --widths base channels, widest first. Each width trains a few steps (the probe: its first
   seconds), and the widest whose measured rate reaches --min-steps within --train-budget-s is
   kept (members big enough to memorise 300 images need many epochs: the authors' follow-up
   trained ~10^6/N); if none does, the narrowest, for as many steps as fit.
3. Trains it (models.train) into OUT/ensemble.pt, resumable, and runs the copies validation on it
   (experiments.copies: the service's attribution with the exact top --verify-top-k, the selective
   test, the shuffled control, the authors' FAR, and --exact exact ablations of every source for
   the near-copies), writing OUT/report.json and OUT/copies.png.

--cpu-smoke runs the same code path on the CPU with toy sizes (the suite runs it). Prints one JSON
object as the last stdout line; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import _common as C
import torch

from experiments import run as run_experiment
from experiments.configs import Checkpoint, CopiesConfig
from models.codes import default_k, make_codebook
from models.data import ImageDataset, load_data
from models.ensemble import PRESETS, DatasetInfo, Ensemble
from models.train import TrainConfig, train
from models.unet import UNetConfig, num_parameters

DEFAULT_DATA = "../shared/data/mnist10k.npz"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=C.HelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="the same code path on the CPU, toy sizes")
    p.add_argument("--device", default="cuda")
    p.add_argument("--data", default=os.environ.get("DATA", DEFAULT_DATA), help="dataset spec (env DATA)")
    p.add_argument("--subset", type=int, default=300, help="training images (the paper's Figure 2a: 300)")
    p.add_argument("--n", type=int, default=16, help="ensemble size")
    p.add_argument("--widths", default="128,64,32", help="base channels to probe, widest first")
    p.add_argument("--batch-size", type=int, default=64, help="images per member per step")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--min-steps", type=int, default=20000,
                   help="steps a width must reach within the training budget to be chosen")
    p.add_argument("--probe-steps", type=int, default=8, help="training steps timed per width")
    p.add_argument("--train-budget-s", type=float, default=330.0)
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--sample-steps", type=int, default=100, help="respaced sampling steps of the copies run")
    p.add_argument("--verify-top-k", type=int, default=50)
    p.add_argument("--exact", choices=("none", "copies", "all"), default="copies")
    p.add_argument("--out", default="runs/gpu-copies", help="folder for the ensemble and the report")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.cpu_smoke:
        args.device = "cpu"
        args.data = "digits"
        args.subset = 40
        args.n = 8
        args.widths = "8,4"
        args.batch_size = 4
        args.lr = 2e-3
        args.min_steps = 4
        args.probe_steps = 2
        args.train_budget_s = 20.0
        args.samples = 3
        args.sample_steps = 4
        args.verify_top_k = 5
    return args


def unet_of(width: int, shape: tuple[int, int, int], smoke: bool) -> UNetConfig:
    """The paper preset's layout at ``width`` base channels (toy norm groups in the smoke run)."""
    paper = PRESETS["paper"]
    attn = paper.attn_resolutions if shape[1] % 4 == 0 and shape[1] >= 14 else ()
    groups = 4 if smoke else min(paper.norm_groups, width)
    return UNetConfig(shape[0], shape[1], width, paper.channel_mults, paper.num_res_blocks, attn, groups,
                      paper.heads)


def fresh(args: argparse.Namespace, ds: ImageDataset, width: int) -> Ensemble:
    """A new ensemble at ``width`` on ``ds``; its DatasetInfo records the data spec, so the copies run
    reloads it."""
    book = make_codebook(ds.N, args.n, default_k(args.n), seed=args.seed)
    info = DatasetInfo(ds.name, ds.fingerprint(), ds.N, ds.shape, args.data, args.subset, 0)
    return Ensemble.create(PRESETS["paper"], book, info, seed=args.seed, unet=unet_of(width, ds.shape,
                                                                                       args.cpu_smoke))


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("gpu_copies: no CUDA device (use --cpu-smoke to run the code path on the CPU)")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_data(args.data, args.subset, 0)
    x = ds.to_tensor()
    probes: list[dict[str, Any]] = []
    chosen: tuple[int, float] | None = None
    widths = [int(w) for w in args.widths.split(",")]
    for width in widths:  # widest first: the first that reaches min_steps in the budget is kept
        ens = fresh(args, ds, width)
        ens.net.to(device)
        cfg = TrainConfig(1, args.batch_size, args.lr, seed=args.seed)
        train(ens, x, cfg)  # warm-up (kernels, allocator) outside the timing
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        train(ens, x, TrainConfig(1 + args.probe_steps, args.batch_size, args.lr, seed=args.seed))
        if device.type == "cuda":
            torch.cuda.synchronize()
        rate = args.probe_steps / (time.perf_counter() - start)
        reach = int(rate * args.train_budget_s)
        probes.append({"width": width, "parameters_per_member": num_parameters(ens.net) // args.n,
                       "steps_per_s": round(rate, 3), "steps_in_budget": reach})
        C.log(f"width {width}: {rate:.2f} steps/s, {reach} steps in {args.train_budget_s:.0f} s")
        if reach >= args.min_steps:
            chosen = (width, rate)
            break
    if chosen is None:
        chosen = (widths[-1], probes[-1]["steps_per_s"])
    width, rate = chosen
    steps = max(1, min(args.min_steps * 4, int(rate * args.train_budget_s)))
    ens = fresh(args, ds, width)
    ens.net.to(device)
    ckpt = out / "ensemble.pt"
    t_train = time.perf_counter()
    every = max(steps // 4, 1)
    train(ens, x, TrainConfig(steps, args.batch_size, args.lr, seed=args.seed, checkpoint_every=every),
          checkpoint=ckpt)
    train_s = time.perf_counter() - t_train
    config = CopiesConfig(ensemble=Checkpoint(checkpoint=str(ckpt)), samples=args.samples,
                          steps=args.sample_steps, verify_top_k=args.verify_top_k, exact=args.exact,
                          seed=args.seed)
    t_copies = time.perf_counter()
    report = run_experiment(config, out, device=device, log=C.log)
    numbers = report.numbers
    causal = numbers["trust"]["causal"]
    print(json.dumps({
        "bench": "gpu_copies", "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "probes": probes, "width": width, "train_steps": steps, "train_seconds": round(train_s, 1),
        "copies_seconds": round(time.perf_counter() - t_copies, 1),
        "total_seconds": round(time.perf_counter() - t0, 1), "n_copies": numbers["n_copies"],
        "targets": {name: o.to_json() for name, o in report.targets.items()}, "passed": report.passed,
        "far": {m: causal["far"][m]["far"] for m in causal["far"]},
        "report": str(out / "report.json"), "headline": report.headline}))


if __name__ == "__main__":
    main()
