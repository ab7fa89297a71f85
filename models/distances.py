"""Image-space distances: Euclidean (L2) and LPIPS (Zhang et al. 2018).

Both distances take images shaped ``(..., C, H, W)`` and return one value per leading index,
shape ``(...)``; the leading dims of the two arguments broadcast against each other.

LPIPS needs ImageNet classification weights for its trunk (AlexNet or VGG16). Nothing here ever
downloads them: :func:`load_lpips` looks for torchvision's checkpoint file on disk (see
:func:`lpips_backbone_path`) and raises :class:`LPIPSUnavailable` if it is missing or unreadable.
The small linear calibration layers ship inside the ``lpips`` package itself. For tests, a metric
with a deterministic random trunk can be built with ``load_lpips(random_trunk=True)``.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BACKBONE_ENV_VAR",
    "BACKBONE_FILES",
    "LPIPSMetric",
    "LPIPSUnavailable",
    "l2_distance",
    "load_lpips",
    "lpips_backbone_path",
]

#: Environment variable that, when set, overrides where the trunk weight file is looked for.
BACKBONE_ENV_VAR = "ATTRIB_LPIPS_BACKBONE"

#: torchvision's ImageNet checkpoint file name for each supported LPIPS trunk.
BACKBONE_FILES: dict[str, str] = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
}

_TORCHVISION_NAMES = {"alex": ("AlexNet", "alexnet"), "vgg": ("VGG16", "vgg16")}
_DOWNLOAD_BASE = "https://download.pytorch.org/models/"
_MIN_SIDE = 64  # AlexNet's pooling stack fails on very small inputs (e.g. 8x8 digits).


def l2_distance(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distance over the last three dims.

    Args:
        a: ``(..., C, H, W)``.
        b: ``(..., C, H, W)``, broadcastable against ``a``.

    Returns:
        ``(...)`` -- the broadcast leading shape; ``||a - b||_2`` over ``(C, H, W)``.
        Integer inputs are promoted to float32.
    """
    if a.ndim < 3 or b.ndim < 3:
        raise ValueError(
            f"l2_distance expects (..., C, H, W) tensors, got shapes {tuple(a.shape)} "
            f"and {tuple(b.shape)}"
        )
    if not a.is_floating_point():
        a = a.float()
    if not b.is_floating_point():
        b = b.float()
    return torch.linalg.vector_norm(a - b, ord=2, dim=(-3, -2, -1))


class LPIPSUnavailable(RuntimeError):
    """The ImageNet trunk weights LPIPS needs are missing or unreadable (never downloaded)."""


def _check_net(net: str) -> None:
    if net not in BACKBONE_FILES:
        raise ValueError(f"unsupported LPIPS net {net!r}; expected one of {sorted(BACKBONE_FILES)}")


def lpips_backbone_path(net: str = "alex") -> Path:
    """Where the ImageNet trunk weights for ``net`` are expected on disk.

    This is where torchvision itself caches them, ``torch.hub.get_dir()/checkpoints/<file>``
    (``alexnet-owt-7be5be79.pth`` for ``"alex"``, ``vgg16-397923af.pth`` for ``"vgg"``), unless
    the environment variable ``ATTRIB_LPIPS_BACKBONE`` is set, in which case its value is
    returned (for whichever ``net`` is asked). The file need not exist.

    Raises:
        ValueError: ``net`` is not ``"alex"`` or ``"vgg"``.
    """
    _check_net(net)
    override = os.environ.get(BACKBONE_ENV_VAR)
    if override:
        return Path(override).expanduser()
    return Path(torch.hub.get_dir()) / "checkpoints" / BACKBONE_FILES[net]


def _unavailable_message(net: str, path: Path, problem: str) -> str:
    file_name = BACKBONE_FILES[net]
    arch, tv_fn = _TORCHVISION_NAMES[net]
    default = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    return (
        f"LPIPS ({net}) needs torchvision's ImageNet {arch} weights, but {problem}: {path}\n"
        f"Obtain {file_name} on a machine with internet access, e.g. "
        f"`python -c \"import torchvision; torchvision.models.{tv_fn}(weights='IMAGENET1K_V1')\"` "
        f"(or download {_DOWNLOAD_BASE}{file_name}), then put it at {default} "
        f"(torch.hub.get_dir()/checkpoints/), or pass backbone_path=... to load_lpips, "
        f"or set the environment variable {BACKBONE_ENV_VAR} to the file's path. "
        f"Nothing is downloaded automatically. For tests only, load_lpips(random_trunk=True) "
        f"uses a random trunk."
    )


class LPIPSMetric:
    """LPIPS (Zhang et al. 2018) via the ``lpips`` package.

    Inputs are images in ``[-1, 1]`` with 1 or 3 channels and any size: grayscale is repeated to
    3 channels, and images with a side smaller than 64 are bilinearly upsampled (to 64x64 for
    square images; each side below 64 is raised to 64), because AlexNet's pooling stack needs it
    (8x8 digits would otherwise fail).

    ``metric(a, b)``: ``(..., C, H, W) x (..., C, H, W) -> (...)`` with broadcasting over the
    leading dims, evaluated in chunks of ``chunk_size`` image pairs under ``torch.no_grad``, in
    float32 on ``self.device``. Build one with :func:`load_lpips`.

    Attributes:
        net: ``"alex"`` or ``"vgg"``.
        random_trunk: True when the trunk is random rather than ImageNet-trained (tests only);
            exposed so reports can say so.
        backbone_path: the weight file the trunk was loaded from (None for a random trunk).
        device: where the model lives and distances are computed.
        chunk_size: default number of image pairs per forward pass.
        model: the underlying ``lpips.LPIPS`` module (eval mode, no grad).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        net: str,
        random_trunk: bool,
        backbone_path: Path | None,
        device: torch.device,
        chunk_size: int = 256,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.model = model
        self.net = net
        self.random_trunk = random_trunk
        self.backbone_path = backbone_path
        self.device = device
        self.chunk_size = chunk_size

    def __repr__(self) -> str:
        return (
            f"LPIPSMetric(net={self.net!r}, random_trunk={self.random_trunk}, "
            f"backbone_path={self.backbone_path}, device={self.device})"
        )

    def _prepare(self, x: Tensor) -> Tensor:
        """``(N, C, H, W)`` with C in {1, 3} -> ``(N, 3, H', W')`` float32 on ``self.device``."""
        x = x.to(device=self.device, dtype=torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        if h < _MIN_SIDE or w < _MIN_SIDE:
            size = (max(h, _MIN_SIDE), max(w, _MIN_SIDE))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x.contiguous()

    def __call__(self, a: Tensor, b: Tensor, *, chunk_size: int | None = None) -> Tensor:
        """LPIPS distance between image pairs.

        Args:
            a: ``(..., C, H, W)`` in ``[-1, 1]``, C in {1, 3}.
            b: ``(..., C, H, W)``, same C/H/W as ``a``; leading dims broadcast against ``a``'s.
            chunk_size: image pairs per forward pass (default ``self.chunk_size``). Broadcast
                inputs are gathered chunk by chunk, never materialised in full.

        Returns:
            ``(...)`` float32 on ``self.device``: the broadcast leading shape.
        """
        chunk = self.chunk_size if chunk_size is None else chunk_size
        if chunk < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk}")
        if a.ndim < 3 or b.ndim < 3:
            raise ValueError(
                f"LPIPS expects (..., C, H, W) tensors, got shapes {tuple(a.shape)} "
                f"and {tuple(b.shape)}"
            )
        if a.shape[-3:] != b.shape[-3:]:
            raise ValueError(
                f"LPIPS needs matching (C, H, W), got {tuple(a.shape[-3:])} "
                f"and {tuple(b.shape[-3:])}"
            )
        if a.shape[-3] not in (1, 3):
            raise ValueError(f"LPIPS expects 1 or 3 channels, got {a.shape[-3]}")
        lead = torch.broadcast_shapes(a.shape[:-3], b.shape[:-3])
        img = a.shape[-3:]
        a_b = a.expand(*lead, *img)  # views with stride 0 where broadcast; no copy
        b_b = b.expand(*lead, *img)
        n = math.prod(lead)
        out = torch.empty(n, dtype=torch.float32, device=self.device)
        with torch.no_grad():
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                if len(lead) == 0:
                    xa, xb = a_b.unsqueeze(0), b_b.unsqueeze(0)
                else:
                    idx = torch.unravel_index(torch.arange(start, stop), lead)
                    xa, xb = a_b[idx], b_b[idx]  # (chunk, C, H, W): gathers only this chunk
                d = self.model(self._prepare(xa), self._prepare(xb))  # (chunk, 1, 1, 1)
                out[start:stop] = d.reshape(-1)
        return out.reshape(lead)


def _trunk_targets(model: nn.Module) -> dict[str, Tensor]:
    """Map torchvision ``features.<i>.<param>`` keys to the lpips trunk's tensors.

    ``lpips.pretrained_networks.{alexnet,vgg16}`` split ``tv.<arch>().features`` into
    ``slice1..sliceN`` and register each layer under its original index as its name, so layer
    ``features[i]`` lives at ``model.net.slice<k>.<i>``.
    """
    trunk: Any = model.net  # lpips.pretrained_networks.alexnet / vgg16
    targets: dict[str, Tensor] = {}
    for k in range(1, trunk.N_slices + 1):
        for idx, layer in getattr(trunk, f"slice{k}").named_children():
            for pname, tensor in [*layer.named_parameters(), *layer.named_buffers()]:
                targets[f"features.{idx}.{pname}"] = tensor
    return targets


def _load_trunk(model: nn.Module, net: str, path: Path) -> None:
    """Copy torchvision ImageNet ``features`` weights from ``path`` into ``model``'s trunk."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LPIPSUnavailable(
            _unavailable_message(net, path, f"the file could not be read ({exc!r})")
        ) from exc
    if not isinstance(state, dict):
        raise LPIPSUnavailable(
            _unavailable_message(
                net, path, f"the file holds a {type(state).__name__}, not a state dict"
            )
        )
    targets = _trunk_targets(model)
    features = {k: v for k, v in state.items() if isinstance(k, str) and k.startswith("features.")}
    missing = sorted(set(targets) - set(features))
    unexpected = sorted(set(features) - set(targets))
    bad_shape = sorted(
        k
        for k in set(targets) & set(features)
        if not isinstance(features[k], Tensor) or features[k].shape != targets[k].shape
    )
    if missing or unexpected or bad_shape:
        raise LPIPSUnavailable(
            _unavailable_message(
                net,
                path,
                f"the file does not match torchvision's {_TORCHVISION_NAMES[net][0]} "
                f"(missing {missing[:4]}, unexpected {unexpected[:4]}, "
                f"wrong shape {bad_shape[:4]})",
            )
        )
    with torch.no_grad():
        for key, tensor in targets.items():
            tensor.copy_(features[key])


def _randomize_trunk(model: nn.Module, seed: int) -> None:
    """Re-initialise trunk convs like PyTorch's default init, from a private seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        trunk: Any = model.net
        for module in trunk.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.in_channels // module.groups * math.prod(module.kernel_size)
                bound = 1.0 / math.sqrt(fan_in)
                w = torch.rand(module.weight.shape, generator=gen) * 2 - 1
                module.weight.copy_(w * bound)
                if module.bias is not None:
                    b = torch.rand(module.bias.shape, generator=gen) * 2 - 1
                    module.bias.copy_(b * bound)


def load_lpips(
    net: str = "alex",
    *,
    random_trunk: bool = False,
    backbone_path: str | Path | None = None,
    device: str | torch.device = "cpu",
    chunk_size: int = 256,
    seed: int = 0,
) -> LPIPSMetric:
    """Build an :class:`LPIPSMetric` without ever touching the network.

    Args:
        net: ``"alex"`` or ``"vgg"``.
        random_trunk: False (default): the trunk gets torchvision's ImageNet weights, read from
            ``backbone_path`` or else :func:`lpips_backbone_path` (``ATTRIB_LPIPS_BACKBONE`` or
            ``torch.hub.get_dir()/checkpoints/<file>``); the file's existence is checked before
            anything is constructed. True: a random trunk, re-initialised from a private
            generator seeded with ``seed`` (deterministic; the global RNG is left untouched);
            for tests only -- ``metric.random_trunk`` is then True.
        backbone_path: explicit trunk weight file; ignored when ``random_trunk`` is True.
        device: where the model lives and distances are computed.
        chunk_size: default image pairs per forward pass.
        seed: seed for the random trunk.

    Returns:
        The metric. Its linear calibration layers are the ``lpips`` package's v0.1 weights.

    Raises:
        ValueError: unsupported ``net``.
        LPIPSUnavailable: weights file missing, unreadable/corrupt, or of the wrong architecture
            (the message names the path and how to obtain the file); also if the ``lpips``
            package's own linear-layer weights are missing.
    """
    _check_net(net)
    path: Path | None = None
    if not random_trunk:
        path = Path(backbone_path).expanduser() if backbone_path else lpips_backbone_path(net)
        if not path.is_file():
            raise LPIPSUnavailable(_unavailable_message(net, path, "no such file"))

    import lpips  # deferred: importing lpips is slow-ish and pulls in torchvision models

    lin_path = Path(lpips.__file__).resolve().parent / "weights" / "v0.1" / f"{net}.pth"
    if not lin_path.is_file():
        raise LPIPSUnavailable(
            f"the lpips package's linear calibration weights are missing: {lin_path}; "
            f"reinstall lpips==0.1.4"
        )

    # pnet_rand=True: torchvision builds a random trunk (weights=None) and never downloads.
    # fork_rng: that random init must not consume the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's `pretrained=` deprecation
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)

    if random_trunk:
        _randomize_trunk(model, seed)
    else:
        assert path is not None
        _load_trunk(model, net, path)

    dev = torch.device(device)
    model = model.to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LPIPSMetric(
        model,
        net=net,
        random_trunk=random_trunk,
        backbone_path=path,
        device=dev,
        chunk_size=chunk_size,
    )
