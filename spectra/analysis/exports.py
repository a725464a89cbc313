"""Exports of a run for other tools: the prototype's CSV layout, and a DuckDB script of views over the Parquet.

    python -m spectra.analyze run_dir=<run> export=csv     # also <run>/analysis/metrics.csv
    duckdb -init <run>/analysis/duckdb_views.sql           # then: SELECT layer, avg(entropy) FROM metrics GROUP BY 1

The CSV is streamed from the part files (never held in memory): one row per (sample, layer, head, token) with
the key columns and then the metric columns, in the files' order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import polars as pl

from spectra.analysis.head_stats import KEY_NAMES, metric_columns

ANALYSIS_TABLES = ("heads", "correlations", "positions")
# Same definitions as head_stats.RATIOS, in SQL: derived at query time, never stored.
SQL_RATIOS = {
    "entropy_normalized": ("entropy", "CASE WHEN token_pos > 0 THEN entropy / ln(token_pos + 1) END"),
    "k_eff_fraction": ("k_eff", "CASE WHEN token_pos > 0 THEN k_eff / (token_pos + 1) END"),
}


def export_csv(lf: pl.LazyFrame, path: Path) -> Path:
    """Streams the rows to CSV; float16 metrics are written as float32 (CSV readers know no half floats)."""
    metrics = metric_columns(lf)
    schema = lf.collect_schema()
    halves = [name for name in metrics if schema[name] == pl.Float16]
    path.parent.mkdir(parents=True, exist_ok=True)
    lf.select(*KEY_NAMES, *metrics).with_columns(pl.col(halves).cast(pl.Float32)).sink_csv(path)
    return path


def sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def duckdb_views(runs: Sequence[tuple[str, Path, Path, Sequence[str]]], path: Path) -> Path:
    """Writes CREATE VIEW statements. runs: (label, run dir, analysis dir, metric columns) per run.

    Views: metrics (plus the derived ratios), samples, and the analysis tables; every view has a `run` column
    so one script serves a single run and a sweep alike.
    """

    def view(name: str, columns, files) -> str:
        """columns(metrics) -> SELECT list; files(run dir, analysis dir) -> the Parquet path or glob."""
        selects = [
            f"SELECT {sql_string(label)} AS run, {columns(metrics)} "
            f"FROM read_parquet({sql_string(str(files(run_dir, analysis_dir).resolve()))})"
            for label, run_dir, analysis_dir, metrics in runs
        ]
        return f"CREATE OR REPLACE VIEW {name} AS\n" + "\nUNION ALL BY NAME\n".join(selects) + ";"

    def with_ratios(metrics: Sequence[str]) -> str:
        return ", ".join(["*"] + [f"{sql} AS {name}" for name, (base, sql) in SQL_RATIOS.items() if base in metrics])

    every = lambda _: "*"  # noqa: E731
    statements = [
        "-- Views over Spectra Parquet files, written by `python -m spectra.analyze`.\n"
        "-- duckdb -init duckdb_views.sql    or, in Python: duckdb.execute(open('duckdb_views.sql').read())",
        view("metrics", with_ratios, lambda run, _: run / "metrics" / "part-*.parquet"),
    ]
    # DuckDB reads a view's files when it is created: leave samples out if a run never wrote them.
    if all((run_dir / "samples.parquet").is_file() for _, run_dir, _, _ in runs):
        statements.append(view("samples", every, lambda run, _: run / "samples.parquet"))
    statements += [view(t, every, lambda _, out, t=t: out / f"{t}.parquet") for t in ANALYSIS_TABLES]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(statements) + "\n")
    return path
