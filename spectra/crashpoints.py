"""Test hook: stop the process with SIGKILL at a named point, to prove that a killed run resumes cleanly.

`SPECTRA_CRASH_AT=<point>:<n>` kills the process the n-th time it passes `crash_point("<point>")`. Unset (always,
outside tests) every call is one dictionary lookup. `SPECTRA_CRASH_SIGNAL=SIGTERM` sends that signal instead
(what `scancel` or a SLURM time limit sends). The points, in the order a part travels:

    attention-layer   inside the forward pass, after a layer's metrics are computed (mid-batch)
    parquet-written   a Parquet file (samples.parquet first, then each part) is on disk under its temporary
                      name, not yet synced or renamed (mid-write)
    part-renamed      the part has its final name but the manifest does not list it yet
    part-recorded     the manifest lists the part (between parts)

    SPECTRA_CRASH_AT=part-renamed:2 python -m spectra.run model=tiny_llama data=synthetic data.context_length=16
"""

from __future__ import annotations

import os
import signal
import threading

ENVIRONMENT_VARIABLE = "SPECTRA_CRASH_AT"


def _target() -> tuple[str, int] | None:
    value = os.environ.get(ENVIRONMENT_VARIABLE)
    if not value:
        return None
    point, _, count = value.rpartition(":")
    return point, int(count)


_TARGET = _target()
_passes = 0
_lock = threading.Lock()  # parts are written from the writer thread


def crash_point(point: str) -> None:
    global _passes
    if _TARGET is None or point != _TARGET[0]:
        return
    with _lock:
        _passes += 1
        if _passes == _TARGET[1]:
            os.kill(os.getpid(), getattr(signal, os.environ.get("SPECTRA_CRASH_SIGNAL", "SIGKILL")))
