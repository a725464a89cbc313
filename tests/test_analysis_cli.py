"""Around the analysis: python -m spectra.sql on a moved run, stale outputs of an earlier analysis removed, the
sweep comparison's axes, and one-line errors from the command line."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import polars as pl
import pytest
from conftest import run_module_inprocess, run_spectra
from conftest import test_env as subprocess_env  # as: pytest would collect a test_* name
from test_analyze import analyze_cli

from spectra.analyze import sweep_axes
from spectra.store.manifest import file_sha256


def sql_cli(tmp_path: Path, *args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    return run_module_inprocess("spectra.sql", *args, cwd=cwd, env=subprocess_env(tmp_path), stdin=stdin)


@pytest.fixture(scope="module")
def analysed(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("analysed")
    result = run_spectra(tmp, "model=tiny_llama", "data=synthetic", "data.context_length=16", "data.n_samples=3",
                         "logger=none")  # fmt: skip
    assert result.returncode == 0, result.stderr
    result = analyze_cli(tmp, f"run_dir={tmp / 'run'}", "export=csv", "bootstrap=20", "figures=false")
    assert result.returncode == 0, result.stderr
    return tmp / "run"


def test_sql_on_a_moved_run_from_another_directory(analysed, tmp_path):
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(analysed, moved)
    shutil.rmtree(analysed.parent / "run" / "metrics")  # the views must not reach back to the original
    try:
        query = "SELECT count(*) AS n, count(DISTINCT sample_id) AS samples FROM metrics"
        result = sql_cli(tmp_path, str(moved), query, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert str(3 * 3 * 8 * 16) in result.stdout  # rows: samples x layers x heads x tokens
        piped = "SELECT count(*) FROM tokens;\nSELECT t.context FROM metrics m JOIN tokens t USING (run, sample_id, token_pos) LIMIT 1;"
        result = sql_cli(tmp_path, str(moved / "analysis"), cwd=Path("/"), stdin=piped)
        assert result.returncode == 0, result.stderr
        assert "48" in result.stdout and "⟦" in result.stdout
    finally:
        shutil.copytree(moved / "metrics", analysed / "metrics")


@pytest.mark.parametrize(
    "args, message",
    [([], "required: folder"), (["/nonexistent"], "no duckdb_views.sql"), (["RUN", "SELEC 1"], "duckdb: Parser Error")],
)
def test_sql_errors_are_one_line(analysed, tmp_path, args, message):
    result = sql_cli(tmp_path, *[str(analysed) if a == "RUN" else a for a in args], cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and result.stderr.startswith("spectra: error: ")
    assert message.replace("required: folder", "the following arguments are required: folder") in result.stderr


def test_rerun_removes_stale_exports(analysed, tmp_path):
    out = analysed / "analysis"
    assert (out / "metrics.csv").is_file()
    (out / "figures").mkdir()  # a figure of an earlier analysis (the fixture's drew none: figures=false)
    (out / "figures" / "density_from_an_older_run.png").write_bytes(b"")
    result = analyze_cli(tmp_path, f"run_dir={analysed}", "bootstrap=20", "figures=false")
    assert result.returncode == 0, result.stderr
    assert not (out / "metrics.csv").exists() and not (out / "figures").exists()
    assert (out / "tokens.parquet").is_file() and (out / "report.md").is_file()


def test_sweep_axis_is_the_key_that_varies_most():
    comparison = pl.DataFrame({
        "run": list("abcdef"), "data.context_length": [16, 32, 64, 16, 32, 64], "data.n_samples": [2, 2, 2, 4, 4, 4],
        "model.name": ["m"] * 6,
    })  # fmt: skip
    assert sweep_axes(comparison, ["data.context_length", "data.n_samples"]) == ("data.context_length", ["data.n_samples"])
    assert sweep_axes(comparison, ["data.n_samples", "model.name"]) == ("data.n_samples", ["model.name"])
    assert sweep_axes(comparison, []) == ("run", [])


def test_an_extra_metric_column_is_analysed_like_the_others(analysed, tmp_path):
    """A metric the capture adds later (value_norm, output_norm) needs no change here: summaries, correlations,
    heatmaps and the SQL views pick up any numeric column that is not a key."""
    from test_analyze import analyze_config

    from spectra.analysis.exports import open_views
    from spectra.analyze import analyze

    run = tmp_path / "run"
    shutil.copytree(analysed, run, ignore=shutil.ignore_patterns("analysis"))
    for part in sorted((run / "metrics").glob("part-*.parquet")):
        frame = pl.read_parquet(part)
        frame.with_columns((pl.col("query_norm") * 2 + 1).cast(pl.Float32).alias("value_norm")).write_parquet(part)
    # As a capture with that metric would list them: the readers verify every part against its manifest line.
    manifest = run / "manifest.jsonl"
    header, *lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    for line in lines:
        part = run / "metrics" / line["part"]
        line.update(bytes=part.stat().st_size, sha256=file_sha256(part))
    manifest.write_text("".join(json.dumps(line) + "\n" for line in [header, *lines]))
    analyze(analyze_config(f"run_dir={run}", "bootstrap=20"))
    out = run / "analysis"
    heads = pl.read_parquet(out / "heads.parquet")
    expected = pl.concat([pl.read_parquet(p) for p in sorted((run / "metrics").glob("part-*.parquet"))])
    means = expected.group_by("layer", "head").agg(pl.col("value_norm").cast(pl.Float64).mean()).sort("layer", "head")
    assert heads.sort("layer", "head")["value_norm_mean"].to_list() == pytest.approx(means["value_norm"].to_list(), rel=1e-12)
    correlations = pl.read_parquet(out / "correlations.parquet").filter(pl.col("y") == "value_norm")
    # value_norm = 2 query_norm + 1: the same ranks, so the partial correlation is exactly 1.
    assert correlations.height == 24 and correlations["partial_r"].to_list() == pytest.approx([1.0] * 24)
    assert (out / "figures" / "heatmap_value_norm.png").is_file()
    assert open_views(out).execute("SELECT count(value_norm) FROM metrics").fetchone()[0] == expected.height
