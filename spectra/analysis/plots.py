"""Figures of an analysis, as PNG files: tables in (polars DataFrames, numpy arrays), a file out. No statistics.

    head_heatmap        layer x head grid of one per-head value (a metric's mean)
    correlation_heatmaps  layer x head grids of query_norm's partial r with a metric (heads with q < 0.05 marked)
                        and, beside it and labelled so, the token-level Spearman r
    position_curves     mean metric vs token position: every layer thin on a depth colour scale, a few
                        highlighted, one panel per metric
    density_panels      2-D histogram of two per-token values for a few heads (the report: position-centred ranks)
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


def layer_head_grid(table: pl.DataFrame, value: str) -> np.ndarray:
    """(L, H) array of table's `value` per (layer, head); NaN where the table has no row or no value."""
    grid = np.full((int(table["layer"].max()) + 1, int(table["head"].max()) + 1), np.nan)  # (L, H)
    grid[table["layer"].to_numpy(), table["head"].to_numpy()] = table[value].cast(pl.Float64).fill_null(np.nan)
    return grid


def draw_grid(figure, axes, grid: np.ndarray, label: str, title: str, diverging: bool):
    """One layer x head panel; a NaN cell (no value) shows grey, never as a colour of the scale."""
    cmap = plt.get_cmap("RdBu_r" if diverging else "viridis").with_extremes(bad="0.75")
    limits = {"vmin": -1, "vmax": 1} if diverging else {}
    image = axes.imshow(grid, aspect="auto", origin="lower", interpolation="nearest", cmap=cmap, **limits)
    figure.colorbar(image, ax=axes, label=label)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("head")
    axes.set_ylabel("layer")
    axes.set_title(title, fontsize="medium")


def grid_size(layers: int, heads: int, panels: int = 1) -> tuple[float, float]:
    return min(2 + 0.35 * heads, 16) * panels, min(1.5 + 0.3 * layers, 14)


def head_heatmap(table: pl.DataFrame, value: str, title: str, path: Path) -> Path:
    """table: one row per (layer, head) with column `value` (a metric's mean)."""
    grid = layer_head_grid(table, value)
    figure, axes = plt.subplots(figsize=grid_size(*grid.shape))
    draw_grid(figure, axes, grid, value, title, diverging=False)
    return save(figure, path)


def correlation_heatmaps(rows: pl.DataFrame, title: str, path: Path, level: float = 0.05) -> Path:
    """rows: one metric's correlations.parquet rows (layer, head, partial_r, partial_q, spearman_r). Left the
    partial r the report leads with, a dot on each head with q < level; right the token-level Spearman r."""
    partial, plain = layer_head_grid(rows, "partial_r"), layer_head_grid(rows, "spearman_r")
    width, height = grid_size(*partial.shape, panels=2)
    figure, (left, right) = plt.subplots(1, 2, figsize=(width + 1, height + 0.4), layout="constrained")
    draw_grid(figure, left, partial, "partial r", f"partial r, controlled for position\n(dot: q < {level})", True)
    significant = rows.filter(pl.col("partial_q") < level)
    left.scatter(significant["head"], significant["layer"], s=6, c="black", marker="o", linewidths=0)
    draw_grid(figure, right, plain, "Spearman r", "token-level Spearman r\n(no position control, for comparison)", True)
    figure.suptitle(title)
    return save(figure, path)


def highlighted_layers(layers: list[int], count: int = 4) -> list[int]:
    """The first, the last and evenly spaced layers between: the few a reader can tell apart."""
    if len(layers) <= count:
        return list(layers)
    return [layers[round(i * (len(layers) - 1) / (count - 1))] for i in range(count)]


def position_curves(profile: pl.DataFrame, metrics: Sequence[str], path: Path, title: str = "") -> Path:
    """profile: rows (layer, token_pos, <metric>...); one panel per metric. Up to 6 layers each gets a line
    and a legend; beyond, every layer is a thin line on a depth colour scale and a few layers (first, last,
    between) are drawn thick and named, so that 30 layers do not tangle into one band."""
    figure, panels = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.8), squeeze=False,
                                  layout="constrained")  # fmt: skip
    layers = profile["layer"].unique().sort().to_list()
    colours = layer_colours(figure, panels[0].tolist(), layers, threshold=6)
    shown = highlighted_layers(layers) if len(layers) > 6 else layers
    for axes, metric in zip(panels[0], metrics):
        for colour, layer in zip(colours, layers):
            rows = profile.filter(pl.col("layer") == layer)
            thick = layer in shown
            axes.plot(rows["token_pos"], rows[metric], color=colour if thick or len(layers) <= 6 else (*colour[:3], 0.25),
                      linewidth=1.6 if thick else 0.6, label=f"layer {layer}" if thick else None,
                      zorder=3 if thick else 2)  # fmt: skip
        axes.set_xlabel("token position t")
        axes.set_title(f"mean {metric}")
    panels[0][0].legend(fontsize="small", loc="best", title="thick lines" if len(layers) > 6 else None,
                        title_fontsize="small")  # fmt: skip
    figure.suptitle(title)
    return save(figure, path)


def density_panels(
    heads: Sequence[tuple[str, np.ndarray, np.ndarray]], x: str, y: str, path: Path, max_bins: int = 80,
    title: str = "",
) -> Path:  # fmt: skip
    """heads: (panel title, x values, y values); one log-scaled 2-D histogram per head."""
    columns = min(len(heads), 4)
    rows = -(-len(heads) // columns)
    figure, panels = plt.subplots(
        rows, columns, figsize=(4.8 * columns, 3.8 * rows + 0.4), squeeze=False, layout="constrained"
    )
    for axes in panels.flat[len(heads) :]:
        axes.axis("off")
    for axes, (panel_title, xs, ys) in zip(panels.flat, heads):
        if len(xs):
            bins = int(np.clip(np.sqrt(len(xs)), 10, max_bins))  # a few hundred tokens: coarser bins
            _, _, _, image = axes.hist2d(xs, ys, bins=bins, norm=LogNorm(vmin=1), cmap="magma_r")
            figure.colorbar(image, ax=axes, label="tokens")
        axes.set_title(panel_title, fontsize="medium")
        axes.set_xlabel(x)
        axes.set_ylabel(y)
    figure.suptitle(title)
    return save(figure, path)


def layer_colours(figure, axes_list, layers: list[int], threshold: int = 12):
    """Colours by depth; beyond `threshold` layers a colour bar says which is which (a legend would hide them)."""
    colours = plt.get_cmap("viridis")(np.linspace(0, 1, max(len(layers), 1)))
    if len(layers) > threshold:
        mappable = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(min(layers), max(layers)))
        figure.colorbar(mappable, ax=axes_list, label="layer")
    return colours


def sweep_lines(comparison: pl.DataFrame, x: str, others: Sequence[str], value: str, path: Path) -> Path:
    """comparison: rows (run, <x>, <others>..., layer, <value>). value vs x, one line per layer; one panel per
    combination of the other swept keys, named in its title, so runs that differ in more than x never share a
    line."""
    # partial_r_<y>: the layer's median over heads of query_norm's position-controlled r with y.
    label = f"median partial r, query_norm vs {value.removeprefix('partial_r_')}" if value.startswith("partial_r_") else (
        f"mean {value}"
    )
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
        axes.set_ylabel(label)
        axes.set_title(", ".join(f"{k}={v}" for k, v in zip(others, combination)) or f"{label} per layer",
                       fontsize="small")  # fmt: skip
        if len(layers) <= 12:
            axes.legend(fontsize="x-small")
    figure.suptitle(f"{label} per layer across runs, x = {x}")
    return save(figure, path)
