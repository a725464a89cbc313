"""Per-(layer, head) statistics of a run's metric rows: pure polars queries, LazyFrame in, DataFrame out.

No files, no figures: spectra/analyze.py feeds these a `scan_parquet` of a run and writes what they return.

    head_summary        count, mean, std, min, quantiles, max of every metric, per (layer, head)
    head_correlations   Pearson and Spearman r of query_norm with every other metric, tokens and p-values
    position_profile    mean of every metric per (layer, token position)
    layer_comparison    per-layer means of one run over the positions the correlations use, and median partial r
                        (the report's layer table, and the rows of a sweep comparison)

Memory: the summary and correlations need a group's rows at once (quantiles, ranks), so `by_layer` runs them
one layer at a time; a pass holds one layer's rows of the columns it reads. The position profile is means only
and streams in a single pass.

    python -m pytest tests/test_analyze.py
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import polars as pl
from scipy import stats

KEY_NAMES = ("sample_id", "layer", "head", "token_pos")
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
# Derived, never stored: entropy relative to the uniform distribution's ln(n) over the n keys the query sees, and
# k_eff as a fraction of those keys. n = t + 1 under full causal attention, min(t + 1, W) on a sliding-window
# layer (run.json: model.attention_windows). Undefined (null) where n = 1 (t = 0): ln 1 = 0, and one key is no
# choice at all; a null leaves means over the other tokens intact where a NaN would poison them.
RATIOS = {
    "entropy_normalized": ("entropy", lambda visible: visible.cast(pl.Float64).log()),
    "k_eff_fraction": ("k_eff", lambda visible: visible.cast(pl.Float64)),
}


CORRELATION_SCHEMA = {
    "layer": pl.Int16, "head": pl.Int16, "x": pl.String, "y": pl.String, "tokens": pl.Int64,
    "pearson_r": pl.Float64, "pearson_p": pl.Float64, "spearman_r": pl.Float64, "spearman_p": pl.Float64,
}  # fmt: skip


def metric_columns(lf: pl.LazyFrame) -> list[str]:
    """The metric columns a run holds, in file order: whatever is not a key (restricted or extended sets alike)."""
    schema = lf.collect_schema()
    return [name for name, dtype in schema.items() if name not in KEY_NAMES and dtype.is_numeric()]


def visible_keys(windows: Sequence | None = None) -> pl.Expr:
    """The number of keys query t sees on its layer. windows: run.json's model.attention_windows, one entry per
    layer: None (full: t + 1), W (sliding: min(t + 1, W)), or the name of another rule (null: not guessed).
    Without windows (a run recorded before they were), every layer counts as full attention."""
    full = pl.col("token_pos").cast(pl.Int64) + 1
    layer = pl.col("layer").cast(pl.Int64)
    sliding = {i: int(w) for i, w in enumerate(windows or []) if isinstance(w, int)}
    other = [i for i, w in enumerate(windows or []) if isinstance(w, str)]
    visible = full
    if sliding:
        window = layer.replace_strict(sliding, default=None, return_dtype=pl.Int64)
        visible = pl.when(window.is_null()).then(full).otherwise(pl.min_horizontal(full, window))
    if other:
        visible = pl.when(layer.is_in(other)).then(None).otherwise(visible)
    return visible


def with_ratios(lf: pl.LazyFrame, windows: Sequence | None = None) -> pl.LazyFrame:
    """Adds the derived ratio columns whose base metric is present; metrics become Float64 for exact sums."""
    metrics = metric_columns(lf)
    visible = visible_keys(windows)
    lf = lf.with_columns(pl.col(metrics).cast(pl.Float64))
    derived = [
        pl.when(visible > 1).then(pl.col(base) / denominator(visible)).otherwise(None).alias(name)
        for name, (base, denominator) in RATIOS.items()
        if base in metrics
    ]
    return lf.with_columns(derived) if derived else lf


def quantile_name(q: float) -> str:
    return f"q{round(q * 100):02d}"


def head_summary(
    lf: pl.LazyFrame, windows: Sequence | None = None, quantiles: Sequence[float] = QUANTILES
) -> pl.DataFrame:
    """One row per (layer, head): `<metric>_count/mean/std/min/qNN/max` for every metric and ratio.

    count excludes nulls (the ratios are null at t = 0); std has ddof = 1; quantiles interpolate linearly
    (numpy's default).
    """
    lf = with_ratios(lf, windows)
    aggregations = []
    for name in metric_columns(lf):
        column = pl.col(name)
        aggregations += [
            column.count().alias(f"{name}_count"),
            column.mean().alias(f"{name}_mean"),
            column.std().alias(f"{name}_std"),
            column.min().alias(f"{name}_min"),
            *[column.quantile(q, interpolation="linear").alias(f"{name}_{quantile_name(q)}") for q in quantiles],
            column.max().alias(f"{name}_max"),
        ]
    return lf.group_by("layer", "head").agg(aggregations).sort("layer", "head").collect(engine="streaming")


def t_test_p(r: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Two-sided p-value of a correlation r from n pairs under H0: rho = 0, via t = r sqrt((n-2) / (1-r^2)).

    This is scipy.stats.pearsonr's exact p for normal data (its beta distribution is the same law) and
    scipy.stats.spearmanr's p. NaN where r is undefined or n < 3.
    """
    r = np.asarray(r, dtype=np.float64)
    dof = np.asarray(n, dtype=np.float64) - 2
    with np.errstate(divide="ignore", invalid="ignore"):
        t = r * np.sqrt(dof / ((1 - r) * (1 + r)))  # (1-r)(1+r): no cancellation near |r| = 1
        p = 2 * stats.t.sf(np.abs(t), dof)
    p = np.where(np.abs(r) >= 1, 0.0, p)
    return np.where((dof > 0) & np.isfinite(r), p, np.nan)


def head_correlations(lf: pl.LazyFrame, skip_positions: int = 2, x: str = "query_norm") -> pl.DataFrame:
    """Long table, one row per (layer, head, y): tokens (the pairs correlated), pearson_r/p, spearman_r/p of x
    with every other metric y.

    Positions t < skip_positions are left out (at t = 0 a query sees one key: entropy 0, max_attn 1, k_eff 1,
    whatever its norm). Spearman ranks are taken within each (layer, head), ties get their average rank.
    Empty when x is not in the run.
    """
    metrics = metric_columns(lf)
    if x not in metrics:
        return pl.DataFrame(schema=CORRELATION_SCHEMA)
    lf = lf.filter(pl.col("token_pos") >= skip_positions).with_columns(pl.col(metrics).cast(pl.Float64))
    tables = []
    for y in (m for m in metrics if m != x):
        pairs = lf.select("layer", "head", x, y).drop_nulls().drop_nans()
        table = pairs.group_by("layer", "head").agg(
            pl.len().cast(pl.Int64).alias("tokens"),
            pl.corr(x, y, method="pearson").alias("pearson_r"),
            pl.corr(x, y, method="spearman").alias("spearman_r"),
        )
        tables.append(table.with_columns(pl.lit(x).alias("x"), pl.lit(y).alias("y")))
    table = pl.concat(tables).collect(engine="streaming")
    return (
        table.with_columns(
            pl.Series("pearson_p", t_test_p(table["pearson_r"].to_numpy(), table["tokens"].to_numpy())),
            pl.Series("spearman_p", t_test_p(table["spearman_r"].to_numpy(), table["tokens"].to_numpy())),
        )
        .select(list(CORRELATION_SCHEMA))
        .sort("y", "layer", "head")
    )


def by_layer(query: Callable[[pl.LazyFrame], pl.DataFrame], lf: pl.LazyFrame, layers: Sequence[int]) -> pl.DataFrame:
    """`query` run on each layer's rows alone, results stacked: bounds memory to one layer's rows."""
    parts = [query(lf.filter(pl.col("layer") == layer)) for layer in layers]
    parts = [part for part in parts if part.height]
    return pl.concat(parts) if parts else query(lf.head(0))


def layers_of(lf: pl.LazyFrame) -> list[int]:
    return sorted(lf.select(pl.col("layer").unique()).collect(engine="streaming")["layer"].to_list())


def position_profile(lf: pl.LazyFrame, windows: Sequence | None = None) -> pl.DataFrame:
    """One row per (layer, token_pos): rows (count) and the mean of every metric and ratio over heads and samples."""
    lf = with_ratios(lf, windows)
    metrics = metric_columns(lf)
    return (
        lf.group_by("layer", "token_pos")
        .agg(pl.len().alias("rows"), *[pl.col(m).mean() for m in metrics])
        .sort("layer", "token_pos")
        .collect(engine="streaming")
    )


def layer_comparison(profile: pl.DataFrame, correlations: pl.DataFrame, skip_positions: int) -> pl.DataFrame:
    """One row per layer: every metric's mean over the tokens t >= skip_positions (the positions the correlations
    use; from the position profile, weighted by its row counts, so exact), and per y the median over the layer's
    heads of the position-controlled `partial_r_<y>` and of the token-level `spearman_r_<y>` (over the heads
    where it is defined: a head whose y never varies has none)."""
    metrics = [c for c in profile.columns if c not in ("layer", "token_pos", "rows")]
    weight = pl.col("rows").cast(pl.Float64)
    means = [((pl.col(m) * weight).sum() / weight.filter(pl.col(m).is_not_null()).sum()).alias(m) for m in metrics]
    table = profile.filter(pl.col("token_pos") >= skip_positions).group_by("layer").agg(means)
    if correlations.height:
        for column in ("partial_r", "spearman_r"):
            if column not in correlations.columns:
                continue
            r = correlations.pivot(on="y", index=["layer", "head"], values=column)
            ys = [y for y in r.columns if y not in ("layer", "head")]
            r = r.group_by("layer").agg([pl.col(y).fill_nan(None).median().alias(f"{column}_{y}") for y in ys])
            table = table.join(r, on="layer", how="left")
    return table.sort("layer")


def strongest_heads(
    correlations: pl.DataFrame, y: str = "entropy", top: int = 5, r: str = "spearman_r"
) -> pl.DataFrame:
    """The `top` heads whose query_norm-vs-y |r| is largest (NaN r last); r: the column that ranks them."""
    table = correlations.filter(pl.col("y") == y).with_columns(pl.col(r).fill_nan(None))
    return table.sort(pl.col(r).abs(), descending=True, nulls_last=True).head(top)

