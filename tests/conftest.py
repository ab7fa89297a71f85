"""Shared fixtures: a tiny encoded ensemble trained once per test session.

The ensemble is the "tiny" preset (T = 20, base 8 channels) with n = 8 members and k = 4
on the first 60 scikit-learn digits (C(8, 4) = 70 >= 60 item codes). Training it takes a
few seconds on 2 CPU cores. Tests must not mutate the session objects: use the copies
(``tiny_net64`` etc.) or ``copy.deepcopy``.
"""

from __future__ import annotations

import os

# The suite runs thousands of tiny tensor ops. With OpenMP's default (active, spinning)
# wait policy, one busy core elsewhere on a 2-core machine makes every parallel region
# wait for a descheduled spinner: measured 1 s instead of 4 ms per tiny-U-Net forward.
# Passive waiting keeps the default thread count and removes that cliff. It only takes
# effect if set before torch (libgomp) is loaded; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Under pytest-xdist (make test runs two processes on this 2-core machine), one thread per
# process: two torch processes of two threads each slow each other many times over.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from models.codes import make_codebook
from models.data import load_digits
from models.ensemble import PRESETS, DatasetInfo, Ensemble
from models.train import TrainConfig, train
from models.unet import WideUNet

TINY_ITEMS = 60

# Under ATTRIB_REQUIRE_SERVICES=1 (CI, .ci/run) a test may skip only for one of these reasons (a
# substring of its skip message); any other skip is turned into a failure, so a test CI is meant
# to run cannot pass by not running. Keep it short; README.md "Tests" lists it.
SKIPS_ALLOWED = (
    "needs a CUDA device",  # GPU-only checks, on a machine without a GPU
)
REQUIRE_SERVICES = os.environ.get("ATTRIB_REQUIRE_SERVICES") == "1"


def _unexpected_skip(report: pytest.CollectReport | pytest.TestReport) -> str | None:
    """The reason of a skip that is not allowed under ATTRIB_REQUIRE_SERVICES=1, else None."""
    if not (REQUIRE_SERVICES and report.skipped) or hasattr(report, "wasxfail"):
        return None
    longrepr = report.longrepr
    reason = str(longrepr[2] if isinstance(longrepr, tuple) else longrepr)
    return None if any(allowed in reason for allowed in SKIPS_ALLOWED) else reason


def _fail_unexpected_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    reason = _unexpected_skip(report)
    if reason is not None:
        report.outcome = "failed"
        report.longrepr = (f"skipped under ATTRIB_REQUIRE_SERVICES=1 for a reason not in "
                           f"tests/conftest.py SKIPS_ALLOWED: {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    _fail_unexpected_skip(outcome.get_result())  # type: ignore[attr-defined]


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    outcome = yield
    _fail_unexpected_skip(outcome.get_result())  # type: ignore[attr-defined]
TINY_N = 8
TINY_K = 4


@dataclass(frozen=True)
class TinyData:
    """The first 60 digits as float32 (N, 1, 8, 8) in [-1, 1], with their labels."""

    x: torch.Tensor
    labels: np.ndarray
    info: DatasetInfo


@pytest.fixture(scope="session")
def tiny_data() -> TinyData:
    ds = load_digits().subset(np.arange(TINY_ITEMS))
    info = DatasetInfo(ds.name, ds.fingerprint(), ds.N, ds.shape)
    assert ds.labels is not None
    return TinyData(ds.to_tensor(), ds.labels.copy(), info)


def make_tiny_ensemble(data: TinyData, n: int = TINY_N, k: int = TINY_K, seed: int = 0,
                       num_items: int | None = None) -> Ensemble:
    """A freshly initialised (untrained) tiny-preset ensemble over the first items."""
    num = data.info.num_items if num_items is None else num_items
    book = make_codebook(num, n, k, seed=seed)
    info = data.info if num_items is None else DatasetInfo(
        data.info.name, f"{data.info.fingerprint}:{num}", num, data.info.shape)
    return Ensemble.create(PRESETS["tiny"], book, info, seed=seed)


@pytest.fixture(scope="session")
def tiny_ensemble(tiny_data: TinyData) -> Ensemble:
    """The tiny preset trained for its default 40 steps, frozen for inference (float32)."""
    ens = make_tiny_ensemble(tiny_data)
    p = PRESETS["tiny"]
    train(ens, tiny_data.x, TrainConfig(p.train_steps, p.batch_size, p.lr, seed=0))
    return ens.for_inference()


@pytest.fixture(scope="session")
def tiny_net64(tiny_ensemble: Ensemble) -> WideUNet:
    """A float64 copy of the trained tiny ensemble's wide network (parameters frozen)."""
    net = copy.deepcopy(tiny_ensemble.net).double()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


@pytest.fixture(scope="session")
def cli_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ensemble (n=8) trained by the `attrib` CLI on 60 digits (for real-process tests)."""
    from tests.procs import attrib

    out = tmp_path_factory.mktemp("cli") / "tiny.pt"
    attrib({**os.environ, "OMP_NUM_THREADS": "2"}, "train", "--data", "digits", "--subset", "60",
           "--preset", "tiny", "--n", "8", "--out", str(out))
    return out


def service_env(data_dir: Path) -> dict[str, str]:
    """A clean environment for service processes: data under data_dir, one torch thread each."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTRIB_") and k not in
           ("DATABASE_URL", "BROKER_URL")}
    env.update(ATTRIB_DATA_DIR=str(data_dir), ATTRIB_WORKER_THREADS="1", OMP_NUM_THREADS="1",
               ATTRIB_HEARTBEAT_S="1")
    return env


@pytest.fixture
def base_env(tmp_path: Path) -> dict[str, str]:
    return service_env(tmp_path / "data")
