"""Validation experiments: evidence that the attributions are right (paper Figures 1c and 2a).

One module per experiment -- ``classes`` (the class-ablation control), ``fidelity``
(synthetic against exact influence), ``copies`` (copy detection), ``canaries`` (a benchmark
whose truth is known: planted, duplicated works) -- each with
``run(config, out_dir, progress)``, which writes ``report.json`` and PNG figures into
``out_dir`` and returns the typed Report. Their frozen configs, whose fields are named like the
`attrib validate` flags, are in ``configs`` (no torch: the API validates requests with them).
``common`` holds what the runs share (the ensemble a config names, targets, reports, sampling
loops), beside ``statistics``, ``classifiers`` and ``figures``. Built on models/ only.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from experiments.configs import (
    CONFIGS,
    AnyConfig,
    CanariesConfig,
    ClassesConfig,
    Config,
    CopiesConfig,
    FidelityConfig,
)

if TYPE_CHECKING:
    import torch

    from experiments.common import LogFn, ProgressFn, Report

__all__ = ["CONFIGS", "AnyConfig", "CanariesConfig", "ClassesConfig", "Config", "CopiesConfig",
           "FidelityConfig", "run"]


def run(config: AnyConfig, out_dir: Path, progress: ProgressFn | None = None, *,
        device: torch.device | str = "cpu", log: LogFn | None = None) -> Report:
    """Run the experiment ``config`` is the config of (see each module's ``run``); progress and
    log default to ignoring what they are told."""
    # The runs load torch; imported here so that importing this package (its configs) does not.
    from experiments import canaries, classes, copies, fidelity
    from experiments.common import ignore_log, ignore_progress

    on_progress, on_log = progress or ignore_progress, log or ignore_log
    if isinstance(config, ClassesConfig):
        return classes.run(config, out_dir, on_progress, device=device, log=on_log)
    if isinstance(config, FidelityConfig):
        return fidelity.run(config, out_dir, on_progress, device=device, log=on_log)
    if isinstance(config, CanariesConfig):
        return canaries.run(config, out_dir, on_progress, device=device, log=on_log)
    return copies.run(config, out_dir, on_progress, device=device, log=on_log)
