"""What each submitit job of a sweep did, said on the submitting machine once the jobs have ended: one line per
job, its run folder with rows and tokens/s, or its one-line error and its log. A job's own summary, warnings and
errors go to its log files (<sweep dir>/.submitit/<job id>/), which nobody reads unless told where to look.
Shared by the local (submitit_local.py) and SLURM (slurm.py) launchers.

    python -m spectra.run -m hydra/launcher=submitit_local model=tiny_llama data=synthetic data.context_length=16,32
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus

from spectra.errors import SpectraError

# The lines spectra.run ends with on stderr (errors.py): a refusal or fault, or a stop by a signal.
LAST_WORDS = ("spectra: error: ", "spectra: interrupted (")


def fail(error: SpectraError) -> None:
    """Hydra prints a launcher's exceptions with a traceback; a person gets one line and exit status 2."""
    print(f"spectra: error: {error}", file=sys.stderr, flush=True)
    sys.exit(2)


def job_outcome(job) -> tuple[JobReturn | None, str | None]:
    """(the JobReturn of a job that completed, None) or (None, why it failed when the log may not say)."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    if not job.paths.result_pickle.exists():
        return None, None  # killed, or ended by `spectra: error:` (the log's last lines say which)
    try:
        outcome = job.results()[0]
    except (FailedJobError, UncompletedJobError) as error:  # an exception outside the task function
        return None, str(error).strip().splitlines()[-1]
    if outcome.status != JobStatus.COMPLETED:  # the task function raised: a bug, which Hydra kept, not logged
        return None, f"{type(outcome._return_value).__name__}: {outcome._return_value}"
    return outcome, None


def done_line(number: int, outcome: JobReturn) -> str:
    """`job 0: 1,536 rows, 310 tokens/s (wall 4.2 s) in <run folder>`, from the run.json record spectra.run's main
    returns (the figures of its own summary)."""
    record = outcome.return_value
    if not isinstance(record, dict):  # a job that ran no capture (Hydra's --cfg, a dry run)
        return f"job {number}: done in {outcome.working_dir}"
    counts, timing = record["counts"], record["timing"]
    speed = timing["tokens_per_second"]  # three figures at least: a tiny job's first run (compiling) reads 0.8
    return (
        f"job {number}: {counts['rows']:,} rows, {f'{speed:,.0f}' if speed >= 100 else f'{speed:.3g}'} tokens/s "
        f"(wall {timing['wall_seconds']:.1f} s) in {record['output_dir']}"
    )


def error_line(log: Path) -> str:
    """The line that says why a job ended: spectra's own last line in its log, else the last line the job wrote
    (a traceback's last line names the exception)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return f"no log at {log}"
    # A progress bar redraws itself with carriage returns: each redraw is a line of its own.
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    own = [line for line in lines if line.startswith(LAST_WORDS)]
    if own:
        return own[-1]
    return lines[-1] if lines else f"the job wrote nothing to {log}"
