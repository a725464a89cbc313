"""What a SLURM cluster offers and what a sweep's jobs ask of it: sizing from the run's config, cheap checks.

Everything here runs on the submitting machine, before and after `sbatch`; it reads the cluster with `sinfo`,
`squeue` and `scontrol` only (no accounting database: many small clusters run without one).

    sinfo -h -o '%P|%c|%m|%G|%l'           # what check_request compares the request with
    python -m spectra.run -m hydra/launcher=slurm hydra.launcher.partition=debug model=tiny_llama data=synthetic
"""

from __future__ import annotations

import math
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from spectra.errors import ConfigError, SpectraError

# A request's CPUs when hardware.num_threads is unset: tokenizing, Parquet writing and W&B beside the model.
DEFAULT_CPUS = 8
# Host memory per task besides the weights: Python with torch, transformers, polars, the writer's queue.
BASE_MEMORY_GB = 3
# Per task when the weights' size cannot be read here (a hub id not downloaded on this machine).
FALLBACK_MEMORY_GB = 32
# 4-bit GGUF files hold ~0.5-0.6 bytes per parameter; checkpoints in a folder hold 16-bit weights.
GGUF_BYTES_PER_PARAMETER = 0.5
CHECKPOINT_BYTES_PER_PARAMETER = 2
# squeue's states of a job that has not ended (a requeued job is PENDING again, with the same id).
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
                 "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "POWER_UP_NODE"}  # fmt: skip


@dataclass(frozen=True)
class Partition:
    name: str
    cpus: int  # per node, the largest node's
    memory_mb: int  # per node, the largest node's
    gres: str  # e.g. "gpu:a100:8", or "(null)"
    default: bool

    @property
    def has_gpus(self) -> bool:
        return "gpu" in self.gres


def slurm(*command: str) -> str:
    """stdout of a SLURM client command; a missing client or an unreachable controller is one line."""
    if shutil.which(command[0]) is None:
        raise ConfigError(
            "hydra/launcher", f"no SLURM here ({command[0]} not found); use hydra/launcher=submitit_local"
        )
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if result.returncode:
        raise SpectraError(f"`{' '.join(command)}` failed: {(result.stderr or result.stdout).strip().splitlines()[-1]}")
    return result.stdout


def partitions() -> dict[str, Partition]:
    found: dict[str, Partition] = {}
    for line in slurm("sinfo", "-h", "-o", "%P|%c|%m|%G").splitlines():
        name, cpus, memory, gres = line.split("|")
        default = name.endswith("*")
        name = name.rstrip("*")
        old = found.get(name)
        cpus_n, memory_n = int(cpus.rstrip("+")), int(memory.rstrip("+"))
        if old:  # one line per node kind: keep the largest
            cpus_n, memory_n, gres = max(cpus_n, old.cpus), max(memory_n, old.memory_mb), f"{old.gres},{gres}"
        found[name] = Partition(name, cpus_n, memory_n, gres, default)
    return found


def weight_bytes(model_cfg: DictConfig, dtype: str) -> int | None:
    """The weights' size in memory at `dtype`, read cheaply (no weights, no hub); None when not known here."""
    # Imported here: Hydra imports this module whenever it scans its plugins, for every run.
    import torch

    from spectra.models.loading import TORCH_DTYPES, model_location

    element = torch.empty(0, dtype=TORCH_DTYPES[dtype]).element_size()
    if model_cfg.source == "random":
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(**OmegaConf.to_container(model_cfg.architecture, resolve=True))
        with torch.device("meta"):
            return element * sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    try:
        location = Path(model_location(model_cfg))
    except SpectraError:
        return None
    if model_cfg.source == "gguf" and model_cfg.gguf_file and (location / model_cfg.gguf_file).is_file():
        return int((location / model_cfg.gguf_file).stat().st_size / GGUF_BYTES_PER_PARAMETER * element)
    files = [*location.glob("*.safetensors")] or [*location.glob("*.bin")] if location.is_dir() else []
    if files:
        return int(sum(f.stat().st_size for f in files) / CHECKPOINT_BYTES_PER_PARAMETER * element)
    return None


def size_request(params: dict, configs: list[DictConfig], partition: Partition) -> dict:
    """The launcher settings with every null resource filled in from the jobs' configs (one array, one size).

    gpus_per_node: one GPU per task when the run computes on CUDA, none on a CPU config (0 also means none).
    cpus_per_task: hardware.num_threads, else DEFAULT_CPUS, at most what the partition's nodes hold.
    mem_gb: per node, each task twice its weights (loading copies them) plus BASE_MEMORY_GB.
    """
    params = dict(params)
    tasks = params["tasks_per_node"]
    if params["gpus_per_node"] is None:
        on_gpu = any(str(cfg.hardware.device).startswith("cuda") for cfg in configs)
        params["gpus_per_node"] = tasks if on_gpu else None
    elif params["gpus_per_node"] == 0:
        params["gpus_per_node"] = None  # sbatch refuses a GPU request of 0 on clusters without GPUs
    if params["cpus_per_task"] is None:
        threads = [cfg.hardware.num_threads for cfg in configs if cfg.hardware.num_threads]
        params["cpus_per_task"] = max(threads) if threads else max(1, min(DEFAULT_CPUS, partition.cpus // tasks))
    if params["mem_gb"] is None:
        sizes = [weight_bytes(cfg.model, cfg.hardware.dtype) for cfg in configs]
        per_task = (
            FALLBACK_MEMORY_GB
            if None in sizes
            else math.ceil(2 * max(sizes) / 2**30 + BASE_MEMORY_GB)  # type: ignore[type-var]
        )
        params["mem_gb"] = tasks * per_task
    return params


def choose_partition(name: str | None, found: dict[str, Partition]) -> Partition:
    """The partition the jobs go to: the one named, or the cluster's default."""
    if name is None:
        defaults = [p for p in found.values() if p.default]
        if not defaults:
            raise ConfigError(
                "hydra.launcher.partition", f"this cluster has no default partition; choose one of {', '.join(found)}"
            )
        return defaults[0]
    if name not in found:
        raise ConfigError(
            "hydra.launcher.partition", f"no partition {name!r} on this cluster; sinfo lists {', '.join(found) or 'none'}"
        )
    return found[name]


def check_request(params: dict, partition: Partition) -> None:
    """One job's request must fit a node of its partition; errors name the launcher key."""
    tasks = params["tasks_per_node"]
    if params["gpus_per_node"] and not partition.has_gpus:
        raise ConfigError(
            "hydra.launcher.gpus_per_node",
            f"{params['gpus_per_node']} GPU(s) asked for, but partition {partition.name!r} has none (gres "
            f"{partition.gres}); use a GPU partition, or hardware=cpu for a CPU run",
        )
    if params["cpus_per_task"] * tasks > partition.cpus:
        raise ConfigError(
            "hydra.launcher.cpus_per_task",
            f"{params['cpus_per_task']} CPUs x {tasks} task(s) asked for, but the nodes of partition "
            f"{partition.name!r} have at most {partition.cpus}",
        )
    if params["mem_gb"] * 1024 > partition.memory_mb:
        raise ConfigError(
            "hydra.launcher.mem_gb",
            f"{params['mem_gb']} GB per node asked for, but the nodes of partition {partition.name!r} have at most "
            f"{partition.memory_mb // 1024} GB; set hydra.launcher.mem_gb lower (or a smaller model or dtype)",
        )


# sbatch's refusals that the checks above cannot see (accounts, QOS, limits), by the launcher key they concern.
SBATCH_ERRORS = (
    ("account", "hydra.launcher.account"),
    ("partition", "hydra.launcher.partition"),
    ("qos", "hydra.launcher.qos"),
    ("gres", "hydra.launcher.gpus_per_node"),
    ("memory", "hydra.launcher.mem_gb"),
    ("time limit", "hydra.launcher.timeout_min"),
)


def submission_error(message: str) -> ConfigError:
    """sbatch's refusal as one line naming the launcher key it concerns."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    line = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else "no message")
    key = next((key for word, key in SBATCH_ERRORS if word in line.lower()), "hydra.launcher")
    return ConfigError(key, f"sbatch refused the jobs: {line}")


def queue_states(array_job_id: str) -> dict[str, str] | None:
    """'<array id>_<index>' -> state, for the jobs squeue still knows (finished ones for MinJobAge, ~5 min);
    None when squeue could not answer (a busy controller), which says nothing about the jobs."""
    result = subprocess.run(
        ["squeue", "-h", "-r", "--states=all", "-j", array_job_id, "-o", "%i|%T"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if result.returncode and "Invalid job id" not in result.stderr:  # all of them purged is an answer
        return None
    states = {}
    for line in result.stdout.splitlines():
        job_id, _, state = line.partition("|")
        states[job_id.strip()] = state.strip()
    return states


def last_lines(path: Path, count: int = 12) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-count:]
    except OSError:
        return []
