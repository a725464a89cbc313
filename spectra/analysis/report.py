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
    """The strongest position-controlled query_norm-vs-entropy heads, their token-level r and mean metrics."""
    means = [f"{m}_mean" for m in ("entropy", "max_attn", "k_eff") if f"{m}_mean" in a.heads.columns]
    return (
        strongest_heads(a.correlations, "entropy", top, "partial_r")
        .join(a.heads.select("layer", "head", *means), on=["layer", "head"], how="left")
        .select("layer", "head", "samples", "n", "partial_r", "partial_ci_low", "partial_ci_high", "partial_p",
                "partial_q", "spearman_r", *means)  # fmt: skip
    )


def discoveries(a: RunAnalysis, level: float = 0.05) -> pl.DataFrame:
    """Per y: heads tested, and heads with q < level whose partial r is positive / negative."""
    q = pl.col("partial_q")
    return (
        a.correlations.group_by("y")
        .agg(
            q.is_not_nan().and_(q.is_not_null()).sum().alias("heads tested"),
            ((q < level) & (pl.col("partial_r") > 0)).sum().alias(f"q < {level}, r > 0"),
            ((q < level) & (pl.col("partial_r") < 0)).sum().alias(f"q < {level}, r < 0"),
        )
        .sort("y")
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


def describe_windows(windows) -> str:
    """What n (the keys a query sees) is on each layer."""
    if windows is None:
        return ("run.json records no attention windows (a run from before they were recorded): the ratios assume "
                "full causal attention, n = t + 1, on every layer.")  # fmt: skip
    sliding = {}
    for layer, rule in enumerate(windows):
        if rule is not None:
            sliding.setdefault(rule, []).append(str(layer))
    if not sliding:
        return "Every layer attends to all earlier tokens: n = t + 1."
    parts = []
    for rule, layers in sliding.items():
        what = f"a sliding window of W = {rule} keys, n = min(t + 1, {rule})" if isinstance(rule, int) else (
            f"the rule {rule!r} (ratios left out)"
        )
        parts.append(f"layer{'s' * (len(layers) > 1)} {', '.join(layers)}: {what}")
    return "Attention windows: " + "; ".join(parts) + "; other layers full, n = t + 1."


def figure_links(figures: Sequence[Path], out: Path) -> list[str]:
    return [f"![{path.stem}]({relative(path, out)})" for path in figures]


def cell_text(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")


def token_tables(top: pl.DataFrame) -> list[str]:
    """One table per highlight: a row per layer, the top tokens as `token` (sample, position: value)."""
    lines = []
    for highlight in top["highlight"].unique(maintain_order=True).to_list():
        rows = top.filter(pl.col("highlight") == highlight)
        ranks = rows["rank"].max()
        lines += [f"**{highlight}** (mean over the layer's heads)", ""]
        lines += ["| layer | " + " | ".join(f"#{i}" for i in range(1, ranks + 1)) + " |", "|---|" + "---|" * ranks]
        for (layer,), group in rows.group_by("layer", maintain_order=True):
            cells = [
                f"`{cell_text(r['token'] or '?')}` (s{r['sample_id']} t{r['token_pos']}: {number(r['value'])})"
                for r in group.sort("rank").iter_rows(named=True)
            ]
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def write_run_report(a: RunAnalysis, skip_positions: int, top: int, path: Path) -> Path:
    ratios = [m for m in ("entropy_normalized", "k_eff_fraction") if f"{m}_mean" in a.heads.columns]
    lines = [
        f"# Spectra analysis: {a.label}",
        "",
        describe_run(a),
        "",
        f"Metrics: {', '.join(a.metrics)}." + (
            " Derived, not stored: entropy_normalized = entropy / ln(n) (1 for uniform attention), k_eff_fraction = "
            "k_eff / n, where n is the number of keys the query sees; both undefined where n = 1 (t = 0)."
            if ratios else ""
        ),
        describe_windows(a.windows),
        "",
        f"## Strongest heads: query_norm vs entropy, controlled for position (top {top} by |partial r|)",
        "",
        f"Token positions t >= {skip_positions}. How to read the columns:",
        "",
        "- `partial_r`: Spearman-type partial correlation: both variables are ranked, each token position's mean "
        "rank is subtracted, and r is taken over what remains, so that the shared drift of query norm and "
        "entropy with position does not count as association.",
        "- `partial_ci_low/high`: 95% bootstrap interval that resamples whole samples (context windows), not "
        "tokens, because the tokens of one window are not independent.",
        "- `partial_p`: two-sided t-test across samples of each sample's contribution to the partial correlation "
        "(samples - 1 degrees of freedom).",
        "- `partial_q`: Benjamini-Hochberg q-value over all heads of this run for the same metric: the expected "
        "share of false discoveries among heads with q at most this one's.",
        "- `spearman_r`: the plain token-level Spearman r, without position control, for comparison.",
        "",
    ]  # fmt: skip
    if a.correlations.filter(pl.col("y") == "entropy").height:
        lines.append(markdown_table(strongest_table(a, top)))
        lines += ["", "Heads whose position-controlled correlation with query_norm survives q < 0.05:", ""]
        lines.append(markdown_table(discoveries(a)))
    else:
        lines.append("No correlations: this run lacks query_norm or entropy (see metrics.names).")
    lines += ["", f"## Tokens that stand out (t >= {skip_positions})", ""]
    if a.top_tokens is not None and a.top_tokens.height:
        lines += ["Cells: the token (s: sample_id, t: token_pos: value); tokens.parquet holds every token with its "
                  "neighbours, joinable with the metric rows on (sample_id, token_pos).", ""]  # fmt: skip
        lines += token_tables(a.top_tokens)
    else:
        lines.append(f"No token text: {a.tokens_note or 'nothing to rank'}.")
    lines += ["", "## Layers (means over all heads and tokens; r: mean token-level Spearman r over heads)", ""]
    lines.append(markdown_table(layer_comparison(a.heads, a.correlations)))
    lines += ["", "## Figures", "", *figure_links(a.figures, path.parent)]
    lines += [
        "",
        "## Files",
        "",
        "- `heads.parquet`: per (layer, head), `<metric>_count/mean/std/min/q05/q25/q50/q75/q95/max`",
        "- `correlations.parquet`: per (layer, head, y), token-level n, pearson_r/p, spearman_r/p of query_norm "
        "with y, and the position-controlled samples, partial_r, partial_ci_low/high, partial_p, partial_q",
        "- `positions.parquet`: per (layer, token_pos), mean of every metric",
        "- `tokens.parquet`, `top_tokens.parquet`: every token's text and neighbours; the tokens above",
        "- `duckdb_views.sql`: `python -m spectra.sql <run>` opens views metrics (with the ratios), samples, tokens, "
        "heads, correlations, positions",
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
    top = strongest_heads(a.correlations, "entropy", 3, "partial_r")
    for row in top.iter_rows(named=True):
        lines.append(
            f"  layer {row['layer']:>2} head {row['head']:>2}: partial r(query_norm, entropy | position) = "
            f"{number(row['partial_r'])} [{number(row['partial_ci_low'])}, {number(row['partial_ci_high'])}], "
            f"q = {number(row['partial_q'])} ({row['samples']} samples, t >= {skip_positions})"
        )
    lines.append(f"  figures    {len(a.figures)} PNG in {a.out / 'figures'}")
    return "\n".join(lines)
