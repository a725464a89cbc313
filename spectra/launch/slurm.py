"""`hydra/launcher=slurm`: a sweep becomes one SLURM array job, sized from the run's config; a job stopped by its
time limit lands its parts, requeues itself and resumes where it stopped.

Hydra's submitit launcher (hydra-submitit-launcher) with three changes:
  launch    on the submitting machine: fills the null resources from the jobs' configs (cluster.size_request),
            checks them against `sinfo` before sbatch sees them, skips jobs already complete when run.resume=true,
            says where each job's log is, waits with `squeue` (no accounting database needed), then gives each
            job's outcome in one line (job_outcomes.py) and the last lines of a failed job's log; every problem
            ends in one `spectra: error: <key>: ...` line, exit 2.
  __call__  inside the job: SLURM's warning signal (sbatch --signal=USR2@signal_delay_s, sent that long before
            the time limit) or SIGTERM (preemption, scancel) stops the capture as Ctrl-C does, so queued parts
            land; after the warning, the job requeues itself (`scontrol requeue`) at most max_num_timeout times.
            A requeued job (SLURM_RESTART_COUNT > 0, whoever requeued it) runs with run.resume=true.

    python -m spectra.run -m hydra/launcher=slurm hydra.launcher.partition=debug model=tiny_llama data=synthetic \
        data.context_length=16,32
    python -m spectra.run -m hydra/launcher=slurm hydra.launcher.partition=gpu hardware=h100 model=llama3_8b \
        data.context_length=512,2048 run.resume=true hydra.sweep.dir=<the same sweep>   # finish what is missing
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import DictConfig, OmegaConf, open_dict

from spectra.errors import SpectraError
from spectra.launch.cluster import (
    ACTIVE_STATES,
    check_request,
    choose_partition,
    last_lines,
    partitions,
    queue_states,
    size_request,
    submission_error,
)
from spectra.launch.job_outcomes import done_line, fail, job_outcome

# The signal sbatch --signal sends before the time limit (submitit's choice; SUBMITIT_PREEMPT_SIGNAL changes it).
WARNING_SIGNAL = signal.Signals["SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")]
POLL_SECONDS = (1, 2, 3, 5)  # squeue at these intervals, then every 5 s


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    # --- on the submitting machine ---------------------------------------------------------------------------

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        try:
            return self._launch(job_overrides, initial_job_idx)
        except SpectraError as error:
            fail(error)
            raise  # unreachable: fail exits

    def _job_config(self, overrides: Sequence[str], number: int) -> DictConfig:
        assert self.hydra_context is not None and self.config is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.num = number
        return cfg

    def _launch(self, job_overrides: Sequence[Sequence[str]], first: int) -> list[JobReturn]:
        configs = [self._job_config(overrides, first + i) for i, overrides in enumerate(job_overrides)]
        partition = choose_partition(self.params["partition"], partitions())
        params = size_request(self.params, configs, partition)
        check_request(params, partition)

        returns: list[JobReturn | None] = [None] * len(configs)
        todo = []
        for index, cfg in enumerate(configs):
            directory = job_directory(cfg)
            if cfg.run.resume and (directory / "run.json").is_file():
                print(f"spectra: job {first + index} is complete in {directory}; not submitted", flush=True)
                returns[index] = JobReturn(
                    overrides=list(job_overrides[index]), working_dir=str(directory), status=JobStatus.COMPLETED
                )
            else:
                todo.append(index)
        if not todo:
            return returns  # type: ignore[return-value]

        jobs = self._submit(params, [job_overrides[i] for i in todo], [first + i for i in todo])
        folder = Path(jobs[0].paths.folder).parent
        print(
            f"spectra: SLURM {'array ' if len(jobs) > 1 else ''}job {jobs[0].job_id.split('_')[0]}: {len(jobs)} job(s) "
            f"on partition {partition.name}, at most {params['array_parallelism']} at once; each "
            f"{params['tasks_per_node']} task(s) x {params['cpus_per_task']} CPU(s), "
            f"{params['gpus_per_node'] or 0} GPU(s), {params['mem_gb']} GB, {params['timeout_min']} min; logs in {folder}",
            flush=True,
        )
        for index, job in zip(todo, jobs):
            overrides = " ".join(filter_overrides(job_overrides[index]))
            print(f"  job {first + index} = SLURM {job.job_id}: {overrides}\n    log {job.paths.stdout}", flush=True)

        failed = []
        for index, job, state in zip(todo, jobs, wait_for(jobs)):
            outcome, error = job_outcome(job)
            if outcome is not None:
                returns[index] = outcome
                print(f"spectra: {done_line(first + index, outcome)}", flush=True)
                continue
            failed.append(first + index)
            log = job.paths.stderr if job.paths.stderr.exists() else job.paths.stdout
            print(f"spectra: job {first + index} (SLURM {job.job_id}) failed, state {state}; last lines of {log}:",
                  file=sys.stderr)  # fmt: skip
            for line in last_lines(log) + ([error] if error else []):
                print(f"    {line}", file=sys.stderr)
        if failed:
            raise SpectraError(
                f"{len(failed)} of {len(jobs)} SLURM job(s) failed (job {', '.join(map(str, failed))}); their logs are "
                f"in {folder}; finish the sweep with run.resume=true and the same hydra.sweep.dir"
            )
        return returns  # type: ignore[return-value]

    def _submit(self, params: dict, job_overrides: list[Sequence[str]], numbers: list[int]) -> list:
        import submitit
        from submitit.core.utils import FailedJobError, FailedSubmissionError

        assert self.config is not None
        executor = submitit.AutoExecutor(
            cluster="slurm", folder=params["submitit_folder"], slurm_max_num_timeout=params["max_num_timeout"]
        )
        generic = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{
                name if name in generic else f"slurm_{name}": value
                for name, value in params.items()
                if name not in ("submitit_folder", "max_num_timeout")
            }
        )
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        arguments = [
            (list(overrides), "hydra.sweep.dir", number, f"job_id_for_{number}", Singleton.get_state())
            for overrides, number in zip(job_overrides, numbers)
        ]
        try:
            # submitit prints sbatch's stderr before raising; the error below says it in one line.
            with contextlib.redirect_stderr(io.StringIO()):
                return executor.map_array(self, *zip(*arguments))
        except (FailedJobError, FailedSubmissionError) as error:
            raise submission_error(str(error)) from None

    # --- inside the job ---------------------------------------------------------------------------------------

    def __call__(
        self,
        sweep_overrides: list[str],
        job_dir_key: str,
        job_num: int,
        job_id: str,
        singleton_state: dict[type, Singleton],
    ) -> JobReturn:
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if restarts:  # requeued: after a time limit (below), a preemption, or by hand; finish the same run
            sweep_overrides = [o for o in sweep_overrides if not o.startswith("run.resume=")] + ["run.resume=true"]
            print(f"spectra: SLURM restart {restarts}: resuming the run", flush=True)
        with StopSignals() as stop:
            try:
                return super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)
            except (SystemExit, KeyboardInterrupt):
                stop.disarm()
                if stop.received and stop.received[0] == WARNING_SIGNAL:
                    requeue(restarts, self.params["max_num_timeout"])
                raise



def job_directory(cfg: DictConfig) -> Path:
    """Where a sweep job writes, as its task will resolve it (run.output_dir wins, as in spectra.run)."""
    if cfg.run.output_dir:
        return Path(cfg.run.output_dir)
    return Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)


def wait_for(jobs: list) -> list[str]:
    """Each job's last state once every job has a result file or has ended without one."""
    array_id = jobs[0].job_id.split("_")[0]
    for poll in itertools.count():
        states = queue_states(array_id)  # before looking for results: a job that ends in between has one
        running = states is None or any(
            states.get(job.job_id, "GONE") in ACTIVE_STATES and not job.paths.result_pickle.exists() for job in jobs
        )
        if not running:
            return [states.get(job.job_id, "GONE") for job in jobs]  # type: ignore[union-attr]
        time.sleep(POLL_SECONDS[min(poll, len(POLL_SECONDS) - 1)])
    raise AssertionError("unreachable")  # itertools.count() does not end


class StopSignals:
    """SIGTERM (preemption, scancel, the time limit) or the warning signal unwinds the job as Ctrl-C does:
    spectra.run lands the queued parts and exits 130.

    Python drops an interrupt raised inside a __del__ or a callback (it prints "Exception ignored"), and SLURM
    sends its warning only once; so after a signal the interrupt is raised again every second until the job is
    unwinding, and never while it is, which would cut the landing of the parts short.
    """

    def __init__(self) -> None:
        self.received: list[signal.Signals] = []

    def __enter__(self) -> "StopSignals":
        self._previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGTERM, WARNING_SIGNAL, signal.SIGALRM)}
        return self

    def _stop(self, signum: int, _frame) -> None:
        if signum != signal.SIGALRM:
            self.received.append(signal.Signals(signum))
            print(f"spectra: {self.received[-1].name} received", file=sys.stderr, flush=True)
            signal.setitimer(signal.ITIMER_REAL, 1.0, 1.0)
        unwinding = isinstance(sys.exc_info()[1], (KeyboardInterrupt, SystemExit))
        if self.received and not unwinding:
            raise KeyboardInterrupt(self.received[0].name)

    def disarm(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)

    def __exit__(self, *exc_info) -> None:
        self.disarm()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def requeue(restarts: int, max_requeues: int) -> None:
    """After the time-limit warning, put this job back in the queue unless it has been requeued enough."""
    if int(os.environ.get("SLURM_PROCID", "0")) != 0:
        return  # one task requeues the job; the others have landed their parts
    if restarts >= max_requeues:
        print(
            f"spectra: error: hydra.launcher.max_num_timeout: the job reached its time limit after {restarts} "
            f"requeue(s), the most allowed; raise hydra.launcher.timeout_min or max_num_timeout, or finish it with "
            "run.resume=true",
            file=sys.stderr,
            flush=True,
        )
        return
    array = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job_id = f"{array[0]}_{array[1]}" if all(array) else os.environ["SLURM_JOB_ID"]
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
    print(
        f"spectra: time limit: parts landed; requeued SLURM job {job_id} (requeue {restarts + 1} of at most "
        f"{max_requeues}); it resumes where it stopped",
        file=sys.stderr,
        flush=True,
    )
