"""Hydra multirun sweeps: one complete run directory and one W&B run per job, all in one W&B group.

The same sweep runs with Hydra's basic launcher (2 x 2 jobs in one process) and, two of its points, with
submitit_local (jobs as separate processes, as on SLURM, each job's outcome told in the terminal). It starts from
the shipped standard sweep, whose values the command line replaces; the shipped sweep config is also composed and
checked (the SLURM launcher's: tests/test_slurm.py).
"""

from __future__ import annotations

import json
import re
from itertools import product
from pathlib import Path

import polars as pl
import pytest
from conftest import run_spectra
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from wandb_files import inspect_records, inspect_summary, run_file

from spectra.config.paths import config_dir
from spectra.launch.job_outcomes import error_line

LAYERS, HEADS = 3, 8
CONTEXT_LENGTHS, SAMPLE_COUNTS = (8, 16), (1, 2)
SWEEP = ["hydra/sweeper=standard_sweep", "model=tiny_llama", "data=synthetic", "data.context_length=8,16",
         "data.n_samples=1,2"]  # fmt: skip


def check_sweep(sweep_dir: Path, points: set = set(product(CONTEXT_LENGTHS, SAMPLE_COUNTS))) -> None:
    """One complete run directory per (context length, sample count) point, each with a finished W&B run in the
    sweep's group."""
    job_dirs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(job_dirs) == len(points), job_dirs
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
    assert seen == points
    assert groups == {str(sweep_dir)}


def test_multirun_2x2(tmp_path):
    result = run_spectra(tmp_path, "-m", *SWEEP, f"hydra.sweep.dir={tmp_path / 'sweep'}", wandb=True)
    assert result.returncode == 0, result.stderr[-3000:]
    check_sweep(tmp_path / "sweep")


@pytest.mark.slow
def test_multirun_submitit_local(tmp_path):
    """Two points of the same sweep (the basic launcher's test covers the 2 x 2 expansion), each a process."""
    sweep_dir = tmp_path / "sweep"
    sweep = [*SWEEP[:-1], "data.n_samples=1"]
    result = run_spectra(tmp_path, "-m", "hydra/launcher=submitit_local", *sweep, f"hydra.sweep.dir={sweep_dir}",
                         wandb=True)
    assert result.returncode == 0, result.stderr[-3000:]
    check_sweep(sweep_dir, {(context_length, 1) for context_length in CONTEXT_LENGTHS})
    # Two separate submitit jobs, each in a folder named by its id: no unfilled `%j` folder beside them.
    job_ids = sorted(p.name for p in (sweep_dir / ".submitit").iterdir())
    assert len(job_ids) == 2 and all(job_id.isdigit() for job_id in job_ids), job_ids
    assert all((sweep_dir / ".submitit" / job_id / f"{job_id}_0_result.pkl").is_file() for job_id in job_ids)

    # The terminal says where each job logs, then what each job did, one line each, as its run.json has it.
    logs = re.findall(r"^    log (\S+)$", result.stdout, re.MULTILINE)
    assert sorted(Path(log).parent.name for log in logs) == job_ids and all(Path(log).is_file() for log in logs)
    outcomes = re.findall(r"^  job (\d+): ([\d,]+) rows, ([\d.,]+) tokens/s \(wall ([\d.]+) s\) in (.+)$",
                          result.stdout, re.MULTILINE)  # fmt: skip
    assert sorted(int(o[0]) for o in outcomes) == [0, 1], result.stdout
    for number, rows, speed, wall, folder in outcomes:
        assert Path(folder).parent == sweep_dir and Path(folder).name.startswith(f"{number}_")
        record = json.loads((Path(folder) / "run.json").read_text())
        assert int(rows.replace(",", "")) == record["counts"]["rows"]
        assert float(speed.replace(",", "")) == pytest.approx(record["timing"]["tokens_per_second"], rel=0.01)
        assert float(wall) == pytest.approx(record["timing"]["wall_seconds"], abs=0.05)


def test_a_failed_job_is_told_by_its_own_last_line(tmp_path):
    """The line the launcher shows for a failed job: spectra's one error line from the job's log, not the progress
    bar drawn over it with carriage returns; for a bug, the traceback's last line."""
    log = tmp_path / "1234_0_log.err"
    bar = "capture:   0%|          | 0.00/64.0 [00:00<?, ?tok/s]\rcapture:  12%|#         | 8.00/64.0 [00:01<00:07]"
    error = "spectra: error: data.n_samples: 100000 asked for, but the corpus holds 40 windows of 64 tokens"
    log.write_text(f"{bar}\r{error}\n{bar}\n")
    assert error_line(log) == error
    log.write_text(f"{bar}\rTraceback (most recent call last):\n  File \"x.py\", line 1\nValueError: bad shape\n\n")
    assert error_line(log) == "ValueError: bad shape"
    log.write_text("")
    assert error_line(log) == f"the job wrote nothing to {log}"
    assert error_line(tmp_path / "missing.err") == f"no log at {tmp_path / 'missing.err'}"


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

