"""A sweep job's folder: `<job number>_<its overrides>`, and the same folder again when a sweep is resumed.

Hydra numbers jobs in the order the command line lists the values, so `data.context_length=512,256` run again as
`256,512` would give each point another number and so another folder: its finished job would run again beside the
old one. The overrides alone decide the folder: a folder whose name ends in the same overrides is the job's own,
whatever its number. conf/config.yaml's hydra.sweep.subdir calls this through the `spectra.job_folder` resolver.

    python -m spectra.run -m data.context_length=16,32 hydra.sweep.dir=outputs/s1 ...                # killed
    python -m spectra.run -m data.context_length=32,16 hydra.sweep.dir=outputs/s1 run.resume=true    # same folders
"""

from __future__ import annotations

from pathlib import Path


def job_folder(sweep_dir: str, number: int, override_dirname: str) -> str:
    """The folder name, under sweep_dir, of the job with these overrides (Hydra's override_dirname)."""
    default = f"{number}_{override_dirname}"
    sweep = Path(str(sweep_dir))
    if len(default.encode()) > 255:
        return default  # no such folder can exist (ENAMETOOLONG); the run's folder check says so in one line
    if (sweep / default).is_dir() or not sweep.is_dir():
        return default
    for existing in sorted(sweep.iterdir()):
        prefix, separator, overrides = existing.name.partition("_")
        if separator and prefix.isdigit() and overrides == override_dirname and existing.is_dir():
            return existing.name
    return default
