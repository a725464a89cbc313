"""Nothing a user or a cluster does loses data or mixes in wrong data (issue 20): run.json and user files are
never replaced before it is safe, every reader of parts verifies them against the manifest, stop signals end in
one line with the exact command to resume. In-process on one tiny_llama run, except where a real signal or a
real kill must reach a real process.

    python -m pytest tests/test_integrity.py -q
"""

from __future__ import annotations

import errno
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import conftest
import pytest
from conftest import REPO, compose_config, run_spectra_inprocess

from spectra.errors import ConfigError, SpectraError, ends_in_one_line, signals_held, stop_signals_as_interrupt
from spectra.store import manifest as manifest_module
from spectra.store.lock import FolderLock
from spectra.store.manifest import Manifest, fingerprint, inspect_run_directory, read_manifest, verified_parts

ARGS = ["model=tiny_llama", "data=synthetic", "data.context_length=16", "data.n_samples=4", "hardware.batch_size=1",
        "logger=none"]  # fmt: skip


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("integrity") / "run"
    code, _, stderr = run_spectra_inprocess(*ARGS, f"hydra.run.dir={run_dir}")
    assert code == 0, stderr
    return run_dir


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".spectra.lock"))
    return target


def files(run_dir: Path) -> dict[str, bytes]:
    """Every file's bytes, the lock aside (it names its last holder)."""
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != ".spectra.lock"
    }


def error_line(stderr: str) -> str:
    lines = stderr.replace("\r", "\n").splitlines()
    lines = [line for line in lines if line.strip() and not line.startswith("capture:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def damage_in_place(part: Path) -> None:
    data = bytearray(part.read_bytes())
    data[len(data) // 3] ^= 0x10  # same size, footer intact: still a readable Parquet file
    part.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------- never delete first
def test_full_disk_during_a_finished_runs_resume_keeps_run_json_and_its_timings(tmp_path, finished, monkeypatch):
    run_dir = copy_run(finished, tmp_path / "run")
    before = files(run_dir)

    def disk_full(text, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(manifest_module, "write_text_atomic", disk_full)  # the manifest rewrite is the first write
    code, _, stderr = run_spectra_inprocess(*ARGS, f"hydra.run.dir={run_dir}", "run.resume=true")
    assert code == 2 and error_line(stderr).startswith("spectra: error: the disk is full"), stderr
    assert "4 finished part(s) are kept; free space, then finish the run with: " in stderr
    monkeypatch.undo()
    attempt = (".hydra", "run.log")  # what records the attempt itself
    data = lambda snapshot: {k: v for k, v in snapshot.items() if not k.startswith(attempt)}  # noqa: E731
    assert data(files(run_dir)) == data(before)

    code, _, stderr = run_spectra_inprocess(*ARGS, f"hydra.run.dir={run_dir}", "run.resume=true")
    assert code == 0, stderr
    record = json.loads((run_dir / "run.json").read_text())
    assert record == json.loads(before["run.json"]) and record["timing"]["tokens_per_second"] > 0


def test_a_users_own_files_are_never_replaced(tmp_path):
    """A folder is a Spectra run only if its own manifest says so: following the advice (run.resume=true) on a
    folder holding the user's run.json, or a manifest.jsonl of theirs, changes nothing."""
    for name, text in (("run.json", '{"mine": true}\n'), ("manifest.jsonl", "my own notes\n")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / name).write_text(text)
        for resume in ("run.resume=false", "run.resume=true"):
            code, _, stderr = run_spectra_inprocess(*ARGS, f"hydra.run.dir={folder}", resume)
            assert code == 2 and "Spectra never replaces files it did not write" in error_line(stderr), stderr
            assert "pass run.resume=true" not in stderr
            assert (folder / name).read_text() == text


def test_a_lock_that_is_a_symlink_or_a_directory_is_one_line_and_left_alone(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    linked, directory = tmp_path / "linked", tmp_path / "directory"
    linked.mkdir()
    (linked / ".spectra.lock").symlink_to(target)
    (directory / ".spectra.lock").mkdir(parents=True)
    for folder, what in ((linked, "a symbolic link"), (directory, "a directory")):
        for attempt in (FolderLock(folder, "hydra.run.dir").check_free, FolderLock(folder, "hydra.run.dir").__enter__):
            with pytest.raises(ConfigError, match=f"hydra.run.dir: .*spectra.lock is {what}, not Spectra's lock file"):
                attempt()
    assert target.read_text() == "keep me\n" and (directory / ".spectra.lock").is_dir()
    # Through the entrypoint: one line, exit 2.
    code, _, stderr = run_spectra_inprocess(*ARGS, f"hydra.run.dir={linked}")
    assert code == 2 and "is a symbolic link" in error_line(stderr) and target.read_text() == "keep me\n"


# ------------------------------------------------------------------------------------- one integrity rule
def test_a_part_line_with_other_settings_is_refused_even_under_a_matching_header(tmp_path, finished):
    """A part and its line copied from a run with other settings (or a header edited to match): the line's own
    settings hash decides; nothing is deleted, and every reader refuses it too."""
    run_dir = copy_run(finished, tmp_path / "run")
    manifest = run_dir / "manifest.jsonl"
    lines = manifest.read_text().splitlines(keepends=True)
    stranger = json.loads(lines[2])
    stranger["settings"] = "0123456789abcdef"  # the hash of another run's settings
    manifest.write_text(lines[0] + lines[1] + json.dumps(stranger) + "\n" + "".join(lines[3:]))
    before = files(run_dir)

    code, _, stderr = run_spectra_inprocess(*ARGS, f"hydra.run.dir={run_dir}", "run.resume=true")
    line = error_line(stderr)
    assert code == 2 and f"lists {stranger['part']} with another settings hash than its header's" in line, line
    assert files(run_dir) == before
    with pytest.raises(SpectraError, match=f"{stranger['part']}: its line in manifest.jsonl has another settings"):
        verified_parts(run_dir)


def test_every_reader_refuses_a_damaged_unlisted_or_unmanifested_part(tmp_path, finished):
    from spectra.analysis.runs import scan_metrics
    from spectra.sql import verify_runs
    from spectra.tracking.tracker import metric_parts

    run_dir = copy_run(finished, tmp_path / "run")
    assert [p.name for p in verified_parts(run_dir)] == [f"part-00000{i}.parquet" for i in range(4)]
    damage_in_place(run_dir / "metrics" / "part-000002.parquet")
    views = tmp_path / "views"
    views.mkdir()
    (views / "duckdb_views.sql").write_text(f"SELECT * FROM read_parquet('../run/metrics/part-*.parquet');\n")
    for reader in (verified_parts, scan_metrics, metric_parts, lambda _: verify_runs(views)):
        with pytest.raises(SpectraError, match=r"part-000002.parquet: sha256 differs .* hydra.run.dir="):
            reader(run_dir)

    shutil.copy(finished / "metrics" / "part-000002.parquet", run_dir / "metrics")  # repaired
    shutil.copy(run_dir / "metrics" / "part-000002.parquet", run_dir / "metrics" / "part-000009.parquet")
    with pytest.raises(SpectraError, match=r"part-000009.parquet: not listed in any manifest .* or delete the file"):
        verified_parts(run_dir)
    (run_dir / "metrics" / "part-000009.parquet").unlink()
    (run_dir / "manifest.jsonl").unlink()
    with pytest.raises(SpectraError, match=r"no Spectra manifest \(manifest.jsonl\) lists its parts"):
        scan_metrics(run_dir)


def test_a_killed_sliding_window_run_keeps_its_windows_for_the_analysis(tmp_path):
    """The windows are in the manifest header, written before any part: a run killed before run.json is still
    analysed with the keys its layers saw (not the full causal prefix)."""
    from spectra.analysis.runs import attention_windows

    run_dir = tmp_path / "run"
    code, _, stderr = run_spectra_inprocess(
        "model=tiny_gemma2", "data=synthetic", "data.context_length=16", "data.n_samples=1", "logger=none",
        f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert code == 0, stderr
    recorded = json.loads((run_dir / "run.json").read_text())["model"]["attention_windows"]
    assert any(isinstance(window, int) for window in recorded)  # tiny_gemma2 alternates sliding and full layers
    (run_dir / "run.json").unlink()  # killed before it was written
    assert read_manifest(run_dir / "manifest.jsonl")[0]["attention_windows"] == recorded
    assert attention_windows(run_dir, {}) == recorded


def test_other_weights_at_the_same_model_path_are_refused_on_resume(tmp_path):
    from checkpoints import hub_model_overrides, save_tiny_checkpoint

    checkpoint = tmp_path / "checkpoint"
    save_tiny_checkpoint(checkpoint)
    cfg = compose_config(*hub_model_overrides(checkpoint), "data=synthetic")
    original = fingerprint(cfg)
    assert set(original["weights"]) == {"config.json", "generation_config.json", "model.safetensors"}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    Manifest(run_dir / "manifest.jsonl", original)
    os.utime(checkpoint / "model.safetensors", ns=(0, 0))  # touched or copied: still the same weights
    assert fingerprint(cfg) == original
    save_tiny_checkpoint(checkpoint, nan_query_heads=((1, 0),))  # a re-save with other weights, same size
    with pytest.raises(ConfigError, match=r"run.resume: .* other settings \(weights.model.safetensors: '"):
        inspect_run_directory(run_dir, fingerprint(cfg), True, "hydra.run.dir")


# ------------------------------------------------------------------------------------- signals
@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGHUP])
def test_stop_signals_and_ctrl_c_end_in_one_line_naming_the_signal(number, capsys):
    with pytest.raises(SystemExit) as stop:
        with stop_signals_as_interrupt(), ends_in_one_line(lambda: "fault", lambda: "what to do"):
            os.kill(os.getpid(), number)
            time.sleep(5)  # the handler raises before this ends
    assert stop.value.code == 130
    assert capsys.readouterr().err == f"spectra: interrupted ({signal.Signals(number).name}); what to do\n"
    with pytest.raises(SystemExit), ends_in_one_line(lambda: "fault", lambda: "what to do"):
        raise KeyboardInterrupt  # Ctrl-C: no args; the line used to read "interrupted ()"
    assert capsys.readouterr().err == "spectra: interrupted (SIGINT); what to do\n"


def test_signals_held_delays_an_interrupt_until_the_block_ends():
    done = []
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        with signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            done.append("the renames")
    assert done == ["the renames"]


def test_ctrl_c_during_imports_is_one_line(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "spectra.run", *ARGS, f"hydra.run.dir={tmp_path / 'run'}"],
                               cwd=REPO, env=conftest.test_env(tmp_path), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while "libtorch" not in Path(f"/proc/{process.pid}/maps").read_text():  # torch is being imported
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr[-3000:]
    assert stderr == "spectra: interrupted (SIGINT) while starting; nothing was written\n"
    assert not (tmp_path / "run").exists()


def test_sighup_stops_a_run_whose_line_gives_the_exact_command_that_finishes_it(tmp_path, finished):
    run_dir = tmp_path / "my run"  # a space: the command must be quoted
    env = {**conftest.test_env(tmp_path), "SPECTRA_CRASH_AT": "attention-layer:8", "SPECTRA_CRASH_SIGNAL": "SIGHUP"}
    argv = [*ARGS, f"hydra.run.dir={run_dir}"]
    process = conftest.spectra_subprocess("spectra.run", argv, env, timeout=300)
    line = error_line(process.stderr)
    assert process.returncode == 130, process.stderr[-3000:]
    prefix = "spectra: interrupted (SIGHUP); 2 finished part(s) are kept; finish the run with: "
    assert line.startswith(prefix), line
    command = shlex.split(line[len(prefix) :])
    assert command == [sys.executable, "-m", "spectra.run", *ARGS, "run.resume=true", f"hydra.run.dir={run_dir}"]
    code, _, stderr = run_spectra_inprocess(*command[3:])  # the command itself, run
    assert code == 0, stderr
    assert files(run_dir / "metrics") == files(finished / "metrics")


# ------------------------------------------------------------------------------------- kills at random moments
@pytest.mark.slow
def test_kills_at_random_moments_lose_nothing(tmp_path, finished):
    """SIGKILL at random moments of a run (each attempt resuming the last), then a resume: the parts are the
    uninterrupted run's, byte for byte, and run.json counts every row once. The seed is in the failure message."""
    seed = random.randrange(2**32)
    # Milliseconds after the first output: the run ends ~0.55 s after it on this quiet 2-core machine (forked),
    # so moments past ~1 s would mostly kill a process that has already finished.
    moments = random.Random(seed).sample(range(0, 1000, 10), 2)
    run_dir = tmp_path / "run"
    for milliseconds in moments:
        process = conftest.spectra_process("spectra.run", [*ARGS, f"hydra.run.dir={run_dir}", "run.resume=true"],
                                           conftest.test_env(tmp_path), discard_stdout=True)  # fmt: skip
        assert process.stderr.read(len("capture:")) is not None  # the first output: the model is loaded
        time.sleep(milliseconds / 1000)
        process.kill()
        process.communicate(timeout=60)
    code, _, stderr = run_spectra_inprocess(*ARGS, f"hydra.run.dir={run_dir}", "run.resume=true")
    assert code == 0, (seed, moments, stderr)
    assert files(run_dir / "metrics") == files(finished / "metrics"), (seed, moments)
    assert json.loads((run_dir / "run.json").read_text())["counts"]["rows"] == 4 * 3 * 8 * 16


# ------------------------------------------------------------------------------------- sweeps and re-analysis
def test_a_resumed_sweep_with_its_values_reordered_finds_each_jobs_folder(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from spectra.config.paths import config_dir

    sweep = tmp_path / "sweep"
    (sweep / "1_data.context_length=16").mkdir(parents=True)  # job 1 of `data.context_length=32,16`
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        job = compose(config_name="config", overrides=[f"hydra.sweep.dir={sweep}"], return_hydra_config=True)
    folders = []
    for number, overrides in enumerate(["data.context_length=16", "data.context_length=32"]):  # `16,32`: reordered
        with open_dict(job):
            job.hydra.job.num, job.hydra.job.override_dirname = number, overrides
        folders.append(job.hydra.sweep.subdir)
    assert folders == ["1_data.context_length=16", "1_data.context_length=32"]  # the old folder; a new one


def test_one_empty_job_does_not_stop_a_sweeps_analysis(tmp_path, finished, capsys):
    from spectra.analysis.runs import find_runs

    sweep = tmp_path / "sweep"
    copy_run(finished, sweep / "0_a")
    (sweep / "1_b" / "metrics").mkdir(parents=True)  # killed before its first part
    assert find_runs(str(sweep)) == ([sweep / "0_a"], sweep)
    assert f"spectra: note: {sweep / '1_b'} has no parts yet; left out of the analysis" in capsys.readouterr().err
    shutil.rmtree(sweep / "0_a")
    with pytest.raises(ConfigError, match="none of its 1 runs has written a part yet"):
        find_runs(str(sweep))


def test_an_interrupted_reanalysis_leaves_the_earlier_one_whole(tmp_path, finished, monkeypatch):
    from test_analyze import analyze_config

    from spectra import analyze as analyze_module

    run_dir = copy_run(finished, tmp_path / "run")
    analyze_module.analyze(analyze_config(f"run_dir={run_dir}", "bootstrap=20", "export=csv", "figures=false"))
    earlier = files(run_dir / "analysis")
    assert "metrics.csv" in earlier and "report.md" in earlier

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C after the tables were written
        time.sleep(5)

    monkeypatch.setattr(analyze_module.report, "write_run_report", interrupted)
    with pytest.raises(KeyboardInterrupt):
        analyze_module.analyze(analyze_config(f"run_dir={run_dir}", "bootstrap=30", "figures=false"))
    assert files(run_dir / "analysis") == earlier  # not a file of the second analysis, none of the first lost
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".analysis")) == []  # staging removed
