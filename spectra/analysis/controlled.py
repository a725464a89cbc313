"""Position-controlled correlations of query_norm with each metric, with uncertainty over samples and
multiple-testing control across heads: the statistics the report leads with.

Query norm and every attention metric drift with token position t (entropy grows like ln(t + 1)), so a plain
correlation over tokens mostly says "both depend on t"; and the tokens of one window are not independent
draws, so a token-level p-value overstates certainty. Per (layer, head) and metric y, on positions t >= skip:

    partial_r         Spearman-type partial correlation: x and y are ranked over the head's rows, each position's
                      mean rank is subtracted (position as a factor: any shape of dependence on t is removed,
                      not just a linear one), and r is the Pearson correlation of what remains; equal to
                      regressing both ranks on one indicator per position and correlating the residuals.
    partial_ci_low/high  95% percentile bootstrap interval: whole samples (context windows) are resampled with
                      replacement, never single tokens; the ranks stay those of the full data.
    partial_p         two-sided one-sample t-test, across samples, of each sample's share of the numerator
                      (sum over its tokens of the products of the two residuals): samples are the
                      independent units, so there are S - 1 degrees of freedom, not S x T - 2 (undefined
                      below 3 samples: two samples centred on their mean contribute equally by construction).
    partial_q         Benjamini-Hochberg q-value over all heads of the run, for the same y: the smallest false
                      discovery rate at which this head's partial_p would count as a discovery.

Each head's rows form an S x T grid (one row per sample and position); a resample is a vector of counts per
sample, and the bootstrap reduces to (S, S) cross-product matrices, so B = 1000 costs little even at 8192 tokens.

    python -m spectra.analyze run_dir=<run> bootstrap=1000 seed=0     # correlations.parquet: partial_* columns
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import polars as pl
from scipy import stats

from spectra.errors import SpectraError

CONTROLLED_SCHEMA = {
    "layer": pl.Int16, "head": pl.Int16, "y": pl.String, "samples": pl.Int64, "partial_r": pl.Float64,
    "partial_ci_low": pl.Float64, "partial_ci_high": pl.Float64, "partial_p": pl.Float64,
}  # fmt: skip
CI_LEVEL = 0.95


def resample_counts(samples: int, draws: int, seed: int) -> np.ndarray:
    """(draws, samples): how often each sample is picked when `samples` are drawn with replacement."""
    picks = np.random.default_rng(seed).integers(0, samples, size=(draws, samples))  # (B, S) sample indices
    counts = np.zeros((draws, samples))
    np.add.at(counts, (np.arange(draws)[:, None], picks), 1)
    return counts


def centred_cross(a: np.ndarray, b: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(B,): per resample, sum over positions of sum_s w_s (a_st - m_t)(b_st - mb_t), m the weighted position means.

    Expanded as sum_s w_s sum_t a b - (w^T (a b^T) w) / n, so that a resample costs O(S^2), not O(S x T): the
    (S, S) cross-product matrix is computed once per head.
    """
    n = counts.sum(axis=1)  # (B,)
    return counts @ (a * b).sum(axis=1) - np.einsum("bs,st,bt->b", counts, a @ b.T, counts) / n


def weighted_partial_r(x: np.ndarray, y: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """x, y: (S, T) rank grids, centred; counts: (B, S). Per row of counts, r after removing each position's
    weighted mean."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return centred_cross(x, y, counts) / np.sqrt(centred_cross(x, x, counts) * centred_cross(y, y, counts))


def sample_contributions(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(S,): each sample's sum over positions of the product of the position-centred x and y."""
    return ((x - x.mean(axis=0)) * (y - y.mean(axis=0))).sum(axis=1)


def ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks over the whole (S, T) grid, centred (the constant changes nothing but float round-off)."""
    rank = stats.rankdata(values, axis=None).reshape(values.shape)
    return rank - rank.mean()


def head_partial(rx: np.ndarray, y: np.ndarray, counts: np.ndarray) -> tuple[float, float, float, float]:
    """(r, ci_low, ci_high, p) for one head and metric; rx: ranks of x, y: (S, T) raw values. NaN where undefined."""
    samples = rx.shape[0]
    if samples < 2 or not np.isfinite(y).all():
        return (np.nan,) * 4
    ry = ranks(y)
    r = weighted_partial_r(rx, ry, np.ones((1, samples)))[0]
    if not np.isfinite(r):  # y (or x) constant within every position: nothing left to correlate
        return (np.nan,) * 4
    boot = weighted_partial_r(rx, ry, counts)
    tail = (1 - CI_LEVEL) / 2 * 100
    low, high = np.nanpercentile(boot, [tail, 100 - tail]) if np.isfinite(boot).any() else (np.nan, np.nan)
    contributions = sample_contributions(rx, ry)
    # Two samples centred on their own mean are mirror images: both contribute the same, so no test exists.
    p = stats.ttest_1samp(contributions, 0.0).pvalue if samples >= 3 and contributions.std() > 0 else np.nan
    return float(r), float(low), float(high), float(p)


def position_controlled(
    lf: pl.LazyFrame, metrics: Sequence[str], skip_positions: int, draws: int, seed: int, x: str = "query_norm"
) -> pl.DataFrame:
    """One row per (layer, head, y) of the rows in lf (by_layer feeds one layer at a time); no q-values yet."""
    if x not in metrics:
        return pl.DataFrame(schema=CONTROLLED_SCHEMA)
    ys = [m for m in metrics if m != x]
    rows = (
        lf.filter(pl.col("token_pos") >= skip_positions)
        .select("layer", "head", "sample_id", "token_pos", pl.col(x, *ys).cast(pl.Float64))
        .sort("layer", "head", "sample_id", "token_pos")
        .collect(engine="streaming")
    )
    if rows.height == 0:
        return pl.DataFrame(schema=CONTROLLED_SCHEMA)
    groups = rows.select("layer", "head").unique(maintain_order=True)
    samples, positions = rows["sample_id"].n_unique(), rows["token_pos"].n_unique()
    if rows.height != groups.height * samples * positions:
        raise SpectraError(
            f"position-controlled correlations need every (sample, position) once per head; found {rows.height:,} "
            f"rows for {groups.height} heads x {samples} samples x {positions} positions (a damaged run?)"
        )
    shape = (groups.height, samples, positions)  # (heads, S, T)
    grid = {name: rows[name].to_numpy().reshape(shape) for name in (x, *ys)}
    counts = resample_counts(samples, draws, seed)  # the same resamples for every head: comparable intervals
    table = []
    for i, (layer, head) in enumerate(groups.iter_rows()):
        finite = np.isfinite(grid[x][i]).all()
        rx = ranks(grid[x][i]) if finite else None
        for y in ys:
            result = head_partial(rx, grid[y][i], counts) if finite else (np.nan,) * 4
            table.append((layer, head, y, samples, *result))
    return pl.DataFrame(table, schema=CONTROLLED_SCHEMA, orient="row")


def q_values(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg over the finite p-values; NaN stays NaN (an undefined test is no test)."""
    p = np.asarray(p, dtype=np.float64)
    q = np.full_like(p, np.nan)
    finite = np.isfinite(p)
    if finite.any():
        q[finite] = stats.false_discovery_control(p[finite], method="bh")
    return q


def with_q_values(table: pl.DataFrame) -> pl.DataFrame:
    """partial_q: Benjamini-Hochberg across every head of the run, separately for each y."""
    parts = [
        part.with_columns(pl.Series("partial_q", q_values(part["partial_p"].to_numpy())))
        for part in table.partition_by("y", maintain_order=True)
    ]
    return pl.concat(parts) if parts else table.with_columns(pl.lit(None, pl.Float64).alias("partial_q"))
