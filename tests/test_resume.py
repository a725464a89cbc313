"""A capture killed with SIGKILL at each crash point (spectra/crashpoints.py) and resumed ends with exactly the
dataset an uninterrupted run writes: the same part files byte for byte, the same rows, no duplicates.

    python -m pytest tests/test_resume.py -q
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import conftest
import numpy as np
import polars as pl
import pytest
from conftest import REPO, run_spectra_inprocess

from spectra.data.sample import Sample
from spectra.store.manifest import PartRecord, ResumeState, batch_done, misaligned_batches, read_manifest

ARGS = ["model=tiny_llama", "data=synthetic", "data.context_length=16", "data.n_samples=8", "hardware.batch_size=1",
        "logger=none"]  # fmt: skip
LAYERS, HEADS, TOKENS, SAMPLES = 3, 8, 16, 8  # tiny_llama's shape and the run above
ROWS = SAMPLES * LAYERS * HEADS * TOKENS


def killed_run(tmp_path: Path, run_dir: Path, crash_at: str, *extra: str) -> None:
    """`python -m spectra.run` that must die by SIGKILL at crash_at; fails if it gets past it."""
    env = {**conftest.test_env(tmp_path), "SPECTRA_CRASH_AT": crash_at}
    process = conftest.spectra_subprocess("spectra.run", [*ARGS, f"hydra.run.dir={run_dir}", *extra], env, timeout=300)
    assert process.returncode == -signal.SIGKILL, (crash_at, process.returncode, process.stderr[-2000:])


def listed_parts(run_dir: Path) -> list[str]:
    return [part.part for part in read_manifest(run_dir / "manifest.jsonl")[1]]


def on_disk(run_dir: Path, pattern: str) -> list[str]:
    return sorted(path.name for path in (run_dir / "metrics").glob(pattern))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    code, _, stderr = run_spectra_inprocess(*ARGS, f"hydra.run.dir={run_dir}")
    assert code == 0, stderr
    return run_dir


def test_killed_capture_resumes_to_the_uninterrupted_dataset(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    observed = {}

    # Mid-batch: inside the third forward pass (3 layers per batch). The writer thread may or may not have
    # landed the first two parts by then; whatever the manifest lists must be intact.
    killed_run(tmp_path, run_dir, "attention-layer:8")
    observed["mid-batch"] = (listed_parts(run_dir), on_disk(run_dir, "*"))
    assert len(listed_parts(run_dir)) <= 2

    # Mid-write: the resumed run's first part (the second Parquet file, after samples.parquet) is on disk under
    # its temporary name only.
    killed_run(tmp_path, run_dir, "parquet-written:2", "run.resume=true")
    observed["mid-write"] = (listed_parts(run_dir), on_disk(run_dir, "*"))
    assert len(on_disk(run_dir, "*.inprogress")) == 1

    # Renamed but not listed: a complete-looking part the manifest does not vouch for; the resume redoes it.
    killed_run(tmp_path, run_dir, "part-renamed:2", "run.resume=true")
    observed["renamed, not listed"] = (listed_parts(run_dir), on_disk(run_dir, "*"))
    unlisted = set(on_disk(run_dir, "*.parquet")) - set(listed_parts(run_dir))
    assert len(unlisted) == 1
    assert not on_disk(run_dir, "*.inprogress")  # the resume deleted the previous attempt's temporary file

    # A listed part damaged on disk (truncated) fails its size check and is redone too.
    damaged = run_dir / "metrics" / listed_parts(run_dir)[0]
    damaged.write_bytes(damaged.read_bytes()[:100])

    # Between parts: killed right after a part was listed. The damaged part is the lowest pending batch, so it
    # is the one redone and listed (again) before the kill.
    killed_run(tmp_path, run_dir, "part-recorded:1", "run.resume=true")
    observed["between parts"] = (listed_parts(run_dir), on_disk(run_dir, "*"))
    assert set(on_disk(run_dir, "*.parquet")) == set(listed_parts(run_dir))
    assert listed_parts(run_dir)[-1] == damaged.name
    assert damaged.read_bytes() == (uninterrupted / "metrics" / damaged.name).read_bytes()

    code, stdout, stderr = run_spectra_inprocess(*ARGS, f"hydra.run.dir={run_dir}", "run.resume=true")
    assert code == 0, stderr
    print("\n".join(f"{point}: listed {listed} on disk {files}" for point, (listed, files) in observed.items()))

    # The same files, byte for byte, and nothing else.
    parts = on_disk(uninterrupted, "*")
    assert parts == on_disk(run_dir, "*") == [f"part-{i:06d}.parquet" for i in range(SAMPLES)]
    for name in parts:
        assert (run_dir / "metrics" / name).read_bytes() == (uninterrupted / "metrics" / name).read_bytes(), name
    assert not list(run_dir.glob("*.inprogress"))

    # The same rows, each once; the manifest lists every sample exactly once.
    resumed = pl.read_parquet(run_dir / "metrics" / "*.parquet").sort("sample_id", "layer", "head", "token_pos")
    reference = pl.read_parquet(uninterrupted / "metrics" / "*.parquet").sort("sample_id", "layer", "head", "token_pos")
    assert resumed.height == ROWS
    assert resumed.select("sample_id", "layer", "head", "token_pos").n_unique() == ROWS
    assert resumed.equals(reference)
    listed_samples = sorted(i for part in read_manifest(run_dir / "manifest.jsonl")[1] for i in part.sample_ids)
    assert listed_samples == list(range(SAMPLES))

    record = json.loads((run_dir / "run.json").read_text())
    assert record["counts"]["rows"] == ROWS and record["counts"]["part_files"] == SAMPLES
    assert 0 < record["counts"]["samples_resumed"] < SAMPLES


def test_sigterm_stops_cleanly_and_the_run_resumes(tmp_path, uninterrupted):
    """scancel or a time limit sends SIGTERM: one line, exit 130, finished batches kept, a resume completes."""
    run_dir = tmp_path / "run"
    env = {**conftest.test_env(tmp_path), "SPECTRA_CRASH_AT": "attention-layer:8", "SPECTRA_CRASH_SIGNAL": "SIGTERM"}
    process = conftest.spectra_subprocess("spectra.run", [*ARGS, f"hydra.run.dir={run_dir}"], env, timeout=300)
    assert process.returncode == 130, process.stderr[-2000:]
    assert "Traceback" not in process.stderr
    last = process.stderr.strip().splitlines()[-1]
    assert last.startswith("spectra: interrupted (SIGTERM); 2 finished part(s) are kept; finish the run with: ")
    # SIGTERM arrived inside the third batch: the two batches before it were written and listed, not lost.
    assert listed_parts(run_dir) == on_disk(run_dir, "*.parquet") == ["part-000000.parquet", "part-000001.parquet"]
    assert not on_disk(run_dir, "*.inprogress")

    code, _, stderr = run_spectra_inprocess(*ARGS, f"hydra.run.dir={run_dir}", "run.resume=true")
    assert code == 0, stderr
    assert on_disk(run_dir, "*.parquet") == on_disk(uninterrupted, "*.parquet")
    for part in on_disk(uninterrupted, "*.parquet"):
        assert (run_dir / "metrics" / part).read_bytes() == (uninterrupted / "metrics" / part).read_bytes()


def test_same_config_twice_gives_identical_metric_columns(tmp_path, uninterrupted):
    code, _, stderr = run_spectra_inprocess(*ARGS, f"hydra.run.dir={tmp_path / 'again'}")
    assert code == 0, stderr
    first = pl.read_parquet(uninterrupted / "metrics" / "*.parquet")
    second = pl.read_parquet(tmp_path / "again" / "metrics" / "*.parquet")
    for column in ("query_norm", "entropy", "max_attn", "k_eff"):
        assert first[column].to_numpy().tobytes() == second[column].to_numpy().tobytes(), column
    assert np.isfinite(first["entropy"].to_numpy()).all()


def test_resume_of_a_finished_run_changes_no_part(tmp_path, uninterrupted):
    run_dir = tmp_path / "copy"
    shutil.copytree(uninterrupted, run_dir)
    before = {name: (run_dir / "metrics" / name).read_bytes() for name in on_disk(run_dir, "*")}
    code, stdout, stderr = run_spectra_inprocess(*ARGS, f"hydra.run.dir={run_dir}", "run.resume=true")
    assert code == 0, stderr
    assert {name: (run_dir / "metrics" / name).read_bytes() for name in on_disk(run_dir, "*")} == before
    # Nothing left to capture: the finished run's record (counts, timings) is kept as it was.
    assert json.loads((run_dir / "run.json").read_text()) == json.loads((uninterrupted / "run.json").read_text())


def test_manifest_ignores_a_torn_last_line(tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    header = {"manifest_version": 1, "fingerprint": {"data": {"n_samples": 2}}}
    part = {"part": "part-000000.parquet", "sample_ids": [0], "rows": 10, "bytes": 100}
    manifest.write_text(json.dumps(header) + "\n" + json.dumps(part) + "\n" + '{"part": "part-000001.parq')
    read_header, parts = read_manifest(manifest)
    assert read_header == header
    assert [p.part for p in parts] == ["part-000000.parquet"]


def test_batches_that_do_not_line_up_with_the_kept_parts_are_refused_with_the_writers_count():
    """Parts written at batch size 2 resumed with batch size 3 (the shares of another number of ranks): the batch
    [0, 1, 2] is partly done; the advice names the number of processes that wrote the parts."""
    samples = [Sample(i, np.zeros(4, dtype=np.int64), "synthetic", "seed-0", i) for i in range(6)]
    kept = [PartRecord("part-000000.parquet", [0, 1], 1, 1)]
    single = ResumeState(kept={"manifest.jsonl": kept}, completed={0, 1})
    assert misaligned_batches(samples, 2, single) is None and batch_done(samples[:2], single.completed)
    assert not batch_done(samples[2:4], single.completed)
    why = misaligned_batches(samples, 3, single)
    assert "samples [0, 1, 2] are only partly in the run's parts" in why and "by 1 process(es)" in why
    assert "resume with python -m spectra.run (no torchrun) <same overrides> run.resume=true" in why
    ranks = ResumeState(kept={"manifest.rank0.jsonl": kept, "manifest.rank2.jsonl": []}, completed={0, 1})
    assert "by 3 process(es)" in misaligned_batches(samples, 3, ranks)
    assert "torchrun --nproc_per_node=3 -m spectra.run" in misaligned_batches(samples, 3, ranks)
