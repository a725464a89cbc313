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
from spectra.store.manifest import MANIFEST_GLOB, read_manifest, verified_parts


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
        # A job that wrote no part (killed before its first batch, or still starting) has nothing to analyse;
        # it must not stop the analysis of the sweep's other jobs.
        empty = [job for job in jobs if not any((job / "metrics").glob("part-*.parquet"))]
        for job in empty:
            print(f"spectra: note: {job} has no parts yet; left out of the analysis", file=sys.stderr)
        if len(empty) == len(jobs):
            raise ConfigError("run_dir", f"{name}: none of its {len(jobs)} runs has written a part yet")
        runs += [job for job in jobs if job not in empty]
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


def attention_windows(run: Path, record: dict) -> Optional[list]:
    """The keys each layer's queries see (None: all earlier tokens), which the window-aware ratios divide by:
    from run.json, or, for a run killed before writing it, from its manifests' header (written before any part)."""
    if "attention_windows" in record.get("model", {}):
        return record["model"]["attention_windows"]
    for manifest in sorted(run.glob(MANIFEST_GLOB)):
        header, _ = read_manifest(manifest)
        if header is not None and "attention_windows" in header:
            return header["attention_windows"]
    return None


def scan_metrics(run: Path) -> pl.LazyFrame:
    """The run's parts, each verified against its manifest line first (verified_parts): a damaged, foreign or
    unlisted part is one line naming it, never a silently different result."""
    parts = verified_parts(run)
    if not parts:
        raise SpectraError(f"{run / 'metrics'}: no part-*.parquet files; did the capture run write any batch?")
    # The files themselves, glob=False: a sweep job's folder name may hold [ ] (list-valued overrides), which a
    # glob pattern would read as a character class and match nothing.
    return pl.scan_parquet(parts, glob=False)


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
    headline: Optional[pl.DataFrame] = None  # controlled.headline: per y, heads with q < 0.05, median partial r


IGNORED_KEYS = ("run.output_dir", "run.resume", "run.dry_run")  # where and how a run was written, not what


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"data.context_length": 512, ...}; values other than scalars as their text."""
    items = {}
    for key, value in config.items():
        if isinstance(value, dict):
            items.update(flatten(value, f"{prefix}{key}."))
        else:
            items[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
    return items


def read_yaml(path: Path) -> Any:
    import yaml  # Hydra's own dependency

    return yaml.safe_load(path.read_text()) if path.is_file() else None


def job_overrides(run: Path) -> Optional[dict[str, str]]:
    """The run's command-line overrides as {key: value} (Hydra's .hydra/overrides.yaml: `model=tiny_llama` is
    {"model": "tiny_llama"}), None where Hydra kept no record. Hydra's own settings (hydra.*, hydra/launcher=)
    and where the run writes are not settings of the measurement."""
    overrides = read_yaml(run / ".hydra" / "overrides.yaml")
    if not isinstance(overrides, list):
        return None
    pairs = (str(item).split("=", 1) for item in overrides if "=" in str(item))
    cleaned = {key.lstrip("+~"): value for key, value in pairs}
    return {k: v for k, v in cleaned.items() if not k.startswith("hydra") and k not in IGNORED_KEYS}


def run_settings(run: Path, record: dict) -> dict[str, Any]:
    """Every setting of a run by the name a user types: flattened config keys, and each config group's choice
    (`model`: "tiny_llama", from Hydra's record of the run) under the group's name."""
    settings = flatten(record.get("config", {}))
    hydra = read_yaml(run / ".hydra" / "hydra.yaml") or {}
    choices = (((hydra.get("hydra") or {}).get("runtime") or {}).get("choices")) or {}
    settings.update({group: choice for group, choice in choices.items() if "/" not in group})
    return settings



def swept_keys(settings: list[dict[str, Any]], overrides: list[Optional[dict[str, str]]]) -> list[str]:
    """The keys the user swept: among the keys given on the command line (overrides), those whose values differ
    between runs. A sweep over `model=` is one key, `model`, not every `model.architecture.*` value that comes
    with the choice. Runs without Hydra's record: every config key that differs, less the keys of a group whose
    choice (or name) differs itself."""
    value = lambda s, key: json.dumps(s.get(key), sort_keys=True, default=str)  # noqa: E731
    differs = lambda key: len({value(s, key) for s in settings}) > 1  # noqa: E731
    if all(o is not None for o in overrides):
        keys = sorted(set().union(*overrides))
        for s, o in zip(settings, overrides):  # a `+key=` the config does not know: its text
            s.update({k: v for k, v in o.items() if k not in s})
        return [key for key in keys if differs(key)]
    keys = sorted(k for k in set().union(*settings) if k not in IGNORED_KEYS and differs(k))
    # A group whose choice differs (`model`, or `model.name` where no choice was recorded) stands for its keys.
    groups = {k for k in keys if "." not in k} | {k.split(".")[0] for k in keys if k.count(".") == 1 and k.endswith(".name")}
    representative = {g: g if g in keys else f"{g}.name" for g in groups}
    return [k for k in keys if k.split(".")[0] not in groups or k == representative[k.split(".")[0]]]
