"""Run folders as the analysis reads them: which folders are runs, their records and parts, and what was found."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import polars as pl

from spectra.errors import ConfigError, SpectraError
from spectra.store.manifest import listed_parts, part_damage


def is_run(folder: Path) -> bool:
    return (folder / "metrics").is_dir()


def job_order(folder: Path) -> tuple:
    """Hydra names sweep jobs `<num>_<overrides>`: order by the number, so 10 comes after 9."""
    match = re.match(r"(\d+)", folder.name)
    return (int(match.group(1)) if match else sys.maxsize, folder.name)


def find_runs(run_dir: Any) -> tuple[list[Path], Optional[Path]]:
    """The run folders named by run_dir, and the sweep folder when one was given (where the comparison goes)."""
    given = [run_dir] if isinstance(run_dir, str) else list(run_dir)
    runs, sweep = [], None
    for name in map(Path, map(str, given)):
        if not name.is_dir():
            message = f"{name} is not a folder; give a run folder (holding metrics/) or a sweep folder"
            raise ConfigError("run_dir", message)
        if is_run(name):
            runs.append(name)
            continue
        jobs = sorted((sub for sub in name.iterdir() if sub.is_dir() and is_run(sub)), key=job_order)
        if not jobs:
            raise ConfigError("run_dir", f"{name} holds no metrics/ folder and no runs; is it a Spectra run folder?")
        runs += jobs
        sweep = sweep or name
    # The same run named twice ([A,A], or a run and its sweep) is analysed once: a "comparison" of a run with
    # itself would overwrite the run's own report.
    unique = list({run.resolve(): run for run in reversed(runs)}.values())[::-1]
    return unique, sweep


def run_record(run: Path) -> dict:
    """run.json, or {} for a run that did not finish (its complete part files are still worth analysing)."""
    path = run / "run.json"
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (ValueError, OSError) as error:  # ValueError: cut short (a full disk) or not UTF-8
        raise SpectraError(
            f"{path}: damaged ({str(error).splitlines()[0]}); move it aside to analyse the parts without it, or "
            f"finish the run again with python -m spectra.run <its overrides> run.resume=true hydra.run.dir={run}"
        ) from None
    if not isinstance(record, dict) or not all(isinstance(record.get(k, {}), dict) for k in ("model", "config", "counts")):
        raise SpectraError(f"{path}: not a Spectra run record (model, config and counts objects); move it aside")
    return record


def scan_metrics(run: Path) -> pl.LazyFrame:
    # part-*: the writer's in-progress files end in .inprogress, but be strict anyway.
    parts = sorted((run / "metrics").glob("part-*.parquet"))
    if not parts:
        raise SpectraError(f"{run / 'metrics'}: no part-*.parquet files; did the capture run write any batch?")
    # The files themselves, glob=False: a sweep job's folder name may hold [ ] (list-valued overrides), which a
    # glob pattern would read as a character class and match nothing.
    return pl.scan_parquet(parts, glob=False)


def name_damaged_part(run: Path) -> None:
    """After a read failed: raises SpectraError naming the first part that is not what the run's manifests list.
    Hashes every part, so it runs only once something is known to be wrong."""
    listed = listed_parts(run)
    if not listed:
        return  # no manifest (an older Spectra): nothing to compare with
    for path in sorted((run / "metrics").glob("part-*.parquet")):
        damage = part_damage(path, listed[path.name]) if path.name in listed else "not listed in any manifest"
        if damage:
            raise SpectraError(
                f"{path}: {damage}; python -m spectra.run <the run's overrides> run.resume=true hydra.run.dir={run} "
                "captures it again"
            )


@dataclass
class RunAnalysis:
    label: str
    run: Path
    out: Path
    record: dict
    metrics: list[str]
    heads: pl.DataFrame
    correlations: pl.DataFrame
    profile: pl.DataFrame
    figures: list[Path]
    windows: Optional[list] = None  # run.json's model.attention_windows; None: not recorded
    top_tokens: Optional[pl.DataFrame] = None  # tokens.top_tokens; None when the tokenizer did not load
    tokens_note: str = ""  # why there is no token text, when there is none
