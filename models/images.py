"""Turning samples into pictures: PNG bytes, grids and the paper's Figure-2 layout."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor


def to_uint8(x: Tensor) -> np.ndarray:
    """Images in [-1, 1], (..., C, H, W) -> uint8 (..., H, W, C), values clipped."""
    y = ((x.detach().to(torch.float32).clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return y.movedim(-3, -1).cpu().numpy()


def to_pil(x: Tensor, scale: int = 1) -> Image.Image:
    """One image (C, H, W) in [-1, 1] -> PIL image (mode L or RGB), upscaled ``scale`` times."""
    a = to_uint8(x)
    img = Image.fromarray(a[..., 0], "L") if a.shape[-1] == 1 else Image.fromarray(a, "RGB")
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    return img


def png_bytes(x: Tensor) -> bytes:
    """One image (C, H, W) in [-1, 1] -> PNG bytes (deterministic for the same pixels)."""
    buf = io.BytesIO()
    to_pil(x).save(buf, format="PNG")
    return buf.getvalue()


def grid(images: Tensor, ncol: int = 8, scale: int = 4, pad: int = 2) -> Image.Image:
    """(B, C, H, W) in [-1, 1] -> one grid picture, row-major."""
    B, _, H, W = images.shape
    ncol = max(1, min(ncol, B))
    nrow = -(-B // ncol)
    cell_w, cell_h = W * scale + pad, H * scale + pad
    canvas = Image.new("RGB", (ncol * cell_w + pad, nrow * cell_h + pad), "white")
    for i in range(B):
        canvas.paste(to_pil(images[i], scale).convert("RGB"),
                     (pad + (i % ncol) * cell_w, pad + (i // ncol) * cell_h))
    return canvas


def attribution_figure(samples: Tensor, attributed: Sequence[Tensor],
                       captions: Sequence[Sequence[str]], titles: Sequence[str],
                       scale: int = 6, marked: Sequence[Sequence[bool]] | None = None) -> Image.Image:
    """The paper's Figure 2 layout: each generated sample above its top attributed items.

    Args:
        samples: (B, C, H, W) generated images, one per column.
        attributed: B tensors (K, C, H, W): the top-K training images of each sample.
        captions: B lists of K short strings drawn under each training image (e.g. scores).
        titles: B strings drawn above each sample (e.g. its seed).
        marked: B lists of K flags: a flagged training image gets a green frame (e.g. significant).
    """
    B, _, H, W = samples.shape
    K = max((a.shape[0] for a in attributed), default=0)
    font = ImageFont.load_default()
    text_h, gap = 12, 6
    cell_w = max(W * scale, 64) + gap
    cell_h = H * scale + text_h + gap
    canvas = Image.new("RGB", (B * cell_w + gap, text_h + (K + 1) * cell_h + gap + 4), "white")
    draw = ImageDraw.Draw(canvas)
    for b in range(B):
        x0 = gap + b * cell_w
        draw.text((x0, 2), titles[b][:14], fill="black", font=font)
        canvas.paste(to_pil(samples[b], scale).convert("RGB"), (x0, text_h + 2))
        y_line = text_h + H * scale + 4
        draw.line([(x0, y_line), (x0 + W * scale, y_line)], fill="red", width=2)
        for j in range(attributed[b].shape[0]):
            y0 = text_h + 4 + (j + 1) * cell_h
            canvas.paste(to_pil(attributed[b][j], scale).convert("RGB"), (x0, y0))
            if marked is not None and marked[b][j]:
                frame = [(x0 - 2, y0 - 2), (x0 + W * scale + 1, y0 + H * scale + 1)]
                draw.rectangle(frame, outline=(0, 160, 0), width=2)
            draw.text((x0, y0 + H * scale + 1), captions[b][j][:14], fill="black", font=font)
    return canvas
