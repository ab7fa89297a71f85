"""Wide (grouped-convolution) ensemble vs a Python loop over single-member networks.

Measures, on the real 8x8 digits with the "digits" preset (n=16, k=8):

* sample_speedup = time(models.sampler.sample_loop over [net.member(i)]) /
  time(models.sampler.sample, the batched wide pass), same noise tape; max_abs_diff checks
  that both give the same samples.
* train_speedup = time per step of 16 single-member nets, each its own forward/backward/
  Adam step on its own minibatch (slice i of the same models.train.draw_batch draws) /
  time per step of the wide step (member_losses(...).sum().backward(); Adam). Both see the
  same batches in the same order, so their parameters stay equal (train_max_param_diff).

Weights are random-init unless --train-steps is given (timing does not depend on them).
Prints one JSON object as the last stdout line; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import copy

import _common as C
import torch

from models.ensemble import PRESETS
from models.sampler import make_tape, sample, sample_loop
from models.train import Batch, draw_batch, make_optimizer, member_losses

TARGET_SAMPLE = 2.5
TARGET_TRAIN = 3.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=C.HelpFormatter)
    C.add_common_args(p)
    p.add_argument("--samples", type=int, default=16, help="samples per sampling run")
    p.add_argument("--sample-steps", type=int, default=None,
                   help="sampling steps (default 100 = T, 50 with --quick)")
    p.add_argument("--batch-size", type=int, default=32, help="training images per member")
    p.add_argument("--train-steps-timed", type=int, default=None,
                   help="training steps per timed repeat (default 5, 3 with --quick)")
    p.add_argument("--train-steps", type=int, default=0,
                   help="train the ensemble this many steps first (0 = random init)")
    return p.parse_args()


def bench_sampling(ens, args, env_repeats: int) -> dict:
    net = ens.net
    members = [net.member(i) for i in range(net.n)]
    for m in members:
        m.eval()
        for q in m.parameters():
            q.requires_grad_(False)
    tape = make_tape(list(range(args.seed, args.seed + args.samples)), ens.shape,
                     args.sample_steps)
    C.log(f"sampling: {args.samples} samples x {args.sample_steps} steps")
    warm = make_tape(tape.seeds, ens.shape, 3)  # warm-up at the timed shapes
    sample(net, ens.schedule, warm)
    sample_loop(members, ens.schedule, warm)
    tm, res = C.interleaved({"wide": lambda: sample(net, ens.schedule, tape),
                             "loop": lambda: sample_loop(members, ens.schedule, tape)},
                            env_repeats, budget_s=20.0 if args.quick else None)
    wide_t, loop_t, wide, loop = tm["wide"], tm["loop"], res["wide"], res["loop"]
    return {
        "sample_speedup": C.ratio(loop_t.wall, wide_t.wall),
        "sample_speedup_cpu": C.ratio(loop_t.cpu, wide_t.cpu),
        "max_abs_diff": float((wide - loop).abs().max()),
        "sample_wide": wide_t.as_dict(),
        "sample_loop": loop_t.as_dict(),
        "_timings": [wide_t, loop_t],
    }


def bench_training(ens, x_all, args, repeats: int) -> dict:
    g = torch.Generator().manual_seed(args.seed + 1)
    splits = [torch.from_numpy(s) for s in ens.codebook.member_items()]
    T = ens.schedule.T
    lr = PRESETS["digits"].lr
    wide = copy.deepcopy(ens.net).train()
    for q in wide.parameters():
        q.requires_grad_(True)
    loop = [wide.member(i).train() for i in range(wide.n)]
    for m in loop:
        for q in m.parameters():
            q.requires_grad_(True)
    opt_wide = make_optimizer(wide.parameters(), lr)
    opt_loop = [make_optimizer(m.parameters(), lr) for m in loop]

    def step_wide(b: Batch) -> None:
        losses = member_losses(wide, ens.schedule, b)
        opt_wide.zero_grad(set_to_none=True)
        losses.sum().backward()
        opt_wide.step()

    def step_loop(b: Batch) -> None:
        for i, (m, opt) in enumerate(zip(loop, opt_loop, strict=True)):
            bi = Batch(b.x_0[i : i + 1], b.t[i : i + 1], b.eps[i : i + 1])
            loss = member_losses(m, ens.schedule, bi)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()

    k = args.train_steps_timed
    max_rounds = 2 * repeats
    nb = 1 + k * max_rounds  # one warm-up step, then up to `max_rounds` chunks of k steps
    draw_t, batches = C.measure(
        lambda: [draw_batch(x_all, splits, args.batch_size, T, g) for _ in range(nb)], 1)
    C.log(f"training: {wide.n} members x {args.batch_size} images, {k} steps per repeat")
    step_wide(batches[0])  # warm-up, also in lock-step for the parameter check
    step_loop(batches[0])
    # Same batch, same init: member i's gradient must equal the wide gradient's slice i.
    grad_diff, grad_max = 0.0, 0.0
    for (name, p), i_m in ((np_, i) for np_ in wide.named_parameters() for i in range(wide.n)):
        gl = dict(loop[i_m].named_parameters())[name].grad
        gw = p.grad[i_m : i_m + 1]
        grad_diff = max(grad_diff, float((gw - gl).abs().max()))
        grad_max = max(grad_max, float(gw.abs().max()))
    it = iter(batches[1:])

    def chunk() -> list[Batch]:
        return [next(it) for _ in range(k)]

    # Both nets must see the same batches in the same order (parameter check), so every
    # round draws its chunk once and runs it on both.
    pending: list[list[Batch]] = []

    def run_wide() -> None:
        pending.append(chunk())
        for b in pending[-1]:
            step_wide(b)

    def run_loop() -> None:
        for b in pending.pop():
            step_loop(b)

    tm, _ = C.interleaved({"wide": run_wide, "loop": run_loop}, repeats,
                          max_repeats=max_rounds, budget_s=10.0 if args.quick else None)
    wide_t, loop_t = tm["wide"], tm["loop"]
    sd = wide.state_dict()
    diff = 0.0
    for i, m in enumerate(loop):
        for name, v in m.state_dict().items():
            diff = max(diff, float((sd[name][i : i + 1] - v).abs().max()))
    per = {"wall": wide_t.wall / k, "cpu": wide_t.cpu / k}
    per_loop = {"wall": loop_t.wall / k, "cpu": loop_t.cpu / k}
    return {
        "train_speedup": C.ratio(per_loop["wall"], per["wall"]),
        "train_speedup_cpu": C.ratio(per_loop["cpu"], per["cpu"]),
        "train_wide_s_per_step": round(per["wall"], 4),
        "train_loop_s_per_step": round(per_loop["wall"], 4),
        "train_draw_batch_s_per_step": round(draw_t.wall / nb, 4),
        "train_grad_max_rel_diff": grad_diff / grad_max,
        "train_max_param_diff": diff,
        "train_max_param_diff_in_lr_units": round(diff / lr, 3),
        "train_wide": wide_t.as_dict(),
        "train_loop": loop_t.as_dict(),
        "train_steps_per_repeat": k,
        "_timings": [wide_t, loop_t],
    }


def main() -> None:
    args = parse_args()
    env = C.configure(args)
    if args.sample_steps is None:
        args.sample_steps = 50 if args.quick else 100
    if args.train_steps_timed is None:
        args.train_steps_timed = 3 if args.quick else 5
    ens, ds = C.digits_ensemble(args.seed, args.train_steps)
    ens.for_inference()
    out: dict = {"bench": "ensemble", "quick": args.quick}
    s_res = bench_sampling(ens, args, args.repeats)
    t_res = bench_training(ens, ds.to_tensor(), args, args.repeats)
    timings = s_res.pop("_timings") + t_res.pop("_timings")
    out.update(s_res)
    out.update(t_res)
    out["targets"] = {"sample_speedup": f">= {TARGET_SAMPLE}", "train_speedup": f">= {TARGET_TRAIN}"}
    out["meets_targets"] = {"sample_speedup": out["sample_speedup"] >= TARGET_SAMPLE,
                            "train_speedup": out["train_speedup"] >= TARGET_TRAIN}
    out["config"] = {
        "preset": "digits", "n": ens.n, "k": ens.k, "T": ens.schedule.T,
        "unet": ens.net.config.to_dict(), "params_per_member": C.params_per_member(ens.net),
        "samples": args.samples, "sample_steps": args.sample_steps,
        "train_batch_per_member": args.batch_size, "repeats": args.repeats,
        "weights": C.weights_label(args.train_steps), "dataset": f"digits N={ds.N}", **env,
    }
    C.emit(out, *timings)


if __name__ == "__main__":
    main()
