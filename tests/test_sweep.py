"""Hydra multirun sweeps: one complete run directory and one W&B run per job, all in one W&B group.

The same 2 x 2 sweep runs with Hydra's basic launcher (jobs in one process) and with submitit_local (jobs as
separate processes, as on SLURM). It starts from the shipped standard sweep, whose values the command line
replaces; the shipped sweep config is also composed and checked (the SLURM launcher's: tests/test_slurm.py).
"""

from __future__ import annotations

import json
from itertools import product
from pathlib import Path

import polars as pl
import pytest
from conftest import run_spectra
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from wandb_files import inspect_records, inspect_summary, run_file

from spectra.config.paths import config_dir

LAYERS, HEADS = 3, 8
CONTEXT_LENGTHS, SAMPLE_COUNTS = (8, 16), (1, 2)
SWEEP = ["hydra/sweeper=standard_sweep", "model=tiny_llama", "data=synthetic", "data.context_length=8,16",
         "data.n_samples=1,2"]  # fmt: skip


def check_sweep(sweep_dir: Path) -> None:
    """Four complete run directories, one per combination, each with a finished W&B run in the sweep's group."""
    job_dirs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(job_dirs) == 4, job_dirs
    seen, groups = set(), set()
    for job_dir in job_dirs:
        record = json.loads((job_dir / "run.json").read_text())
        context_length, n_samples = record["config"]["data"]["context_length"], record["config"]["data"]["n_samples"]
        seen.add((context_length, n_samples))
        rows = n_samples * LAYERS * HEADS * context_length
        assert record["counts"]["rows"] == record["counts"]["expected_rows"] == rows
        metrics = pl.read_parquet(job_dir / "metrics" / "*.parquet")
        assert metrics.height == rows
        assert sorted(metrics["sample_id"].unique()) == list(range(n_samples))
        assert sorted(metrics["token_pos"].unique()) == list(range(context_length))
        assert pl.read_parquet(job_dir / "samples.parquet").height == n_samples

        path = run_file(job_dir)
        summary = inspect_summary(path)
        assert summary["state"] == "finished"
        assert summary["summary"]["totals/rows"] == rows
        assert f"data.context_length={context_length}" in summary["name"]
        assert f"data.n_samples={n_samples}" in summary["name"]
        (run,) = [r["run"] for r in inspect_records(path) if r["type"] == "run"]
        groups.add(run["run_group"])
    assert seen == set(product(CONTEXT_LENGTHS, SAMPLE_COUNTS))
    assert groups == {str(sweep_dir)}


def test_multirun_2x2(tmp_path):
    result = run_spectra(tmp_path, "-m", *SWEEP, f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert result.returncode == 0, result.stderr[-3000:]
    check_sweep(tmp_path / "sweep")


@pytest.mark.slow
def test_multirun_2x2_submitit_local(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_spectra(tmp_path, "-m", "hydra/launcher=submitit_local", *SWEEP, f"hydra.sweep.dir={sweep_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in result.stdout + result.stderr
    assert len(list(sweep_dir.glob(".submitit/*/*_0_result.pkl"))) == 4  # four separate submitit jobs
    check_sweep(sweep_dir)


def compose_hydra(*overrides: str):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def test_standard_sweep_config():
    cfg = compose_hydra("hydra/sweeper=standard_sweep")
    params = cfg.hydra.sweeper.params
    sweep = OverridesParser.create().parse_overrides([f"{key}={value}" for key, value in params.items()])
    choices = {o.key_or_group: list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()] for o in sweep}
    assert choices == {"data.context_length": [128, 256, 512, 1024, 2048], "data.n_samples": [16]}
    assert cfg.hydra.sweeper._target_.endswith("BasicSweeper")

