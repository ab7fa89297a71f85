"""What every experiment shares: the config of how it gets its ensemble (a checkpoint, or
training options), typed targets and reports, the error a user's mistake raises, and the
sampling loops it runs (full-ensemble samples, exact ablations, synthetic scores).

Nothing here prints or draws a progress bar: long loops call ``progress(stage, done, total)``
and what a person may want to read goes to ``log(message)``.
"""

from __future__ import annotations

import json
import math
import operator
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from experiments.configs import Checkpoint, ExperimentConfig, Training
from models.ablation import ablation_weights, delta_w, gram, influence, jacobian
from models.codes import CapacityError
from models.data import DatasetError, ImageDataset, load_data
from models.ensemble import Ensemble
from models.sampler import NoiseTape, exact_counterfactuals, make_tape, sample
from models.train import TrainSpec, create_ensemble, train
from models.unet import WideUNet

ProgressFn = Callable[[str, int, int], None]
"""progress(stage, done, total): ``done`` of ``total`` units of ``stage`` are finished."""

LogFn = Callable[[str], None]
"""log(message): one line for a person (what is being trained, a fallback taken)."""


def ignore_progress(stage: str, done: int, total: int) -> None:
    return None


def ignore_log(message: str) -> None:
    return None


class ExperimentError(Exception):
    """A mistake in an experiment's config or data (an unknown class, steps past T, a checkpoint
    of the wrong granularity, ...): the message says what, in the words of the CLI's flags."""


# ============================================================================ targets and reports
Op = Literal[">=", ">", "<", "<="]
_COMPARE: dict[str, Callable[[Any, Any], Any]] = {">=": operator.ge, ">": operator.gt, "<": operator.lt,
                                                  "<=": operator.le}


@dataclass(frozen=True)
class Outcome:
    """A target and what was measured for it; ``met`` is None when it could not be measured
    (say, LPIPS without its weights), and ``details`` says more (a p-value's log10, why not)."""

    target: Target | Comparison
    value: Any
    met: bool | None
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, **self.details, "target": str(self.target), "met": self.met}


@dataclass(frozen=True)
class Target:
    """A threshold: the measured value must be ``op threshold``, e.g. Target(">=", 0.6).
    A NaN value never meets it."""

    op: Op
    threshold: float

    def __str__(self) -> str:
        return f"{self.op} {self.threshold:g}"

    def outcome(self, value: float, **details: Any) -> Outcome:
        return Outcome(self, value, bool(_COMPARE[self.op](value, self.threshold)), details)

    def unmeasured(self, **details: Any) -> Outcome:
        return Outcome(self, None, None, details)


@dataclass(frozen=True)
class Comparison:
    """One method must score ``op`` another, e.g. Comparison("synthetic", ">", "pixel")."""

    first: str
    op: Op
    second: str

    def __str__(self) -> str:
        return f"{self.first} {self.op} {self.second}"

    def outcome(self, first: float, second: float) -> Outcome:
        return Outcome(self, [first, second], bool(_COMPARE[self.op](first, second)))


@dataclass(frozen=True)
class Report:
    """What an experiment found.

    Attributes:
        experiment: what was run, e.g. "copy detection (paper Figure 2a)".
        targets: each target by name, with its value and whether it is met.
        numbers: everything else the report says (ensemble, statistics, per-sample rows, timings).
        figures: PNG files the experiment wrote into its folder (some may be absent when there
            was nothing to show).
        headline: one line for a person.
    """

    experiment: str
    targets: Mapping[str, Outcome]
    numbers: Mapping[str, Any]
    figures: tuple[str, ...]
    headline: str

    @property
    def passed(self) -> bool:
        """Every target that was measured is met, and at least one was measured."""
        measured = [o.met for o in self.targets.values() if o.met is not None]
        return bool(measured) and all(measured)

    def to_json(self) -> dict[str, Any]:
        """The report as written to report.json: JSON-safe (NaN and infinities as null)."""
        return _json_safe({"experiment": self.experiment, **self.numbers,
                           "targets": {name: o.to_json() for name, o in self.targets.items()},
                           "passed": self.passed, "figures": list(self.figures)})

    def write(self, out_dir: Path) -> Path:
        path = out_dir / "report.json"
        path.write_text(json.dumps(self.to_json(), indent=2))
        return path


def _json_safe(obj: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python, tuples -> lists, keys -> str."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ============================================================================ configs
# ============================================================================ the ensemble
@dataclass(frozen=True)
class Setup:
    """An experiment's ensemble, the data it was trained on (as used), what the report says of
    them, and the noise tape of the samples."""

    ensemble: Ensemble
    data: ImageDataset
    info: dict[str, Any]
    tape: NoiseTape
    steps: int


@dataclass(frozen=True)
class Planted:
    """Training data an experiment changed on purpose, and how many times each item is listed in
    its members' splits (``models.train.duplicated_splits``; None: once each)."""

    data: ImageDataset
    repeats: np.ndarray | None = None


def prepare(config: ExperimentConfig, out_dir: Path, *, granularity: str, device: torch.device,
            progress: ProgressFn, log: LogFn, codes: Literal["random", "balanced"] = "random",
            exclude_classes: Sequence[str] = (),
            plant: Callable[[ImageDataset], Planted] | None = None) -> Setup:
    """Load the config's checkpoint (checking its granularity and data) or train an ensemble
    into ``out_dir/ensemble.pt`` (on ``plant``'s data and repeats when given: only trained); then
    the tape of ``config.samples`` samples from ``config.seed_start`` with ``config.steps`` steps."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(config.ensemble, Checkpoint):
        if plant is not None:
            raise ExperimentError("this validation trains its own ensemble (its training data is planted): "
                                  "give training options, not --checkpoint")
        ens, ds, extra = _load(config.ensemble, granularity, device, exclude_classes)
    else:
        ens, ds, extra = _train(config, config.ensemble, out_dir, granularity, device, progress, log, codes,
                                exclude_classes, plant)
    try:
        steps = ens.schedule.sampling_steps(config.steps)
    except ValueError as exc:
        raise ExperimentError(f"--{exc}") from exc
    tape = make_tape(range(config.seed_start, config.seed_start + config.samples), ens.shape, steps)
    return Setup(ens, ds, ensemble_info(ens, ds, extra), tape, steps)


def _load(source: Checkpoint, granularity: str, device: torch.device,
          exclude_classes: Sequence[str]) -> tuple[Ensemble, ImageDataset, dict[str, Any]]:
    path = source.checkpoint
    try:
        ens = Ensemble.load(path).for_inference(device)
    except (FileNotFoundError, ValueError) as exc:
        raise ExperimentError(str(exc)) from exc
    if ens.codebook.granularity != granularity:
        raise ExperimentError(f"{path} has {ens.codebook.granularity} granularity; this validation "
                              f"needs an ensemble trained with --granularity {granularity}")
    spec = source.data or ens.dataset.spec
    if not spec:
        raise ExperimentError(f"{path} does not record the data it was trained on; give --data")
    try:
        data = load_data(spec, ens.dataset.subset, ens.dataset.subset_seed)
    except DatasetError as exc:
        raise ExperimentError(f"cannot load the training data of {path} ({spec!r}): {exc}") from exc
    ds = without_classes(data, exclude_classes)
    if ds.fingerprint() != ens.dataset.fingerprint:
        hint = " (and the same --exclude-classes)" if granularity == "class" else ""
        raise ExperimentError(f"data {spec!r}{hint} is not the data {path} was trained on")
    return ens, ds, {"checkpoint": path, "trained_steps": (ens.train_state or {}).get("step")}


def _train(config: ExperimentConfig, options: Training, out_dir: Path, granularity: str,
           device: torch.device, progress: ProgressFn, log: LogFn, codes: Literal["random", "balanced"],
           exclude_classes: Sequence[str], plant: Callable[[ImageDataset], Planted] | None = None
           ) -> tuple[Ensemble, ImageDataset, dict[str, Any]]:
    ds = without_classes(load_data(options.data, options.subset, options.subset_seed), exclude_classes)
    planted = Planted(ds) if plant is None else plant(ds)
    ds = planted.data
    if granularity == "class" and ds.labels is None:
        raise ExperimentError(f"--data {options.data!r} has no labels; the class control needs them")
    spec = TrainSpec(data=options.data, subset=options.subset, subset_seed=options.subset_seed,
                     preset=options.preset, n=options.n, k=options.k, granularity=granularity, codes=codes,
                     seed=config.seed, steps=options.train_steps, batch_size=options.batch_size,
                     lr=options.lr)
    try:
        ens = create_ensemble(spec, ds)
    except (CapacityError, ValueError) as exc:
        raise ExperimentError(str(exc)) from exc
    cfg = spec.train_config()
    log(f"training {spec.n} members (k={spec.weight}, {ens.codebook.num_sources} {granularity} sources, "
        f"{codes} codes) on {ds.N} items of {ds.name}, preset {spec.preset}, {cfg.steps} steps, "
        f"device {device}")
    ens.net.to(device)
    out = out_dir / "ensemble.pt"
    t0 = time.perf_counter()
    train(ens, ds.to_tensor(), cfg, checkpoint=out, repeats=planted.repeats,
          progress=lambda step, losses: progress("train", step, cfg.steps))
    return ens.for_inference(device), ds, {"checkpoint": str(out), "trained_steps": cfg.steps,
                                           "train_seconds": round(time.perf_counter() - t0, 1)}


def without_classes(ds: ImageDataset, classes: Sequence[str]) -> ImageDataset:
    """``ds`` without the items of the named classes; as given when none is named."""
    if not classes:
        return ds
    if ds.labels is None:
        raise ExperimentError(f"--exclude-classes: data {ds.name!r} has no labels")
    names = ds.label_names or tuple(str(i) for i in range(int(ds.labels.max()) + 1))
    unknown = [c for c in classes if c not in names]
    if unknown:
        raise ExperimentError(f"--exclude-classes: no class {', '.join(unknown)} in {ds.name!r} "
                              f"(its classes: {', '.join(names)})")
    keep = ~np.isin(ds.labels, [names.index(c) for c in classes])
    if not keep.any():
        raise ExperimentError("--exclude-classes leaves no item")
    return ds.subset(keep)


def ensemble_info(ens: Ensemble, ds: ImageDataset, extra: dict[str, Any]) -> dict[str, Any]:
    """What a report says of the ensemble and its data (``extra``: checkpoint, training)."""
    info = {"n": ens.n, "k": ens.k, "T": ens.schedule.T, "preset": ens.preset,
            "granularity": ens.codebook.granularity, "sources": ens.codebook.num_sources,
            "dataset": ds.name, "items": ds.N, "shape": list(ds.shape), **extra}
    if ens.codebook.num_sources <= 64:  # class/owner sources: how many members pairs of codes share
        bits = ens.codebook.bits().astype(np.int64)
        overlap = (bits @ bits.T)[~np.eye(len(bits), dtype=bool)]
        info["code_overlap"] = {"min": int(overlap.min()), "max": int(overlap.max()),
                                "mean": float(overlap.mean())}
    return info


# ============================================================================ sampling loops
def generate(ens: Ensemble, tape: NoiseTape, *, batch: int = 256,
             progress: ProgressFn = ignore_progress) -> Tensor:
    """Full-ensemble samples (w = 1/n) in batches of ``batch``: (B, C, H, W) on the CPU, float32."""
    B = len(tape.seeds)
    out = []
    progress("sample", 0, B)
    for b0 in range(0, B, batch):
        idx = torch.arange(b0, min(B, b0 + batch))
        out.append(sample(ens.net, ens.schedule, tape.select(idx)).float().cpu())
        progress("sample", int(idx[-1]) + 1, B)
    return torch.cat(out)


def exact_ablations(ens: Ensemble, tape: NoiseTape, sample_index: Tensor, sources: Tensor, *,
                    members: Sequence[WideUNet] | None = None, chunk: int = 1024,
                    progress: ProgressFn = ignore_progress, stage: str = "exact",
                    consume: Callable[[slice, Tensor], None] | None = None) -> Tensor | None:
    """Exact counterfactual of sample ``sample_index[r]`` with source ``sources[r]`` ablated.

    Same noise tape, weights w'_i = (1 - c_i)/(n - k) (members trained on the source
    dropped), many trajectories per pass, each member run only where its weight is non-zero.

    Args:
        sample_index, sources: (R,) long.
        chunk: trajectories per pass (bounds memory; progress is reported per chunk).
        consume: if given, called with (rows, images (r, C, H, W) float32 CPU) per chunk and
            nothing is kept (for R too large to hold); else all are returned.
    Returns:
        (R, C, H, W) float32 on the CPU, or None with ``consume``.
    """
    bits = torch.from_numpy(ens.codebook.bits())
    if members is None:
        members = [ens.net.member(i) for i in range(ens.n)]
    R = len(sources)
    outs: list[Tensor] = []
    progress(stage, 0, R)
    for r0 in range(0, R, chunk):
        sl = slice(r0, min(R, r0 + chunk))
        W = ablation_weights(bits[sources[sl]], ens.k)
        x = exact_counterfactuals(ens.net, ens.schedule, tape, W, sample_index[sl],
                                  members=members, max_rows=chunk).float().cpu()
        if consume is None:
            outs.append(x)
        else:
            consume(sl, x)
        progress(stage, sl.stop, R)
    if consume is not None:
        return None
    return torch.cat(outs) if outs else torch.empty(0, *ens.shape)


def synthetic_scores(ens: Ensemble, tape: NoiseTape, *, batch: int = 8, max_rows: int = 2048,
                     progress: ProgressFn = ignore_progress) -> tuple[Tensor, Tensor, Tensor]:
    """One forward-mode Jacobian per sample, then every source's synthetic influence.

    Returns f (B, C, H, W), J (B, D, n) and scores (B, S) float64, all on the CPU.
    """
    B = len(tape.seeds)
    dW = delta_w(torch.from_numpy(ens.codebook.bits()), ens.k)
    fs, Js, scores = [], [], []
    progress("jacobian", 0, B)
    for b0 in range(0, B, batch):
        idx = torch.arange(b0, min(B, b0 + batch))
        f, J = jacobian(ens.net, ens.schedule, tape.select(idx), max_rows=max_rows)
        G = gram(J)
        scores.append(influence(G, dW.to(G.device)).cpu())
        fs.append(f.float().cpu())
        Js.append(J.float().cpu())
        progress("jacobian", int(idx[-1]) + 1, B)
    return torch.cat(fs), torch.cat(Js), torch.cat(scores)
