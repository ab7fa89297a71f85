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
from models.train import Batch, draw_batch, member_losses

TARGET_SAMPLE = 2.5
TARGET_TRAIN = 3.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    wide_t, loop_t = C.Timing(), C.Timing()
    C.log(f"sampling: {args.samples} samples x {args.sample_steps} steps, warm-up")
    warm = make_tape(tape.seeds, ens.shape, 3)  # warm-up at the timed shapes
    sample(net, ens.schedule, warm)
    sample_loop(members, ens.schedule, warm)
    wide = loop = None
    for r in range(env_repeats):  # interleaved, so both see the same machine load
        _, wide = C.measure(lambda: sample(net, ens.schedule, tape), 1, wide_t)
        _, loop = C.measure(lambda: sample_loop(members, ens.schedule, tape), 1, loop_t)
        C.log(f"  repeat {r}: wide {wide_t.walls[-1]:.3f} s (cpu {wide_t.cpus[-1]:.3f}), "
              f"loop {loop_t.walls[-1]:.3f} s (cpu {loop_t.cpus[-1]:.3f})")
    assert wide is not None and loop is not None
    return {
        "sample_speedup": C.ratio(loop_t.wall, wide_t.wall),
        "sample_speedup_cpu": C.ratio(loop_t.cpu, wide_t.cpu),
        "max_abs_diff": float((wide - loop).abs().max()),
        "sample_wide": wide_t.as_dict(),
        "sample_loop": loop_t.as_dict(),
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
    opt_wide = torch.optim.Adam(wide.parameters(), lr=lr)
    opt_loop = [torch.optim.Adam(m.parameters(), lr=lr) for m in loop]

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
    nb = 1 + k * repeats  # one warm-up step, then `repeats` timed chunks of k steps
    draw_t, batches = C.measure(
        lambda: [draw_batch(x_all, splits, args.batch_size, T, g) for _ in range(nb)], 1)
    C.log(f"training: {wide.n} members x {args.batch_size} images, {k} steps per repeat")
    step_wide(batches[0])  # warm-up, also in lock-step for the parameter check
    step_loop(batches[0])
    wide_t, loop_t = C.Timing(), C.Timing()
    for r in range(repeats):
        chunk = batches[1 + r * k : 1 + (r + 1) * k]
        C.measure(lambda chunk=chunk: [step_wide(b) for b in chunk], 1, wide_t)
        C.measure(lambda chunk=chunk: [step_loop(b) for b in chunk], 1, loop_t)
        C.log(f"  repeat {r}: wide {wide_t.walls[-1] / k:.3f} s/step, "
              f"loop {loop_t.walls[-1] / k:.3f} s/step")
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
        "train_max_param_diff": diff,
        "train_wide": wide_t.as_dict(),
        "train_loop": loop_t.as_dict(),
        "train_steps_per_repeat": k,
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
    out.update(bench_sampling(ens, args, args.repeats))
    out.update(bench_training(ens, ds.to_tensor(), args, args.repeats))
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
    C.emit(out)


if __name__ == "__main__":
    main()
