"""Cost of an opt-out's retrain against a full retrain (DESIGN.md: k/n of a full training).

On the real 8x8 digits with the "digits" preset (n=16, k=8), the same number of training
steps, batch size and learning rate:

* full: a fresh wide network of all n members trained on the code book's splits
  (models.train.fit), what retraining the whole ensemble without a work would cost;
* retrain: models.unlearn.retrain of the k members of one withdrawn source, from scratch,
  spliced back into the ensemble (what the service's retrain job runs).

cost_ratio = retrain / full (wall and CPU, best of N, interleaved); expected_ratio = k/n.
Prints one JSON object as the last stdout line; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import _common as C
import torch

from models.train import TrainConfig, fit
from models.unet import WideUNet
from models.unlearn import plan_retrain, retrain

WITHDRAWN_SOURCE = 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=C.HelpFormatter)
    C.add_common_args(p)
    p.add_argument(
        "--steps", type=int, default=None, help="training steps of each run (default 60, 15 with --quick)"
    )
    p.add_argument("--batch-size", type=int, default=32, help="training images per member per step")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    env = C.configure(args)
    steps = args.steps or (15 if args.quick else 60)
    ens, ds = C.digits_ensemble(args.seed)
    x = ds.to_tensor()
    cfg = TrainConfig(steps, args.batch_size, 2e-3, args.seed, checkpoint_every=steps + 1)
    plan = plan_retrain(ens.codebook, [WITHDRAWN_SOURCE])
    splits = [torch.from_numpy(s) for s in ens.codebook.withdraw([WITHDRAWN_SOURCE]).member_items()]
    C.log(f"{steps} steps: full ({ens.n} members) vs retrain ({len(plan.members)} members)")
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state.pt"

        def full() -> None:
            net = WideUNet(ens.net.config, ens.n, torch.Generator().manual_seed(args.seed))
            fit(net, ens.schedule, splits, x, cfg)

        def only_s() -> None:
            state.unlink(missing_ok=True)
            retrain(ens, plan, x, cfg, state_path=state)

        tm, _ = C.interleaved({"full": full, "retrain": only_s}, args.repeats)
    out = {
        "bench": "retrain",
        "quick": args.quick,
        "cost_ratio": C.ratio(tm["retrain"].wall, tm["full"].wall),
        "cost_ratio_cpu": C.ratio(tm["retrain"].cpu, tm["full"].cpu),
        "expected_ratio": round(len(plan.members) / ens.n, 3),
        "members_retrained": len(plan.members),
        "full": tm["full"].as_dict(),
        "retrain": tm["retrain"].as_dict(),
        "config": {
            "preset": "digits",
            "n": ens.n,
            "k": ens.k,
            "steps": steps,
            "batch_per_member": args.batch_size,
            "params_per_member": C.params_per_member(ens.net),
            "dataset": f"digits N={ds.N}",
            "repeats": args.repeats,
            **env,
        },
    }
    C.emit(out, tm["full"], tm["retrain"])


if __name__ == "__main__":
    main()
