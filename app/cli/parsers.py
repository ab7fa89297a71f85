"""The `attrib` command line: every command's flags, and which function runs it.

Only the flags live here, so that building the parser loads no engine: a command's module (and
torch, for those that compute) is imported when that command runs. `attrib serve`, `migrate` and
`key` start in the time Python, FastAPI and SQLAlchemy take; `train` or `attribute` load torch.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from typing import Any

from app.cli.common import DEFAULT_CKPT, add_device_flag, add_json_flag, positive_int
from app.queue import parse_queues
from experiments.configs import (
    CLASSIFIERS,
    CanariesConfig,
    ClassesConfig,
    CopiesConfig,
    ExperimentConfig,
    FidelityConfig,
)
from models.codes import GRANULARITIES
from models.presets import PRESETS
from models.scores import ALPHA, DECOYS, DEFAULT_SCORE, METRICS, SCORES, SET_SOURCE_SCORE


@dataclass(frozen=True)
class Command:
    """The function ``name`` of module ``module``, imported when the command runs."""

    module: str
    name: str

    def __call__(self, args: argparse.Namespace) -> None:
        getattr(importlib.import_module(self.module), self.name)(args)


def _default(cls: type[ExperimentConfig], name: str) -> Any:
    return cls.model_fields[name].default


def _queues(text: str) -> list[str]:
    try:
        return parse_queues(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_engine_parsers(sub: Any) -> None:
    """Register train, generate, attribute and info on the `attrib` sub-parser set ``sub``."""

    def common(sp: argparse.ArgumentParser) -> None:
        add_device_flag(sp)
        add_json_flag(sp)

    def seeds(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--ckpt", default=DEFAULT_CKPT, help=f"checkpoint (default {DEFAULT_CKPT})")
        sp.add_argument("--seeds", help="seeds, e.g. '0,3,9' or '0-15' (overrides --count)")
        sp.add_argument("--count", type=int, default=16, help="number of samples (default 16)")
        sp.add_argument("--seed-start", type=int, default=0, help="first seed with --count")
        sp.add_argument("--steps", type=int, default=None,
                        help="sampling steps (default: the ensemble's T; fewer are respaced)")

    t = sub.add_parser("train", help="train an encoded ensemble",
                       description="Train n DDPM members at once, each on the items whose "
                                   "source code has its bit set. Saves a resumable checkpoint.")
    t.add_argument("--data", default="digits",
                   help="'digits' (sklearn, default), an .npz with images/labels, an MNIST IDX "
                        "images file, or a folder of PNG/JPEG images (subfolders = labels)")
    t.add_argument("--subset", type=int, default=None, help="train on a random subset of N items")
    t.add_argument("--subset-seed", type=int, default=0, help="seed of that subset")
    t.add_argument("--preset", choices=sorted(PRESETS), default="digits",
                   help="; ".join(f"{k}: {v.description}" for k, v in PRESETS.items()))
    t.add_argument("--n", type=int, default=16, help="ensemble size (default 16)")
    t.add_argument("--k", type=int, default=None, help="code weight (default n/2)")
    t.add_argument("--granularity", choices=GRANULARITIES, default="item",
                   help="what one code stands for: an item, a class (label) or an owner")
    t.add_argument("--owners", help="CSV of item_index,owner lines (for --granularity owner)")
    t.add_argument("--steps", type=int, default=None, help="training steps (default: preset's)")
    t.add_argument("--batch-size", type=int, default=None, help="items per member per step")
    t.add_argument("--lr", type=float, default=None, help="Adam learning rate")
    t.add_argument("--seed", type=int, default=0, help="seed for codes, init and minibatches")
    t.add_argument("--checkpoint-every", type=int, default=200, help="save every N steps")
    t.add_argument("--out", default=DEFAULT_CKPT, help=f"checkpoint path (default {DEFAULT_CKPT})")
    t.add_argument("--resume", action="store_true", help="continue training --out to --steps")
    common(t)
    t.set_defaults(func=Command("app.cli.engine", "cmd_train"))

    g = sub.add_parser("generate", help="sample a PNG grid",
                       description="Sample from the full ensemble (w = 1/n); each seed fixes "
                                   "the whole noise tape, so output is reproducible.")
    seeds(g)
    g.add_argument("--out", default="runs/samples.png", help="PNG grid path")
    g.add_argument("--scale", type=int, default=4, help="pixel upscaling in the grid")
    common(g)
    g.set_defaults(func=Command("app.cli.engine", "cmd_generate"))

    a = sub.add_parser("attribute", help="rank training sources for generated samples",
                       description="Synthetic ablation: one forward-mode Jacobian per sample "
                                   "scores every source (resemblance and influence); the top "
                                   "--verify-top-k are re-ranked by exact counterfactuals; decoy "
                                   "p-values say whether a sample is attributable; a copy check "
                                   "says whether it is a near-copy of a training image.")
    seeds(a)
    a.add_argument("--data", default=None,
                   help="training data (default: the spec stored in the checkpoint)")
    a.add_argument("--top-k", type=int, default=10, help="sources reported per sample")
    a.add_argument("--metric", choices=METRICS, default="l2", help="distance (default l2)")
    a.add_argument("--rerank", type=int, default=50, help="candidates LPIPS re-ranks")
    a.add_argument("--score", choices=SCORES, default=None,
                   help=f"what ranks (default {DEFAULT_SCORE} for item sources, {SET_SOURCE_SCORE} for "
                        "class and owner sources and with --metric lpips); both are reported")
    a.add_argument("--verify-top-k", type=int, default=50,
                   help="exact counterfactuals for the synthetic top K, re-ranked by them (default 50, "
                        "the service's; 0: synthetic only)")
    a.add_argument("--decoys", type=int, default=DECOYS,
                   help=f"decoy codes the p-values count against (default {DECOYS})")
    a.add_argument("--alpha", type=float, default=ALPHA,
                   help=f"family-wise error level of 'attributable' (default {ALPHA})")
    a.add_argument("--lpips-random-trunk", action="store_true",
                   help="TESTING ONLY: LPIPS with a random trunk (no ImageNet weights)")
    a.add_argument("--out-json", default=None, help="write the JSON report here")
    a.add_argument("--out-png", default=None, help="write a Figure-2-style PNG here")
    a.add_argument("--figure-top", type=int, default=3, help="training images per sample in PNG")
    common(a)
    a.set_defaults(func=Command("app.cli.engine", "cmd_attribute"))

    i = sub.add_parser("info", help="describe a checkpoint")
    i.add_argument("--ckpt", default=DEFAULT_CKPT, help=f"checkpoint (default {DEFAULT_CKPT})")
    add_json_flag(i)
    i.set_defaults(func=Command("app.cli.engine", "cmd_info"))


def add_validate_parsers(sub: Any) -> None:
    """Register `validate` with its sub-commands on the `attrib` sub-parser set ``sub``."""
    v = sub.add_parser("validate", help="acceptance experiments: class control, fidelity, copies, canaries",
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
        sp.set_defaults(func=Command("app.cli.validate", "cmd_validate"))

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
    p.add_argument("--far-draws", type=int, default=_default(CopiesConfig, "far_draws"),
                   help="random training images dropped per sample for the false attribution rate's "
                        "u_r (default %(default)s)")

    k = vs.add_parser("canaries", help="a benchmark whose truth is known: planted, duplicated works",
                      description="A few works are made distinctive (inverted) and duplicated in their "
                                  "members' splits; samples near one must name it (first, attributable, "
                                  "causally by the authors' FAR), other samples must not name a canary, "
                                  "and with the codes shuffled nothing may be attributable. Trains its own "
                                  "ensemble.")
    common(k, CanariesConfig)
    k.add_argument("--canaries", type=int, default=_default(CanariesConfig, "canaries"),
                   help="works made canaries (default %(default)s)")
    k.add_argument("--duplicates", type=int, default=_default(CanariesConfig, "duplicates"),
                   help="times each canary is listed in its members' splits (default %(default)s)")
    k.add_argument("--canary-seed", type=int, default=_default(CanariesConfig, "canary_seed"),
                   help="which works become canaries")
    k.add_argument("--copy-ratio", type=float, default=_default(CanariesConfig, "copy_ratio"),
                   help="near a canary: nearest training image is the canary, within this times the "
                        "training set's median nearest-neighbour distance")
    k.add_argument("--verify-top-k", type=int, default=_default(CanariesConfig, "verify_top_k"),
                   help="synthetic top K re-ranked exactly (default %(default)s, the service's)")
    k.add_argument("--decoys", type=int, default=_default(CanariesConfig, "decoys"),
                   help="decoy codes of the p-values (default %(default)s)")
    k.add_argument("--far-draws", type=int, default=_default(CanariesConfig, "far_draws"),
                   help="random works dropped per sample for FAR's u_r (default %(default)s)")


def add_operations_parsers(sub: Any) -> None:
    """Register migrate, import, owner, key and register on the `attrib` sub-parser set ``sub``."""
    m = sub.add_parser("migrate", help="create or update the database schema (Alembic)",
                       description="Apply migrations to DATABASE_URL (default: SQLite under ./data).")
    m.add_argument("action", nargs="?", choices=("upgrade", "downgrade", "check"), default="upgrade")
    m.add_argument("--revision", default=None, help="target (default head for upgrade, base for downgrade)")
    add_json_flag(m)
    m.set_defaults(func=Command("app.cli.operations", "cmd_migrate"))

    i = sub.add_parser("import", help="import a dataset as training works",
                       description="Store every image as a training work (PNG stored once), with "
                                   "optional rights holders; prints each new holder's key once.")
    i.add_argument("--data", default="digits", help="digits, an .npz, an IDX file or an image folder")
    i.add_argument("--subset", type=int, default=None, help="a random subset of N items")
    i.add_argument("--subset-seed", type=int, default=0)
    i.add_argument("--name", default=None, help="dataset name (default: the data's name)")
    g = i.add_mutually_exclusive_group()
    g.add_argument("--owners", help="CSV of item_index,owner lines")
    g.add_argument("--owners-by-label", type=int, metavar="M", help="M rights holders, each owning "
                   "consecutive classes (demo)")
    add_json_flag(i)
    i.set_defaults(func=Command("app.cli.operations", "cmd_import"))

    o = sub.add_parser("owner", help="rights holders")
    osub = o.add_subparsers(dest="owner_command", required=True)
    oa = osub.add_parser("add", help="add a rights holder and print their key (once)")
    oa.add_argument("name")
    add_json_flag(oa)
    oa.set_defaults(func=Command("app.cli.operations", "cmd_owner_add"))

    k = sub.add_parser("key", help="API keys (stored hashed; shown once at creation)")
    ksub = k.add_subparsers(dest="key_command", required=True)
    kc = ksub.add_parser("create", help="create an operator key, or a key for --owner")
    kc.add_argument("--owner", default=None, help="rights holder name (default: an operator key)")
    kc.add_argument("--name", default=None, help="a label for the key")
    add_json_flag(kc)
    kc.set_defaults(func=Command("app.cli.operations", "cmd_key_create"))
    kr = ksub.add_parser("revoke", help="revoke a key by its prefix")
    kr.add_argument("prefix", help="the 12 hex characters after 'attrib_'")
    add_json_flag(kr)
    kr.set_defaults(func=Command("app.cli.operations", "cmd_key_revoke"))
    kl = ksub.add_parser("list", help="list keys (prefixes only)")
    add_json_flag(kl)
    kl.set_defaults(func=Command("app.cli.operations", "cmd_key_list"))

    r = sub.add_parser("register", help="register a trained ensemble with the service",
                       description="The ensemble's training data must be imported first (same content).")
    r.add_argument("--ckpt", required=True)
    r.add_argument("--name", default=None, help="ensemble name (default: the file's stem)")
    add_json_flag(r)
    r.set_defaults(func=Command("app.cli.operations", "cmd_register"))

    oo = sub.add_parser("opt-out", help="withdraw a training work (exact unlearning)",
                        description="At once, every ensemble that trained on the work serves from the "
                                    "members that never saw it; a retrain job (run by a service's worker, or "
                                    "by 'attrib retrain') then retrains those members without it.")
    oo.add_argument("work", type=positive_int, help="the work's id (training item id, as GET /works shows)")
    oo.add_argument("--reason", default="", help="why it is withdrawn (kept with the opt-out)")
    add_json_flag(oo)
    oo.set_defaults(func=Command("app.cli.operations", "cmd_opt_out"))

    rt = sub.add_parser("retrain", help="retrain the members opt-outs dropped, in this process",
                        description="For every ensemble serving without the members of withdrawn works (or "
                                    "--lineage), retrain those members from scratch without them and serve "
                                    "the result as a new version: what the service's retrain job does.")
    rt.add_argument("--lineage", type=positive_int, default=None,
                    help="only this ensemble lineage (its first version's id)")
    add_device_flag(rt)
    add_json_flag(rt)
    rt.set_defaults(func=Command("app.cli.operations", "cmd_retrain"))


def add_serve_parsers(sub: Any) -> None:
    """Register demo-setup, serve and worker on the `attrib` sub-parser set ``sub``."""
    d = sub.add_parser("demo-setup", help="schema, digits with demo rights holders, a trained ensemble, keys")
    d.add_argument("--preset", default="digits", help="network preset of the demo ensemble")
    d.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    add_json_flag(d)
    d.set_defaults(func=Command("app.cli.demo", "cmd_demo_setup"))

    sv = sub.add_parser("serve", help="serve the HTTP API (and run workers)",
                        description="Embedded default: migrates SQLite under ./data and starts one "
                                    "worker process with the filesystem broker.")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--workers", type=int, default=1, help="interactive worker processes to start, besides "
                    "one for the long queue (0: no workers)")
    sv.add_argument("--api-processes", type=positive_int, default=None,
                    help="HTTP server processes (default: ATTRIB_API_PROCESSES, else 1); on a machine "
                         "with spare cores, more serve more requests at once")
    sv.add_argument("--loglevel", default="info")
    sv.add_argument("--access-log", action="store_true", help="log every request")
    sv.set_defaults(func=Command("app.cli.serve", "cmd_serve"))

    w = sub.add_parser("worker", help="run a Celery worker for the configured broker and database")
    w.add_argument("--queues", type=_queues, default=["interactive", "long"],
                   help="queues it takes jobs from, comma-separated: interactive (generate, attribute, "
                        "small batches), long (validations, large batches); default both")
    w.add_argument("--concurrency", type=positive_int, default=1, help="processes (one job each at a time)")
    w.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads per process (default: ATTRIB_WORKER_THREADS)")
    w.add_argument("--loglevel", default="INFO")
    w.set_defaults(func=Command("app.cli.serve", "cmd_worker"))
