"""Charts drawn on the server as inline SVG (no script, no inline style: the page's
Content-Security-Policy allows neither); colours come from the stylesheet's classes."""

from __future__ import annotations

from markupsafe import Markup, escape

from app.shares import DayTotal

WIDTH, HEIGHT = 640, 220
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 12, 36


SCALES = (1.0, 2.0, 5.0, 10.0, 20.0, 25.0, 50.0, 100.0)
"""Tops of the y axis in percent: the first at or above the largest bar is used."""


def _axis_top(largest: float) -> float:
    return next((top for top in SCALES if top >= largest), SCALES[-1])


def share_chart(days: list[DayTotal], holder: str) -> Markup:
    """Bars of the holder's share of each day's attributed generations (percent), with an
    accessible title and description and one <title> per bar (hover text)."""
    percents = [100.0 * d.share for d in days]
    top = _axis_top(max(percents, default=0.0))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / max(1, len(days))
    parts = [f'<svg id="share-chart" class="chart" role="img" aria-labelledby="share-chart-title '
             f'share-chart-desc" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
             f'xmlns="http://www.w3.org/2000/svg">',
             f'<title id="share-chart-title">Share of {escape(holder)} per day</title>',
             f'<desc id="share-chart-desc">{len(days)} days from {days[0].day if days else "-"} to '
             f'{days[-1].day if days else "-"}; the largest daily share is {max(percents, default=0.0):.1f}%.'
             '</desc>']
    for frac in (0.0, 0.5, 1.0):
        y = TOP + plot_h * (1 - frac)
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text class="axis" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
                     f'{top * frac:g}%</text>')
    for i, (d, pct) in enumerate(zip(days, percents, strict=True)):
        h = plot_h * pct / top
        x = LEFT + i * slot + slot * 0.15
        parts.append(f'<rect class="bar" x="{x:.1f}" y="{TOP + plot_h - h:.1f}" width="{slot * 0.7:.1f}" '
                     f'height="{h:.1f}" data-day="{d.day}" data-share="{d.share:.6f}">'
                     f'<title>{d.day}: {pct:.1f}% ({d.total:.2f} of {d.attributable} generations)</title>'
                     '</rect>')
        if i % 7 == 0 or i == len(days) - 1:
            parts.append(f'<text class="axis" x="{x + slot * 0.35:.1f}" y="{HEIGHT - BOTTOM + 16}" '
                         f'text-anchor="middle">{d.day.strftime("%b %d")}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
