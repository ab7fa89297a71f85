"""PNG encoding and predicted counterfactuals for the API, in numpy (no torch in requests).

Pixel conversion matches models.images.to_uint8: clip to [-1, 1], (x + 1) * 127.5, round half
to even, so a predicted counterfactual renders exactly as the worker would render it.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from models.codes import ablated_weights, delta_w_values, unpack_bits

MAX_SCALE = 32


def to_png(x: np.ndarray, scale: int = 1) -> bytes:
    """x: (C, H, W) float in [-1, 1] -> PNG bytes."""
    a = np.round((np.clip(x.astype(np.float32), -1.0, 1.0) + 1.0) * np.float32(127.5)).astype(np.uint8)
    a = np.moveaxis(a, 0, -1)
    img = Image.fromarray(a[..., 0], "L") if a.shape[-1] == 1 else Image.fromarray(a, "RGB")
    return _encode(img, scale)


def rescale_png(png: bytes, scale: int) -> bytes:
    if scale == 1:
        return png
    with Image.open(io.BytesIO(png)) as img:
        return _encode(img, scale)


def _encode(img: Image.Image, scale: int) -> bytes:
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def predicted_counterfactual(sample: bytes, jacobian: bytes, shape: tuple[int, int, int],
                             code: int, n: int, k: int, served: int | None = None) -> np.ndarray:
    """f + J dw (synthetic ablation's first-order counterfactual): (C, H, W). served: the bitmask
    of the members the generation's ensemble version samples with (None or all: the full ensemble)."""
    f = np.frombuffer(sample, dtype=np.float32).astype(np.float64)
    J = np.frombuffer(jacobian, dtype=np.float32).reshape(f.size, n).astype(np.float64)
    if served is None or served == (1 << n) - 1:
        kept, dropped = delta_w_values(n, k)
        dw = np.where(unpack_bits(np.array([code]), n)[0] != 0, dropped, kept)
    else:
        dw = ablated_weights(code, served, n) - ablated_weights(0, served, n)
    return (f + J @ dw).reshape(shape)
