"""Analyse capture runs: per-head summaries, query-norm correlations, position profiles, figures and a report.

    python -m spectra.analyze run_dir=outputs/2026-11-28/14-00-00-000000_tiny_llama        # -> <run>/analysis/
    python -m spectra.analyze run_dir=outputs/multirun/2026-11-28/14-05-00-000000          # a sweep: every run,
                                                                                          #   and a comparison
    python -m spectra.analyze run_dir=[runA,runB] output_dir=cmp                          # several runs
    python -m spectra.analyze run_dir=<run> skip_positions=0 heads=[[0,3],[2,5]] export=csv logger=wandb
    python -m spectra.analyze --cfg job                                                   # the documented config

Per run it writes, under <run>/analysis/ (or output_dir): heads.parquet, correlations.parquet (token-level and
position-controlled, with bootstrap intervals over samples and q-values), positions.parquet, tokens.parquet and
top_tokens.parquet (token text, when the run's tokenizer loads), figures/*.png, report.md, explorer.html
(analysis/explorer.py: the metrics on the text, head by head, one offline page), duckdb_views.sql
(python -m spectra.sql <run>), and with export=csv metrics.csv. Several runs add comparison.parquet,
a figure and report.md in the sweep folder's analysis/ (or output_dir). Reads top to bottom: check config ->
find runs -> per run: statistics -> tables -> figures -> report -> exports; then the comparison; then W&B.
Statistics live in spectra/analysis/head_stats.py, figures in plots.py, the report in report.py (same folder).
"""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import polars as pl
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

from spectra.analysis import explorer, head_stats, plots, report
from spectra.analysis.controlled import headline, position_controlled, position_residual_ranks, with_q_values
from spectra.analysis.exports import VIEWS_FILE, ViewSource, duckdb_views, export_csv
from spectra.analysis.publish import publish, published, staging
from spectra.analysis.runs import (
    RunAnalysis, attention_windows, find_runs, job_overrides, run_record, run_settings, scan_metrics, swept_keys,
)  # fmt: skip
from spectra.analysis.tokens import run_tokenizer, top_tokens, write_tokens
from spectra.config.paths import config_dir, hydra_entrypoint
from spectra.config.plan import check_writable
from spectra.config.schema import LoggerConfig, register_configs
from spectra.config.secrets import check_arguments_for_secrets, check_config_for_secrets
from spectra.config.command_line import UNCHECKED_FLAGS, compose_job, flags_first, hydra_parser
from spectra.errors import ConfigError, SpectraError, ends_in_one_line, stop_signals_as_interrupt
from spectra.store.lock import FolderLock
from spectra.store.writer import write_parquet_atomic
from spectra.tracking.tracker import (
    wandb_mode,  # the capture's own rule: auto = WANDB_MODE, else online with credentials
)

HEATMAP_METRICS = (
    "entropy", "max_attn", "k_eff", "query_norm", "entropy_normalized", "k_eff_fraction", "sink_attn", "attn_distance",
)  # fmt: skip
PROFILE_METRICS = ("entropy", "entropy_normalized", "k_eff", "k_eff_fraction")
SWEEP_METRICS = ("partial_r_entropy", "entropy", "k_eff", "max_attn")


@dataclass
class AnalyzeConfig:
    run_dir: Any = None  # a run folder, a list of them ([a,b]), or a multirun (sweep) folder holding runs
    output_dir: Optional[str] = None  # None: <run>/analysis for each run, <sweep>/analysis for the comparison
    skip_positions: int = 2  # correlations leave out token positions t < this (at t = 0 a query sees one key)
    bootstrap: int = 1000  # resamples of whole samples for the position-controlled correlations' 95% intervals
    seed: int = 0  # the bootstrap's seed: the same seed and runs give the same intervals
    top_tokens: int = 3  # per layer, the report lists this many tokens for each highlight (query norm, ...)
    heads: list[Any] = field(default_factory=list)  # [[layer, head], ...] for density plots; []: the strongest
    top_heads: int = 4  # rows of the report's strongest-heads table; density plots when `heads` is empty
    export: str = "none"  # none | csv: also write analysis/metrics.csv (the prototype's CSV layout)
    figures: bool = True  # false: no PNGs, the tables, report and explorer only (drawing is most of a small run's)
    # The capture's logger group (conf/logger/): logger=wandb logs tables, figures and the report to W&B.
    logger: LoggerConfig = field(default_factory=LoggerConfig)


register_configs()  # the logger group's schema
ConfigStore.instance().store(name="base_analyze", node=AnalyzeConfig)


def checked_config(cfg: DictConfig) -> DictConfig:
    """Merged into the schema again (catches `+key=` overrides) and range-checked; ConfigError names the key."""
    check_config_for_secrets(OmegaConf.to_container(cfg, resolve=False))  # a --config-dir YAML included
    try:
        # A plain container: merging the composed DictConfig itself keeps `+` keys (its struct flag travels along).
        cfg = OmegaConf.merge(OmegaConf.structured(AnalyzeConfig), OmegaConf.to_container(cfg, resolve=True))
    except Exception as error:
        raise ConfigError(getattr(error, "full_key", None) or "config", str(error).splitlines()[0]) from None
    if cfg.run_dir in (None, "", []):
        raise ConfigError("run_dir", "required: python -m spectra.analyze run_dir=<run folder or sweep folder>")
    if not 0 <= cfg.seed <= 2**63 - 1:
        raise ConfigError("seed", f"must be in 0 .. 2**63 - 1 (the bootstrap's numpy seed), got {cfg.seed}")
    if cfg.skip_positions < 0:
        raise ConfigError("skip_positions", f"must be >= 0, got {cfg.skip_positions}")
    for key in ("top_heads", "top_tokens", "bootstrap"):
        if cfg[key] < 1:
            raise ConfigError(key, f"must be >= 1, got {cfg[key]}")
    if cfg.export not in ("none", "csv"):
        raise ConfigError("export", f"must be none or csv, got {cfg.export!r}")
    if cfg.logger.name not in ("none", "wandb"):
        raise ConfigError("logger.name", f"must be none or wandb, got {cfg.logger.name!r}")
    for pair in cfg.heads:
        if not (isinstance(pair, (list, ListConfig)) and len(pair) == 2 and all(isinstance(i, int) for i in pair)):
            raise ConfigError("heads", f"each entry must be [layer, head], got {pair!r}; e.g. heads=[[0,3],[2,5]]")
    return cfg


def check_heads(heads: list, layers: list[int], n_heads: int) -> None:
    """Before any work: each requested [layer, head] must exist in the run."""
    for layer, head in heads:
        if layer not in layers or not 0 <= head < n_heads:
            raise ConfigError("heads", f"[{layer}, {head}] is not in the run ({len(layers)} layers x {n_heads} heads, "
                              "counted from 0)")  # fmt: skip


def density_heads(cfg: DictConfig, correlations: pl.DataFrame) -> list[tuple[int, int]]:
    """The heads asked for, or else the strongest position-controlled query_norm-vs-entropy heads."""
    if cfg.heads:
        return [tuple(pair) for pair in cfg.heads]
    strongest = head_stats.strongest_heads(correlations, "entropy", cfg.top_heads, "partial_r")
    return list(zip(strongest["layer"].to_list(), strongest["head"].to_list()))


def head_grids(lf: pl.LazyFrame, layer: int, head: int, skip_positions: int, columns: list[str]) -> list:
    """One head's values (1 / (layers x heads) of the run) as (S, T) grids, positions t < skip_positions left out."""
    chosen = (pl.col("layer") == layer) & (pl.col("head") == head) & (pl.col("token_pos") >= skip_positions)
    rows = lf.filter(chosen).sort("sample_id", "token_pos").select("sample_id", pl.col(columns).cast(pl.Float64))
    rows = rows.collect(engine="streaming")
    samples = rows["sample_id"].n_unique()
    return [rows[name].to_numpy().reshape(samples, -1) for name in columns]  # (S, T) each


def run_figures(
    lf: pl.LazyFrame, label: str, heads: pl.DataFrame, correlations: pl.DataFrame, profile: pl.DataFrame,
    cfg: DictConfig, folder: Path,
) -> list[Path]:  # fmt: skip
    """In the report's order: per metric, partial r beside token-level r; query_norm vs entropy within positions
    for a few heads; position profiles; heatmaps of every metric's mean."""
    figures = []
    for y in correlations["y"].unique().sort().to_list():
        title = f"{label}: query_norm vs {y}, t >= {cfg.skip_positions}"
        rows = correlations.filter(pl.col("y") == y)
        figures.append(plots.correlation_heatmaps(rows, title, folder / f"heatmap_partial_r_{y}.png"))
    entropy = correlations.filter(pl.col("y") == "entropy")
    if entropy.height:
        # What partial r correlates: ranks with each position's mean rank taken out, so that position, which
        # moves both query norm and entropy, does not draw the picture.
        points = []
        for layer, head in density_heads(cfg, correlations):
            x, y = head_grids(lf, layer, head, cfg.skip_positions, ["query_norm", "entropy"])
            r = entropy.filter(pl.col("layer") == layer, pl.col("head") == head)["partial_r"]
            title = f"layer {layer}, head {head}: partial r = {r[0]:.2f} ({x.size:,} tokens)"
            points.append((title, position_residual_ranks(x).ravel(), position_residual_ranks(y).ravel()))
        title = f"{label}: query_norm vs entropy within positions, t >= {cfg.skip_positions}"
        axis = "{}: rank - position's mean rank (sd)"
        figures.append(plots.density_panels(points, axis.format("query_norm"), axis.format("entropy"),
                                            folder / "density_query_norm_entropy.png", title=title))  # fmt: skip
    shown = [m for m in PROFILE_METRICS if m in profile.columns]
    if shown:
        figures.append(plots.position_curves(profile, shown, folder / "position_profiles.png", label))
    # The usual metrics first, then any other column the run holds (a metric added to the capture later).
    present = [c.removesuffix("_mean") for c in heads.columns if c.endswith("_mean")]
    ordered = [m for m in HEATMAP_METRICS if m in present] + [m for m in present if m not in HEATMAP_METRICS]
    figures += [
        plots.head_heatmap(heads, f"{metric}_mean", f"{label}: mean {metric} (all tokens)", folder / f"heatmap_{metric}.png")
        for metric in ordered
    ]
    return figures


def correlation_table(
    lf: pl.LazyFrame, metrics: list[str], layers: list[int], cfg: DictConfig
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Token-level Pearson/Spearman and the position-controlled partial r, interval, p and q, per (layer, head, y);
    and the headline over heads per y (its interval needs every head's resampled r, which is then dropped)."""
    skip = cfg.skip_positions
    plain = head_stats.by_layer(lambda rows: head_stats.head_correlations(rows, skip), lf, layers)
    controlled = head_stats.by_layer(
        lambda rows: position_controlled(rows, metrics, skip, cfg.bootstrap, cfg.seed), lf, layers
    )
    controlled = with_q_values(controlled)
    table = plain.join(controlled.drop("partial_draws"), on=["layer", "head", "y"], how="left")
    return table, headline(controlled)


def token_text(run: Path, record: dict, lf: pl.LazyFrame, windows, cfg: DictConfig, out: Path):
    """tokens.parquet and top_tokens.parquet, or (None, why not) when the run's tokenizer cannot be had."""
    if not (run / "samples.parquet").is_file():
        return None, "no samples.parquet in the run"
    tokenizer, why = run_tokenizer(record)
    if tokenizer is None:
        return None, why
    tokens = write_tokens(run / "samples.parquet", tokenizer, out / "tokens.parquet")
    top = top_tokens(lf, tokens, windows, cfg.skip_positions, cfg.top_tokens)
    write_parquet_atomic(top.to_arrow(), out / "top_tokens.parquet")
    return top, ""


def analyze_run(run: Path, out: Path, label: str, cfg: DictConfig) -> RunAnalysis:
    lf = scan_metrics(run)
    record = run_record(run)
    windows = attention_windows(run, record)  # None: a run from before they were recorded
    metrics = head_stats.metric_columns(lf)
    layers = head_stats.layers_of(lf)
    check_heads(cfg.heads, layers, int(lf.select(pl.col("head").max()).collect().item()) + 1)

    heads = head_stats.by_layer(lambda rows: head_stats.head_summary(rows, windows), lf, layers)
    correlations, findings = correlation_table(lf, metrics, layers, cfg)
    profile = head_stats.position_profile(lf, windows)
    out.mkdir(parents=True, exist_ok=True)
    tables = (("heads", heads), ("correlations", correlations), ("headline", findings), ("positions", profile))
    for name, table in tables:
        write_parquet_atomic(table.to_arrow(), out / f"{name}.parquet")
    top, tokens_note = token_text(run, record, lf, windows, cfg, out)

    figures = run_figures(lf, label, heads, correlations, profile, cfg, out / "figures") if cfg.figures else []
    analysis = RunAnalysis(label, run, out, record, metrics, heads, correlations, profile, figures, windows, top,
                           tokens_note, findings)  # fmt: skip
    report.write_run_report(analysis, cfg, out / "report.md")
    duckdb_views([view_source(analysis)], out / VIEWS_FILE)
    if cfg.export == "csv":
        export_csv(lf, out / "metrics.csv")
    # Reads tokens.parquet and top_tokens.parquet only when this analysis wrote them (the staging folder starts empty).
    explorer.write_explorer(run, out, lf, record, label, cfg.skip_positions)
    return analysis


def view_source(a: RunAnalysis) -> ViewSource:
    return ViewSource(a.label, a.run, a.out, a.metrics, a.windows)


def sweep_axes(comparison: pl.DataFrame, keys: list[str]) -> tuple[str, list[str]]:
    """(x, the other swept keys): x is the swept key with the most distinct values, numeric keys first (a line
    over context lengths reads better than one over model names); no swept key: the run label."""
    if not keys:
        return "run", []
    x = max(keys, key=lambda k: (comparison[k].dtype.is_numeric(), comparison[k].n_unique()))
    return x, [k for k in keys if k != x]


def compare_runs(
    analyses: list[RunAnalysis], out: Path, skip_positions: int, figures: bool
) -> tuple[pl.DataFrame, list[Path]]:
    """comparison.parquet: one row per (run, layer) with the values of the keys the user swept, per-layer means
    (t >= skip_positions) and median partial r; and, if `figures`, a line plot per metric."""
    settings = [run_settings(a.run, a.record) for a in analyses]
    keys = swept_keys(settings, [job_overrides(a.run) for a in analyses])
    tables = []
    for a, setting in zip(analyses, settings):
        table = head_stats.layer_comparison(a.profile, a.correlations, skip_positions)
        tables.append(table.with_columns(pl.lit(a.label).alias("run"), *[pl.lit(setting.get(k)).alias(k) for k in keys]))
    comparison = pl.concat(tables, how="diagonal_relaxed").select("run", *keys, pl.exclude("run", *keys))
    out.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(comparison.to_arrow(), out / "comparison.parquet")
    if not figures:
        return comparison, []
    x, others = sweep_axes(comparison, keys)
    return comparison, [
        plots.sweep_lines(comparison, x, others, metric, out / "figures" / f"sweep_{metric}.png")
        for metric in SWEEP_METRICS
        if metric in comparison.columns
    ]


def log_to_wandb(
    cfg: DictConfig, analyses: list[RunAnalysis], comparison: Optional[pl.DataFrame], reports: list[Path]
) -> None:
    """One W&B run per analysis: per-head tables (never per-token rows: W&B tables stop at 200k), figures, report.
    Its files go to <analysis folder>/wandb, as a capture's go to <run>/wandb."""
    import wandb

    name = analyses[0].label if len(analyses) == 1 else f"compare-{len(analyses)}-runs"
    setting = lambda key, default: OmegaConf.select(cfg, f"logger.{key}", default=default)  # noqa: E731
    run = wandb.init(
        project=setting("project", "spectra"),
        entity=setting("entity", None),
        group=setting("group", None),
        tags=list(setting("tags", [])),
        mode=wandb_mode(setting("mode", "auto")),
        job_type="analysis",
        name=setting("run_name", None) or name,
        dir=str(reports[-1].parent),
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    try:
        for a in analyses:
            prefix = "" if len(analyses) == 1 else f"{a.label}/"
            run.log({
                f"{prefix}heads": wandb.Table(dataframe=a.heads.to_pandas()),
                f"{prefix}correlations": wandb.Table(dataframe=a.correlations.to_pandas()),
                **{f"{prefix}figures/{path.stem}": wandb.Image(str(path)) for path in a.figures},
                # The explorer's per-head and top-token tables: explorer_heads, top_tokens.
                **{f"{prefix}{name}": wandb.Table(dataframe=t.to_pandas())
                   for name, t in explorer.tables(a.out).items()},
            })  # fmt: skip
            top = head_stats.strongest_heads(a.correlations, "entropy", 1, "partial_r")
            if top.height:
                run.summary[f"{prefix}strongest_head"] = f"L{top['layer'][0]}H{top['head'][0]}"
                run.summary[f"{prefix}strongest_partial_r"] = top["partial_r"][0]
                run.summary[f"{prefix}strongest_partial_q"] = top["partial_q"][0]
            for row in (a.headline if a.headline is not None else pl.DataFrame()).iter_rows(named=True):
                run.summary[f"{prefix}significant_heads/{row['y']}"] = row["significant"]
                run.summary[f"{prefix}median_partial_r/{row['y']}"] = row["median_r"]
        if comparison is not None:
            run.log({"comparison": wandb.Table(dataframe=comparison.to_pandas())})
        artifact = wandb.Artifact(f"analysis-{run.id}", type="analysis")
        for path in reports:
            artifact.add_file(str(path), name=f"{path.parent.name}-{path.parent.parent.name}-{path.name}")
        run.log_artifact(artifact)
    finally:
        run.finish()


def unique_labels(runs: list[Path]) -> list[str]:
    labels = [run.name for run in runs]
    return [label if labels.count(label) == 1 else f"{label}-{i}" for i, label in enumerate(labels)]


def analyze(cfg: DictConfig) -> list[Path]:
    """Everything; returns the report paths (one per run, then the comparison's)."""
    cfg = checked_config(cfg)
    runs, sweep = find_runs(cfg.run_dir)
    several = len(runs) > 1
    base = Path(cfg.output_dir) if cfg.output_dir else None
    labels = unique_labels(runs)
    outs = [(base / label if several else base) if base else run / "analysis" for run, label in zip(runs, labels)]
    joint = (base or (sweep or Path(os.path.commonpath(runs))) / "analysis") if several else None
    for out in outs + ([joint] if joint else []):  # a file in the way, or a folder that cannot be written
        check_writable(out, "output_dir" if base else "run_dir")
    with ExitStack() as locks:  # one writer per analysis folder; a second analysis of the same runs is refused
        for out in outs + ([joint] if joint else []):
            locks.enter_context(FolderLock(out, "output_dir"))
        # Each analysis is written into a staging folder and moved into its folder once complete (publish.py).
        analyses = []
        for run, out, label in zip(runs, outs, labels):
            with staging(out) as staged:
                analyses.append(published(analyze_run(run, staged, label, cfg), out))
        reports = [a.out / "report.md" for a in analyses]
        comparison = None
        if joint:
            with staging(joint) as staged:
                comparison, figures = compare_runs(analyses, staged, cfg.skip_positions, cfg.figures)
                report.write_sweep_report(analyses, comparison, figures, staged / "report.md")
                duckdb_views([view_source(a) for a in analyses], staged / VIEWS_FILE)
                publish(staged, joint)
            reports.append(joint / "report.md")
    for a in analyses:
        print(report.console_summary(a, cfg.skip_positions))
    if several:
        print(f"comparison of {len(analyses)} runs: {reports[-1]}")
    if cfg.logger.name == "wandb":
        log_to_wandb(cfg, analyses, comparison, reports)
    return reports


def main(cfg: DictConfig) -> None:
    # The analysis is moved into place only once complete (publish.py), so running again is all it takes.
    with ends_in_one_line(
        lambda: "free space (or choose a writable output_dir), then run the same command again",
        lambda: "run the same command again",
    ):
        analyze(cfg)


def check_command_line(argv: list[str]) -> None:
    """The overrides composed as Hydra will and checked (keys, types, ranges) before Hydra runs, so that a mistake is
    one line and exit 2, not Hydra's multi-line error and exit 1."""
    args = hydra_parser().parse_args(argv)
    if any(getattr(args, flag, None) for flag in UNCHECKED_FLAGS):
        return
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        job = OmegaConf.to_container(compose_job(args.overrides, "analyze"))
    job.pop("hydra", None)
    checked_config(OmegaConf.create(job))


def cli() -> None:
    """`python -m spectra.analyze`: flags anywhere; a command-line mistake or a credential is one line."""
    try:
        sys.argv[1:] = flags_first(sys.argv[1:])
        check_arguments_for_secrets(sys.argv[1:])  # before Hydra copies the overrides anywhere
        check_command_line(sys.argv[1:])
    except SpectraError as error:
        print(f"spectra: error: {error}", file=sys.stderr)
        sys.exit(2)
    with stop_signals_as_interrupt():
        hydra_entrypoint(main, "analyze", "spectra")


if __name__ == "__main__":
    cli()
