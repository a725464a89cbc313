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
    partial_note      why partial_r or partial_p is undefined (NaN) for this head, null where both are defined.

The headline of a run (one row per y, `headline`): how many heads have q < 0.05 and in which direction, and the
median partial r over heads with its 95% interval. The interval resamples whole samples too, the same resamples
for every head (one seed), so each resample has a median over heads and the interval is that median's percentile
interval; the per-head resampled r travel along in `partial_draws` until the headline is taken.

Each head's rows form an S x T grid (one row per sample and position); a resample is a vector of counts per
sample, and the bootstrap reduces to (S, S) cross-product matrices, so B = 1000 costs little even at 8192 tokens.

    python -m spectra.analyze run_dir=<run> bootstrap=1000 seed=0     # correlations.parquet: partial_* columns
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import polars as pl
from scipy import stats

from spectra.errors import SpectraError

CONTROLLED_SCHEMA = {
    "layer": pl.Int16, "head": pl.Int16, "y": pl.String, "samples": pl.Int64, "partial_r": pl.Float64,
    "partial_ci_low": pl.Float64, "partial_ci_high": pl.Float64, "partial_p": pl.Float64, "partial_note": pl.String,
    "partial_draws": pl.List(pl.Float64),
}  # fmt: skip
CI_LEVEL = 0.95
Q_LEVEL = 0.05  # the false discovery rate at which the report counts a head as a finding
HEADLINE_SCHEMA = {
    "y": pl.String, "heads": pl.Int64, "tested": pl.Int64, "significant": pl.Int64, "positive": pl.Int64,
    "negative": pl.Int64, "with_r": pl.Int64, "median_r": pl.Float64, "median_ci_low": pl.Float64,
    "median_ci_high": pl.Float64, "samples": pl.Int64,
}  # fmt: skip


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


def constant_note(name: str, values: np.ndarray) -> str:
    """Why a variable left nothing to correlate: one value everywhere, or one value per position."""
    if np.all(values == values.flat[0]):
        return f"{name} = {values.flat[0]:.6g} at every token"
    return f"{name} takes one value at each position (the same in every sample)"


def head_partial(rx, y: np.ndarray, counts: np.ndarray, x_values: np.ndarray, y_name: str, x_name: str) -> tuple:
    """(r, ci_low, ci_high, p, note, draws) for one head and metric; rx: centred ranks of x (None where x is not
    finite), y: (S, T) raw values, x_values: x's raw values (for the note). NaN where undefined, and then the note
    says why; draws: the B resampled r (for the run's headline)."""
    samples = rx.shape[0] if rx is not None else y.shape[0]
    undefined = lambda note: (np.nan, np.nan, np.nan, np.nan, note, [])  # noqa: E731
    if rx is None:
        return undefined(f"{x_name} has non-finite values")
    if samples < 2:
        return undefined("one sample: nothing varies within a position")
    if not np.isfinite(y).all():
        return undefined(f"{y_name} has non-finite values")
    ry = ranks(y)
    r = weighted_partial_r(rx, ry, np.ones((1, samples)))[0]
    if not np.isfinite(r):  # y (or x) constant within every position: nothing left to correlate
        # Constant within positions: the position-centred sum of squares is zero up to round-off.
        constant_x = centred_cross(rx, rx, np.ones((1, samples)))[0] <= 1e-9 * (rx * rx).sum()
        return undefined(constant_note(x_name, x_values) if constant_x else constant_note(y_name, y))
    boot = weighted_partial_r(rx, ry, counts)
    tail = (1 - CI_LEVEL) / 2 * 100
    low, high = np.nanpercentile(boot, [tail, 100 - tail]) if np.isfinite(boot).any() else (np.nan, np.nan)
    contributions = sample_contributions(rx, ry)
    # Two samples centred on their own mean are mirror images: both contribute the same, so no test exists.
    note = None
    if samples < 3:
        p, note = np.nan, "2 samples: r, but no test across samples (it needs 3)"
    elif contributions.std() > 0:
        p = stats.ttest_1samp(contributions, 0.0).pvalue
    else:
        p, note = np.nan, "every sample contributes the same: no test"
    return float(r), float(low), float(high), float(p), note, boot.tolist()


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
        rx = ranks(grid[x][i]) if np.isfinite(grid[x][i]).all() else None
        for y in ys:
            table.append((layer, head, y, samples, *head_partial(rx, grid[y][i], counts, grid[x][i], y, x)))
    return pl.DataFrame(table, schema=CONTROLLED_SCHEMA, orient="row")


def position_residual_ranks(values: np.ndarray) -> np.ndarray:
    """(S, T) -> (S, T): what partial_r correlates, on a readable scale: each value's rank over the head's
    tokens minus its position's mean rank, in standard deviations of that residual (all zero where it is 0)."""
    centred = ranks(values)
    residual = centred - centred.mean(axis=0)
    spread = residual.std()
    return residual / spread if spread > 0 else residual


def q_values(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg over the finite p-values; NaN stays NaN (an undefined test is no test)."""
    p = np.asarray(p, dtype=np.float64)
    q = np.full_like(p, np.nan)
    finite = np.isfinite(p)
    if finite.any():
        q[finite] = stats.false_discovery_control(p[finite], method="bh")
    return q


def headline(table: pl.DataFrame, level: float = Q_LEVEL) -> pl.DataFrame:
    """One row per y: heads, tested (a q exists), significant (q < level) split by the sign of partial_r, and the
    median partial r over the heads where it is defined (with_r), with the percentile interval of that median
    over the shared resamples (partial_draws: the same B resamples of samples for every head)."""
    rows = []
    for (y,), part in table.group_by("y", maintain_order=True):
        q, r = part["partial_q"].fill_null(np.nan).to_numpy(), part["partial_r"].fill_null(np.nan).to_numpy()
        significant = np.isfinite(q) & (q < level)
        defined = np.isfinite(r)
        median, low, high = np.nan, np.nan, np.nan
        if defined.any():
            median = float(np.median(r[defined]))
            draws = np.array([d for d, ok in zip(part["partial_draws"].to_list(), defined) if ok and len(d)])
            if draws.size:  # (heads, B)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # a resample where no head has an r
                    medians = np.nanmedian(draws, axis=0)  # (B,)
                if np.isfinite(medians).any():
                    tail = (1 - CI_LEVEL) / 2 * 100
                    low, high = np.nanpercentile(medians, [tail, 100 - tail])
        rows.append((y, part.height, int(np.isfinite(q).sum()), int(significant.sum()),
                     int((significant & (r > 0)).sum()), int((significant & (r < 0)).sum()), int(defined.sum()),
                     median, float(low), float(high), int(part["samples"].max())))  # fmt: skip
    return pl.DataFrame(rows, schema=HEADLINE_SCHEMA, orient="row").sort("y")


def with_q_values(table: pl.DataFrame) -> pl.DataFrame:
    """partial_q: Benjamini-Hochberg across every head of the run, separately for each y."""
    parts = [
        part.with_columns(pl.Series("partial_q", q_values(part["partial_p"].to_numpy())))
        for part in table.partition_by("y", maintain_order=True)
    ]
    return pl.concat(parts) if parts else table.with_columns(pl.lit(None, pl.Float64).alias("partial_q"))
