"""Named network sizes with their training defaults. No torch here: the CLI's flags and the API's
request checks name presets without loading the engine (``models.ensemble`` re-exports these)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.unet import UNetConfig


@dataclass(frozen=True)
class Preset:
    """A named network size with training defaults. Image shape comes from the data."""

    name: str
    base_channels: int
    channel_mults: tuple[int, ...]
    T: int
    train_steps: int
    batch_size: int
    lr: float
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] = ()
    norm_groups: int = 8
    heads: int = 1
    description: str = ""

    def unet(self, shape: tuple[int, int, int]) -> UNetConfig:
        from models.unet import UNetConfig  # the network module loads torch; presets do not

        C, H, W = shape
        if H != W:
            raise ValueError(f"images must be square, got {H}x{W}")
        return UNetConfig(C, H, self.base_channels, self.channel_mults, self.num_res_blocks,
                          self.attn_resolutions, self.norm_groups, self.heads)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("tiny", 8, (1, 2), T=20, train_steps=40, batch_size=8, lr=2e-3, norm_groups=4,
               description="test-suite size: trains an ensemble in seconds"),
        Preset("digits", 16, (1, 2), T=100, train_steps=1500, batch_size=32, lr=2e-3,
               description="8x8 digits on a 2-core CPU in a few minutes"),
        Preset("mnist", 16, (1, 2, 2), T=200, train_steps=2000, batch_size=32, lr=2e-3,
               description="28x28 MNIST on a CPU (tens of minutes) or a GPU (seconds)"),
        Preset("paper", 128, (1, 2, 2), T=1000, train_steps=20000, batch_size=128, lr=2e-4,
               num_res_blocks=2, attn_resolutions=(14,), norm_groups=32, heads=1,
               description="the paper's configuration (Ho et al. MNIST-size U-Net); for GPUs"),
    )
}
