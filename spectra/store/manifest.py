"""Resumable runs: a manifest of the parts that have landed, and the clean-up that lets a killed run finish.

A writer appends one JSON line per part to its manifest after the part is synced and renamed, then syncs the
manifest: a part the manifest lists is complete, anything else in the run directory is a leftover. The first
line records the settings that decide the dataset's rows and values (the fingerprint). One manifest per writer
(`manifest.jsonl`, or `manifest.rank<r>.jsonl` for rank r under torchrun); resume reads them all.

A resume (`run.resume=true` with the run's directory) refuses a different fingerprint, naming what differs,
keeps the listed parts whose files are intact, deletes everything else a killed run may have left (temporary
files, parts written but never listed, a stale run.json), and skips the batches already done, so the finished
directory holds exactly what an uninterrupted run writes.

    python -m spectra.run model=tiny_llama data=synthetic hydra.run.dir=outputs/r1                   # killed
    python -m spectra.run model=tiny_llama data=synthetic hydra.run.dir=outputs/r1 run.resume=true   # finishes
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from spectra.data.sample import Sample
from spectra.errors import ConfigError, SpectraError

MANIFEST_GLOB = "manifest*.jsonl"
MANIFEST_VERSION = 1
# Hardware settings that change which rows a part holds or their values; device, threads and the attention
# block budget may change on resume (a preempted job lands on another node, or is retried with less memory).
FINGERPRINT_HARDWARE = ("dtype", "batch_size")


def manifest_path(out: Path, rank: int | None = None) -> Path:
    return out / ("manifest.jsonl" if rank is None else f"manifest.rank{rank}.jsonl")


def fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """The settings that decide the dataset: model, data, metrics, and the hardware settings above."""
    config = OmegaConf.to_container(cfg, resolve=True)
    return {
        "model": config["model"],
        "data": config["data"],
        "metrics": config["metrics"],
        "hardware": {name: config["hardware"][name] for name in FINGERPRINT_HARDWARE},
    }


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def differences(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for every setting that differs."""
    before, after = _flatten(old), _flatten(new)
    return [
        f"{key}: {before.get(key, '<unset>')!r} -> {after.get(key, '<unset>')!r}"
        for key in sorted(before.keys() | after.keys())
        if before.get(key, "<unset>") != after.get(key, "<unset>")
    ]


@dataclass
class PartRecord:
    part: str  # file name under metrics/
    sample_ids: list[int]
    rows: int
    bytes: int


def read_manifest(path: Path) -> tuple[dict | None, list[PartRecord]]:
    """(header, parts). A torn last line (the machine died mid-append) is ignored: its part counts as unlisted."""
    header, parts = None, []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "fingerprint" in entry:
            header = entry
        elif {"part", "sample_ids", "rows", "bytes"} <= entry.keys():
            parts.append(PartRecord(entry["part"], entry["sample_ids"], entry["rows"], entry["bytes"]))
    return header, parts


def fsync_directory(directory: Path) -> None:
    # A rename is durable only once its directory is synced (matters when the node dies, not on SIGKILL).
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class Manifest:
    """One writer's append-only manifest; starts as the header plus the parts kept from earlier attempts."""

    def __init__(self, path: Path, fingerprint_: dict, kept: Sequence[PartRecord] = ()):
        self.path = path
        self.parts = list(kept)
        lines = [{"manifest_version": MANIFEST_VERSION, "fingerprint": fingerprint_}] + [asdict(p) for p in kept]
        temporary = path.with_name(path.name + ".inprogress")
        with open(temporary, "w") as handle:
            handle.writelines(json.dumps(line) + "\n" for line in lines)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        fsync_directory(path.parent)

    def record(self, part: PartRecord) -> None:
        """Called once the part has its final name; when this returns, the part survives a kill."""
        with open(self.path, "a") as handle:
            handle.write(json.dumps(asdict(part)) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.parts.append(part)


@dataclass
class ResumeState:
    """What a run directory holds, read without changing anything (a dry run prints it)."""

    kept: dict[str, list[PartRecord]] = field(default_factory=dict)  # manifest file name -> complete parts
    leftovers: list[Path] = field(default_factory=list)  # files a resume deletes
    completed: set[int] = field(default_factory=set)  # sample ids already captured

    def kept_parts(self, manifest: Path) -> list[PartRecord]:
        return self.kept.get(manifest.name, [])


def _run_files(out: Path) -> list[Path]:
    names = [*out.glob(MANIFEST_GLOB), out / "samples.parquet", out / "run.json", *out.glob("metrics/part-*.parquet")]
    return [path for path in names if path.exists()]


def _intact(path: Path, part: PartRecord) -> bool:
    try:
        return path.stat().st_size == part.bytes and pq.read_metadata(path).num_rows == part.rows
    except (OSError, ValueError):  # missing, or not a readable Parquet file
        return False


def _check_samples(out: Path, samples: Sequence[Sample]) -> None:
    """A resume must capture the same token windows as the attempt it finishes."""
    path = out / "samples.parquet"
    if not path.exists():
        return
    table = pq.read_table(path, columns=["sample_id", "input_ids"]).to_pydict()
    same = table["sample_id"] == [s.sample_id for s in samples] and all(
        np.array_equal(np.asarray(ids), s.input_ids) for ids, s in zip(table["input_ids"], samples)
    )
    if not same:
        raise ConfigError(
            "run.resume",
            f"{path} holds other token windows than this config produces (corpus or tokenizer changed); "
            "start a new run in another directory",
        )


def inspect_run_directory(
    out: Path, fingerprint_: dict, resume: bool, key: str, samples: Sequence[Sample] | None = None
) -> ResumeState:
    """Refuses a directory holding another run (or, on resume, a run with other settings); changes nothing.

    key: the config key that chose the directory, named in the errors (hydra.run.dir or run.output_dir).
    samples: this run's samples, compared with the run's samples.parquet on resume (when given).
    """
    state = ResumeState()
    existing = _run_files(out)
    if not resume:
        if existing:
            raise ConfigError(
                key,
                f"{out} already holds a Spectra run ({existing[0].name}); pass run.resume=true to finish it, "
                f"or choose another {key}",
            )
        return state

    manifests = sorted(out.glob(MANIFEST_GLOB))
    parts_on_disk = sorted(out.glob("metrics/part-*.parquet"))
    if parts_on_disk and not manifests:
        raise SpectraError(
            f"{out}/metrics holds parts but {out} has no manifest (written by an older Spectra?), so which parts "
            "are complete is unknown; start a new run in another directory"
        )
    listed: set[str] = set()
    for manifest in manifests:
        header, parts = read_manifest(manifest)
        if header is None:
            state.leftovers.append(manifest)
            continue
        changed = differences(header["fingerprint"], fingerprint_)
        if changed:
            raise ConfigError(
                "run.resume",
                f"the run in {out} was made with other settings ({'; '.join(changed)}); "
                f"resume with the original settings, or start a new run in another {key}",
            )
        kept = []
        for part in parts:
            if _intact(out / "metrics" / part.part, part) and not (set(part.sample_ids) & state.completed):
                kept.append(part)
                listed.add(part.part)
                state.completed.update(part.sample_ids)
        state.kept[manifest.name] = kept
    if samples is not None:
        _check_samples(out, samples)

    state.leftovers += [path for path in parts_on_disk if path.name not in listed]
    state.leftovers += sorted(out.glob("*.inprogress")) + sorted(out.glob("metrics/*.inprogress"))
    state.leftovers += [path for path in (out / "run.json",) if path.exists()]  # stale: rewritten at the end
    return state


def delete_leftovers(state: ResumeState) -> None:
    for path in state.leftovers:
        path.unlink(missing_ok=True)


def batch_done(batch: Sequence[Sample], completed: set[int]) -> bool:
    """True when every sample of the batch is in a kept part. Parts are whole batches, so a batch is all or none."""
    done = [s.sample_id in completed for s in batch]
    if any(done) and not all(done):
        raise SpectraError(
            f"samples {[s.sample_id for s in batch]} are only partly in the run's parts: the parts do not line up "
            "with this run's batches; start a new run in another directory"
        )
    return all(done)
