"""The command line as people type it: Hydra's flags anywhere (`-m` after the overrides), argparse-level
mistakes and bad sweep values as one `spectra: error:` line, and a resumed finished run keeping its timings."""

from __future__ import annotations

import json

import pytest
from conftest import run_spectra, run_spectra_inprocess
from test_validation import assert_one_line_error

from spectra.config.command_line import flags_first
from spectra.errors import SpectraError


def test_flags_move_before_the_overrides_in_their_order():
    assert flags_first(["data.n_samples=2", "-m", "data.context_length=16,32"]) == [
        "-m", "data.n_samples=2", "data.context_length=16,32",
    ]  # fmt: skip
    assert flags_first(["a=1", "--cfg", "job", "b=2"]) == ["--cfg", "job", "a=1", "b=2"]
    assert flags_first(["a=1", "-c=job", "--multirun"]) == ["-c=job", "--multirun", "a=1"]
    assert flags_first(["--info", "config", "a=1"]) == ["--info", "config", "a=1"]  # --info takes an optional value
    assert flags_first(["--info", "a=1"]) == ["a=1", "--info"]  # no value: last, so it takes no override


SWEEP_JOB = r"sweep job 0 \([^)]*\): "


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["--cfg"], r"argument --cfg/-c: expected one argument"),
        (["--bogus", "data.n_samples=2"], r"unrecognized arguments: --bogus"),
        (["--cfg", "everything"], r"argument --cfg/-c: invalid choice: 'everything'"),
        # A sweep is checked point by point before any job starts; the line names the point.
        (["data.context_length=16,32", "-m", "data.n_samples=two"], SWEEP_JOB + r"data\.n_samples: Value 'two'"),
        (["-m", "model=nope,tiny_llama"], SWEEP_JOB + r"model: no option 'nope'"),
        (["data.context_lenght=16,32", "--multirun"], SWEEP_JOB + r"data\.context_lenght: no such key"),
    ],
)
def test_command_line_mistakes_are_one_line(tmp_path, argv, pattern):
    code, stdout, stderr = run_spectra_inprocess(f"hydra.sweep.dir={tmp_path / 'sweep'}", *argv)
    assert_one_line_error(code, stdout, stderr, pattern)
    with pytest.raises(SpectraError, match="unrecognized"):
        flags_first(["--nope"])


def test_multirun_flag_after_the_overrides_runs_the_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_spectra(tmp_path, "model=tiny_llama", "data=synthetic", "data.n_samples=1",
                         "data.context_length=8,12", "logger=none", f"hydra.sweep.dir={sweep}", "-m")  # fmt: skip
    assert result.returncode == 0, result.stderr
    lengths = sorted(json.loads(p.read_text())["config"]["data"]["context_length"] for p in sweep.glob("*/run.json"))
    assert lengths == [8, 12]


def test_resuming_a_finished_run_keeps_its_timings(tmp_path):
    args = ("model=tiny_llama", "data=synthetic", "data.n_samples=2", "data.context_length=8", "logger=none")
    assert run_spectra(tmp_path, *args).returncode == 0
    first = json.loads((tmp_path / "run" / "run.json").read_text())["timing"]
    assert first["tokens_per_second"] > 0
    result = run_spectra(tmp_path, *args, "run.resume=true")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "run" / "run.json").read_text())["timing"] == first
