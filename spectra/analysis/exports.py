"""Exports of a run for other tools: the prototype's CSV layout, and a DuckDB script of views over the Parquet.

    python -m spectra.analyze run_dir=<run> export=csv     # also <run>/analysis/metrics.csv
    python -m spectra.sql <run> "SELECT layer, avg(entropy) FROM metrics GROUP BY 1 ORDER BY 1"
    cd <run>/analysis && duckdb -init duckdb_views.sql     # the same views in the duckdb CLI, if you have it

The views name their files relative to the script's folder, so a run folder can be moved or copied; DuckDB
resolves relative paths against its working directory; spectra.sql makes them absolute when it reads the script.

The CSV is streamed from the part files (never held in memory): one row per (sample, layer, head, token) with
the key columns and then the metric columns, in the files' order.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import polars as pl

from spectra.analysis.head_stats import KEY_NAMES, metric_columns

ANALYSIS_TABLES = ("heads", "correlations", "positions")
VIEWS_FILE = "duckdb_views.sql"
# Same definitions as head_stats.RATIOS, in SQL: derived at query time, never stored. {visible}: the keys query t
# sees on its layer (sliding windows included), see sql_visible.
SQL_RATIOS = {
    "entropy_normalized": ("entropy", "CASE WHEN {visible} > 1 THEN entropy / ln({visible}) END"),
    "k_eff_fraction": ("k_eff", "CASE WHEN {visible} > 1 THEN k_eff / {visible} END"),
}


@dataclass
class ViewSource:
    label: str
    run: Path  # the run folder (metrics/, samples.parquet)
    analysis: Path  # its analysis folder (heads.parquet, ...)
    metrics: Sequence[str]
    windows: Sequence | None = None  # run.json's model.attention_windows


def sql_visible(windows: Sequence | None) -> str:
    """head_stats.visible_keys in SQL: t + 1, least(t + 1, W) on a sliding layer, NULL on a layer of another rule."""
    cases = [
        f"WHEN layer = {layer} THEN " + (f"least(token_pos + 1, {rule})" if isinstance(rule, int) else "NULL")
        for layer, rule in enumerate(windows or [])
        if rule is not None
    ]
    return f"(CASE {' '.join(cases)} ELSE token_pos + 1 END)" if cases else "(token_pos + 1)"


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


def duckdb_views(runs: Sequence[ViewSource], path: Path) -> Path:
    """Writes CREATE VIEW statements, with file paths relative to the script's folder.

    Views: metrics (plus the derived ratios), samples, tokens, and the analysis tables; every view has a `run`
    column so one script serves a single run and a sweep alike.
    """
    folder = path.parent

    def location(file: Path) -> str:
        return sql_string(Path(os.path.relpath(file.absolute(), folder.absolute())).as_posix())

    def view(name: str, columns, files) -> str:
        """columns(source) -> SELECT list; files(source) -> the Parquet path or glob."""
        selects = [
            f"SELECT {sql_string(source.label)} AS run, {columns(source)} FROM read_parquet({location(files(source))})"
            for source in runs
        ]
        return f"CREATE OR REPLACE VIEW {name} AS\n" + "\nUNION ALL BY NAME\n".join(selects) + ";"

    def with_ratios(source: ViewSource) -> str:
        visible = sql_visible(source.windows)
        ratios = [
            f"{sql.format(visible=visible)} AS {name}"
            for name, (base, sql) in SQL_RATIOS.items()
            if base in source.metrics
        ]
        return ", ".join(["*", *ratios])

    every = lambda _: "*"  # noqa: E731
    statements = [
        "-- Views over Spectra Parquet files, written by `python -m spectra.analyze`. Paths are relative to this\n"
        "-- folder: python -m spectra.sql <run>, or cd here and run duckdb -init duckdb_views.sql",
        view("metrics", with_ratios, lambda source: source.run / "metrics" / "part-*.parquet"),
    ]
    # DuckDB reads a view's files when it is created: leave a table out if any run lacks it.
    optional = {"samples": lambda s: s.run / "samples.parquet", "tokens": lambda s: s.analysis / "tokens.parquet"}
    for name, files in optional.items():
        if all(files(source).is_file() for source in runs):
            statements.append(view(name, every, files))
    statements += [view(t, every, lambda source, t=t: source.analysis / f"{t}.parquet") for t in ANALYSIS_TABLES]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(statements) + "\n")
    return path


def absolute_paths(script: str, folder: Path) -> str:
    """The views' relative paths made absolute, with each glob expanded here into a list of files: DuckDB's
    file_search_path is comma-separated and every Hydra sweep job's folder name holds commas, and DuckDB's own glob
    reads the [ ] of a list-valued override as a character class."""

    def absolute(match: re.Match) -> str:
        path = folder.resolve() / match.group(1).replace("''", "'")
        if "*" not in path.name:
            return f"read_parquet({sql_string(os.path.normpath(path))})"
        files = sorted(Path(os.path.normpath(path.parent)).glob(path.name))  # pathlib: the folder part is literal
        return "read_parquet([" + ", ".join(sql_string(str(f)) for f in files) + "])"

    return re.sub(r"read_parquet\('((?:[^']|'')*)'\)", absolute, script)


def open_views(folder: Path):
    """A DuckDB connection with the views of `folder`'s duckdb_views.sql, its relative paths resolved there."""
    import duckdb

    connection = duckdb.connect()
    connection.execute(absolute_paths((folder / VIEWS_FILE).read_text(), folder))
    return connection
