"""Reliability through the real entrypoint (`python -m spectra.run` as a subprocess, tiny_llama, synthetic data):
one writer per run directory, checksummed parts, damaged inputs named in one line, faults that say how to resume.

    python -m pytest tests/test_reliability.py -q -x
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import conftest
import pytest
import yaml
from conftest import REPO

from spectra.store.manifest import read_manifest

ARGS = ["model=tiny_llama", "data=synthetic", "data.context_length=16", "data.n_samples=4", "hardware.batch_size=1",
        "logger=none"]  # fmt: skip
ROWS_PER_SAMPLE = 3 * 8 * 16  # tiny_llama: 3 layers x 8 heads, 16 tokens


def spectra(tmp_path: Path, *argv: str, module: str = "spectra.run", env: dict | None = None, **kw):
    """`python -m <module> <argv>` as a real process; returns the CompletedProcess (or Popen with wait=False)."""
    command = [sys.executable, "-m", module, *argv]
    environment = {**conftest.test_env(tmp_path), **(env or {})}
    return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300, **kw)


def one_line_error(process, pattern: str, code: int = 2, prefix: str = "spectra: error: ") -> str:
    """The process ended with `code` and exactly one stderr line matching prefix + pattern; no traceback."""
    assert "Traceback" not in process.stdout + process.stderr, process.stderr[-3000:]
    lines = [line for line in process.stderr.splitlines() if line.strip()]
    assert process.returncode == code, (process.returncode, process.stderr[-3000:])
    assert len(lines) == 1, process.stderr[-3000:]
    assert re.match(re.escape(prefix) + pattern, lines[0]), lines[0]
    return lines[0]


def stopped(pid: int, timeout: float = 120) -> None:
    """Waits until the process is stopped (SIGSTOP at a crash point)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        if state == "T":
            return
        time.sleep(0.2)
    raise AssertionError(f"process {pid} did not stop")


def dump(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())


def test_one_writer_per_run_directory(tmp_path):
    """Run A holds the directory (stopped mid-capture); B with another seed, a resume, a dry run are all refused
    or harmless and change nothing; once A is dead its lock is gone and a resume finishes A's run."""
    run_dir = tmp_path / "run"
    holder_env = {**conftest.test_env(tmp_path), "SPECTRA_CRASH_AT": "attention-layer:7", "SPECTRA_CRASH_SIGNAL": "SIGSTOP"}
    holder = subprocess.Popen(
        [sys.executable, "-m", "spectra.run", *ARGS, f"hydra.run.dir={run_dir}"], cwd=REPO, env=holder_env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        stopped(holder.pid)
        assert dump(run_dir)["data"]["seed"] == 0
        config_before = (run_dir / ".hydra" / "config.yaml").read_bytes()

        other_seed = spectra(tmp_path, *ARGS, "data.seed=1", f"hydra.run.dir={run_dir}")
        line = one_line_error(other_seed, rf"hydra\.run\.dir: {re.escape(str(run_dir))} is in use by another Spectra")
        assert f"pid {holder.pid} on " in line and "data.context_length=16" in line
        resume = spectra(tmp_path, *ARGS, f"hydra.run.dir={run_dir}", "run.resume=true")
        one_line_error(resume, rf"hydra\.run\.dir: .* is in use by another Spectra process \(pid {holder.pid} ")
        # Nothing the refused commands composed reached the run directory.
        assert (run_dir / ".hydra" / "config.yaml").read_bytes() == config_before
        assert not list((run_dir / "metrics").glob("part-00000[2-3].parquet"))
    finally:
        holder.kill()  # SIGKILL: the kernel drops its lock; the lock file stays, naming a dead holder
        holder.wait()

    dry = spectra(tmp_path, *ARGS, f"hydra.run.dir={run_dir}", "run.resume=true", "run.dry_run=true")
    assert dry.returncode == 0 and re.search(r"resume: [0-2] of 4 samples done", dry.stdout), dry.stderr[-3000:]
    assert (run_dir / ".hydra" / "config.yaml").read_bytes() == config_before  # a dry run writes nothing
    finished = spectra(tmp_path, *ARGS, f"hydra.run.dir={run_dir}", "run.resume=true")
    assert finished.returncode == 0, finished.stderr[-3000:]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["config"]["data"]["seed"] == dump(run_dir)["data"]["seed"] == 0
    assert record["counts"]["rows"] == 4 * ROWS_PER_SAMPLE and record["counts"]["part_files"] == 4
    assert f"pid {holder.pid} " not in (run_dir / ".spectra.lock").read_text()


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    process = spectra(run_dir.parent, *ARGS, f"hydra.run.dir={run_dir}")
    assert process.returncode == 0, process.stderr[-3000:]
    return run_dir


def copy_run(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def test_resume_recaptures_a_part_damaged_in_place_and_keeps_the_rest(tmp_path, finished):
    run_dir = copy_run(finished, tmp_path / "run")
    original = {p.name: p.read_bytes() for p in (run_dir / "metrics").iterdir()}
    damaged = run_dir / "metrics" / "part-000002.parquet"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 8] = bytes(8)  # same size, footer intact
    damaged.write_bytes(bytes(data))
    kept_mtime = (run_dir / "metrics" / "part-000001.parquet").stat().st_mtime_ns

    process = spectra(tmp_path, *ARGS, f"hydra.run.dir={run_dir}", "run.resume=true")
    assert process.returncode == 0, process.stderr[-3000:]
    assert "spectra: note: part-000002.parquet: sha256 differs from the one listed" in process.stderr
    assert {p.name: p.read_bytes() for p in (run_dir / "metrics").iterdir()} == original  # redone, bit-identical
    assert (run_dir / "metrics" / "part-000001.parquet").stat().st_mtime_ns == kept_mtime  # kept, not rewritten
    listed = [part.part for part in read_manifest(run_dir / "manifest.jsonl")[1]]
    assert sorted(listed) == sorted(original) and len(listed) == 4
    assert json.loads((run_dir / "run.json").read_text())["counts"]["samples_resumed"] == 3


def test_lost_manifest_header_never_deletes_parts(tmp_path, finished):
    """The settings are in every line: a lost first line with other settings is refused, parts untouched; with
    the same settings the run resumes and keeps every part."""
    run_dir = copy_run(finished, tmp_path / "run")
    manifest = run_dir / "manifest.jsonl"
    manifest.write_text("".join(manifest.read_text().splitlines(keepends=True)[1:]))
    before = {p.name: p.read_bytes() for p in (run_dir / "metrics").iterdir()}

    other = spectra(tmp_path, *ARGS, "metrics.k_eff_threshold=0.5", f"hydra.run.dir={run_dir}", "run.resume=true")
    one_line_error(other, r"run\.resume: .*manifest\.jsonl has lost its first line \(the settings\), and its parts "
                          r"were made with other settings")  # fmt: skip
    assert {p.name: p.read_bytes() for p in (run_dir / "metrics").iterdir()} == before

    same = spectra(tmp_path, *ARGS, f"hydra.run.dir={run_dir}", "run.resume=true")
    assert same.returncode == 0, same.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in (run_dir / "metrics").iterdir()} == before
    header, parts = read_manifest(manifest)
    assert header is not None and len(parts) == 4  # the header is written again


def test_run_json_counts_every_ranks_manifest_and_a_finished_resume_keeps_its_timings(tmp_path, finished):
    """A two-rank run (its manifests split by rank) resumed by one process: run.json counts all four parts."""
    run_dir = copy_run(finished, tmp_path / "run")
    lines = (run_dir / "manifest.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "manifest.rank0.jsonl").write_text("".join(lines[:3]))
    (run_dir / "manifest.rank1.jsonl").write_text(lines[0] + "".join(lines[3:]))
    (run_dir / "manifest.jsonl").unlink()
    timing = json.loads((run_dir / "run.json").read_text())["timing"]

    process = spectra(tmp_path, *ARGS, f"hydra.run.dir={run_dir}", "run.resume=true")
    assert process.returncode == 0, process.stderr[-3000:]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["counts"]["rows"] == 4 * ROWS_PER_SAMPLE and record["counts"]["part_files"] == 4
    assert record["counts"]["metric_bytes"] == sum(p.stat().st_size for p in (run_dir / "metrics").iterdir())
    assert record["timing"] == timing
    assert "rows       1,536 in 4 part files" in process.stdout
