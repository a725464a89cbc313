"""An analysis is written into a staging folder beside its output folder and moved in only once complete, so an
interrupted or failed re-analysis leaves the earlier results as they were: never old and new files mixed.

    python -m spectra.analyze run_dir=outputs/r1   # writes outputs/r1/.analysis.inprogress/, then moves it to analysis/

The staging folder sits at the same depth as the output folder, so the relative paths written into report.md and
duckdb_views.sql hold after the move. Moving is one rename per file with stop signals held (a few milliseconds);
only SIGKILL or a power cut in that moment can leave a mix, and the next analysis replaces it whole.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from spectra.analysis.runs import RunAnalysis
from spectra.errors import signals_held


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """An empty staging folder for `out`, removed when the block ends, however it ends (what an analysis killed
    with SIGKILL left there is removed first)."""
    absolute = Path(os.path.abspath(out))  # output_dir=. has no name of its own
    folder = absolute.parent / f".{absolute.name}.inprogress"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def stale_outputs(out: Path) -> list[Path]:
    """Files an earlier analysis may have written into `out` that a later one does not always write (a CSV export,
    figures of other heads, token tables whose tokenizer no longer loads). Only Spectra's own names: an output_dir
    may hold the user's files too."""
    return [out / name for name in ("metrics.csv", "tokens.parquet", "top_tokens.parquet")] + sorted(
        (out / "figures").glob("*.png")
    )


def publish(staged: Path, out: Path) -> None:
    """Every file of `staged` moved into `out`, and the earlier analysis's files this one did not write removed."""
    files = sorted(path for path in staged.rglob("*") if path.is_file())
    targets = {out / path.relative_to(staged) for path in files}
    with signals_held():
        for path in files:
            target = out / path.relative_to(staged)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
        for path in stale_outputs(out):
            if path not in targets:
                path.unlink(missing_ok=True)
        figures = out / "figures"
        if figures.is_dir() and not any(figures.iterdir()):
            figures.rmdir()  # a rerun with figures=false: no empty folder where the figures were


def published(analysis: RunAnalysis, out: Path) -> RunAnalysis:
    """The run's analysis moved from its staging folder into `out`, its paths pointing there."""
    staged = analysis.out
    publish(staged, out)
    figures = [out / path.relative_to(staged) for path in analysis.figures]
    return dataclasses.replace(analysis, out=out, figures=figures)
