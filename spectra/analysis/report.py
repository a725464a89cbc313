"""The analysis report: Markdown that embeds the figures and tabulates the strongest heads, and a console summary.

    python -m spectra.analyze run_dir=<run>     # writes <run>/analysis/report.md
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import polars as pl

from spectra.analysis.head_stats import layer_comparison, strongest_heads
from spectra.analysis.runs import RunAnalysis


def number(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value != value:
            return "nan"
        return f"{value:.3g}" if value == 0 or 1e-3 <= abs(value) < 1e5 else f"{value:.2e}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def p_text(p) -> str:
    """A p-value below the smallest double underflows to 0; say so rather than print an impossible 0."""
    return "< 1e-300" if p == 0 else f"= {number(p)}"


def markdown_table(table: pl.DataFrame, headers: Sequence[str] | None = None) -> str:
    headers = list(headers or table.columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    cell = lambda header, v: p_text(v).lstrip("= ") if header.endswith("_p") else number(v)  # noqa: E731
    lines += ["| " + " | ".join(cell(h, v) for h, v in zip(headers, row)) + " |" for row in table.iter_rows()]
    return "\n".join(lines)


def strongest_table(a: RunAnalysis, top: int) -> pl.DataFrame:
    """The strongest query_norm-vs-entropy heads with their p-values and mean metrics."""
    means = [f"{m}_mean" for m in ("entropy", "max_attn", "k_eff") if f"{m}_mean" in a.heads.columns]
    return (
        strongest_heads(a.correlations, "entropy", top)
        .join(a.heads.select("layer", "head", *means), on=["layer", "head"], how="left")
        .select("layer", "head", "n", "spearman_r", "spearman_p", "pearson_r", "pearson_p", *means)
    )


def describe_run(a: RunAnalysis) -> str:
    record = a.record
    if not record:
        return f"Run `{a.run}` (no run.json: the capture did not finish; its complete part files are analysed)."
    model, counts, config = record["model"], record["counts"], record["config"]
    return (
        f"Run `{a.run}`: model **{config['model']['name']}** ({model['layers']} layers x {model['heads']} heads, "
        f"{model['kv_heads']} KV heads), {counts['samples']} samples x {config['data']['context_length']} tokens "
        f"({config['data']['name']} data), {counts['rows']:,} rows, attention {config['metrics']['attention']}."
    )


def figure_links(figures: Sequence[Path], out: Path) -> list[str]:
    return [f"![{path.stem}]({relative(path, out)})" for path in figures]


def write_run_report(a: RunAnalysis, skip_positions: int, top: int, path: Path) -> Path:
    ratios = [m for m in ("entropy_normalized", "k_eff_fraction") if f"{m}_mean" in a.heads.columns]
    lines = [
        f"# Spectra analysis: {a.label}",
        "",
        describe_run(a),
        "",
        f"Metrics: {', '.join(a.metrics)}." + (
            " Derived, not stored: entropy_normalized = entropy / ln(t+1), k_eff_fraction = k_eff / (t+1) (t >= 1)."
            if ratios else ""
        ),
        f"Correlations use token positions t >= {skip_positions}; p-values are two-sided (t-distribution, n - 2 "
        "degrees of freedom); Spearman ranks are within each (layer, head).",
        "",
        f"## Strongest heads: query_norm vs entropy (top {top} by |Spearman r|)",
        "",
    ]  # fmt: skip
    if a.correlations.filter(pl.col("y") == "entropy").height:
        lines.append(markdown_table(strongest_table(a, top)))
    else:
        lines.append("No correlations: this run lacks query_norm or entropy (see metrics.names).")
    lines += ["", "## Layers (means over all heads and tokens; r: mean Spearman r over heads)", ""]
    lines.append(markdown_table(layer_comparison(a.heads, a.correlations)))
    lines += ["", "## Figures", "", *figure_links(a.figures, path.parent)]
    lines += [
        "",
        "## Files",
        "",
        "- `heads.parquet`: per (layer, head), `<metric>_count/mean/std/min/q05/q25/q50/q75/q95/max`",
        "- `correlations.parquet`: per (layer, head, y), n, pearson_r/p, spearman_r/p of query_norm with y",
        "- `positions.parquet`: per (layer, token_pos), mean of every metric",
        "- `duckdb_views.sql`: `duckdb -init duckdb_views.sql` gives views metrics (with the ratios), samples, heads, "
        "correlations, positions",
        "",
    ]
    path.write_text("\n".join(lines))
    return path


def relative(target: Path, folder: Path) -> str:
    return Path(os.path.relpath(target, folder)).as_posix()


def write_sweep_report(
    analyses: Sequence[RunAnalysis], comparison: pl.DataFrame, figures: Sequence[Path], path: Path
) -> Path:
    lines = [f"# Spectra comparison of {len(analyses)} runs", ""]
    lines += [f"- [{a.label}]({relative(a.out / 'report.md', path.parent)}): `{a.run}`" for a in analyses]
    lines += ["", "## Per-layer means by run (`comparison.parquet`)", "", markdown_table(comparison)]
    lines += ["", "## Figures", "", *figure_links(figures, path.parent), ""]
    path.write_text("\n".join(lines))
    return path


def console_summary(a: RunAnalysis, skip_positions: int) -> str:
    lines = [f"\nSpectra analysis: {a.out / 'report.md'}", f"  {a.heads.height} heads, metrics {', '.join(a.metrics)}"]
    top = strongest_heads(a.correlations, "entropy", 3)
    for row in top.iter_rows(named=True):
        lines.append(
            f"  layer {row['layer']:>2} head {row['head']:>2}: Spearman r(query_norm, entropy) = "
            f"{number(row['spearman_r'])} (p {p_text(row['spearman_p'])}, n = {row['n']:,}, t >= {skip_positions})"
        )
    lines.append(f"  figures    {len(a.figures)} PNG in {a.out / 'figures'}")
    return "\n".join(lines)
