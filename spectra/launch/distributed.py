"""Several processes: `torchrun` ranks split the samples, each writes its own Parquet parts into the one run dir.

    torchrun --standalone --nproc_per_node=2 -m spectra.run model=tiny_llama data=synthetic   # CPU, gloo
    torchrun --standalone --nproc_per_node=8 -m spectra.run model=llama3_8b hardware.device=cuda  # a GPU per rank
    python -m spectra.run -m hydra/launcher=slurm hydra.launcher.tasks_per_node=4 ...   # 4 ranks per SLURM job

torchrun starts one process per rank and sets RANK, WORLD_SIZE and LOCAL_RANK; a submitit job of several tasks
gets the same variables from submitit. Each process composes its own Hydra config. Every rank loads the same samples (same seed) and keeps a contiguous share of them, so each sample
is captured exactly once, and parts, named by their first sample id, never collide. Only small Python objects
cross ranks (the run directory, per-rank counts), so the process group is gloo even on GPUs: the capture itself
has no collectives and each rank's GPU stays busy with its own forward passes. Ranks on several nodes resolve
Hydra's default run directory each on their own clock: give them one with hydra.run.dir=<shared folder>.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Iterator, Sequence, TypeVar

import psutil
import torch
import torch.distributed as dist

from spectra.errors import ConfigError

# Ranks meet only at the end; a slow rank may finish long after a fast one on a long capture. A dead rank does
# not leave the others waiting this long: torchrun stops the whole group when one process fails.
GATHER_TIMEOUT = timedelta(hours=6)

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0  # this process's index among all processes
    size: int = 1  # number of processes
    local_rank: int = 0  # index among the processes on this node: picks the GPU

    @property
    def is_main(self) -> bool:
        """Rank 0 writes samples.parquet, run.json and the W&B run."""
        return self.rank == 0


def export_submitit_ranks() -> None:
    """In a submitit job with several tasks (hydra.launcher.tasks_per_node > 1), set torchrun's variables."""
    if "SUBMITIT_EXECUTOR" not in os.environ or "RANK" in os.environ:
        return
    import submitit

    if submitit.JobEnvironment().num_tasks > 1:
        # Keep every GPU visible: rank_device picks cuda:<LOCAL_RANK> itself.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


@cache
def launch_time() -> datetime:
    """When this run was started: under torchrun, when the torchrun agent (every rank's parent) started.

    Hydra's `${now:}` is each process's own clock, so ranks started microseconds apart would each create a run
    directory of their own; the agent's start time is the same in every rank.
    """
    if "TORCHELASTIC_RUN_ID" in os.environ:  # set by torchrun for every rank
        return datetime.fromtimestamp(psutil.Process(os.getppid()).create_time())
    return datetime.now()


def format_launch_time(pattern: str) -> str:
    """The `${spectra.launch_time:<strftime pattern>}` resolver used in conf/config.yaml's hydra.run.dir."""
    return launch_time().strftime(pattern)


@contextmanager
def joined() -> Iterator[World]:
    """This process's place among the ranks (a world of one when started alone), in a gloo process group."""
    export_submitit_ranks()
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        yield World()
        return
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("gloo", rank=world.rank, world_size=world.size, timeout=GATHER_TIMEOUT)
    try:
        yield world
    finally:
        dist.destroy_process_group()


def rank_device(device: str, world: World) -> str:
    """The device this rank computes on: with several ranks, `cuda` means the GPU numbered LOCAL_RANK."""
    if world.size == 1 or device == "cpu":
        return device
    if device != "cuda":
        raise ConfigError("hardware.device", f"under torchrun each rank takes cuda:<LOCAL_RANK>; set cuda, not {device}")
    torch.cuda.set_device(world.local_rank)
    return f"cuda:{world.local_rank}"


def gathered(world: World, value: T) -> list[T]:
    """Every rank's value, in rank order, on every rank (also a barrier)."""
    if world.size == 1:
        return [value]
    values: list = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def summed(world: World, **counts: int) -> dict[str, int]:
    """Each count added up over all ranks, on every rank (also a barrier)."""
    per_rank = gathered(world, counts)
    return {key: sum(rank_counts[key] for rank_counts in per_rank) for key in counts}


def same_directory(world: World, directory: Path) -> Path:
    """The run directory, checked to be the same on every rank."""
    directories = gathered(world, str(Path(directory).resolve()))
    if len(set(directories)) > 1:
        raise ConfigError(
            "hydra.run.dir",
            f"torchrun ranks chose different run directories ({directories[0]}, ...); "
            "pass hydra.run.dir=<dir> explicitly",
        )
    return directory


def share(samples: Sequence[T], world: World) -> Sequence[T]:
    """This rank's contiguous share of the samples; shares differ in size by at most one sample."""
    per_rank, extra = divmod(len(samples), world.size)
    first = world.rank * per_rank + min(world.rank, extra)
    return samples[first : first + per_rank + (world.rank < extra)]
