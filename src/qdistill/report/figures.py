"""Plots for the HTML pages: matplotlib figures rendered to inline SVG (no display, no network).

Figures are built with matplotlib's object API (``Figure``, never ``pyplot``), so making a
report changes no global backend; text stays text (``svg.fonttype: none``) so a page can be
searched and read by a screen reader, and each figure gets its own id salt so that several
figures can share one HTML page.

Example:
    >>> svg = line_plot("loss", [1, 2, 3], {"loss": [0.9, 0.5, 0.4]}, "epoch", "loss")
    >>> svg.startswith("<svg") and ">epoch<" in svg
    True
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

TEACHER, STUDENT = "#4c72b0", "#dd8452"
PALETTE = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")
STYLE = {"svg.fonttype": "none", "font.size": 10, "axes.titlesize": 11, "axes.grid": True, "grid.alpha": 0.3,
         "axes.spines.top": False, "axes.spines.right": False, "legend.fontsize": 9, "legend.framealpha": 0.85}
NO_METADATA = {"Date": None, "Creator": None, "Format": None, "Type": None}
WIDE = (7.5, 3.2)


def figure_svg(label: str, size: tuple[float, float], draw: Callable[[Figure], None],
               layout: str | None = "constrained") -> str:
    """Call ``draw(figure)`` on a new figure of ``size`` inches and return it as an inline ``<svg>`` element.

    ``layout=None`` skips matplotlib's constrained layout (a second drawing pass) for figures that
    place their axes themselves.

    Example:
        >>> figure_svg("empty", (2, 1), lambda fig: fig.add_subplot().set_title("t"))[:4]
        '<svg'
    """
    with matplotlib.rc_context({**STYLE, "svg.hashsalt": label}):
        fig = Figure(figsize=size, layout=layout)
        draw(fig)
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", metadata=NO_METADATA)
    return _inline(buffer.getvalue(), label)


def _inline(svg: str, label: str) -> str:
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)
    title = label.replace("&", "&amp;").replace("<", "&lt;").replace('"', "&quot;")
    return svg.replace("<svg ", f'<svg class="plot" role="img" aria-label="{title}" ', 1)


def _finish(ax: Axes, xlabel: str, ylabel: str, title: str = "", legend: bool = True) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best")


def _legend_on_top(fig: Figure, ax: Axes) -> None:
    """One legend above the plot area, where it covers no bar."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        wide = sum(len(label) for label in labels) > 70  # one row would be wider than the figure
        fig.legend(handles, labels, loc="outside upper center", ncols=min(len(labels), 2 if wide else 4), frameon=False)


def _integer_ticks(ax: Axes, x: Sequence[float]) -> None:
    """Whole-number ticks on x (epochs): each value when there are few, never 0.95 or 1.05 around one point."""
    if len(x) <= 12:
        ax.set_xticks(list(x))
        ax.set_xlim(min(x) - 0.5, max(x) + 0.5)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _as_percent(values: Sequence[float | None]) -> list[float]:
    return [np.nan if v is None else 100.0 * v for v in values]


def line_plot(label: str, x: Sequence[float], series: dict[str, Sequence[float | None]], xlabel: str, ylabel: str,
              *, hlines: dict[str, float] | None = None, percent: bool = False, log: bool = False,
              size: tuple[float, float] = (5.0, 3.0)) -> str:
    """One line per series (markers on the points; None values are gaps), optional labelled horizontal lines.

    With ``percent`` the values are fractions, drawn as percentages (the label should say "%").
    """
    scale = 100.0 if percent else 1.0

    def draw(fig: Figure) -> None:
        ax = fig.add_subplot()
        for index, (name, values) in enumerate(series.items()):
            ax.plot(x, [np.nan if v is None else scale * v for v in values], marker="o", color=PALETTE[index % 8],
                    label=name)
        for index, (name, value) in enumerate((hlines or {}).items()):
            ax.axhline(scale * value, linestyle="--", color=PALETTE[(index + len(series)) % 8], label=name)
        _integer_ticks(ax, x)
        if log:
            ax.set_yscale("log")
        _finish(ax, xlabel, ylabel)
    return figure_svg(label, size, draw)


def grouped_bars(label: str, categories: Sequence[str], panels: dict[str, dict[str, Sequence[float]]],
                 xlabel: str, ylabel: str, *, ylim: tuple[float, float] | None = None,
                 colors: Sequence[str] = (TEACHER, STUDENT)) -> str:
    """One panel per entry of ``panels`` (stacked), each with side-by-side bars per category and series."""
    def draw(fig: Figure) -> None:
        axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
        positions = np.arange(len(categories))
        for ax, (title, series) in zip(axes, panels.items(), strict=True):
            width = 0.8 / max(len(series), 1)
            for index, (name, values) in enumerate(series.items()):
                ax.bar(positions + (index - (len(series) - 1) / 2) * width, values, width, label=name,
                       color=colors[index % len(colors)])
            if ylim:
                ax.set_ylim(*ylim)
            _finish(ax, "", ylabel, title, legend=False)
        _legend_on_top(fig, axes[0])
        axes[-1].set_xticks(positions, list(categories))
        axes[-1].set_xlabel(xlabel)
    return figure_svg(label, (7.5, 1.2 + 1.9 * len(panels)), draw)


def heatmaps(label: str, matrices: dict[str, Sequence[Sequence[int]]], class_names: Sequence[str]) -> str:
    """Confusion matrices side by side on one colour scale, each cell labelled with its count."""
    def draw(fig: Figure) -> None:
        axes = fig.subplots(1, len(matrices), squeeze=False)[0]
        high = max(max(max(row) for row in matrix) for matrix in matrices.values()) or 1
        for ax, (title, matrix) in zip(axes, matrices.items(), strict=True):
            image = ax.imshow(np.asarray(matrix), cmap="Blues", vmin=0, vmax=high)
            _annotate(ax, np.asarray(matrix), high)
            ticks = np.arange(len(class_names))
            ax.set_xticks(ticks, list(class_names))
            ax.set_yticks(ticks, list(class_names))
            ax.grid(False)
            _finish(ax, "predicted class", "true class", title)
        fig.colorbar(image, ax=list(axes), label="test samples", shrink=0.8)
    return figure_svg(label, (4.0 * len(matrices) + 1.0, 4.0), draw)


def _annotate(ax: Axes, matrix: np.ndarray, high: float) -> None:
    if matrix.shape[0] > 20:
        return  # too small to read; the colour says enough
    for (row, col), count in np.ndenumerate(matrix):
        if count:
            ax.text(col, row, str(count), ha="center", va="center", fontsize=8,
                    color="white" if count > 0.6 * high else "black")


def image_grid(label: str, images: Sequence[np.ndarray], captions: Sequence[str], wrong: Sequence[bool],
               columns: int = 10) -> str:
    """Images in a grid, each with a caption (red when ``wrong``); 1-D inputs are drawn as a strip.

    One mosaic in one Axes, the captions as text above their tiles: a subplot per image made a
    20-image grid take 0.7 s to render, most of a run report's time.
    """
    tiles = [_grey_r_rgb(_displayable(np.asarray(image))) for image in images]
    height = max((tile.shape[0] for tile in tiles), default=1)
    width = max((tile.shape[1] for tile in tiles), default=1)
    columns = max(1, min(columns, len(tiles)))
    rows = max(1, -(-len(tiles) // columns))
    gap = max(1, width // 7)  # between tiles
    inches_per_pixel = 10.5 / 10 / (width + gap)  # a tile about 1 inch wide, as the captions' 8 pt text expects
    band = int(np.ceil(0.55 / inches_per_pixel))  # above each tile: room for a three-line caption
    cell_w, cell_h = width + gap, height + band
    mosaic = np.ones((rows * cell_h, columns * cell_w - gap, 3))
    for index, tile in enumerate(tiles):
        top, left = (index // columns) * cell_h + band, (index % columns) * cell_w
        mosaic[top:top + tile.shape[0], left:left + tile.shape[1]] = tile

    def draw(fig: Figure) -> None:
        ax = fig.add_axes((0, 0, 1, 1))
        ax.axis("off")
        ax.imshow(mosaic, interpolation="nearest")
        for index, (caption, bad) in enumerate(zip(captions, wrong, strict=False)):
            ax.text((index % columns) * cell_w + width / 2, (index // columns) * cell_h + band - 1.5, caption,
                    ha="center", va="bottom", fontsize=8, color="#b00020" if bad else "#1b5e20")
    return figure_svg(label, (mosaic.shape[1] * inches_per_pixel, mosaic.shape[0] * inches_per_pixel), draw,
                      layout=None)


def _grey_r_rgb(image: np.ndarray) -> np.ndarray:
    """An image from ``_displayable`` as RGB in 0..1, grey drawn dark on light (matplotlib's ``gray_r``)."""
    return np.repeat((1.0 - image)[..., None], 3, axis=-1) if image.ndim == 2 else image


def _displayable(image: np.ndarray) -> np.ndarray:
    """(H, W) grey or (H, W, 3) colour in 0..1 from (C, H, W), (H, W) or flat inputs."""
    if image.ndim == 3 and image.shape[0] == 3:
        image = np.moveaxis(image, 0, -1)
    elif image.ndim >= 2:
        image = image.reshape(image.shape[-2], image.shape[-1])
    else:
        image = image.reshape(1, -1)
    low, high = float(image.min()), float(image.max())
    return (image - low) / ((high - low) or 1.0)


def hbars(label: str, categories: Sequence[str], series: dict[str, Sequence[float | None]], xlabel: str,
          *, log: bool = False, colors: Sequence[str] = PALETTE, width: float = 7.5) -> str:
    """Horizontal bars, one group per category (top to bottom), each bar labelled with its value."""
    def draw(fig: Figure) -> None:
        ax = fig.add_subplot()
        positions = np.arange(len(categories))
        height = 0.8 / max(len(series), 1)
        for index, (name, values) in enumerate(series.items()):
            numbers = [np.nan if v is None else v for v in values]
            bars = ax.barh(positions + index * height, numbers, height, label=name, color=colors[index % len(colors)])
            ax.bar_label(bars, labels=[_short(v) for v in values], padding=2, fontsize=8)
        ax.set_yticks(positions + (len(series) - 1) * height / 2, list(categories))
        ax.invert_yaxis()
        if log:
            ax.set_xscale("log")
        ax.margins(x=0.15)
        _finish(ax, xlabel, "", legend=False)
        _legend_on_top(fig, ax)
    return figure_svg(label, (width, 1.1 + 0.3 * len(categories) * max(len(series), 1)), draw)


def _short(value: float | None) -> str:
    """A bar's label: three significant digits, whole numbers with separators from 1000 on."""
    if value is None:
        return ""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def scatter(label: str, series: dict[str, list[dict[str, Any]]], xlabel: str, ylabel: str, *,
            hlines: dict[str, float] | None = None, front: list[tuple[float, float]] | None = None,
            marked: tuple[float, float, str] | None = None, logx: bool = False,
            zoom: tuple[float, float] | None = None, band: tuple[float, str] | None = None,
            size: tuple[float, float] = WIDE) -> str:
    """Accuracy (a fraction, drawn in %) against x: points ``{x, y, text}`` per series, each labelled with its
    text; labelled horizontal lines; an optional front (a step line through ``(x, y)`` points), one
    marked point ``(x, y, name)``, a shaded ``band`` (lowest accuracy, label) up to 100%, and with
    ``zoom`` (low, high) a second panel showing only that range."""
    def draw(fig: Figure) -> None:
        axes = fig.subplots(1, 2 if zoom else 1, squeeze=False)[0]
        for ax in axes:
            _scatter_panel(ax, series, hlines, front, marked)
            if logx:
                ax.set_xscale("log")
            ax.margins(x=0.12, y=0.12)
            if band:
                low, high = ax.get_ylim()
                ax.axhspan(100 * band[0], 100.0, color="#55a868", alpha=0.12, label=band[1], zorder=0)
                ax.set_ylim(low, high)
            _finish(ax, xlabel, ylabel, legend=False)
        if zoom:
            axes[0].set_title("all runs")
            axes[1].set_ylim(100 * zoom[0], 100 * zoom[1])
            axes[1].set_title(f"zoomed in: {100 * zoom[0]:.1f}% to {100 * zoom[1]:.1f}%")
        _legend_on_top(fig, axes[0])
    return figure_svg(label, size, draw)


def _scatter_panel(ax: Axes, series: dict[str, list[dict[str, Any]]], hlines: dict[str, float] | None,
                   front: list[tuple[float, float]] | None, marked: tuple[float, float, str] | None) -> None:
    for index, (name, points) in enumerate(series.items()):
        _points(ax, points, name, PALETTE[index % 8], "os^Dv"[index % 5], below=index % 2 == 0)
    for index, (name, value) in enumerate((hlines or {}).items()):
        ax.axhline(100 * value, linestyle="--", color="#555555" if index == 0 else PALETTE[(index + 3) % 8], label=name)
    if front:
        xs, ys = zip(*sorted(front), strict=True)
        ax.plot(xs, _as_percent(ys), drawstyle="steps-post", color="#999999", zorder=1, label="Pareto front")
    if marked:
        ax.scatter([marked[0]], [100 * marked[1]], s=260, facecolors="none", edgecolors="#b00020", linewidths=2,
                   label=marked[2], zorder=4)


def _points(ax: Axes, points: list[dict[str, Any]], name: str, color: str, marker: str, below: bool) -> None:
    """A series' points, each labelled (below-right or above-right, so that two series at one x do not collide)."""
    if not points:
        return
    ax.scatter([p["x"] for p in points], _as_percent([p["y"] for p in points]), color=color, marker=marker, s=45,
               label=name, zorder=3)
    for point in points:
        ax.annotate(point.get("text", ""), (point["x"], 100 * point["y"]), textcoords="offset points",
                    xytext=(7, -11 if below else 5), fontsize=8, color=color)
