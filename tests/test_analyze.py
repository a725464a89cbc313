"""spectra.analyze: statistics checked against numpy/scipy on a real run's rows, the entrypoint on a run split
over several part files and on a two-job sweep, exports read back, W&B offline, and bad inputs."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, run_module_inprocess, run_spectra, spectra_subprocess, touches_wandb
from conftest import (
    test_env as subprocess_env,  # as: pytest would collect a test_* name
)
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from scipy import stats
from wandb_files import inspect_summary

from spectra.analysis import head_stats
from spectra.analysis.exports import open_views
from spectra.analysis.runs import flatten, swept_keys
from spectra.analyze import analyze
from spectra.config.paths import config_dir
from spectra.errors import SpectraError

METRICS = ("query_norm", "entropy", "max_attn", "k_eff")


def read_rows(run: Path) -> dict[str, np.ndarray]:
    """Every row of a run, read with pyarrow (not polars) into float64 / int64 numpy arrays."""
    table = pa.concat_tables(pq.read_table(part) for part in sorted((run / "metrics").glob("part-*.parquet")))
    return {name: table[name].to_numpy().astype(np.float64 if name in METRICS else np.int64) for name in table.column_names}


def with_numpy_ratios(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    t = rows["token_pos"]
    rows = dict(rows)
    with np.errstate(divide="ignore", invalid="ignore"):
        rows["entropy_normalized"] = np.where(t > 0, rows["entropy"] / np.log(t + 1), np.nan)
        rows["k_eff_fraction"] = np.where(t > 0, rows["k_eff"] / (t + 1), np.nan)
    return rows


def analyze_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m spectra.analyze <overrides>`, in this process unless it logs to W&B."""
    if touches_wandb("spectra.analyze", overrides):
        return spectra_subprocess("spectra.analyze", overrides, subprocess_env(tmp_path, wandb=True), timeout=300)
    return run_module_inprocess("spectra.analyze", *overrides, env=subprocess_env(tmp_path))


def analyze_config(*overrides: str):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="analyze", overrides=list(overrides))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """tiny_llama, 3 samples x 32 tokens, one sample per batch: three part files."""
    tmp = tmp_path_factory.mktemp("capture")
    result = run_spectra(tmp, "model=tiny_llama", "data=synthetic", "data.context_length=32", "data.n_samples=3",
                         "hardware.batch_size=1", "logger=none")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(list((tmp / "run" / "metrics").glob("part-*.parquet"))) == 3
    return tmp / "run"


@pytest.fixture(scope="module")
def rows(run) -> dict[str, np.ndarray]:
    return read_rows(run)


def scan(run: Path) -> pl.LazyFrame:
    return pl.scan_parquet(run / "metrics" / "part-*.parquet")


def test_head_summary_matches_numpy(run, rows):
    summary = head_stats.by_layer(head_stats.head_summary, scan(run), [0, 1, 2])
    assert summary.height == 3 * 8
    reference = with_numpy_ratios(rows)
    for row in summary.iter_rows(named=True):
        mask = (rows["layer"] == row["layer"]) & (rows["head"] == row["head"])
        for name in (*METRICS, "entropy_normalized", "k_eff_fraction"):
            values = reference[name][mask]
            values = values[~np.isnan(values)]  # the ratios are undefined at t = 0
            assert row[f"{name}_count"] == len(values) == (3 * 32 if name in METRICS else 3 * 31)
            np.testing.assert_allclose(row[f"{name}_mean"], values.mean(), rtol=1e-12)
            np.testing.assert_allclose(row[f"{name}_std"], values.std(ddof=1), rtol=1e-9)
            assert row[f"{name}_min"] == values.min() and row[f"{name}_max"] == values.max()
            for q in head_stats.QUANTILES:
                np.testing.assert_allclose(row[f"{name}_{head_stats.quantile_name(q)}"], np.quantile(values, q), rtol=1e-12)


@pytest.mark.parametrize("skip_positions", [2, 0])
def test_correlations_match_scipy(run, rows, skip_positions):
    table = head_stats.by_layer(lambda lf: head_stats.head_correlations(lf, skip_positions), scan(run), [0, 1, 2])
    assert table.height == 3 * 8 * 3 and set(table["y"]) == {"entropy", "max_attn", "k_eff"}
    for row in table.iter_rows(named=True):
        mask = (rows["layer"] == row["layer"]) & (rows["head"] == row["head"]) & (rows["token_pos"] >= skip_positions)
        x, y = rows["query_norm"][mask], rows[row["y"]][mask]
        assert row["tokens"] == mask.sum() == 3 * (32 - skip_positions)
        pearson, spearman = stats.pearsonr(x, y), stats.spearmanr(x, y)
        np.testing.assert_allclose(row["pearson_r"], pearson.statistic, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(row["pearson_p"], pearson.pvalue, rtol=1e-6)
        np.testing.assert_allclose(row["spearman_r"], spearman.statistic, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(row["spearman_p"], spearman.pvalue, rtol=1e-6)


def test_p_values_at_the_edges():
    p = head_stats.t_test_p(np.array([1.0, -1.0, np.nan, 0.5, 0.0]), np.array([10, 10, 10, 2, 10]))
    assert p[0] == 0 and p[1] == 0 and np.isnan(p[2]) and np.isnan(p[3])  # n = 2: no degrees of freedom
    assert p[4] == pytest.approx(1.0)


def test_layer_comparison_leaves_out_skipped_positions_and_undefined_r(run, rows):
    """The layer table's means cover the positions the correlations use (t >= 2), as numpy finds on the rows;
    its r columns are medians over heads of partial and token-level r, a head without r left out."""
    profile = head_stats.position_profile(scan(run))
    correlations = pl.DataFrame({"layer": [0, 0, 0, 1], "head": [0, 1, 2, 0], "y": ["k_eff"] * 4,
                                 "partial_r": [0.5, float("nan"), 0.1, -0.25], "spearman_r": [0.2, 0.4, 0.9, 0.0]})  # fmt: skip
    table = head_stats.layer_comparison(profile, correlations, skip_positions=2)
    reference = with_numpy_ratios(rows)
    for layer in range(3):
        mask = (rows["layer"] == layer) & (rows["token_pos"] >= 2)
        row = table.filter(pl.col("layer") == layer).row(0, named=True)
        for name in ("entropy", "k_eff", "entropy_normalized"):
            np.testing.assert_allclose(row[name], reference[name][mask].mean(), rtol=1e-12)
    assert table["partial_r_k_eff"].to_list()[:2] == pytest.approx([0.3, -0.25])
    assert table["spearman_r_k_eff"].to_list()[:2] == pytest.approx([0.4, 0.0])


def test_position_profile_matches_numpy(run, rows):
    profile = head_stats.position_profile(scan(run))
    assert profile.height == 3 * 32
    reference = with_numpy_ratios(rows)
    for row in profile.iter_rows(named=True):
        mask = (rows["layer"] == row["layer"]) & (rows["token_pos"] == row["token_pos"])
        assert row["rows"] == mask.sum() == 3 * 8
        for name in ("entropy", "k_eff", "max_attn", "query_norm"):
            np.testing.assert_allclose(row[name], reference[name][mask].mean(), rtol=1e-12)
        if row["token_pos"] == 0:
            assert row["entropy_normalized"] is None and row["k_eff_fraction"] is None
        else:
            np.testing.assert_allclose(row["entropy_normalized"], reference["entropy_normalized"][mask].mean(), rtol=1e-12)
            np.testing.assert_allclose(row["k_eff_fraction"], reference["k_eff_fraction"][mask].mean(), rtol=1e-12)


def test_whatever_metric_columns_exist(run, rows):
    """metrics.names restricted (no query_norm), an extra metric from metrics=extended, float16 storage."""
    restricted = scan(run).drop("query_norm", "max_attn")
    assert head_stats.head_correlations(restricted).height == 0
    summary = head_stats.head_summary(restricted)
    assert not [c for c in summary.columns if c.startswith(("query_norm", "max_attn"))]
    assert "entropy_normalized_mean" in summary.columns

    sink_attn = np.random.default_rng(0).random(len(rows["layer"]))
    extended = scan(run).with_columns(pl.Series("sink_attn", sink_attn, dtype=pl.Float32)).drop("k_eff")
    table = head_stats.head_correlations(extended.filter(pl.col("layer") == 1))
    assert set(table["y"]) == {"entropy", "max_attn", "sink_attn"}
    assert "k_eff_fraction_mean" not in head_stats.head_summary(extended).columns
    row = table.filter((pl.col("y") == "sink_attn") & (pl.col("head") == 4)).row(0, named=True)
    mask = (rows["layer"] == 1) & (rows["head"] == 4) & (rows["token_pos"] >= 2)
    expected = stats.spearmanr(rows["query_norm"][mask], sink_attn.astype(np.float32)[mask].astype(np.float64))
    np.testing.assert_allclose([row["spearman_r"], row["spearman_p"]], [expected.statistic, expected.pvalue], rtol=1e-6)

    half = pl.scan_parquet(run / "metrics" / "part-*.parquet").with_columns(pl.col("entropy").cast(pl.Float16))
    summary = head_stats.head_summary(half.filter(pl.col("layer") == 0)).filter(pl.col("head") == 0)
    values = rows["entropy"][(rows["layer"] == 0) & (rows["head"] == 0)].astype(np.float16).astype(np.float64)
    np.testing.assert_allclose(summary["entropy_mean"][0], values.mean(), rtol=1e-12)


def test_analyze_run_split_over_part_files(run, rows, tmp_path):
    out = tmp_path / "analysis"
    result = analyze_cli(tmp_path, f"run_dir={run}", f"output_dir={out}", "export=csv", "heads=[[0,1],[2,3]]")
    assert result.returncode == 0, result.stderr

    heads = pl.read_parquet(out / "heads.parquet")
    mask = (rows["layer"] == 2) & (rows["head"] == 3)
    assert heads.height == 24
    np.testing.assert_allclose(heads.filter(layer=2, head=3)["max_attn_mean"][0], rows["max_attn"][mask].mean(), rtol=1e-12)

    # The report's strongest head is the head with the largest |partial r| in correlations.parquet, and that
    # table's token-level r is what scipy finds on the rows.
    correlations = pl.read_parquet(out / "correlations.parquet").filter(pl.col("y") == "entropy")
    strongest = correlations.sort(pl.col("partial_r").abs(), descending=True).row(0, named=True)
    mask = (rows["layer"] == strongest["layer"]) & (rows["head"] == strongest["head"]) & (rows["token_pos"] >= 2)
    assert strongest["spearman_r"] == pytest.approx(stats.spearmanr(rows["query_norm"][mask], rows["entropy"][mask]).statistic)
    report = (out / "report.md").read_text()
    table_rows = [line for line in report.splitlines() if re.match(r"\| \d+ \| \d+ \| \d+ \| \d+ \|", line)]
    assert "| layer | head | samples | tokens |" in report  # the token count is `tokens`; n is the visible keys
    assert table_rows[0].startswith(f"| {strongest['layer']} | {strongest['head']} | 3 | 90 |")
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", report)
    assert {"figures/heatmap_entropy.png", "figures/heatmap_max_attn.png", "figures/heatmap_k_eff.png",
            "figures/heatmap_partial_r_entropy.png", "figures/position_profiles.png", "figures/density_query_norm_entropy.png"} <= set(images)  # fmt: skip
    for image in images:
        pixels = matplotlib.image.imread(out / image)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.std() > 0  # a real picture, not blank

    check_headline_and_warnings(out, rows, report)

    # CSV: every row, key columns first, the same values as the Parquet.
    with open(out / "metrics.csv", newline="") as handle:
        reader = csv.reader(handle)
        assert next(reader) == ["sample_id", "layer", "head", "token_pos", *METRICS]
        table = np.array([line for line in reader])
    assert table.shape == (3 * 3 * 8 * 32, 8)
    for i, name in enumerate(["sample_id", "layer", "head", "token_pos", *METRICS]):
        # float32 values are written in their shortest round-trip form: parsed as float32 they are exact.
        np.testing.assert_array_equal(table[:, i].astype(np.float32), rows[name].astype(np.float32))

    # DuckDB: the script's views read the same rows and the analysis tables.
    connection = open_views(out)
    count, entropy_normalized = connection.execute("SELECT count(*), avg(entropy_normalized) FROM metrics").fetchone()
    assert count == len(rows["layer"])
    np.testing.assert_allclose(entropy_normalized, np.nanmean(with_numpy_ratios(rows)["entropy_normalized"]), rtol=1e-9)
    assert connection.execute("SELECT count(*) FROM heads").fetchone()[0] == 24
    assert connection.execute("SELECT count(*) FROM samples").fetchone()[0] == 3

    # figures=false: the same tables and report text, no PNG, and the report says why.
    bare = tmp_path / "bare"
    result = analyze_cli(tmp_path, f"run_dir={run}", f"output_dir={bare}", "heads=[[0,1],[2,3]]", "figures=false")
    assert result.returncode == 0, result.stderr
    assert "figures    none (figures=false)" in result.stdout and not list(bare.rglob("*.png"))
    for name in ("heads", "correlations", "headline", "positions", "top_tokens"):
        assert pl.read_parquet(bare / f"{name}.parquet").equals(pl.read_parquet(out / f"{name}.parquet")), name
    bare_report = (bare / "report.md").read_text()
    assert bare_report.split("## Figures")[0] == report.split("## Figures")[0].replace(str(out), str(bare))
    assert bare_report.split("## Figures")[1].split("##")[0].strip() == "None: analysed with figures=false."


def check_headline_and_warnings(out: Path, rows: dict[str, np.ndarray], report: str) -> None:
    """The report's answer, recomputed from correlations.parquet with numpy; its warnings for 3 samples of a
    random-weight model; every head without a partial r named with its reason, the reason checked on the rows."""
    correlations = pl.read_parquet(out / "correlations.parquet")
    headline = report.split("## Does query norm predict each metric?")[1].split("##")[0]
    for y in ("entropy", "k_eff", "max_attn"):
        table = correlations.filter(pl.col("y") == y)
        r, q = table["partial_r"].to_numpy(), table["partial_q"].to_numpy()
        significant = np.isfinite(q) & (q < 0.05)
        negative, positive = int((significant & (r < 0)).sum()), int((significant & (r > 0)).sum())
        [line] = [line for line in headline.splitlines() if line.startswith(f"- **{y}**")]
        assert f"median partial r over {np.isfinite(r).sum()} heads = {np.median(r[np.isfinite(r)]):.2f} [" in line
        if max(negative, positive):
            lead, word = (negative, "lower") if negative >= positive else (positive, "higher")
            assert f"in {lead} of 24 heads ({100 * lead / 24:.0f}%" in line and f"goes with {word} {y}" in line
        else:
            assert "in none of 24 heads" in line

    warnings = report.split("## Warnings")[1].split("\n## ")[0]
    assert "**Few samples (3)**: intervals and p-values are not to be trusted below 20 samples" in warnings
    assert "10 distinct resamples" in warnings and "about 75%" in warnings and "2 degrees of freedom" in warnings
    assert "**Random weights**: tiny_llama is initialised at random" in warnings
    assert "| θ (k_eff threshold) | 0.9 | metrics.k_eff_threshold |" in report
    assert "| bootstrap | 1,000 resamples of whole samples | bootstrap |" in report and "| positions left out | t < 2 |" in report

    undefined = correlations.filter(pl.col("partial_r").is_nan())
    assert undefined.height > 0 and undefined["partial_note"].null_count() == 0  # random k_eff: some heads flat
    for row in undefined.iter_rows(named=True):
        [line] = [w for w in warnings.splitlines() if w.startswith(f"- **{row['y']} undefined in")]
        assert f"layer {row['layer']} head {row['head']}" in line and row["partial_note"] in line
        mask = (rows["layer"] == row["layer"]) & (rows["head"] == row["head"]) & (rows["token_pos"] >= 2)
        grid = rows[row["y"]][mask].reshape(3, 30)  # (samples, positions)
        assert row["partial_note"] == f"{row['y']} takes one value at each position (the same in every sample)"
        assert (grid == grid[0]).all() and len(np.unique(grid)) > 1  # the same in every sample, not one value


@pytest.mark.slow
def test_analyze_a_two_job_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_spectra(tmp_path, "-m", "model=tiny_llama", "data=synthetic", "data.n_samples=2",
                         "data.context_length=16,32", f"hydra.sweep.dir={sweep}", "logger=none")  # fmt: skip
    assert result.returncode == 0, result.stderr
    result = analyze_cli(tmp_path, f"run_dir={sweep}", "figures=false")  # the README's sweep draws them
    assert result.returncode == 0, result.stderr

    comparison = pl.read_parquet(sweep / "analysis" / "comparison.parquet")
    assert comparison.height == 2 * 3 and comparison.columns[:2] == ["run", "data.context_length"]
    assert "data" not in comparison.columns  # data=synthetic was given to both jobs: not swept
    jobs = sorted(path for path in sweep.iterdir() if (path / "run.json").exists())
    for job in jobs:
        context_length = json.loads((job / "run.json").read_text())["config"]["data"]["context_length"]
        rows = read_rows(job)
        assert rows["token_pos"].max() == context_length - 1
        assert (job / "analysis" / "report.md").exists()
        for layer in range(3):
            got = comparison.filter(pl.col("data.context_length") == context_length, pl.col("layer") == layer)
            used = (rows["layer"] == layer) & (rows["token_pos"] >= 2)  # the positions the statistics use
            np.testing.assert_allclose(got["entropy"][0], rows["entropy"][used].mean(), rtol=1e-12)
            np.testing.assert_allclose(got["k_eff"][0], rows["k_eff"][used].mean(), rtol=1e-12)

    connection = open_views(sweep / "analysis")
    counts = dict(connection.execute("SELECT run, count(*) FROM metrics GROUP BY run").fetchall())
    assert sorted(counts.values()) == [2 * 3 * 8 * 16, 2 * 3 * 8 * 32]


def test_swept_keys_of_a_model_sweep():
    """`-m model=tiny_llama,tiny_qwen2 data.context_length=16,32`: the keys swept are `model` and
    `data.context_length`, not the dozen model.architecture.* values that come with the choice; without Hydra's
    record of the overrides the model's keys still collapse into one."""
    settings, overrides = [], []
    for model in ("tiny_llama", "tiny_qwen2"):
        for context_length in (16, 32):
            given = [f"model={model}", "data=synthetic", f"data.context_length={context_length}", "logger=none"]
            with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
                cfg = compose(config_name="config", overrides=given, return_hydra_config=True)
            config = OmegaConf.to_container(cfg, resolve=False)
            choices = config.pop("hydra")["runtime"]["choices"]
            settings.append({**flatten(config), **{k: v for k, v in choices.items() if "/" not in k}})
            overrides.append(dict(item.split("=", 1) for item in given))
    differing = [k for k in settings[0] if len({json.dumps(s.get(k)) for s in settings}) > 1]
    assert len([k for k in differing if k.startswith("model.architecture.")]) > 5  # what made 19 columns
    assert swept_keys(settings, overrides) == ["data.context_length", "model"]
    assert [s["model"] for s in settings] == ["tiny_llama", "tiny_llama", "tiny_qwen2", "tiny_qwen2"]
    assert swept_keys(settings, [None] * 4) == ["data.context_length", "model"]  # no .hydra/overrides.yaml
    without_choices = [{k: v for k, v in s.items() if "." in k} for s in settings]  # nor hydra.yaml
    assert swept_keys(without_choices, [None] * 4) == ["data.context_length", "model.name"]


def test_wandb_offline(run, tmp_path):
    out = tmp_path / "analysis"
    result = analyze_cli(tmp_path, f"run_dir={run}", f"output_dir={out}", "logger.name=wandb")
    assert result.returncode == 0, result.stderr
    [log] = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    summary = inspect_summary(log)["summary"]  # the venv's own wandb CLI: CI does not activate the venv
    top = head_stats.strongest_heads(pl.read_parquet(out / "correlations.parquet"), "entropy", 1, "partial_r")
    assert summary["strongest_head"] == f"L{top['layer'][0]}H{top['head'][0]}"
    assert summary["heads"]["nrows"] == 24 and summary["figures/heatmap_entropy"]["_type"] == "image-file"
    # The explorer's tables (analysis/explorer.py), as W&B tables.
    assert summary["explorer_heads"]["nrows"] == 24 and summary["explorer_heads"]["_type"] == "table-file"
    assert summary["top_tokens"]["nrows"] == pl.read_parquet(out / "top_tokens.parquet").height > 0


def test_bad_inputs_are_one_line_errors(run, tmp_path):
    result = analyze_cli(tmp_path)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "run_dir" in result.stderr

    empty, nothing = tmp_path / "empty", tmp_path / "nothing"
    (empty / "metrics").mkdir(parents=True)
    nothing.mkdir()
    cases = {
        "run_dir": [f"run_dir={tmp_path / 'missing'}"],
        "holds no metrics": [f"run_dir={nothing}"],
        "no part-": [f"run_dir={empty}"],
        "skip_positions": [f"run_dir={run}", "skip_positions=-1"],
        "export": [f"run_dir={run}", "export=xlsx"],
        "bootstrap": [f"run_dir={run}", "bootstrap=0"],
        "top_tokens": [f"run_dir={run}", "top_tokens=0"],
        "heads": [f"run_dir={run}", "heads=[[3,0]]"],
        "each entry": [f"run_dir={run}", "heads=[7]"],
        "bogus": [f"run_dir={run}", "+bogus=1"],
    }
    for needle, overrides in cases.items():
        with pytest.raises(SpectraError, match=needle):
            analyze(analyze_config(*overrides, f"output_dir={tmp_path / 'out'}"))
