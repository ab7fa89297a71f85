"""An encoded ensemble: network presets, the ensemble container and its checkpoint artifact.

A checkpoint is one versioned file holding the weights, the architecture, the code book,
the fingerprint of the training data and (while training) the optimiser and RNG state to
resume from. It loads back bit-identically and is written atomically.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.codes import CodeBook
from models.presets import PRESETS, Preset  # noqa: F401 - re-exported
from models.schedule import NoiseSchedule
from models.unet import UNetConfig, WideUNet

FORMAT = "attrib-ensemble"
VERSION = 1


def resolve_device(name: str) -> torch.device:
    """A device name as the CLI and the settings take it: ``auto`` (CUDA when present), ``cpu``,
    ``cuda`` or ``cuda:N``. Asking for CUDA where there is none is a ValueError, not a later crash."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("CUDA is not available")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"not a device name ({exc})") from exc


def save_atomically(obj: Any, path: str | os.PathLike[str]) -> Path:
    """torch.save ``obj`` to ``path`` through a temporary file in the same folder, fsync and
    rename: a reader (or a process killed meanwhile) sees the old file or the new one, whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@dataclass(frozen=True)
class DatasetInfo:
    """What an ensemble was trained on: enough to refuse mismatched data."""

    name: str
    fingerprint: str
    num_items: int
    shape: tuple[int, int, int]
    spec: str = ""  # how to load it again (models.data.load_dataset), e.g. "digits"
    subset: int | None = None  # a random subset of this size was used ...
    subset_seed: int = 0  # ... drawn with this seed (ImageDataset.sample)


@dataclass
class Ensemble:
    """The wide network, its noise schedule, codes and provenance."""

    net: WideUNet
    schedule: NoiseSchedule
    codebook: CodeBook
    dataset: DatasetInfo
    preset: str
    train_state: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def n(self) -> int:
        return self.net.n

    @property
    def k(self) -> int:
        return self.codebook.k

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.dataset.shape

    @classmethod
    def create(cls, preset: Preset, codebook: CodeBook, dataset: DatasetInfo, seed: int,
               unet: UNetConfig | None = None) -> Ensemble:
        """A freshly initialised ensemble (member init drawn from torch.Generator(seed))."""
        cfg = unet or preset.unet(dataset.shape)
        net = WideUNet(cfg, codebook.n, torch.Generator().manual_seed(seed))
        return cls(net, NoiseSchedule(preset.T), codebook, dataset, preset.name)

    def for_inference(self, device: torch.device | str = "cpu") -> Ensemble:
        """Parameters frozen (forward-mode AD and no_grad need no graph), moved to device."""
        self.net.to(device).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        return self

    def to_artifact(self) -> dict[str, Any]:
        book = self.codebook
        return {
            "format": FORMAT,
            "version": VERSION,
            "preset": self.preset,
            "unet": self.net.config.to_dict(),
            "schedule": {"T": self.schedule.T, "beta_start": self.schedule.beta_start,
                         "beta_end": self.schedule.beta_end},
            "codebook": {"n": book.n, "k": book.k, "granularity": book.granularity,
                         "source_keys": list(book.source_keys),
                         "codes": torch.from_numpy(book.codes.copy()),
                         "item_source": torch.from_numpy(book.item_source.copy()),
                         "withdrawn": list(book.withdrawn)},
            "dataset": {"name": self.dataset.name, "fingerprint": self.dataset.fingerprint,
                        "num_items": self.dataset.num_items, "shape": list(self.dataset.shape),
                        "spec": self.dataset.spec, "subset": self.dataset.subset,
                        "subset_seed": self.dataset.subset_seed},
            "state_dict": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
            "train_state": self.train_state,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (temporary file in the same folder, fsync, rename)."""
        return save_atomically(self.to_artifact(), path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: torch.device | str = "cpu") -> Ensemble:
        """Load a checkpoint; raises ValueError naming the file if it is not one of ours."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no ensemble checkpoint at {path}")
        try:
            art = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path} is not a readable ensemble checkpoint: {exc}") from exc
        if not isinstance(art, dict) or art.get("format") != FORMAT:
            raise ValueError(f"{path} is not an attrib ensemble checkpoint")
        if art.get("version") != VERSION:
            raise ValueError(f"{path} has checkpoint version {art.get('version')}; "
                             f"this build reads version {VERSION}")
        cb = art["codebook"]
        book = CodeBook(int(cb["n"]), int(cb["k"]), str(cb["granularity"]),
                        tuple(cb["source_keys"]), cb["codes"].numpy().astype(np.int64),
                        cb["item_source"].numpy().astype(np.int64),
                        tuple(int(s) for s in cb.get("withdrawn", ())))
        ds = art["dataset"]
        info = DatasetInfo(ds["name"], ds["fingerprint"], int(ds["num_items"]),
                           tuple(int(s) for s in ds["shape"]),  # type: ignore[arg-type]
                           str(ds.get("spec", "")), ds.get("subset"), int(ds.get("subset_seed", 0)))
        cfg = UNetConfig.from_dict(art["unet"])
        net = WideUNet(cfg, book.n, torch.Generator().manual_seed(0))
        net.load_state_dict(art["state_dict"])
        sch = art["schedule"]
        schedule = NoiseSchedule(int(sch["T"]), float(sch["beta_start"]), float(sch["beta_end"]))
        ens = cls(net.to(device), schedule, book, info, str(art["preset"]), art.get("train_state"))
        return ens
