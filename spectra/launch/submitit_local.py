"""`hydra/launcher=submitit_local`: a sweep's jobs as separate local processes, as hydra-submitit-launcher runs
them, and the terminal says what became of them: where each job logs while it runs, then one line per job (its
run folder, rows and tokens/s, or its one-line error). A failed job ends the sweep in one `spectra: error:` line,
exit 2, after the other jobs have finished.

submitit keeps each job's logs and pickles in <sweep dir>/.submitit/<job id>/ (the plugin's submitit_folder,
`${hydra.sweep.dir}/.submitit/%j`). Its local controller makes that folder once before filling in the job id
(submitit 1.5, local/local.py: Controller.start_tasks), which left an empty folder named `%j` in every sweep;
it is removed once the jobs have ended.

    python -m spectra.run -m hydra/launcher=submitit_local model=tiny_llama data=synthetic data.context_length=16,32
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf

from spectra.errors import SpectraError
from spectra.launch.job_outcomes import done_line, error_line, fail, job_outcome


class LocalLauncher(submitit_launcher.LocalLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        try:
            return self._launch(job_overrides, initial_job_idx)
        except SpectraError as error:
            fail(error)
            raise  # unreachable: fail exits

    def _launch(self, job_overrides: Sequence[Sequence[str]], first: int) -> list[JobReturn]:
        import submitit

        assert self.config is not None
        folder = self.params["submitit_folder"]
        executor = submitit.AutoExecutor(cluster="local", folder=folder)
        generic = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{
                name if name in generic else f"local_{name}": value
                for name, value in self.params.items()
                if name != "submitit_folder"
            }
        )
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        numbers = [first + index for index in range(len(job_overrides))]
        arguments = [
            (list(overrides), "hydra.sweep.dir", number, f"job_id_for_{number}", Singleton.get_state())
            for overrides, number in zip(job_overrides, numbers)
        ]
        jobs = executor.map_array(self, *zip(*arguments))
        try:
            print(f"spectra: {len(jobs)} local job(s), one process each; submitit's logs in "
                  f"{Path(jobs[0].paths.folder).parent}/<job id>/", flush=True)  # fmt: skip
            for number, overrides, job in zip(numbers, job_overrides, jobs):
                print(f"  job {number} = process {job.job_id}: {' '.join(filter_overrides(overrides))}\n"
                      f"    log {job.paths.stdout}", flush=True)  # fmt: skip
            for job in jobs:
                job.wait()
        finally:
            unfilled = Path(folder).expanduser().absolute()
            if "%j" in unfilled.name:
                with contextlib.suppress(OSError):  # only while empty: the jobs' own folders are its siblings
                    unfilled.rmdir()

        returns, failed = [], []
        print("spectra: the sweep's jobs have ended:", flush=True)
        for number, job in zip(numbers, jobs):
            outcome, error = job_outcome(job)
            if outcome is not None:
                returns.append(outcome)
                print(f"  {done_line(number, outcome)}", flush=True)
                continue
            failed.append(number)
            log = job.paths.stderr if job.paths.stderr.exists() else job.paths.stdout  # stderr_to_stdout=true
            print(f"  job {number}: FAILED: {error or error_line(log)}\n    log {log}", flush=True)
        if failed:
            raise SpectraError(
                f"{len(failed)} of {len(jobs)} local job(s) failed (job {', '.join(map(str, failed))}); the lines "
                "above say why; finish the sweep with run.resume=true and the same hydra.sweep.dir"
            )
        return returns
