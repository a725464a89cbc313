"""explorer.html: one self-contained page to look at a run's metrics on its text, head by head.

    python -m spectra.analyze run_dir=<run>     # writes <run>/analysis/explorer.html next to report.md

The page opens from disk with no network: plotly.js (from the `plotly` Python package) is inlined, and so is the
data. It shows the layer x head heatmaps of the per-head table (position-controlled partial r of query_norm with
each metric and its q-value, every metric's mean); a click on a head shows the sample's text with each token
coloured by the chosen metric (exact values on hover), that head's query_norm-vs-entropy scatter (raw, or as
residual ranks: position controlled, the quantities whose correlation is partial_r) and its position profile.

What it embeds, and why it stays bounded:
    per-head table      heads.parquet's means joined with correlations.parquet's partial_r/ci/q, one row a head
    top tokens          top_tokens.parquet
    token rows          every metric (and ratio) of every head for the first samples that fit TOKEN_VALUES
                        float32 values (fewer positions when even one sample does not); never the whole run
    residual ranks      query_norm and entropy, ranked over all of the run's samples, of the embedded rows
    position profiles   per head, means over all samples in at most PROFILE_POINTS position bins
The page states these bounds and its own size. Statistics come from the tables analyze wrote (heads.parquet,
correlations.parquet, tokens.parquet, top_tokens.parquet); token rows, ranks and profiles from the metric parts.
"""

from __future__ import annotations

import base64
import json
import math
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl

from spectra.analysis.head_stats import metric_columns, with_ratios
from spectra.store.manifest import write_text_atomic

TOKEN_VALUES = 2_500_000  # float32 values of token rows in the page (10 MB, 13 MB as base64)
PROFILE_POINTS = 128  # position bins per head profile
ROWS_PER_PASS = 4_000_000  # metric rows ranked at once for the residual ranks (~0.3 GB), whatever the run's size
RESIDUALS = ("query_norm", "entropy")  # the scatter's axes, as residual ranks
PARTIAL = ("partial_r", "partial_ci_low", "partial_ci_high", "partial_q")
PAGE = "explorer_page.html"  # the page's HTML, CSS and JavaScript, shipped beside this module


def head_table(out: Path) -> pl.DataFrame:
    """One row per (layer, head): every metric's mean (heads.parquet) and, per metric y, the position-controlled
    partial_r, its interval and q-value of query_norm with y (correlations.parquet) as `partial_r_<y>`, ...
    The table the page's heatmaps and head panel show, and the one logged to W&B."""
    heads = pl.read_parquet(out / "heads.parquet", glob=False)
    table = heads.select("layer", "head", *[c for c in heads.columns if c.endswith("_mean")])
    correlations = pl.read_parquet(out / "correlations.parquet", glob=False)
    if "partial_r" in correlations.columns and correlations.height:
        wide = correlations.pivot(on="y", index=["layer", "head"], values=list(PARTIAL), separator="_")
        # entropy first: the question the report leads with.
        ys = sorted(correlations["y"].unique().to_list(), key=lambda y: (y != "entropy", y))
        wide = wide.select("layer", "head", *[f"{name}_{y}" for y in ys for name in PARTIAL])
        table = wide.join(table, on=["layer", "head"], how="right").select("layer", "head", pl.exclude("layer", "head"))
    return table.sort("layer", "head")


def tables(out: Path) -> dict[str, pl.DataFrame]:
    """The page's tables, for W&B: the per-head table and, when the run's text was decoded, the top tokens."""
    found = {"explorer_heads": head_table(out)}
    if (out / "top_tokens.parquet").is_file():
        found["top_tokens"] = pl.read_parquet(out / "top_tokens.parquet", glob=False)
    return found


def shown_window(samples: int, positions: int, values_per_token: int, budget: int) -> tuple[int, int]:
    """(samples, positions) of token rows to embed: whole samples while they fit the budget, else the first
    positions of one sample. values_per_token: layers x heads x embedded columns."""
    whole = budget // max(values_per_token * positions, 1)
    if whole >= 1:
        return min(samples, whole), positions
    return 1, max(budget // max(values_per_token, 1), 1)


def residual_ranks(lf: pl.LazyFrame, skip_positions: int, columns: Sequence[str] = RESIDUALS) -> pl.LazyFrame:
    """Per (layer, head): each column ranked over the head's rows (t >= skip_positions, all samples), minus the
    mean rank at the row's position, as a fraction of the head's rows: `<column>_residual`. The Pearson r of
    two such columns over a head's rows is controlled.py's partial_r."""
    head = ("layer", "head")
    lf = lf.filter(pl.col("token_pos") >= skip_positions)
    lf = lf.with_columns(pl.col(c).cast(pl.Float64).rank("average").over(head).alias(f"{c}_rank") for c in columns)
    return lf.with_columns(
        ((pl.col(f"{c}_rank") - pl.col(f"{c}_rank").mean().over(*head, "token_pos")) / pl.len().over(head))
        .alias(f"{c}_residual")
        for c in columns
    ).select("sample_id", "layer", "head", "token_pos", *[f"{c}_residual" for c in columns])


def float32_base64(values: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(values, dtype="<f4").tobytes()).decode("ascii")


def token_rows(
    lf: pl.LazyFrame, windows, skip_positions: int, sample_ids: list[int], positions: int, layers: list[int],
    heads: int, layer_rows: int,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Every metric, ratio and residual rank of the shown samples' first `positions` tokens, as float32 arrays
    indexed ((sample, layer, head), position) in the order of sample_ids and layers; NaN where a row is missing
    or a value undefined (ratios at t = 0, residuals at t < skip_positions). layer_rows: a layer's rows in the run."""
    shown = (pl.col("sample_id").is_in(sample_ids)) & (pl.col("token_pos") < positions)
    keys = ["sample_id", "layer", "head", "token_pos"]
    frame = with_ratios(lf.filter(shown), windows).collect(engine="streaming")
    # The scatter's residual ranks need both of its columns; a run of other metrics (metrics.names) has none, and the
    # page says so.
    if set(RESIDUALS) <= set(lf.collect_schema().names()):
        # Ranks need all of a head's rows, every sample's: as many layers at a time as ROWS_PER_PASS allows.
        step = max(1, ROWS_PER_PASS // max(layer_rows, 1))
        residuals = [
            residual_ranks(lf.filter(pl.col("layer").is_in(layers[i : i + step])), skip_positions).filter(shown).collect()
            for i in range(0, len(layers), step)
        ]
        frame = frame.join(pl.concat(residuals), on=keys, how="left")
    sample_index = {s: i for i, s in enumerate(sample_ids)}
    layer_index = {layer: i for i, layer in enumerate(layers)}
    s = frame["sample_id"].replace_strict(sample_index, return_dtype=pl.Int64).to_numpy()
    l = frame["layer"].replace_strict(layer_index, return_dtype=pl.Int64).to_numpy()  # noqa: E741
    index = ((s * len(layers) + l) * heads + frame["head"].to_numpy()) * positions + frame["token_pos"].to_numpy()
    arrays = {}
    for name in frame.columns:
        if name in keys:
            continue
        values = np.full(len(sample_ids) * len(layers) * heads * positions, np.nan, dtype=np.float32)
        values[index] = frame[name].cast(pl.Float64).fill_null(np.nan).to_numpy()
        arrays[name] = values
    return arrays


def profiles(
    lf: pl.LazyFrame, windows, metrics: list[str], layers: list[int], heads: int, positions: int
) -> tuple[list[float], dict[str, np.ndarray]]:
    """(bin centres, per metric a (layer, head, bin) float32 array): each head's mean over all samples in
    position bins of equal width, at most PROFILE_POINTS of them (one per position for short contexts)."""
    width = math.ceil(positions / PROFILE_POINTS)
    table = (
        with_ratios(lf, windows)
        .with_columns((pl.col("token_pos") // width).alias("bin"))
        .group_by("layer", "head", "bin")
        .agg(pl.col("token_pos").mean().alias("position"), *[pl.col(m).mean() for m in metrics])
        .collect(engine="streaming")
    )
    bins = math.ceil(positions / width)
    centres = table.group_by("bin").agg(pl.col("position").first()).sort("bin")
    layer_index = {layer: i for i, layer in enumerate(layers)}
    l = table["layer"].replace_strict(layer_index, return_dtype=pl.Int64).to_numpy()  # noqa: E741
    index = (l * heads + table["head"].to_numpy()) * bins + table["bin"].to_numpy()
    arrays = {}
    for metric in metrics:
        values = np.full(len(layers) * heads * bins, np.nan, dtype=np.float32)
        values[index] = table[metric].cast(pl.Float64).fill_null(np.nan).to_numpy()
        arrays[metric] = values
    return centres["position"].to_list(), arrays


def token_text(out: Path, run: Path, sample_ids: list[int], positions: int) -> list[list[str]]:
    """Each shown sample's token pieces: tokens.parquet, or the ids from samples.parquet when there is no text."""
    chosen = (pl.col("sample_id").is_in(sample_ids)) & (pl.col("token_pos") < positions)
    if (out / "tokens.parquet").is_file():
        table = pl.read_parquet(out / "tokens.parquet", glob=False).filter(chosen)
        pieces = {key: group.sort("token_pos")["token"].to_list() for key, group in table.group_by("sample_id")}
        return [pieces.get((s,), []) for s in sample_ids]
    if (run / "samples.parquet").is_file():
        samples = pl.read_parquet(run / "samples.parquet", glob=False).filter(pl.col("sample_id").is_in(sample_ids))
        ids = dict(zip(samples["sample_id"].to_list(), samples["input_ids"].to_list()))
        return [[f"[{i}]" for i in ids.get(s, [])[:positions]] for s in sample_ids]
    return [[] for _ in sample_ids]


def finite_or_none(values) -> list:
    """JSON has no NaN: undefined statistics travel as null."""
    return [None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v for v in values]


def colour_ranges(out: Path, names: list[str]) -> dict[str, list]:
    """Per metric, per head (layer-major), the colour scale's [low, high]: the head's q05 and q95 over the whole
    run (a few extreme tokens, such as the first, would otherwise wash out the rest), or min and max where those
    coincide."""
    heads = pl.read_parquet(out / "heads.parquet", glob=False).sort("layer", "head")
    ranges = {}
    for name in names:
        if f"{name}_q05" not in heads.columns:
            continue
        low = heads[f"{name}_q05"].to_numpy().astype(np.float64)
        high = heads[f"{name}_q95"].to_numpy().astype(np.float64)
        flat = ~(high > low)
        low[flat], high[flat] = heads[f"{name}_min"].to_numpy()[flat], heads[f"{name}_max"].to_numpy()[flat]
        ranges[name] = [finite_or_none(low.tolist()), finite_or_none(high.tolist())]
    return ranges


def describe(record: dict, label: str) -> str:
    config, model = record.get("config", {}), record.get("model", {})
    if not config:
        return f"{label} (no run.json: the capture did not finish)"
    return (f"{label}: {config['model']['name']}, {model.get('layers')} layers x {model.get('heads')} heads, "
            f"{record['counts']['samples']} samples x {config['data']['context_length']} tokens "
            f"({config['data']['name']} data)")  # fmt: skip


def size_text(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.0f} kB"


def page_data(run: Path, out: Path, lf: pl.LazyFrame, record: dict, label: str, skip_positions: int) -> dict:
    windows = record.get("model", {}).get("attention_windows")
    metrics = metric_columns(with_ratios(lf, windows))
    table = head_table(out)
    layers = sorted(table["layer"].unique().to_list())
    heads = int(table["head"].max()) + 1
    all_samples = sorted(lf.select(pl.col("sample_id").unique()).collect()["sample_id"].to_list())
    positions = int(lf.select(pl.col("token_pos").max()).collect().item()) + 1
    embedded = len(metrics) + len(RESIDUALS)  # an upper bound: a run without query_norm or entropy has no residuals
    samples, shown_positions = shown_window(len(all_samples), positions, len(layers) * heads * embedded, TOKEN_VALUES)
    sample_ids = all_samples[:samples]
    layer_rows = len(all_samples) * positions * heads
    values = token_rows(lf, windows, skip_positions, sample_ids, shown_positions, layers, heads, layer_rows)
    centres, profile = profiles(lf, windows, metrics, layers, heads, positions)
    grid = pl.DataFrame({"layer": np.repeat(layers, heads), "head": np.tile(np.arange(heads), len(layers))})
    table = grid.join(table.cast({"layer": pl.Int64, "head": pl.Int64}), on=["layer", "head"], how="left")
    top = pl.read_parquet(out / "top_tokens.parquet", glob=False) if (out / "top_tokens.parquet").is_file() else None
    rows_total = layer_rows * len(layers)
    return {
        "title": describe(record, label),
        "layers": layers,
        "heads": heads,
        "skip_positions": skip_positions,
        "metrics": metrics,
        "residuals": list(RESIDUALS),
        "table": {name: finite_or_none(table[name].to_list()) for name in table.columns},
        "ranges": colour_ranges(out, metrics),
        "samples": sample_ids,
        "positions": shown_positions,
        "bounds": (
            f"Token rows: samples {', '.join(map(str, sample_ids))} of {len(all_samples)}, positions 0-"
            f"{shown_positions - 1} of {positions}: {len(sample_ids) * shown_positions * len(layers) * heads:,} of "
            f"{rows_total:,} rows ({len(metrics) + len(RESIDUALS)} float32 values each; at most "
            f"{TOKEN_VALUES:,} values). Heatmaps, profiles and residual ranks use every row of the run."
        ),
        "tokens": token_text(out, run, sample_ids, shown_positions),
        "values": {name: float32_base64(array) for name, array in values.items()},
        "profile_positions": centres,
        "profiles": {name: float32_base64(array) for name, array in profile.items()},
        # fill_nan: a non-finite value kept by run.on_nonfinite=record (JSON has no NaN).
        "top_tokens": [] if top is None or "layer" not in top.columns else top.select(
            "layer", "highlight", "rank", "sample_id", "token_pos", pl.col("value").fill_nan(None), "context"
        ).to_dicts(),  # fmt: skip
    }


def page_template() -> str:
    return resources.files("spectra.analysis").joinpath(PAGE).read_text(encoding="utf-8")


def render(data: dict) -> str:
    """The page: template, plotly.js and data inlined; the stated size is the file's own."""
    from plotly.offline import get_plotlyjs

    # JSON inside <script>: a token's "</script>" or "<!--" would end or derail the element; "<" occurs only
    # inside JSON strings, where \u003c reads back the same.
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    # Split, not replace: a token's text or plotly.js must not be taken for a placeholder.
    top, rest = page_template().split("/*PLOTLY_JS*/")
    middle, bottom = rest.split("/*DATA*/")
    tail = "".join((get_plotlyjs(), middle, payload, bottom))
    size = len((top + tail).encode("utf-8"))
    for _ in range(3):  # the size's own digits change the size: settle on a fixed point
        page = top.replace("{{SIZE}}", f"{size_text(size)} ({size:,} bytes)") + tail
        if len(page.encode("utf-8")) == size:
            break
        size = len(page.encode("utf-8"))
    return page


def write_explorer(run: Path, out: Path, lf: pl.LazyFrame, record: dict, label: str, skip_positions: int) -> Path:
    """<out>/explorer.html from the tables analyze wrote into out and the run's metric parts (lf)."""
    path = out / "explorer.html"
    write_text_atomic(render(page_data(run, out, lf, record, label, skip_positions)), path)
    return path
