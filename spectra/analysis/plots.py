"""Figures of an analysis, as PNG files: tables in (polars DataFrames, numpy arrays), a file out. No statistics.

    head_heatmap        layer x head grid of one per-head value (a metric's mean, a correlation r)
    position_curves     mean metric vs token position, one line per layer, one panel per metric
    density_panels      2-D histogram of query_norm vs a metric for a few heads
    sweep_lines         a per-layer value across the runs of a sweep: x = the main swept key, a panel per
                        combination of the others

    python -m spectra.analyze run_dir=<run>     # writes them under <run>/analysis/
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display, and no GUI backend probing on headless machines

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

DPI = 120


def save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return path


def head_heatmap(table: pl.DataFrame, value: str, title: str, path: Path, diverging: bool = False) -> Path:
    """table: one row per (layer, head) with column `value`. diverging: a correlation, colours fixed to [-1, 1]."""
    layers = int(table["layer"].max()) + 1
    heads = int(table["head"].max()) + 1
    grid = np.full((layers, heads), np.nan)  # (L, H)
    grid[table["layer"].to_numpy(), table["head"].to_numpy()] = table[value].cast(pl.Float64).fill_null(np.nan)
    figure, axes = plt.subplots(figsize=(min(2 + 0.35 * heads, 16), min(1.5 + 0.3 * layers, 14)))
    limits = {"cmap": "RdBu_r", "vmin": -1, "vmax": 1} if diverging else {"cmap": "viridis"}
    image = axes.imshow(grid, aspect="auto", origin="lower", interpolation="nearest", **limits)
    figure.colorbar(image, ax=axes, label=value)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("head")
    axes.set_ylabel("layer")
    axes.set_title(title)
    return save(figure, path)


def position_curves(profile: pl.DataFrame, metrics: Sequence[str], path: Path, title: str = "") -> Path:
    """profile: rows (layer, token_pos, <metric>...); one panel per metric, one line per layer (coloured by depth)."""
    figure, panels = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.6), squeeze=False)
    layers = profile["layer"].unique().sort().to_list()
    colours = layer_colours(figure, [panels[0][-1]], layers)
    for axes, metric in zip(panels[0], metrics):
        for colour, layer in zip(colours, layers):
            rows = profile.filter(pl.col("layer") == layer)
            axes.plot(rows["token_pos"], rows[metric], color=colour, linewidth=1, label=f"layer {layer}")
        axes.set_xlabel("token position t")
        axes.set_title(f"mean {metric}")
    if len(layers) <= 12:
        panels[0][-1].legend(fontsize="small", loc="best")
    figure.suptitle(title)
    return save(figure, path)


def density_panels(
    heads: Sequence[tuple[int, int, np.ndarray, np.ndarray]], x: str, y: str, path: Path, max_bins: int = 80
) -> Path:
    """heads: (layer, head, x values, y values); one log-scaled 2-D histogram per head."""
    columns = min(len(heads), 4)
    rows = -(-len(heads) // columns)
    figure, panels = plt.subplots(
        rows, columns, figsize=(4.8 * columns, 3.8 * rows), squeeze=False, layout="constrained"
    )
    for axes in panels.flat[len(heads) :]:
        axes.axis("off")
    for axes, (layer, head, xs, ys) in zip(panels.flat, heads):
        if len(xs):
            bins = int(np.clip(np.sqrt(len(xs)), 10, max_bins))  # a few hundred tokens: coarser bins
            _, _, _, image = axes.hist2d(xs, ys, bins=bins, norm=LogNorm(vmin=1), cmap="magma_r")
            figure.colorbar(image, ax=axes, label="tokens")
        axes.set_title(f"layer {layer}, head {head} (n={len(xs):,})")
        axes.set_xlabel(x)
        axes.set_ylabel(y)
    return save(figure, path)


def layer_colours(figure, axes_list, layers: list[int]):
    """Colours by depth; a legend up to 12 layers, beyond that a colour bar (a legend of 30 hides the lines)."""
    colours = plt.get_cmap("viridis")(np.linspace(0, 1, max(len(layers), 1)))
    if len(layers) > 12:
        mappable = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(min(layers), max(layers)))
        figure.colorbar(mappable, ax=axes_list, label="layer")
    return colours


def sweep_lines(comparison: pl.DataFrame, x: str, others: Sequence[str], value: str, path: Path) -> Path:
    """comparison: rows (run, <x>, <others>..., layer, <value>). value vs x, one line per layer; one panel per
    combination of the other swept keys, named in its title, so runs that differ in more than x never share a
    line."""
    panels_of = comparison.select(others).unique(maintain_order=True).rows() if others else [()]
    columns = min(len(panels_of), 3)
    rows_count = -(-len(panels_of) // columns)
    figure, panels = plt.subplots(
        rows_count, columns, figsize=(5.2 * columns, 3.8 * rows_count), squeeze=False, layout="constrained"
    )
    for axes in panels.flat[len(panels_of) :]:
        axes.axis("off")
    layers = comparison["layer"].unique().sort().to_list()
    colours = layer_colours(figure, panels.ravel().tolist(), layers)
    numeric = comparison[x].dtype.is_numeric()
    ticks = comparison[x].unique().sort().to_list()
    for axes, combination in zip(panels.flat, panels_of):
        rows = comparison
        for key, level in zip(others, combination):
            rows = rows.filter(pl.col(key).eq_missing(level))
        for colour, layer in zip(colours, layers):
            line = rows.filter(pl.col("layer") == layer).sort(x)
            xs = line[x].to_numpy() if numeric else np.array([ticks.index(v) for v in line[x].to_list()])
            axes.plot(xs, line[value], marker="o", color=colour, label=f"layer {layer}")
        if not numeric:
            axes.set_xticks(range(len(ticks)), [str(t) for t in ticks], rotation=30, ha="right")
        axes.set_xlabel(x)
        axes.set_ylabel(f"mean {value}")
        axes.set_title(", ".join(f"{k}={v}" for k, v in zip(others, combination)) or f"mean {value} per layer",
                       fontsize="small")  # fmt: skip
        if len(layers) <= 12:
            axes.legend(fontsize="x-small")
    figure.suptitle(f"mean {value} per layer across runs, x = {x}")
    return save(figure, path)
