"""Small statistical figures drawn with PIL only (no matplotlib): overlaid histograms,
scatter panels, labelled image rows. Used by the experiments' reports.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from models.images import to_pil

COLORS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189))
_FONT = ImageFont.load_default()


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def histogram(groups: dict[str, np.ndarray], title: str, xlabel: str, *, bins: int = 40,
              size: tuple[int, int] = (420, 260)) -> Image.Image:
    """Overlaid density histograms (step outlines) of several 1-D samples on shared bins.

    Each group is normalised to unit area so groups of different sizes compare by shape.
    """
    w, h = size
    left, right, top, bottom = 44, 10, 22, 34
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    vals = [np.asarray(v, float)[np.isfinite(v)] for v in groups.values()]
    allv = np.concatenate(vals) if vals else np.zeros(0)
    lo, hi = (float(allv.min()), float(allv.max())) if allv.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    dens = [np.histogram(v, edges, density=True)[0] if v.size else np.zeros(bins) for v in vals]
    ymax = max((float(x.max()) for x in dens), default=1.0) or 1.0
    pw, ph = w - left - right, h - top - bottom
    d.rectangle([left, top, left + pw, top + ph], outline="black")
    for j, (name, y) in enumerate(zip(groups, dens, strict=True)):
        color = COLORS[j % len(COLORS)]
        pts = []
        for b in range(bins):
            x0 = left + pw * b / bins
            x1 = left + pw * (b + 1) / bins
            yy = top + ph * (1 - y[b] / ymax)
            pts += [(x0, yy), (x1, yy)]
        pts = [(left, top + ph), *pts, (left + pw, top + ph)]
        d.line(pts, fill=color, width=2)
        d.text((left + 6, top + 4 + 12 * j), f"{name} (n={len(vals[j])})", fill=color, font=_FONT)
    d.text((4, 4), title, fill="black", font=_FONT)
    d.text((left, top + ph + 4), _fmt(lo), fill="black", font=_FONT)
    d.text((left + pw - 30, top + ph + 4), _fmt(hi), fill="black", font=_FONT)
    d.text((left + pw // 2 - 20, top + ph + 18), xlabel, fill="black", font=_FONT)
    d.text((2, top), "dens.", fill="black", font=_FONT)
    return img


def scatter(x: np.ndarray, y: np.ndarray, title: str, xlabel: str, ylabel: str, *,
            highlight: np.ndarray | None = None, size: tuple[int, int] = (260, 240)) -> Image.Image:
    """A scatter panel of y against x; points where ``highlight`` is True drawn in red."""
    w, h = size
    left, right, top, bottom = 40, 8, 22, 30
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    pw, ph = w - left - right, h - top - bottom
    d.rectangle([left, top, left + pw, top + ph], outline="black")
    if ok.any():
        x0, x1 = float(x[ok].min()), float(x[ok].max())
        y0, y1 = float(y[ok].min()), float(y[ok].max())
        x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
        hl = np.zeros_like(ok) if highlight is None else np.asarray(highlight, bool)
        for i in np.argsort(hl, kind="stable"):  # highlighted points drawn last (on top)
            if not ok[i]:
                continue
            px = left + pw * (x[i] - x0) / (x1 - x0)
            py = top + ph * (1 - (y[i] - y0) / (y1 - y0))
            c = COLORS[1] if hl[i] else COLORS[0]
            d.ellipse([px - 1.5, py - 1.5, px + 1.5, py + 1.5], fill=c)
        d.text((left, top + ph + 2), _fmt(x0), fill="black", font=_FONT)
        d.text((left + pw - 30, top + ph + 2), _fmt(x1), fill="black", font=_FONT)
        d.text((2, top + ph - 10), _fmt(y0), fill="black", font=_FONT)
        d.text((2, top), _fmt(y1), fill="black", font=_FONT)
    d.text((4, 4), title, fill="black", font=_FONT)
    d.text((left + pw // 2 - 30, top + ph + 14), xlabel, fill="black", font=_FONT)
    d.text((left + 4, top + 2), ylabel, fill="gray", font=_FONT)
    return img


def image_table(rows: Sequence[Tensor], header: Sequence[str], row_labels: Sequence[str], *,
                scale: int = 5, marks: Sequence[Sequence[bool]] | None = None) -> Image.Image:
    """A table of images: row r shows ``rows[r]`` (K, C, H, W) left to right.

    ``header`` names the K columns, ``row_labels`` the rows; ``marks[r][j]`` frames cell (r, j)
    in red (e.g. the column of the predicted class, or a miss).
    """
    K = max(r.shape[0] for r in rows)
    H, W = rows[0].shape[-2:]
    cw, ch = max(W * scale, 40) + 6, H * scale + 6
    lw, th = 64, 14
    img = Image.new("RGB", (lw + K * cw + 4, th + len(rows) * ch + 4), "white")
    d = ImageDraw.Draw(img)
    for j, name in enumerate(header[:K]):
        d.text((lw + j * cw, 1), name[:9], fill="black", font=_FONT)
    for r, ims in enumerate(rows):
        y0 = th + r * ch
        d.text((2, y0 + ch // 2 - 6), row_labels[r][:10], fill="black", font=_FONT)
        for j in range(ims.shape[0]):
            x0 = lw + j * cw
            img.paste(to_pil(ims[j], scale).convert("RGB"), (x0 + 2, y0 + 2))
            if marks is not None and marks[r][j]:
                d.rectangle([x0, y0, x0 + W * scale + 3, y0 + H * scale + 3], outline=COLORS[1], width=2)
    return img


def stack(images: Sequence[Image.Image], *, horizontal: bool = False, pad: int = 6) -> Image.Image:
    """Paste pictures one below the other (or side by side) on a white canvas."""
    along = sum(i.width if horizontal else i.height for i in images) + pad * (len(images) + 1)
    across = max(i.height if horizontal else i.width for i in images) + 2 * pad
    size = (along, across) if horizontal else (across, along)
    out = Image.new("RGB", size, "white")
    pos = pad
    for im in images:
        out.paste(im, (pos, pad) if horizontal else (pad, pos))
        pos += (im.width if horizontal else im.height) + pad
    return out
