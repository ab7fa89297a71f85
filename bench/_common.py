"""Shared helpers for the benchmark scripts in bench/ (not a benchmark itself).

Every script is run as ``python bench/NAME.py``; importing this module puts the repository
root on sys.path so ``models`` imports work without PYTHONPATH.

Timing on a shared 2-core machine is noisy (the same run varies up to 2x and more while
other jobs run): every measurement is best-of-N, we report both wall-clock and process CPU
time (user + sys of all threads), and only ratios measured within one run are meaningful.
"""

from __future__ import annotations

import argparse
import ctypes
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

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc() -> bool:
    """Keep big tensor buffers on the heap instead of fresh mmap()s (no page-fault storm).

    Same effect as MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=... in the
    environment (DESIGN.md section 7), but applied from inside the process. Returns True
    when glibc accepted both settings.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok_mmap = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(1_000_000_000))
    ok_trim = libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1))
    return bool(ok_mmap and ok_trim)


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small sizes: finishes in < 60 s here")
    p.add_argument("--repeats", type=int, default=None,
                   help="best-of-N repeats for every timing (default 3)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's own choice)")
    p.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                   help="tuned: raise glibc's mmap/trim thresholds via mallopt (default); "
                        "default: leave glibc malloc alone")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, codes and noise")


def configure(args: argparse.Namespace) -> dict[str, Any]:
    """Apply --threads/--malloc; returns the environment description for the JSON."""
    import torch

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


def emit(result: dict[str, Any]) -> None:
    """Print the single JSON result line (last line of stdout)."""
    result.setdefault("loadavg_end", _loadavg())
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
