"""hydra/launcher=slurm against a real SLURM cluster (scripts/slurm_local.sh starts one on this machine; CI does).

A CPU sweep with the default launcher settings plus the partition; a sweep re-launched with run.resume=true
submits only the job that is missing; a wrong request is one line before sbatch; a capture that outlives its
one-minute time limit requeues itself and ends byte for byte as an uninterrupted run; two tasks per job capture
what one process captures. Without a cluster the `slurm` tests are skipped, saying how to start one.

    sudo bash scripts/slurm_local.sh && python -m pytest tests/test_slurm.py -q
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import polars as pl
import pytest
import torch
from conftest import REPO, compose_config, run_spectra_inprocess
from conftest import test_env as offline_env  # aliased: pytest would collect a test_* name as a test
from omegaconf import OmegaConf
from polars.testing import assert_frame_equal
from test_distributed import OVERRIDES as RANK_OVERRIDES

from spectra.errors import ConfigError
from spectra.launch.cluster import Partition, check_request, choose_partition, size_request, submission_error
from spectra.run import capture

SLURM = ["-m", "hydra/launcher=slurm"]
SWEEP = ["model=tiny_llama", "data=synthetic", "data.context_length=16,32", "data.n_samples=2", "logger=none"]


def cluster_partition() -> str | None:
    """The default partition of a reachable cluster with a node up, or None."""
    if shutil.which("sinfo") is None or shutil.which("scontrol") is None:
        return None
    # `scontrol ping` answers at once; sinfo retries a controller that is down for ~9 s before it gives up.
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    if ping.returncode != 0 or " is UP" not in ping.stdout:
        return None
    result = subprocess.run(["sinfo", "-h", "-o", "%P %t"], capture_output=True, text=True, timeout=30)
    for line in result.stdout.splitlines() if result.returncode == 0 else []:
        name, state = line.split()
        if name.endswith("*") and state.rstrip("*~#") in ("idle", "mix", "alloc"):
            return name.rstrip("*")
    return None


@pytest.fixture(scope="module")
def partition() -> str:
    name = cluster_partition()
    if name is None:
        pytest.skip("no SLURM cluster reachable (scontrol ping: controller down, or sinfo: no node up); "
                    "start one with `bash scripts/slurm_local.sh` (root)")
    return name


def job_dirs(sweep_dir):
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def sbatch_script(sweep_dir) -> str:
    (script,) = sweep_dir.glob(".submitit/*/*_submission.sh")  # submitit's sbatch script: one array job
    return script.read_text()


@pytest.mark.slurm
def test_cpu_sweep_with_default_settings_then_resume_submits_only_the_missing_job(tmp_path, partition):
    sweep_dir = tmp_path / "sweep"
    code, stdout, stderr = run_spectra_inprocess(*SLURM, f"hydra.launcher.partition={partition}", *SWEEP,
                                                 f"hydra.sweep.dir={sweep_dir}")  # fmt: skip
    assert code == 0, stdout[-2000:] + stderr[-3000:]
    # Sized from hardware=cpu and tiny_llama: no GPU, the node's CPUs (at most 8), twice the weights plus 3 GB.
    script = sbatch_script(sweep_dir)
    assert "gpus" not in script and "gres" not in script
    assert re.search(r"#SBATCH --cpus-per-task=\d+\n", script) and "#SBATCH --mem=4GB\n" in script
    assert "#SBATCH --array=0-1%2\n" in script  # one array job, array_parallelism honoured
    logs = re.findall(r"log (\S+_log\.out)", stdout)
    assert len(logs) == 2 and all((sweep_dir / ".submitit").joinpath(*log.split("/.submitit/")[1:]).is_file() for log in logs)

    first = {}
    for job_dir in job_dirs(sweep_dir):
        record = json.loads((job_dir / "run.json").read_text())
        assert record["counts"]["rows"] == record["counts"]["expected_rows"] == 2 * 3 * 8 * record["config"]["data"]["context_length"]
        first[job_dir.name] = {p.name: p.read_bytes() for p in (job_dir / "metrics").iterdir()}
    assert len(first) == 2

    # Job 1 lost: the resumed sweep submits it alone and reports job 0 as complete.
    lost = job_dirs(sweep_dir)[1]
    shutil.rmtree(lost)
    code, stdout, stderr = run_spectra_inprocess(*SLURM, f"hydra.launcher.partition={partition}", *SWEEP,
                                                 "run.resume=true", f"hydra.sweep.dir={sweep_dir}")  # fmt: skip
    assert code == 0, stdout[-2000:] + stderr[-3000:]
    assert "job 0 is complete" in stdout and "SLURM job" in stdout and "1 job(s)" in stdout
    assert [p.name for p in job_dirs(sweep_dir)] == sorted(first)
    assert {p.name: p.read_bytes() for p in (lost / "metrics").iterdir()} == first[lost.name]


@pytest.mark.slurm
@pytest.mark.parametrize(
    "override, message",
    [
        ("hydra.launcher.partition=no_such_partition", "hydra.launcher.partition: no partition 'no_such_partition'"),
        ("hydra.launcher.gpus_per_node=1", "hydra.launcher.gpus_per_node: 1 GPU(s) asked for, but partition"),
        ("hydra.launcher.cpus_per_task=4096", "hydra.launcher.cpus_per_task: 4096 CPUs x 1 task(s) asked for"),
        ("hydra.launcher.mem_gb=100000", "hydra.launcher.mem_gb: 100000 GB per node asked for"),
    ],
)
def test_a_request_the_cluster_cannot_hold_is_one_line(tmp_path, partition, override, message):
    code, _, stderr = run_spectra_inprocess(*SLURM, *SWEEP, override, f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert code == 2
    assert stderr.strip().splitlines() == [stderr.strip()] and stderr.startswith(f"spectra: error: {message}"), stderr
    assert not (tmp_path / "sweep" / ".submitit").exists()  # refused before sbatch


@pytest.mark.slurm
def test_a_failed_job_shows_its_last_lines(tmp_path, partition):
    # Accepted by the command line (which checks every point's config, model and folder), refused inside the job:
    # the built-in corpus holds far fewer than 100,000 windows of 64 tokens, which only loading the data shows.
    code, stdout, stderr = run_spectra_inprocess(
        *SLURM, "model=tiny_llama", "data=builtin", "data.context_length=64", "data.n_samples=100000", "logger=none",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )  # fmt: skip
    assert code == 2
    assert "failed, state" in stderr and "spectra: error: data.n_samples: 100000 asked for" in stderr
    assert stderr.strip().splitlines()[-1].startswith("spectra: error: 1 of 1 SLURM job(s) failed (job 0)")


# tiny_llama on one thread (it starts in seconds; SmolLM2's start-up alone can outlast a one-minute attempt on a
# loaded machine). SLURM warns the job signal_delay_s=5 before its 1-minute limit, which its 30 s periodic check
# turns into 25-55 s into the job. A calibration run sizes the capture to need ~60 s here; the job then shares the
# cores with the reference capture, so it runs no faster than calibrated and its first attempt (start-up ~10 s) is
# warned before it is done; a slower machine only takes more attempts.
TIME_LIMIT_RUN = ["model=tiny_llama", "data=synthetic", "data.context_length=2048", "hardware.num_threads=1",
                  "logger=none"]  # fmt: skip
CAPTURE_SECONDS = 60


def single_thread_capture(out, *overrides: str) -> dict:
    threads = torch.get_num_threads()
    try:
        return capture(compose_config(*overrides), out)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slurm
@pytest.mark.slow
def test_capture_past_its_time_limit_requeues_and_equals_an_uninterrupted_run(tmp_path, partition):
    calibration = single_thread_capture(tmp_path / "calibration", *TIME_LIMIT_RUN, "data.n_samples=2")
    per_sample = calibration["timing"]["capture_seconds"] / 2
    n_samples = min(max(round(CAPTURE_SECONDS / per_sample), 20), 400)
    run = [*TIME_LIMIT_RUN, f"data.n_samples={n_samples}"]
    sweep_dir = tmp_path / "sweep"
    job = subprocess.Popen(
        [sys.executable, "-m", "spectra.run", *SLURM, f"hydra.launcher.partition={partition}",
         "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=5", "hydra.launcher.max_num_timeout=8",
         *run, f"hydra.sweep.dir={sweep_dir}"],
        cwd=REPO, env=offline_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    reference = tmp_path / "uninterrupted"  # on the other core meanwhile, with the same single thread
    single_thread_capture(reference, *run)
    stdout, stderr = job.communicate(timeout=900)
    assert job.returncode == 0, stdout[-2000:] + stderr[-3000:]

    (run_dir,) = job_dirs(sweep_dir)
    (log,) = sweep_dir.glob(".submitit/*/*_log.err")
    assert "requeued SLURM job" in log.read_text() and "SLURM restart 1: resuming" in log.with_suffix(".out").read_text()
    record = json.loads((run_dir / "run.json").read_text())
    assert 0 < record["counts"]["samples_resumed"] < n_samples
    parts = sorted(p.name for p in (reference / "metrics").iterdir())
    assert sorted(p.name for p in (run_dir / "metrics").iterdir()) == parts and len(parts) == n_samples
    for name in parts:
        assert (run_dir / "metrics" / name).read_bytes() == (reference / "metrics" / name).read_bytes(), name
    assert (run_dir / "samples.parquet").read_bytes() == (reference / "samples.parquet").read_bytes()


@pytest.mark.slurm
def test_two_tasks_per_job_equal_one_process(tmp_path, partition):
    sweep_dir = tmp_path / "sweep"
    code, stdout, stderr = run_spectra_inprocess(
        *SLURM, f"hydra.launcher.partition={partition}", "hydra.launcher.tasks_per_node=2", *RANK_OVERRIDES,
        "logger=none", f"hydra.sweep.dir={sweep_dir}",
    )  # fmt: skip
    assert code == 0, stdout[-2000:] + stderr[-3000:]
    assert "#SBATCH --ntasks-per-node=2\n" in sbatch_script(sweep_dir)
    (run_dir,) = job_dirs(sweep_dir)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["world_size"] == 2 and record["counts"]["part_files"] == 5
    assert sorted(path.name for path in run_dir.glob("manifest*.jsonl")) == ["manifest.rank0.jsonl", "manifest.rank1.jsonl"]

    single = tmp_path / "single"
    single_thread_capture(single, *RANK_OVERRIDES, "logger=none")
    keys = ["sample_id", "layer", "head", "token_pos"]
    ranks = pl.read_parquet(run_dir / "metrics" / "*.parquet").sort(keys)
    assert ranks.height == record["counts"]["rows"] == 5 * 3 * 8 * 16  # each sample once
    assert_frame_equal(ranks, pl.read_parquet(single / "metrics" / "*.parquet").sort(keys), check_exact=True)
    assert_frame_equal(pl.read_parquet(run_dir / "samples.parquet"), pl.read_parquet(single / "samples.parquet"))


# --- no cluster needed --------------------------------------------------------------------------------------

CPU_NODE = Partition("cpu", cpus=16, memory_mb=64_000, gres="(null)", default=True)
GPU_NODE = Partition("gpu", cpus=64, memory_mb=512_000, gres="gpu:h100:8", default=False)
LAUNCHER = {"tasks_per_node": 1, "gpus_per_node": None, "cpus_per_task": None, "mem_gb": None}


def test_request_is_sized_from_the_runs_config():
    cpu = compose_config("model=tiny_llama")
    cuda = compose_config("model=tiny_llama", "hardware=h100")
    # tiny_llama: 128256 x 64 tied embeddings + 3 small layers = 8.3M parameters, 33 MB in float32.
    assert size_request(LAUNCHER, [cpu], CPU_NODE) == LAUNCHER | {"gpus_per_node": None, "cpus_per_task": 8, "mem_gb": 4}
    two = size_request(LAUNCHER | {"tasks_per_node": 2}, [cuda], GPU_NODE)
    assert (two["gpus_per_node"], two["cpus_per_task"], two["mem_gb"]) == (2, 8, 8)  # a GPU and a model per task
    small = size_request(LAUNCHER | {"tasks_per_node": 2}, [cpu], Partition("tiny", 2, 4000, "(null)", True))
    assert small["cpus_per_task"] == 1  # the node's 2 CPUs shared by the 2 tasks
    threads = compose_config("model=tiny_llama", "hardware.num_threads=3")
    assert size_request(LAUNCHER, [cpu, threads], CPU_NODE)["cpus_per_task"] == 3
    explicit = LAUNCHER | {"gpus_per_node": 0, "cpus_per_task": 2, "mem_gb": 7}
    assert size_request(explicit, [cuda], GPU_NODE) == explicit | {"gpus_per_node": None}  # 0: no GPU line
    # SmolLM2's 4-bit GGUF file read as ~0.5 bytes per parameter: float32 in memory is 8x the file.
    smollm2 = compose_config("model=smollm2_135m")
    assert 4 <= size_request(LAUNCHER, [smollm2], CPU_NODE)["mem_gb"] <= 6
    hub = compose_config("model=llama3_8b", "hardware=h100")  # not downloaded here: a fixed 32 GB per task
    assert size_request(LAUNCHER, [hub], GPU_NODE)["mem_gb"] == 32


def test_bad_requests_name_the_launcher_key():
    found = {"cpu": CPU_NODE, "gpu": GPU_NODE}
    assert choose_partition(None, found) == CPU_NODE and choose_partition("gpu", found) == GPU_NODE
    with pytest.raises(ConfigError, match=r"^hydra.launcher.partition: no partition 'debug' on this cluster; sinfo lists cpu, gpu$"):
        choose_partition("debug", found)
    with pytest.raises(ConfigError, match=r"^hydra.launcher.partition: this cluster has no default partition"):
        choose_partition(None, {"gpu": GPU_NODE})
    ok = {"tasks_per_node": 1, "gpus_per_node": None, "cpus_per_task": 16, "mem_gb": 62}
    check_request(ok, CPU_NODE)
    check_request(ok | {"gpus_per_node": 8}, GPU_NODE)
    for change, key in [({"gpus_per_node": 1}, "gpus_per_node"), ({"cpus_per_task": 17}, "cpus_per_task"),
                        ({"tasks_per_node": 2}, "cpus_per_task"), ({"mem_gb": 63}, "mem_gb")]:  # fmt: skip
        with pytest.raises(ConfigError) as error:
            check_request(ok | change, CPU_NODE)
        assert error.value.key == f"hydra.launcher.{key}"


@pytest.mark.parametrize(
    "sbatch_stderr, key",
    [
        ("sbatch: error: Invalid generic resource (gres) specification", "hydra.launcher.gpus_per_node"),
        ("sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified",
         "hydra.launcher.account"),
        ("sbatch: error: Batch job submission failed: Invalid partition name specified", "hydra.launcher.partition"),
        ("sbatch: error: Batch job submission failed: Requested time limit is invalid (missing or exceeds some limit)",
         "hydra.launcher.timeout_min"),
        ("sbatch: error: Batch job submission failed: Job violates accounting/QOS policy", "hydra.launcher.account"),
        ("sbatch: error: Batch job submission failed: Socket timed out on send/recv operation", "hydra.launcher"),
    ],
)
def test_sbatch_refusals_name_the_launcher_key(sbatch_stderr, key):
    error = submission_error(f"{sbatch_stderr}\n")
    assert error.key == key and str(error) == f"{key}: sbatch refused the jobs: {sbatch_stderr}"


def test_slurm_launcher_config():
    from test_sweep import compose_hydra

    launcher = compose_hydra("hydra/launcher=slurm", "hydra.launcher.partition=gpu").hydra.launcher
    assert launcher._target_ == "hydra_plugins.spectra_launchers.SpectraSlurmLauncher"
    values = OmegaConf.to_container(launcher)
    assert {k: values[k] for k in ("partition", "gpus_per_node", "cpus_per_task", "mem_gb", "tasks_per_node")} == {
        "partition": "gpu", "gpus_per_node": None, "cpus_per_task": None, "mem_gb": None, "tasks_per_node": 1}  # fmt: skip
    assert (launcher.timeout_min, launcher.max_num_timeout) == (240, 3)
