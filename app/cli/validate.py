"""`attrib validate classes|fidelity|copies`: acceptance evidence for the attributions.

The flags are the fields of the experiment's config (experiments/): each command turns its
flags into that config, runs the experiment (which trains the ensemble it needs, or takes
``--checkpoint``) and prints its summary (or its report with ``--json``); ``report.json`` and
PNG figures go into ``--out DIR``, with a progress bar per stage on stderr. Defaults are the
configs' own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from app.cli.common import CLIError, device, log
from experiments import CONFIGS, AnyConfig, run
from experiments.classes import ClassesConfig
from experiments.classifiers import CLASSIFIERS
from experiments.common import ENSEMBLE_OPTIONS, ExperimentConfig, ExperimentError
from experiments.copies import CopiesConfig
from experiments.fidelity import FidelityConfig
from models.ensemble import PRESETS


class _Progress:
    """One tqdm bar per stage on stderr (none with --json)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bars: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, file=sys.stderr, leave=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            del self.bars[stage]


def cmd_validate(args: argparse.Namespace) -> None:
    config = config_of(args)
    out = Path(args.out)
    try:
        report = run(config, out, _Progress(args.json), device=device(args.device), log=log)
    except ExperimentError as exc:
        raise CLIError(str(exc)) from exc
    print(json.dumps(report.to_json()) if args.json else f"{report.headline}\nwrote {out / 'report.json'}")


def config_of(args: argparse.Namespace) -> AnyConfig:
    """The config the parsed flags of `attrib validate EXPERIMENT` stand for."""
    cls = CONFIGS[args.experiment]
    names = set(cls.model_fields) | set(ENSEMBLE_OPTIONS)
    options = {name: value for name, value in vars(args).items() if name in names}
    if "no_lpips" in vars(args):
        options["lpips"] = not args.no_lpips
    if "sources" in options:
        options["sources"] = _sources(args.sources)
    try:
        return cls.from_options(options)
    except ValidationError as exc:
        # one line per flag; a union field (--sources N|all) lists what each branch wanted
        wanted: dict[str, list[str]] = {}
        for error in exc.errors():
            flag = next((str(p) for p in reversed(error["loc"]) if str(p) in names), str(error["loc"][0]))
            wanted.setdefault(flag, []).append(error["msg"])
        raise CLIError("; ".join(f"--{flag.replace('_', '-')}: {' or '.join(msgs)}"
                                 for flag, msgs in wanted.items())) from None


def _sources(text: str) -> int | Literal["all"]:
    if text == "all":
        return "all"
    try:
        return int(text)
    except ValueError:
        raise CLIError(f"--sources: expected 'all' or a positive integer, got {text!r}") from None


def _default(cls: type[ExperimentConfig], name: str) -> Any:
    return cls.model_fields[name].default


# ------------------------------------------------------------------------ parser
def add_parsers(sub: Any) -> None:
    """Register `validate` with its sub-commands on the `attrib` sub-parser set ``sub``."""
    v = sub.add_parser("validate", help="acceptance experiments: class control, fidelity, copies",
                       description="Validation experiments. Each writes report.json and PNG "
                                   "figures into --out DIR. The service runs the same as jobs: "
                                   "POST /validations.")
    vs = v.add_subparsers(dest="experiment", required=True)

    def common(sp: argparse.ArgumentParser, cls: type[ExperimentConfig]) -> None:
        training = _default(cls, "ensemble")
        samples = _default(cls, "samples")
        sp.add_argument("--out", required=True, help="folder for report.json and the figures")
        sp.add_argument("--checkpoint", default=None,
                        help="use this trained ensemble instead of training one (its data is "
                             "reloaded from the spec stored in it)")
        sp.add_argument("--data", default=None, help=f"training data (default {training.data!r}): digits, "
                        ".npz, MNIST IDX, or an image folder")
        sp.add_argument("--subset", type=int, default=training.subset,
                        help=f"train on a random subset of N items (default {training.subset})")
        sp.add_argument("--subset-seed", type=int, default=training.subset_seed, help="seed of that subset")
        sp.add_argument("--preset", choices=sorted(PRESETS), default=training.preset, help="network preset")
        sp.add_argument("--n", type=int, default=training.n, help=f"ensemble size (default {training.n})")
        sp.add_argument("--k", type=int, default=None, help="code weight (default n/2)")
        sp.add_argument("--train-steps", type=int, default=None, help="training steps (default: preset's)")
        sp.add_argument("--batch-size", type=int, default=None, help="items per member per step")
        sp.add_argument("--lr", type=float, default=None, help="Adam learning rate")
        sp.add_argument("--seed", type=int, default=_default(cls, "seed"),
                        help="seed for codes, training, subsets")
        sp.add_argument("--samples", type=int, default=samples, help=f"generated samples (default {samples})")
        sp.add_argument("--seed-start", type=int, default=_default(cls, "seed_start"),
                        help="first sample seed")
        sp.add_argument("--steps", type=int, default=None, help="sampling steps (default: T)")
        sp.add_argument("--chunk", type=int, default=_default(cls, "chunk"),
                        help="counterfactual trajectories per pass")
        sp.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (default)")
        sp.add_argument("--json", action="store_true", help="print the report as one JSON object")
        sp.set_defaults(func=cmd_validate)

    c = vs.add_parser("classes", help="class-ablation control (paper Figure 1c)",
                      description="Sources are whole classes. Classify each sample and ablate "
                                  "every class exactly: the predicted class should move it most.")
    common(c, ClassesConfig)
    c.add_argument("--codes", choices=("balanced", "random"), default=_default(ClassesConfig, "codes"),
                   help="class codes when training: 'balanced' (Hadamard rows, every pair of classes "
                        "shares exactly n/4 members; default; n a power of two) or 'random' "
                        "(make_codebook's)")
    c.add_argument("--exclude-classes", default=None, metavar="A,B,...",
                   help="leave these classes out of the data (the paper's Figure 1b: 5,7,9)")
    c.add_argument("--classifier", choices=CLASSIFIERS, default=_default(ClassesConfig, "classifier"),
                   help="svc (default), logreg, mlp (scikit-learn) or cnn (a small PyTorch CNN)")
    c.add_argument("--min-confidence", type=float, default=_default(ClassesConfig, "min_confidence"),
                   help="'confident' classification")
    c.add_argument("--no-lpips", action="store_true", help="Euclidean distance only")
    c.add_argument("--lpips-random-trunk", action="store_true",
                   help="TESTING ONLY: LPIPS with a random trunk (no ImageNet weights)")
    c.add_argument("--grid-rows", type=int, default=_default(ClassesConfig, "grid_rows"),
                   help="samples in the counterfactual grid")
    c.add_argument("--raw", action="store_true", help="include every distance in the report")

    f = vs.add_parser("fidelity", help="synthetic vs exact influence, and a pixel baseline",
                      description="Exact counterfactuals of every source (or a random subset "
                                  "plus the synthetic and pixel top candidates) against "
                                  "synthetic ablation.")
    common(f, FidelityConfig)
    f.add_argument("--granularity", choices=("item", "owner", "class"),
                   default=_default(FidelityConfig, "granularity"), help=argparse.SUPPRESS)
    sources = _default(FidelityConfig, "sources")
    f.add_argument("--sources", default=str(sources),
                   help=f"N (default {sources}): a random N sources per sample plus the synthetic and pixel "
                        "top --top (every source when there are at most N), or 'all'")
    f.add_argument("--top", type=int, default=_default(FidelityConfig, "top"),
                   help="top candidates added with --sources N; also the deepest screen-then-verify "
                        "depth reported (recall@k of the synthetic top m re-ranked exactly, "
                        "m = 2k and --top)")
    recall_k = _default(FidelityConfig, "recall_k")
    f.add_argument("--recall-k", type=int, default=recall_k, help=f"k of recall@k (default {recall_k})")
    f.add_argument("--broken", action="store_true",
                   help="CONTROL: replace synthetic scores by random ones (must fail the targets)")

    p = vs.add_parser("copies", help="copy detection on a small training set (paper Figure 2a)",
                      description="Samples that nearly copy a training image should be attributed "
                                  "to that image first, and called attributable; with the codes "
                                  "shuffled after training (a control), nothing may be.")
    common(p, CopiesConfig)
    copy_ratio = _default(CopiesConfig, "copy_ratio")
    p.add_argument("--copy-ratio", type=float, default=copy_ratio,
                   help="near-copy: nearest training image within this times the training set's "
                        f"median nearest-neighbour distance (default {copy_ratio})")
    p.add_argument("--top", type=int, default=_default(CopiesConfig, "top"),
                   help="synthetic top-K kept per sample")
    p.add_argument("--grid", type=int, default=_default(CopiesConfig, "grid"),
                   help="samples shown in the figure")
    p.add_argument("--exact", choices=("none", "copies", "all"), default=_default(CopiesConfig, "exact"),
                   help="also ablate every source exactly for the near-copies (or all samples): "
                        "whether the exact top source is the copied image, i.e. whether a miss is "
                        "the estimate's or the model's (samples x sources diffusion runs)")
    p.add_argument("--verify-top-k", type=int, default=_default(CopiesConfig, "verify_top_k"),
                   help="the service's attribution: synthetic top K re-ranked exactly (default "
                        f"{_default(CopiesConfig, 'verify_top_k')}, the service's)")
    p.add_argument("--decoys", type=int, default=_default(CopiesConfig, "decoys"),
                   help="decoy codes of the p-values (default %(default)s)")
    p.add_argument("--exact-decoys", type=int, default=_default(CopiesConfig, "exact_decoys"),
                   help="decoys also run exactly, for exact p-values (default %(default)s)")
