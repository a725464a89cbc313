"""The analysis report: Markdown that answers "does query norm predict entropy (and each other metric)?" in words
first, warns where the numbers cannot be trusted, states every setting they depend on, then tabulates heads,
tokens and layers and embeds the figures; and the console summary.

    python -m spectra.analyze run_dir=<run>     # writes <run>/analysis/report.md
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import polars as pl
from scipy import stats

from spectra.analysis.controlled import CI_LEVEL, Q_LEVEL
from spectra.analysis.head_stats import layer_comparison, strongest_heads
from spectra.analysis.runs import RunAnalysis

# Below this many samples the report warns that intervals and p-values are not to be trusted: the percentile
# bootstrap over S samples is about a normal interval with S - 1 in place of S in the variance and no
# t-correction, so its nominal 95% covers about P(|t_{S-1}| < 1.96 sqrt((S-1)/S)): 75% at S = 3, 89% at S = 8,
# 93% at S = 20 (interval_coverage); and the p-value's t-test rests on S - 1 degrees of freedom.
MIN_SAMPLES = 20
UNDEFINED_LISTED = 8  # heads named per reason before "and N more"


def interval_coverage(samples: int, level: float = CI_LEVEL) -> float:
    """The approximate true coverage of a nominal `level` percentile-bootstrap interval over `samples` units."""
    if samples < 2:
        return float("nan")
    z = stats.norm.ppf(0.5 + level / 2) * math.sqrt((samples - 1) / samples)
    return float(2 * stats.t.cdf(z, samples - 1) - 1)


def number(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value != value:
            return "nan"
        return f"{value:.3g}" if value == 0 or 1e-3 <= abs(value) < 1e5 else f"{value:.2e}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def r_text(value) -> str:
    """A correlation to two decimals, with a true minus sign lost to nothing: -0.41, 0.07, nan."""
    return "nan" if value is None or value != value else f"{value:.2f}"


def p_text(p) -> str:
    """A p-value below the smallest double underflows to 0; say so rather than print an impossible 0."""
    return "< 1e-300" if p == 0 else f"= {number(p)}"


def markdown_table(table: pl.DataFrame, headers: Sequence[str] | None = None) -> str:
    headers = list(headers or table.columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    cell = lambda header, v: p_text(v).lstrip("= ") if header.endswith("_p") else number(v)  # noqa: E731
    lines += ["| " + " | ".join(cell(h, v) for h, v in zip(headers, row)) + " |" for row in table.iter_rows()]
    return "\n".join(lines)


def percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"


def headline_sentence(row: dict, x: str = "query_norm") -> str:
    """One metric's answer in words, from a controlled.headline row."""
    y, heads = row["y"], row["heads"]
    interval = f"[{r_text(row['median_ci_low'])}, {r_text(row['median_ci_high'])}]"
    median = (
        f"median partial r over {row['with_r']} heads = {r_text(row['median_r'])} {interval}"
        if row["with_r"] else "partial r undefined in every head"
    )  # fmt: skip
    if row["tested"] == 0:
        why = "a test needs 3 or more samples" if row["samples"] < 3 else "no head could be tested"
        return f"**{y}**: no head tested ({why}); {median}."
    positive, negative = row["positive"], row["negative"]
    tested = f"; {row['tested']} tested" if row["tested"] < heads else ""
    if positive + negative == 0:
        return (f"**{y}**: in none of {heads} heads ({row['tested']} tested) does {x} go with {y} after controlling for position "
                f"(q < {Q_LEVEL}); {median}.")  # fmt: skip
    lead, other = (negative, positive) if negative >= positive else (positive, negative)
    lead_word, other_word = ("lower", "higher") if negative >= positive else ("higher", "lower")
    text = (f"**{y}**: in {lead} of {heads} heads ({percent(lead, heads)}{tested}) higher {x} goes with {lead_word} {y} "
            f"after controlling for position (q < {Q_LEVEL})")  # fmt: skip
    if other:
        text += f", in {other} ({percent(other, heads)}) with {other_word} {y}"
    return f"{text}; {median}."


def headline_table(headline: pl.DataFrame) -> pl.DataFrame:
    return headline.select(
        "y", "heads", "tested",
        pl.col("positive").alias(f"q < {Q_LEVEL}, r > 0"), pl.col("negative").alias(f"q < {Q_LEVEL}, r < 0"),
        pl.col("median_r").alias("median partial_r"), pl.col("median_ci_low").alias("95% low"),
        pl.col("median_ci_high").alias("95% high"),
    )  # fmt: skip


def headline_lines(a: RunAnalysis, skip_positions: int) -> list[str]:
    if a.headline is None or a.headline.height == 0:
        return ["No correlations: this run lacks query_norm or another metric (see metrics.names)."]
    samples = int(a.headline["samples"].max())
    lines = [f"- {headline_sentence(row)}" for row in a.headline.iter_rows(named=True)]
    lines += [
        "",
        f"Per head, partial r is the correlation of query_norm's and the metric's ranks after each token position's "
        f"mean rank is taken out (positions t >= {skip_positions}); a head counts at q < {Q_LEVEL} (Benjamini-"
        f"Hochberg over the run's heads, per metric); the interval is a 95% bootstrap interval of the median that "
        f"resamples whole samples ({samples} here), never tokens.",
    ]  # fmt: skip
    return lines


def few_samples_warning(samples: int) -> str | None:
    if samples >= MIN_SAMPLES:
        return None
    if samples < 2:
        return (f"**{samples} sample**: position-controlled correlations need 2 samples or more (a test 3); none "
                f"are given. Intervals and p-values need {MIN_SAMPLES} samples or more.")  # fmt: skip
    distinct = math.comb(2 * samples - 1, samples)
    tests = ("p-values and q-values rest on a t-test with " + f"{samples - 1} degrees of freedom"
             if samples >= 3 else "there are no p-values or q-values (a test needs 3 samples)")  # fmt: skip
    return (f"**Few samples ({samples})**: intervals and p-values are not to be trusted below {MIN_SAMPLES} "
            f"samples. With {samples}, the bootstrap has {distinct:,} distinct resamples and a nominal 95% interval "
            f"covers the true value only about {interval_coverage(samples):.0%} of the time (about "
            f"{interval_coverage(MIN_SAMPLES):.0%} at {MIN_SAMPLES}); {tests}. Capture more windows "
            f"(data.n_samples).")  # fmt: skip


def undefined_heads(correlations: pl.DataFrame) -> list[str]:
    """One line per (metric, reason): the heads whose partial r or p is undefined, named, with why."""
    if "partial_note" not in correlations.columns:
        return []
    lines = []
    noted = correlations.filter(pl.col("partial_note").is_not_null())
    for (y, note), group in noted.group_by("y", "partial_note", maintain_order=True):
        heads = [f"layer {layer} head {head}" for layer, head in group.select("layer", "head").sort("layer", "head").rows()]
        named = ", ".join(heads[:UNDEFINED_LISTED]) + (f" and {len(heads) - UNDEFINED_LISTED} more"
                                                       if len(heads) > UNDEFINED_LISTED else "")  # fmt: skip
        lines.append(f"**{y} undefined in {len(heads)} head{'s' * (len(heads) > 1)}** ({named}): {note}; "
                     "left out of the head counts and the median.")  # fmt: skip
    return lines


def run_warnings(a: RunAnalysis) -> list[str]:
    """What makes the numbers less than they look: few samples, random weights, undefined heads, recorded
    non-finite values, an unfinished run."""
    record, warnings = a.record, []
    if not record:
        warnings.append("**No run.json**: the capture did not finish; only its complete part files are analysed, "
                        "and the settings below are unknown.")  # fmt: skip
    if a.headline is not None and a.headline.height:
        warnings.append(few_samples_warning(int(a.headline["samples"].max())))
    model = record.get("config", {}).get("model", {})
    if model.get("source") == "random":
        warnings.append(f"**Random weights**: {model.get('name')} is initialised at random (seed {model.get('seed')}),"
                        " not trained. Its correlations describe an untrained network and say nothing about trained "
                        "attention; many heads can come out \"significant\" all the same.")  # fmt: skip
    warnings += undefined_heads(a.correlations)
    nonfinite = record.get("nonfinite", {}).get("total", 0)
    if nonfinite:
        warnings.append(f"**Non-finite values**: the capture recorded {nonfinite:,} (run.on_nonfinite=record); the "
                        "heads holding them have no position-controlled statistics.")  # fmt: skip
    return [w for w in warnings if w]


def settings_table(a: RunAnalysis, cfg) -> pl.DataFrame:
    """Every setting the numbers depend on, one row each: the capture's (run.json) and the analysis' own."""
    config, model, counts = a.record.get("config", {}), a.record.get("model", {}), a.record.get("counts", {})
    samples = int(a.headline["samples"].max()) if a.headline is not None and a.headline.height else None
    context = config.get("data", {}).get("context_length")
    source = config.get("model", {}).get("source")
    weights = {"random": "random (untrained)", "gguf": "trained, from a GGUF file", "hub": "trained (checkpoint)"}
    rows = [
        ("model", config.get("model", {}).get("name"), "model.name"),
        ("weights", weights.get(source, source), "model.source"),
        ("shape", f"{model.get('layers')} layers x {model.get('heads')} heads, {model.get('kv_heads')} KV heads"
         if model else None, "run.json model"),
        ("attention measured", config.get("metrics", {}).get("attention"), "metrics.attention"),
        ("θ (k_eff threshold)", config.get("metrics", {}).get("k_eff_threshold"), "metrics.k_eff_threshold"),
        ("metric storage", config.get("metrics", {}).get("storage_dtype"), "metrics.storage_dtype"),
        ("data", config.get("data", {}).get("name"), "data"),
        ("context length T", context, "data.context_length"),
        ("samples S (windows)", samples if samples is not None else counts.get("samples"), "data.n_samples"),
        ("tokens per head", samples * (context - cfg.skip_positions) if samples and context else None,
         "S x (T - skip_positions)"),
        ("positions left out", f"t < {cfg.skip_positions}", "skip_positions"),
        ("bootstrap", f"{cfg.bootstrap:,} resamples of whole samples", "bootstrap"),
        ("seed", cfg.seed, "seed"),
        ("significance", f"q < {Q_LEVEL} (Benjamini-Hochberg per metric)", ""),
    ]  # fmt: skip
    return pl.DataFrame([(name, number(value), key) for name, value, key in rows],
                        schema=["setting", "value", "key"], orient="row")  # fmt: skip


def strongest_table(a: RunAnalysis, top: int) -> pl.DataFrame:
    """The strongest position-controlled query_norm-vs-entropy heads, their token-level r and mean metrics."""
    means = [f"{m}_mean" for m in ("entropy", "max_attn", "k_eff") if f"{m}_mean" in a.heads.columns]
    return (
        strongest_heads(a.correlations, "entropy", top, "partial_r")
        .join(a.heads.select("layer", "head", *means), on=["layer", "head"], how="left")
        .select("layer", "head", "samples", "tokens", "partial_r", "partial_ci_low", "partial_ci_high", "partial_p",
                "partial_q", "spearman_r", *means)  # fmt: skip
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
    if not figures:
        return ["None: analysed with figures=false."]
    return [f"![{path.stem}]({relative(path, out)})" for path in figures]


def cell_text(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")


def token_tables(top: pl.DataFrame) -> list[str]:
    """One table per highlight: a row per layer, the top tokens as `token` (sample, position: value)."""
    lines = []
    for highlight in top["highlight"].unique(maintain_order=True).to_list():
        rows = top.filter(pl.col("highlight") == highlight)
        ranks = rows["rank"].max()
        lines += [f"**{highlight}** for its position (mean over the layer's heads)", ""]
        lines += ["| layer | " + " | ".join(f"#{i}" for i in range(1, ranks + 1)) + " |", "|---|" + "---|" * ranks]
        for (layer,), group in rows.group_by("layer", maintain_order=True):
            cells = [
                f"`{cell_text(r['token'] or '?')}` (s{r['sample_id']} t{r['token_pos']}: {r['value']:.4g} vs "
                f"{r['position_mean']:.4g}, {r['deviation']:+.1f} sd)"
                for r in group.sort("rank").iter_rows(named=True)
            ]
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def write_run_report(a: RunAnalysis, cfg, path: Path) -> Path:
    """cfg: the analysis config (skip_positions, bootstrap, seed, top_heads)."""
    skip_positions, top = cfg.skip_positions, cfg.top_heads
    ratios = [m for m in ("entropy_normalized", "k_eff_fraction") if f"{m}_mean" in a.heads.columns]
    warnings = run_warnings(a)
    lines = [
        f"# Spectra analysis: {a.label}",
        "",
        describe_run(a),
        "",
        "## Does query norm predict each metric?",
        "",
        *headline_lines(a, skip_positions),
        "",
    ]
    if warnings:
        lines += ["## Warnings", "", *[f"- {w}" for w in warnings], ""]
    lines += [
        "## Settings the numbers depend on",
        "",
        markdown_table(settings_table(a, cfg)),
        "",
        f"Metrics: {', '.join(a.metrics)}. θ is the share of attention k_eff must cover: k_eff is the fewest keys "
        "whose probabilities sum to at least θ." + (
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
        "- `tokens`: the (sample, position) pairs correlated in the head: samples x (T - skip_positions).",
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
    else:
        lines.append("No correlations: this run lacks query_norm or entropy (see metrics.names).")
    if a.headline is not None and a.headline.height:
        lines += ["", f"Per metric: heads with q < {Q_LEVEL} by the sign of partial r, and the median partial r over "
                  "the heads where it is defined, with its 95% interval (the headline's numbers):", ""]  # fmt: skip
        lines.append(markdown_table(headline_table(a.headline)))
    lines += ["", f"## Tokens that stand out (t >= {skip_positions}, ranked against their position)", ""]
    if a.top_tokens is not None and a.top_tokens.height:
        lines += ["Each token is ranked by how far its value (the mean over the layer's heads) lies from the mean of "
                  "all samples at the same position, in standard deviations of those samples (sd), as the statistics "
                  "compare tokens within a position: raw values would fill the table with early positions, which see "
                  "few keys and vary most. Cells: the token (s: sample_id, t: token_pos: its value vs the position's "
                  "mean, distance in sd); tokens.parquet holds every token with its neighbours, joinable with the "
                  "metric rows on (sample_id, token_pos).", ""]  # fmt: skip
        lines += token_tables(a.top_tokens)
    else:
        lines.append(f"No token text: {a.tokens_note or 'nothing to rank'}.")
    lines += ["", f"## Layers (t >= {skip_positions})", "",
              f"Metric columns: means over the layer's heads and tokens t >= {skip_positions}. `partial_r_<y>`: the "
              "median over the layer's heads of the position-controlled partial r of query_norm with y (what the "
              "report leads with); `spearman_r_<y>`: the median token-level Spearman r, without position control, "
              "for comparison.", ""]  # fmt: skip
    lines.append(markdown_table(layer_comparison(a.profile, a.correlations, skip_positions)))
    lines += ["", "## Figures", "", *figure_links(a.figures, path.parent)]
    lines += [
        "",
        "## Files",
        "",
        "- `heads.parquet`: per (layer, head), `<metric>_count/mean/std/min/q05/q25/q50/q75/q95/max` over all tokens",
        "- `correlations.parquet`: per (layer, head, y), token-level `tokens`, pearson_r/p, spearman_r/p of "
        "query_norm with y, and the position-controlled samples, partial_r, partial_ci_low/high, partial_p, "
        "partial_q, and partial_note (why a head has none)",
        "- `headline.parquet`: per y, the numbers of the answer at the top",
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
    lines += ["", "## Does query norm predict each metric? (per run)", ""]
    for a in analyses:
        if a.headline is not None and a.headline.height:
            lines += [f"{a.label}:", "", *[f"- {headline_sentence(row)}" for row in a.headline.iter_rows(named=True)]]
            lines += [f"- warning: {w.split('**')[1]}" for w in run_warnings(a)] + [""]
    lines += ["## Per-layer values by run (`comparison.parquet`)", "",
              "Means over tokens t >= skip_positions; `partial_r_<y>`: median over the layer's heads of the "
              "position-controlled r; `spearman_r_<y>`: the token-level r, for comparison.", "", markdown_table(comparison)]  # fmt: skip
    lines += ["", "## Figures", "", *figure_links(figures, path.parent), ""]
    path.write_text("\n".join(lines))
    return path


def console_summary(a: RunAnalysis, skip_positions: int) -> str:
    lines = [f"\nSpectra analysis: {a.out / 'report.md'}", f"  {a.heads.height} heads, metrics {', '.join(a.metrics)}"]
    if a.headline is not None:
        lines += [f"  {headline_sentence(row).replace('**', '')}" for row in a.headline.iter_rows(named=True)]
    top = strongest_heads(a.correlations, "entropy", 3, "partial_r")
    for row in top.iter_rows(named=True):
        lines.append(
            f"  layer {row['layer']:>2} head {row['head']:>2}: partial r(query_norm, entropy | position) = "
            f"{number(row['partial_r'])} [{number(row['partial_ci_low'])}, {number(row['partial_ci_high'])}], "
            f"q = {number(row['partial_q'])} ({row['samples']} samples, t >= {skip_positions})"
        )
    for warning in run_warnings(a):
        lines.append(f"  warning: {warning.split('**')[1]}, see the report")
    figures = f"{len(a.figures)} PNG in {a.out / 'figures'}" if a.figures else "none (figures=false)"
    lines.append(f"  figures    {figures}")
    return "\n".join(lines)
