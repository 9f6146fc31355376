"""The report's plots as inline SVG, so the page stays one file that fetches nothing.

Each plot is built with `Markup(...).format(...)`, which escapes every argument: a label, a run
name or a unit from the user's files lands in the SVG as text, never as markup. Numbers and the
report's own colours are the only other things formatted in. The result is `Markup`, so the
template inserts it as it is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from markupsafe import Markup

Series = tuple[str, list[tuple[float, float]], str, bool]
"""(label, points, colour, with markers) of one line."""


class Mark(NamedTuple):
    """A labelled place on a line chart: with `y`, a ring around that point (the best step);
    without, a dashed line across the plot at `x` (where training stopped)."""

    x: float
    label: str
    y: float | None = None


def line_chart(series: list[Series], x_label: str, y_label: str, width: int = 720, height: int = 300,
               marks: Sequence[Mark] = ()) -> Markup:
    """A line chart with round ticks on both axes; the legend sits under the plot, in HTML, so it
    can never hide a line."""
    xs = [x for _, points, _, _ in series for x, _ in points] + ([m.x for m in marks] if series else [])
    ys = [y for _, points, _, _ in series for _, y in points if math.isfinite(y)]
    if not xs or not ys:
        return Markup("")
    left, right, top, bottom = 56, 16, 12, 40
    x_ticks, y_ticks = ticks(min(xs), max(xs), whole=True), ticks(min(ys), max(ys))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def sx(x: float) -> str:
        return f"{left + (x - x0) / ((x1 - x0) or 1) * (width - left - right):.1f}"

    def sy(y: float) -> str:
        return f"{height - bottom - (y - y0) / ((y1 - y0) or 1) * (height - top - bottom):.1f}"

    parts = [Markup("<svg class=chart viewBox='0 0 {w} {h}' width='{w}' height='{h}' role='img'>").format(
        w=width, h=height)]
    for y in y_ticks:
        parts.append(Markup("<line x1='{l}' x2='{r}' y1='{y}' y2='{y}' class=grid />"
                            "<text x='{t}' y='{ty:.1f}' text-anchor='end'>{label}</text>").format(
            l=left, r=width - right, y=sy(y), t=left - 6, ty=float(sy(y)) + 4, label=tick_label(y)))
    for x in x_ticks:
        parts.append(Markup("<line x1='{x}' x2='{x}' y1='{b}' y2='{b4}' class=axis />"
                            "<text x='{x}' y='{b17}' text-anchor='middle'>{label}</text>").format(
            x=sx(x), b=height - bottom, b4=height - bottom + 4, b17=height - bottom + 17, label=tick_label(x)))
    parts.append(Markup("<line x1='{l}' x2='{r}' y1='{b}' y2='{b}' class=axis />"
                        "<text x='{mid}' y='{h4}' text-anchor='middle'>{x_label}</text>"
                        "<text transform='translate(14 {ymid}) rotate(-90)' text-anchor='middle'>{y_label}</text>"
                        ).format(
        l=left, r=width - right, b=height - bottom, mid=(left + width - right) / 2, h4=height - 4,
        ymid=(top + height - bottom) / 2, x_label=x_label, y_label=y_label))
    for _, points, colour, markers in series:
        points = [(x, y) for x, y in points if math.isfinite(y)]
        path = " ".join(f"{'M' if j == 0 else 'L'}{sx(x)},{sy(y)}" for j, (x, y) in enumerate(points))
        parts.append(Markup("<path d='{d}' fill='none' stroke='{c}' stroke-width='2' />").format(d=path, c=colour))
        if markers or len(points) == 1:
            parts += [Markup("<circle cx='{x}' cy='{y}' r='3' fill='{c}' />").format(x=sx(x), y=sy(y), c=colour)
                      for x, y in points]
    for mark in marks:
        if mark.y is None:
            parts.append(Markup("<line x1='{x}' x2='{x}' y1='{t}' y2='{b}' class=limit />"
                                "<text x='{tx:.1f}' y='{ty}' text-anchor='end' class=limit>{label}</text>").format(
                x=sx(mark.x), t=top, b=height - bottom, tx=float(sx(mark.x)) - 4, ty=top + 10, label=mark.label))
        elif math.isfinite(mark.y):
            parts.append(Markup("<circle cx='{x}' cy='{y}' r='7' fill='none' class=mark />"
                                "<text x='{x}' y='{ty:.1f}' text-anchor='middle' class=mark>{label}</text>").format(
                x=sx(mark.x), y=sy(mark.y), ty=float(sy(mark.y)) + 20, label=mark.label))
    parts.append(Markup("</svg>"))
    legend = Markup("").join(Markup("<span class=key><i style='background:{c}'></i>{label}</span>").format(
        c=colour, label=label) for label, _, colour, _ in series)
    return Markup("<figure>{svg}<figcaption class=legend>{legend}</figcaption></figure>").format(
        svg=Markup("").join(parts), legend=legend)


def histogram(bins: list[list[int]], unit: str, limit: int | None = None) -> Markup:
    """Bars of data_check.json's length histogram ([low, high, rows] per bin), both axes
    labelled, and `--max-length` as a dashed line where it falls."""
    if not bins or not any(b[2] for b in bins):
        return Markup("")
    left, width, height, top = 48, 480, 120, max(b[2] for b in bins)
    step = width / len(bins)
    bars = Markup("").join(
        Markup("<rect x='{x:.1f}' y='{y:.1f}' width='{w:.1f}' height='{h:.1f}' fill='#1f6fb4'>"
               "<title>{low}–{high} {unit}: {rows} rows</title></rect>").format(
            x=left + i * step + 1, y=height - 100 * b[2] / top, w=step - 2, h=100 * b[2] / top,
            low=b[0], high=b[1], unit=unit, rows=b[2]) for i, b in enumerate(bins))
    axes = Markup(
        "<line x1='{l}' x2='{r}' y1='{h}' y2='{h}' class=axis />"
        "<line x1='{l}' x2='{l}' y1='{h100}' y2='{h}' class=axis />"
        "<text x='{l4}' y='{h96}' text-anchor='end'>{top}</text>"
        "<text x='{l4}' y='{hp4}' text-anchor='end'>0</text>"
        "<text transform='translate(12 {h50}) rotate(-90)' text-anchor='middle'>rows</text>"
        "<text x='{l}' y='{h14}'>{first}</text>"
        "<text x='{r}' y='{h14}' text-anchor='end'>{last}</text>"
        "<text x='{mid}' y='{h30}' text-anchor='middle'>example length ({unit})</text>").format(
        l=left, r=left + width, h=height, h100=height - 100, l4=left - 4, h96=height - 96, top=top, hp4=height + 4,
        h50=height - 50, h14=height + 14, first=bins[0][0], last=bins[-1][1], mid=left + width / 2, h30=height + 30,
        unit=unit)
    mark = Markup("")
    span = bins[-1][1] + 1 - bins[0][0]
    if limit is not None and span > 0:
        x = left + width * (limit - bins[0][0]) / span
        mark = Markup("<line x1='{x:.1f}' x2='{x:.1f}' y1='{top}' y2='{h}' class=limit />"
                      "<text x='{tx:.1f}' y='{ty}' text-anchor='end' class=limit>--max-length {limit}</text>").format(
            x=x, top=height - 108, h=height, tx=x - 4, ty=height - 100, limit=limit)
    caption = "Rows of the data file by length" + (f"; rows longer than --max-length {limit} are dropped or "
                                                   "cut as --truncation says" if limit is not None else "")
    return Markup("<figure><svg class=hist viewBox='0 -12 {w} {h}' width='{w}' height='{h}' role='img'>"
                  "{bars}{axes}{mark}</svg><figcaption>{caption}.</figcaption></figure>").format(
        w=left + width + 8, h=height + 48, bars=bars, axes=axes, mark=mark, caption=caption)


def ticks(low: float, high: float, count: int = 5, whole: bool = False) -> list[float]:
    """Round tick values that cover [low, high]; with `whole`, whole numbers only (steps)."""
    if high <= low:
        low, high = low - 1, high + 1
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    steps = [m * magnitude for m in ((1, 2, 5, 10) if whole else (1, 2, 2.5, 5, 10))]
    step = next(m for m in steps if m >= raw)
    step = max(step, 1) if whole else step
    start, values = math.floor(round(low / step, 9)) * step, []
    while not values or values[-1] < high - 1e-12:
        values.append(round(start + step * len(values), 10))
    return values


def tick_label(value: float) -> str:
    return f"{value:g}"
