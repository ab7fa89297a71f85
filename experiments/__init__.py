"""Validation experiments: evidence that the attributions are right (paper Figures 1c and 2a).

One module per experiment -- ``classes`` (the class-ablation control), ``fidelity``
(synthetic against exact influence), ``copies`` (copy detection) -- each with a frozen config
whose fields are named like the `attrib validate` flags, and ``run(config, out_dir, progress)``,
which writes ``report.json`` and PNG figures into ``out_dir`` and returns the typed Report.
``common`` holds what they share (the ensemble a config names, targets, reports, sampling
loops), beside ``statistics``, ``classifiers`` and ``figures``. Built on models/ only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
from pydantic import Field

from experiments import classes, copies, fidelity
from experiments.classes import ClassesConfig
from experiments.common import LogFn, ProgressFn, Report, ignore_log, ignore_progress
from experiments.copies import CopiesConfig
from experiments.fidelity import FidelityConfig

AnyConfig = ClassesConfig | FidelityConfig | CopiesConfig
Config = Annotated[AnyConfig, Field(discriminator="experiment")]
"""The config of any experiment, told apart by its ``experiment`` field (for pydantic)."""

CONFIGS: dict[str, type[AnyConfig]] = {"classes": ClassesConfig, "fidelity": FidelityConfig,
                                              "copies": CopiesConfig}


def run(config: AnyConfig, out_dir: Path, progress: ProgressFn = ignore_progress, *,
        device: torch.device | str = "cpu", log: LogFn = ignore_log) -> Report:
    """Run the experiment ``config`` is the config of (see each module's ``run``)."""
    if isinstance(config, ClassesConfig):
        return classes.run(config, out_dir, progress, device=device, log=log)
    if isinstance(config, FidelityConfig):
        return fidelity.run(config, out_dir, progress, device=device, log=log)
    return copies.run(config, out_dir, progress, device=device, log=log)
