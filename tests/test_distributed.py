"""Several processes: `torchrun --nproc_per_node=2` (gloo, CPU) captures exactly what one process captures.

The two ranks split the samples, write their own parts into one run directory (chosen without being told:
Hydra's default run dir), and rank 0 writes run.json and the only W&B run. The union of the ranks' rows must
equal, value for value, the rows of a single-process capture of the same samples.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import polars as pl
import pytest
import torch
from conftest import REPO, compose_config, run_spectra
from conftest import (
    wandb_env as offline_env,
)
from polars.testing import assert_frame_equal
from wandb_files import inspect_summary, run_file

from spectra.errors import ConfigError
from spectra.launch.distributed import World, rank_device, share
from spectra.run import capture

# torchrun gives each rank one CPU thread; the reference uses one too, so both sum in the same order.
OVERRIDES = ["model=tiny_llama", "data=synthetic", "data.context_length=16", "data.n_samples=5", "hardware.num_threads=1"]
KEYS = ["sample_id", "layer", "head", "token_pos"]


@pytest.mark.parametrize("n_samples", [0, 1, 2, 5, 8])
@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_share_takes_each_sample_exactly_once(n_samples, ranks):
    shares = [list(share(range(n_samples), World(rank, ranks, rank))) for rank in range(ranks)]
    assert sum(shares, []) == list(range(n_samples))  # contiguous, in order, nothing twice or missing
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_rank_device():
    assert rank_device("cpu", World(1, 2, 1)) == "cpu"
    assert rank_device("cuda:1", World()) == "cuda:1"  # one process: as configured
    with pytest.raises(ConfigError, match=r"^hardware.device: under torchrun each rank takes cuda:<LOCAL_RANK>"):
        rank_device("cuda:1", World(1, 2, 1))


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The reference: the same capture in this process, with one thread, as (metric rows, samples)."""
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("single")
    try:
        capture(compose_config(*OVERRIDES, "logger=none"), out)
    finally:
        torch.set_num_threads(threads)
    return pl.read_parquet(out / "metrics" / "*.parquet").sort(KEYS), pl.read_parquet(out / "samples.parquet")


def check_ranks_equal_single_process(run_dir, single_process, wandb: bool = True) -> None:
    """Two ranks' parts in one run directory, one run.json and (`wandb`) one W&B run, rows identical to one
    process's."""
    record = json.loads((run_dir / "run.json").read_text())
    assert record["world_size"] == 2
    assert record["counts"]["rows"] == record["counts"]["expected_rows"] == 5 * 3 * 8 * 16  # no sample twice
    assert record["counts"]["part_files"] == 5
    if wandb:
        summary = inspect_summary(run_file(run_dir))  # exactly one W&B run: rank 0's
        assert summary["state"] == "finished" and summary["summary"]["totals/rows"] == record["counts"]["rows"]

    rows, samples = single_process
    ranks = pl.read_parquet(run_dir / "metrics" / "*.parquet").sort(KEYS)
    assert ranks.height == rows.height == record["counts"]["rows"]
    assert_frame_equal(ranks, rows, check_exact=True)
    assert_frame_equal(pl.read_parquet(run_dir / "samples.parquet"), samples)


def test_torchrun_two_ranks_equal_one_process(tmp_path, single_process):
    env = offline_env(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])  # this checkout's spectra
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "spectra.run",
         *OVERRIDES],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs").glob("*/*_tiny_llama")  # both ranks picked the same default directory
    check_ranks_equal_single_process(run_dir, single_process)


@pytest.mark.slow
def test_submitit_job_with_two_tasks_equals_one_process(tmp_path, single_process):
    """hydra.launcher.tasks_per_node=2: what conf/hydra/launcher/slurm.yaml offers, on the local executor. Without
    W&B: that only rank 0 logs is the torchrun test's (the same World decides it); each W&B start costs seconds."""
    sweep_dir = tmp_path / "sweep"
    result = run_spectra(
        tmp_path, "-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", *OVERRIDES,
        f"hydra.sweep.dir={sweep_dir}", "logger=none",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = [p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    check_ranks_equal_single_process(run_dir, single_process, wandb=False)
