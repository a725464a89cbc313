"""Resumable runs: a manifest of the parts that have landed, and the clean-up that lets a killed run finish.

A writer appends one JSON line per part to its manifest after the part is synced and renamed, then syncs the
manifest: a part the manifest lists is complete, anything else in the run directory is a leftover. The first
line records the settings that decide the dataset's rows and values (the fingerprint); every part's line
carries the fingerprint's hash and the part's sha256, so a lost or damaged first line never lets a resume with
other settings through, and a part damaged in place (same size, readable footer) is caught. One manifest per
writer (`manifest.jsonl`, or `manifest.rank<r>.jsonl` for rank r under torchrun); resume reads them all.

A resume (`run.resume=true` with the run's directory) refuses a different fingerprint, naming what differs,
keeps the listed parts whose files match their size and sha256, deletes everything else a killed run may have
left (damaged parts, temporary files, parts written but never listed), and skips the batches already done, so the
finished directory holds exactly what an uninterrupted run writes. run.json is never deleted: the resume replaces
it (write-new-then-rename) once it has a new one. A folder is a Spectra run only if a manifest of its own says so:
files Spectra did not write (a user's run.json, samples.parquet or manifest.jsonl) are never replaced.

Every reader of parts (resume, spectra.analyze, spectra.sql, the W&B summary) applies one rule, `verified_parts`:
each part must be listed, match its listed size and sha256, and carry the settings hash of its manifest's header.

    python -m spectra.run model=tiny_llama data=synthetic hydra.run.dir=outputs/r1                   # killed
    python -m spectra.run model=tiny_llama data=synthetic hydra.run.dir=outputs/r1 run.resume=true   # finishes
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from spectra.data.sample import Sample
from spectra.errors import ConfigError, SpectraError
from spectra.models.checkpoint_digest import checkpoint_digest

MANIFEST_GLOB = "manifest*.jsonl"
MANIFEST_VERSION = 2  # 2: every part line has sha256 and settings (the fingerprint's hash)
# Hardware settings that change which rows a part holds or their values; device, threads and the attention
# block budget may change on resume (a preempted job lands on another node, or is retried with less memory).
FINGERPRINT_HARDWARE = ("dtype", "batch_size")


def manifest_path(out: Path, rank: int | None = None) -> Path:
    return out / ("manifest.jsonl" if rank is None else f"manifest.rank{rank}.jsonl")


def fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """The settings that decide the dataset: model, data, metrics, the hardware settings above, and what identifies
    the weights of a local checkpoint folder (the same model.path may hold other weights later)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    settings = {
        "model": config["model"],
        "data": config["data"],
        "metrics": config["metrics"],
        "hardware": {name: config["hardware"][name] for name in FINGERPRINT_HARDWARE},
    }
    if weights := checkpoint_digest(cfg.model):
        settings["weights"] = weights
    return settings


def settings_hash(fingerprint_: dict) -> str:
    """Short hash of the fingerprint, stored in every part's manifest line."""
    return hashlib.sha256(json.dumps(fingerprint_, sort_keys=True).encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    # ~1.1 GB/s on a loaded 2-core CPU: a few ms for a part of a few MB, on the writer thread.
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


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
    sha256: str | None = None  # None only in manifests written before version 2
    settings: str | None = None  # settings_hash of the run's fingerprint


def well_formed(entry: dict) -> bool:
    """A part line whose fields have the types every reader assumes (a hand-edited line may not): else it is
    treated like a torn line, its part unlisted."""

    def count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    return (
        isinstance(entry["part"], str)
        and isinstance(entry["sample_ids"], list)
        and all(count(i) for i in entry["sample_ids"])
        and count(entry["rows"])
        and count(entry["bytes"])
        and all(isinstance(entry.get(k), (str, type(None))) for k in ("sha256", "settings"))
    )


def read_manifest(path: Path) -> tuple[dict | None, list[PartRecord]]:
    """(header, parts). A torn or damaged line (the machine died mid-append) is skipped: its part counts as
    unlisted and is captured again."""
    header, parts = None, []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(entry, dict):
            continue
        if "fingerprint" in entry:
            header = entry
        elif {"part", "sample_ids", "rows", "bytes"} <= entry.keys() and well_formed(entry):
            fields = ("part", "sample_ids", "rows", "bytes", "sha256", "settings")
            parts.append(PartRecord(**{name: entry.get(name) for name in fields}))
    return header, parts


def listed_parts(out: Path) -> dict[str, PartRecord]:
    """Every part the run's manifests list (all ranks', any world size), by file name."""
    return {part.part: part for path in sorted(out.glob(MANIFEST_GLOB)) for part in read_manifest(path)[1]}


def foreign_manifest(path: Path) -> bool:
    """True for a manifest*.jsonl that Spectra did not write: not empty, yet no line is a Spectra header or part
    line. (Spectra writes the header whole, by rename, so its own manifest always has one readable line.)"""
    try:
        if path.stat().st_size == 0:
            return False
    except OSError:
        return False
    header, parts = read_manifest(path)
    return header is None and not parts


def write_text_atomic(text: str, path: Path) -> None:
    """path holds the old text or the new, never a part: written under another name, synced, then renamed."""
    temporary = path.with_name(path.name + ".inprogress")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:  # not the locale's: token text is any Unicode
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    os.replace(temporary, path)


def fsync_directory(directory: Path) -> None:
    # A rename is durable only once its directory is synced (matters when the node dies, not on SIGKILL).
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class Manifest:
    """One writer's append-only manifest; starts as the header plus the parts kept from earlier attempts."""

    def __init__(
        self, path: Path, fingerprint_: dict, kept: Sequence[PartRecord] = (), attention_windows: list | None = None
    ):
        """attention_windows: the keys each layer's queries see; in the header (written before any part), so a
        run killed before run.json is still analysed with the right window-aware ratios."""
        self.path = path
        self.parts = list(kept)
        self.settings = settings_hash(fingerprint_)
        header = {"manifest_version": MANIFEST_VERSION, "fingerprint": fingerprint_}
        if attention_windows is not None:
            header["attention_windows"] = attention_windows
        lines = [header] + [asdict(p) for p in kept]
        write_text_atomic("".join(json.dumps(line) + "\n" for line in lines), path)
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
    damaged: list[str] = field(default_factory=list)  # "<part>: <what is wrong>" for listed parts captured again
    previous_record: dict | None = None  # run.json of a finished run being resumed (its timings are kept)

    def kept_parts(self, manifest: Path) -> list[PartRecord]:
        return self.kept.get(manifest.name, [])


def _run_files(out: Path) -> list[Path]:
    names = [*out.glob(MANIFEST_GLOB), out / "samples.parquet", out / "run.json", *out.glob("metrics/part-*.parquet")]
    return [path for path in names if path.exists()]


def part_damage(path: Path, part: PartRecord) -> str | None:
    """What is wrong with a listed part on disk, or None when it is the file the manifest recorded."""
    try:
        if path.stat().st_size != part.bytes:
            return f"size {path.stat().st_size:,} B, listed as {part.bytes:,} B"
        if part.sha256 is not None and file_sha256(path) != part.sha256:
            return "sha256 differs from the one listed (damaged in place)"
        if pq.read_metadata(path).num_rows != part.rows:
            return "row count differs from the one listed"
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError) as error:  # not a readable Parquet file
        return f"unreadable ({str(error).splitlines()[0]})"
    return None


def verified_parts(run: Path) -> list[Path]:
    """The run's part files, in name order, each checked against the manifest line that lists it: listed, the
    listed size, sha256 and row count, and the settings hash of its manifest's header. Every reader of parts uses
    this (spectra.analyze, spectra.sql, the W&B summary), so a damaged, foreign or unlisted part never reaches a
    result; the first that fails is one SpectraError naming it and what to do. Each file is hashed once per call
    (~1 s per GB): the price of results that cannot silently change."""
    parts = sorted((run / "metrics").glob("part-*.parquet"))
    if not parts:
        return []
    resume = f"python -m spectra.run <the run's overrides> run.resume=true hydra.run.dir={run}"
    manifests = sorted(run.glob(MANIFEST_GLOB))
    if not manifests or any(foreign_manifest(m) for m in manifests):
        raise SpectraError(
            f"{run}: no Spectra manifest (manifest.jsonl) lists its parts, so they cannot be verified (a folder "
            "not written by Spectra, or by a Spectra older than manifests); capture the run again"
        )
    listed: dict[str, tuple[Path, PartRecord]] = {}
    run_settings: set[str] = set()
    for manifest in manifests:
        header, lines = read_manifest(manifest)
        expected = settings_hash(header["fingerprint"]) if header is not None else None
        if expected is not None:
            run_settings.add(expected)
        for part in lines:
            if part.sha256 is None or part.settings is None or expected not in (None, part.settings):
                raise SpectraError(
                    f"{run / 'metrics' / part.part}: its line in {manifest.name} has another settings hash than the "
                    "manifest's header, or none (a part copied from another run, or an edited manifest); it cannot "
                    "be trusted: capture the run again"
                )
            run_settings.add(part.settings)
            listed[part.part] = (manifest, part)
    if len(run_settings) > 1:
        raise SpectraError(
            f"{run}: its manifests record {len(run_settings)} different settings hashes (parts of other runs mixed "
            "in); it cannot be trusted: capture the run again"
        )
    for path in parts:
        if path.name not in listed:
            raise SpectraError(
                f"{path}: not listed in any manifest (written by an attempt killed before it could list it); "
                f"{resume} finishes the run (it deletes the file and captures it again), or delete the file to "
                "read only the listed parts"
            )
        damage = part_damage(path, listed[path.name][1])
        if damage is not None:
            raise SpectraError(f"{path}: {damage}; {resume} captures it again")
    return parts


def _check_samples(out: Path, samples: Sequence[Sample]) -> None:
    """A resume must capture the same token windows as the attempt it finishes."""
    path = out / "samples.parquet"
    if not path.exists():
        return
    try:
        table = pq.read_table(path, columns=["sample_id", "input_ids"]).to_pydict()
    except (OSError, ValueError, KeyError) as error:  # pyarrow: ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise SpectraError(
            f"{path} is damaged ({str(error).splitlines()[0][:200]}); it records which token windows the run "
            "captured, so the run cannot be checked for resuming: start a new run in another directory, or, if "
            "certain the data and tokenizer are unchanged, delete it and resume"
        ) from None
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
    manifests = sorted(out.glob(MANIFEST_GLOB))
    for manifest in manifests:
        if foreign_manifest(manifest):
            raise ConfigError(
                key,
                f"{manifest} was not written by Spectra (no line of it is a Spectra manifest line); Spectra never "
                f"replaces files it did not write: choose another {key}",
            )
    if existing and not manifests:
        # run.json, samples.parquet or parts without a manifest: not a Spectra run (Spectra writes its manifest
        # before anything else), or one from a Spectra older than manifests. Either way, nothing here is replaced.
        raise ConfigError(
            key,
            f"{out} holds {existing[0].name} but no Spectra manifest (manifest.jsonl), so it is not a Spectra run "
            f"(or one written by an older Spectra); Spectra never replaces files it did not write: choose another "
            f"{key}",
        )
    if not resume:
        if existing:
            raise ConfigError(
                key,
                f"{out} already holds a Spectra run ({existing[0].name}); pass run.resume=true to finish it, "
                f"or choose another {key}",
            )
        return state

    parts_on_disk = sorted(out.glob("metrics/part-*.parquet"))
    listed: set[str] = set()
    for manifest in manifests:
        header, parts = read_manifest(manifest)
        _check_settings(manifest, header, parts, fingerprint_, key)
        kept = []
        for part in parts:
            damage = part_damage(out / "metrics" / part.part, part)
            if damage is None and not (set(part.sample_ids) & state.completed):
                kept.append(part)
                listed.add(part.part)
                state.completed.update(part.sample_ids)
            elif damage is not None and damage != "missing":
                state.damaged.append(f"{part.part}: {damage}")
        state.kept[manifest.name] = kept
    if samples is not None:
        _check_samples(out, samples)

    state.leftovers += [path for path in parts_on_disk if path.name not in listed]
    state.leftovers += sorted(out.glob("*.inprogress")) + sorted(out.glob("metrics/*.inprogress"))
    # run.json stays until the resume writes the new one over it (by rename): deleting it first would lose the
    # finished run's timings to a full disk or a kill in between.
    if (out / "run.json").is_file():
        try:
            state.previous_record = json.loads((out / "run.json").read_text())
        except (OSError, ValueError):
            state.previous_record = None
    return state


def _check_settings(manifest: Path, header: dict | None, parts: list[PartRecord], fingerprint_: dict, key: str):
    """Refuses a manifest written with other settings: its header's settings, and then every part line's own
    settings hash, header or not (a header edited to match, or a part and its line copied from a run with other
    settings, are refused by the line). A line without a checksum or settings hash cannot be vouched for."""
    if header is not None:
        changed = differences(header["fingerprint"], fingerprint_)
        if changed:
            raise ConfigError(
                "run.resume",
                f"the run in {manifest.parent} was made with other settings ({'; '.join(changed)}); "
                f"resume with the original settings, or start a new run in another {key}",
            )
    current = settings_hash(fingerprint_)
    strangers = [part.part for part in parts if part.settings != current or part.sha256 is None]
    if not strangers:
        return
    if header is None:
        raise ConfigError(
            "run.resume",
            f"{manifest} has lost its first line (the settings), and its parts were made with other settings "
            f"than this command's (or by an older Spectra); resume with the original settings, or start a new run "
            f"in another {key}",
        )
    raise ConfigError(
        "run.resume",
        f"{manifest} lists {strangers[0]}{f' and {len(strangers) - 1} more part(s)' if len(strangers) > 1 else ''} "
        f"with another settings hash than its header's (a part copied from another run, or an edited manifest); "
        f"nothing was changed: move {manifest.parent} aside and start a new run in another {key}",
    )


def delete_leftovers(state: ResumeState, out: Path, fingerprint_: dict) -> None:
    """Deletes what a resume does not keep, and rewrites every manifest to list only the kept parts, so that no
    line points at a part that is captured again (a later resume would judge the new file by the old line)."""
    for damaged in state.damaged:
        print(f"spectra: note: {damaged}; capturing it again", file=sys.stderr)
    for path in state.leftovers:
        path.unlink(missing_ok=True)
    for name, kept in state.kept.items():
        Manifest(out / name, fingerprint_, kept)


def writers(kept: dict[str, list[PartRecord]]) -> int:
    """How many processes wrote the kept parts: manifest.jsonl is one, manifest.rank<r>.jsonl are r+1 or more."""
    ranks = [int(name.split(".rank")[1].split(".")[0]) for name in kept if ".rank" in name]
    return max(ranks) + 1 if ranks else 1


def misaligned_batches(own: Sequence[Sample], batch_size: int, state: ResumeState) -> str | None:
    """Why this process's batches cannot resume the kept parts (parts are whole batches of the attempt that wrote
    them, so another number of ranks splits the samples into other batches), or None. Asked before anything in
    the run directory changes, so the refusal loses nothing."""
    for first in range(0, len(own), batch_size):
        batch = own[first : first + batch_size]
        done = [s.sample_id in state.completed for s in batch]
        if any(done) and not all(done):
            n = writers(state.kept)
            how = "python -m spectra.run (no torchrun)" if n == 1 else f"torchrun --nproc_per_node={n} -m spectra.run"
            return (
                f"samples {[s.sample_id for s in batch]} are only partly in the run's parts: the parts were written "
                f"by {n} process(es), and this resume splits the samples among another number, into other batches; "
                f"nothing was changed: resume with {how} <same overrides> run.resume=true"
            )
    return None


def batch_done(batch: Sequence[Sample], completed: set[int]) -> bool:
    """True when every sample of the batch is in a kept part (misaligned_batches has ruled out a part-done one)."""
    return all(s.sample_id in completed for s in batch)
