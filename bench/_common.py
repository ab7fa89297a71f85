"""Shared helpers for the benchmark scripts in bench/ (not a benchmark itself).

Every script is run as ``python bench/NAME.py``; importing this module puts the repository
root on sys.path so ``models`` imports work without PYTHONPATH.

Timing on a shared 2-core machine is noisy (the same run varies up to 2x and more while
other jobs run): every measurement is best-of-N, we report both wall-clock and process CPU
time (user + sys of all threads), and only ratios measured within one run are meaningful.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app.runtime import tune_malloc  # noqa: E402  (shared with the CLI)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" unless X is None/False or the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        h = action.help or ""
        if action.default is None or action.default is False or "default" in h or h == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small sizes: finishes in < 60 s here")
    p.add_argument("--repeats", type=int, default=None,
                   help="best-of-N repeats for every timing (default 3)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's own choice)")
    p.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                   help="tuned (the default): raise glibc's mmap/trim thresholds via mallopt; "
                        "default: leave glibc malloc alone")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, codes and noise")


def configure(args: argparse.Namespace) -> dict[str, Any]:
    """Apply --threads/--malloc; returns the environment description for the JSON."""
    import torch

    _START.update(_cpu_snapshot())
    malloc_ok = tune_malloc() if args.malloc == "tuned" else False
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.repeats is None:
        args.repeats = 3
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "malloc": args.malloc if args.malloc == "default" or malloc_ok else "default(mallopt failed)",
        "cpu_count": os.cpu_count(),
        "loadavg_start": _loadavg(),
        "python": platform.python_version(),
    }


_START: dict[str, float] = {}


def _cpu_snapshot() -> dict[str, float]:
    """Machine-wide busy CPU seconds (/proc/stat), this process's CPU seconds, wall time."""
    snap = {"wall": time.perf_counter(), "self": time.process_time()}
    try:
        with open("/proc/stat") as fh:
            fields = [float(x) for x in fh.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal ...
        busy = sum(fields[:3]) + sum(fields[5:8])
        snap["busy"] = busy / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    return snap


def other_cpu_share() -> float | None:
    """Share of the machine's CPU capacity used by *other* processes since configure()."""
    end = _cpu_snapshot()
    if "busy" not in end or "busy" not in _START:
        return None
    wall = end["wall"] - _START["wall"]
    other = (end["busy"] - _START["busy"]) - (end["self"] - _START["self"])
    return round(max(0.0, other) / (wall * (os.cpu_count() or 1)), 3) if wall > 0 else None


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


@dataclass
class Timing:
    """Best-of-N wall and CPU seconds of one measured callable, plus every repeat."""

    wall: float = float("inf")
    cpu: float = float("inf")
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)

    def add(self, wall: float, cpu: float) -> None:
        self.walls.append(wall)
        self.cpus.append(cpu)
        self.wall, self.cpu = min(self.wall, wall), min(self.cpu, cpu)

    def as_dict(self, digits: int = 4) -> dict[str, Any]:
        return {"best_wall_s": round(self.wall, digits), "best_cpu_s": round(self.cpu, digits),
                "wall_s": [round(w, digits) for w in self.walls]}


def measure(fn: Callable[[], Any], repeats: int, timing: Timing | None = None,
            sync: Callable[[], None] | None = None) -> tuple[Timing, Any]:
    """Run ``fn`` ``repeats`` times, keep the best wall/CPU seconds and the last result."""
    timing = timing or Timing()
    out = None
    for _ in range(repeats):
        if sync is not None:
            sync()
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        if sync is not None:
            sync()
        timing.add(time.perf_counter() - t0, time.process_time() - c0)
    return timing, out


def ratio(a: float, b: float, digits: int = 3) -> float:
    return round(a / b, digits) if b > 0 else float("nan")


def digits_ensemble(seed: int = 0, train_steps: int = 0):  # -> (Ensemble, ImageDataset)
    """The "digits" preset (n=16, k=8) on the real 8x8 digits, random-init weights.

    With ``train_steps`` > 0 the ensemble is first trained that many steps with the
    preset's batch size and learning rate (models.train.train).
    """
    from models.codes import make_codebook
    from models.data import load_digits
    from models.ensemble import PRESETS, DatasetInfo, Ensemble

    ds = load_digits()
    book = make_codebook(ds.N, 16, 8, seed=seed)
    info = DatasetInfo(ds.name, ds.fingerprint(), ds.N, ds.shape)
    preset = PRESETS["digits"]
    ens = Ensemble.create(preset, book, info, seed=seed)
    if train_steps > 0:
        from models.train import TrainConfig, train

        train(ens, ds.to_tensor(), TrainConfig(train_steps, preset.batch_size, preset.lr, seed))
    return ens, ds


def weights_label(train_steps: int) -> str:
    return "random-init" if train_steps <= 0 else f"trained-{train_steps}-steps"


def noisy(*timings: Timing, tol: float = 0.25) -> bool:
    """True when some measurement's two best repeats differ by more than ``tol``."""
    return any(len(t.walls) >= 2 and sorted(t.walls)[1] > (1 + tol) * t.wall for t in timings)


def emit(result: dict[str, Any], *timings: Timing) -> None:
    """Print the single JSON result line (last line of stdout).

    Adds ``other_processes_cpu_share`` (CPU capacity used by other processes while this
    ran, from /proc/stat) and ``warnings`` when that exceeds 20% or repeats disagreed:
    ratios may then be off by a lot.
    """
    result.setdefault("loadavg_end", _loadavg())
    share = other_cpu_share()
    result["other_processes_cpu_share"] = share
    warnings = []
    if share is not None and share > 0.2:
        warnings.append(f"machine busy: other processes used {share:.0%} of all CPU time "
                        "during this run; ratios may be off, rerun when it is idle")
    if noisy(*timings):
        warnings.append("repeats disagree by more than 25%: timings are noisy")
    result["warnings"] = warnings
    print(json.dumps(result, sort_keys=False, default=_json_default), flush=True)


def _json_default(o: object) -> object:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


def params_per_member(net: Any) -> int:
    from models.unet import num_parameters

    return int(num_parameters(net))


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, *, max_repeats: int | None = None,
                tol: float = 0.25, budget_s: float | None = None,
                sync: Callable[[], None] | None = None,
                ) -> tuple[dict[str, Timing], dict[str, Any]]:
    """Time several callables round-robin (so they share the machine's load), best-of-N.

    After ``repeats`` rounds, keeps going (up to ``max_repeats``, default 2 * repeats, and
    while under ``budget_s`` seconds) until each callable's two best wall times agree within
    ``tol``: one lucky or unlucky repeat then cannot decide a ratio alone.
    """
    max_repeats = max(repeats, max_repeats if max_repeats is not None else 2 * repeats)
    timings = {name: Timing() for name in fns}
    results: dict[str, Any] = {}
    start = time.perf_counter()
    for r in range(max_repeats):
        for name, fn in fns.items():
            _, results[name] = measure(fn, 1, timings[name], sync)
        log("  round " + str(r) + ": " + ", ".join(
            f"{n} {t.walls[-1]:.3f} s (cpu {t.cpus[-1]:.3f})" for n, t in timings.items()))
        if r + 1 < repeats:
            continue
        stable = all(len(t.walls) >= 2 and sorted(t.walls)[1] <= (1 + tol) * t.wall
                     for t in timings.values())
        over = budget_s is not None and time.perf_counter() - start > budget_s
        if stable or over:
            break
    return timings, results
