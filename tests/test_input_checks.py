"""Config values and command lines checked where they enter, each ending in one line naming the key: numbers
range-checked before anything is sized from them, model shapes, dry runs that compute from counts and leave
nothing behind, analyze's own command line, SQL on any folder Hydra makes, preparation faults.

    python -m pytest tests/test_input_checks.py -q
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf
from conftest import REPO, compose_config, run_spectra_inprocess

from spectra.config.schema import checked_config
from spectra.errors import ConfigError, SpectraError, disk_fault
from spectra.models.checks import check_model

TINY = ["model=tiny_llama", "data=synthetic", "data.context_length=16", "logger=none"]


@pytest.fixture(scope="module")
def tiny_config():
    return compose_config("model=tiny_llama", "data.context_length=16")  # composed once: ~1 s each under load


def changed(cfg, key: str, value):
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    OmegaConf.update(cfg, key, value)
    return cfg


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("data.seed", -1, r"data\.seed: must be in 0 \.\. 9,223,372,036,854,775,807"),
        ("model.seed", 10**20, r"model\.seed: must be in 0 \.\."),
        ("hardware.num_threads", 100000, r"hardware\.num_threads: must be <= 1024"),
        ("data.n_samples", 2**31, r"data\.n_samples: must be <= 2,147,483,647"),
        ("data.context_length", 2**31, r"data\.context_length: must be <= 2,147,483,647"),
        ("model.name", "../..", r"model\.name: '\.\./\.\.' is not a folder-safe label"),
    ],
)
def test_numbers_are_range_checked(tiny_config, key, value, message):
    with pytest.raises(ConfigError, match=message):
        checked_config(changed(tiny_config, key, value))


def test_edges_of_the_ranges_pass(tiny_config):
    cfg = checked_config(changed(changed(tiny_config, "model.seed", 2**63 - 1), "hardware.num_threads", 1024))
    assert cfg.model.seed == 2**63 - 1 and cfg.hardware.num_threads == 1024


def test_model_seed_1e20_from_the_command_line_is_one_line():
    code, _, stderr = run_spectra_inprocess(*TINY, "model.seed=1e20")
    assert code == 2 and stderr.count("\n") == 1 and stderr.startswith("spectra: error: model.seed: "), stderr


def tiny_with(cfg, **architecture):
    tiny = yaml.safe_load((REPO / "conf" / "model" / "tiny_llama.yaml").read_text())
    return changed(cfg, "model.architecture", {**tiny["architecture"], **architecture})


@pytest.mark.parametrize(
    "architecture, message",
    [
        ({"head_dim": -8}, r"model\.architecture\.head_dim: must be a whole number >= 1, got -8"),
        ({"num_attention_heads": 0}, r"model\.architecture\.num_attention_heads: must be a whole number >= 1, got 0"),
        ({"num_hidden_layers": 0}, r"model\.architecture\.num_hidden_layers: must be a whole number >= 1, got 0"),
        ({"num_key_value_heads": 3}, r"model\.architecture\.num_key_value_heads: 3 does not divide"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": float("nan")}},
         r"model\.architecture\.rope_parameters\.rope_theta: must be a finite number > 0, got nan"),
    ],
)  # fmt: skip
def test_model_shapes_name_the_field(tiny_config, architecture, message):
    with pytest.raises(ConfigError, match=message):
        check_model(tiny_with(tiny_config, **architecture))


def test_a_checkpoint_config_with_zero_layers_names_the_checkpoint(tmp_path):
    from checkpoints import save_tiny_checkpoint

    save_tiny_checkpoint(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 0}))
    cfg = compose_config("model=llama3_8b", f"model.path={tmp_path}", "data.context_length=16")
    with pytest.raises(SpectraError, match=rf"num_hidden_layers in the config of {re.escape(str(tmp_path))}: must be"):
        check_model(cfg)


# -------------------------------------------------------------------------------------------------- dry runs
def test_dry_run_of_1e8_samples_counts_and_leaves_nothing(tmp_path):
    """No sample is built (the memory guard of a real run would refuse 1e8 x 16 tokens on a small machine; the dry
    run never reaches it), no folder is made, and the time is estimated from the stated basis."""
    run_dir = tmp_path / "outputs" / "run"
    with mock.patch("spectra.data.load.check_fits_in_memory", side_effect=AssertionError("samples were built")):
        code, stdout, stderr = run_spectra_inprocess(
            *TINY, "data.n_samples=100000000", "run.dry_run=true", f"hydra.run.dir={run_dir}"
        )
    assert code == 0, stderr
    assert "100,000,000 x 16 tokens = 1,600,000,000 tokens" in stdout
    assert f"{100_000_000 * 3 * 8 * 16:,} = samples x layers x heads x tokens" in stdout
    assert re.search(r"time +~[\d.]+ (h|days) of capture.*estimated from SmolLM2-135M on a 2-core CPU", stdout)
    assert not (tmp_path / "outputs").exists()


def test_a_sweeps_dry_run_prints_a_total(tmp_path):
    code, stdout, stderr = run_spectra_inprocess(
        "-m", *TINY, "data.n_samples=3,5", "run.dry_run=true", f"hydra.sweep.dir={tmp_path / 'sweep'}"
    )
    assert code == 0, stderr
    assert stdout.count("Spectra dry run: checks passed") == 2
    rows = 8 * 3 * 8 * 16
    assert f"sweep total: 2 jobs, 8 samples, 128 tokens, {rows:,} rows" in stdout.splitlines()[-1]
    assert not (tmp_path / "sweep").exists()


def test_a_real_run_too_large_for_memory_is_refused_before_allocating():
    from spectra.data.load import load_samples

    cfg = compose_config("data=synthetic", "data.context_length=1024", f"data.n_samples={2**31 - 1}")
    with pytest.raises(ConfigError, match=r"data\.n_samples: 2,147,483,647 samples x 1,024 tokens need 16,384\.0 GiB"):
        load_samples(cfg.data, None, 100)


def test_a_sweep_folder_name_over_255_bytes_is_one_line(tmp_path):
    long = "x" * 300
    code, _, stderr = run_spectra_inprocess(
        "-m", *TINY, "data.n_samples=1", f"logger.project={long},b", f"hydra.sweep.dir={tmp_path}"
    )
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert re.match(r"spectra: error: sweep job 0 \(logger\.project=x{300}\): hydra\.sweep\.dir: the folder name "
                    r"0_data\.context_length=16,data\.n_samples=\.\.\. is \d+ bytes, more than the 255", stderr)  # fmt: skip
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------- spectra.analyze
def analyze_inprocess(*argv: str) -> tuple[int, str, str]:
    import contextlib
    import io
    import sys

    from spectra.analyze import cli

    stdout, stderr = io.StringIO(), io.StringIO()
    with mock.patch.object(sys, "argv", ["spectra.analyze", *argv]):
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                cli()
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run_dir=x", "seedx=1"], "seedx: no such key; `python -m spectra.analyze --cfg job` lists them all"),
        (["run_dir=x", "seed=-1"], "seed: must be in 0 .. 2**63 - 1"),
        (["run_dir=x", "bootstrap=many"], "bootstrap: Value 'many' of type 'str' could not be converted to Integer"),
        (["run_dir=x", "logger=nope"], "logger: no option 'nope'; choose one of none, wandb"),
        (["run_dir=x", "figures=maybe"], "figures: Value 'maybe' is not a valid bool (type str)"),
    ],
)
def test_analyze_command_line_mistakes_are_one_line_exit_2(argv, message):
    code, _, stderr = analyze_inprocess(*argv)
    assert code == 2 and stderr.count("\n") == 1 and stderr.startswith(f"spectra: error: {message}"), stderr


def test_analyze_help_lists_its_own_options_only():
    code, stdout, _ = analyze_inprocess("--help")
    assert code == 0
    assert "skip_positions: 2" in stdout and "bootstrap: 1000" in stdout
    assert not re.search(r"^(model|data|hardware|metrics):", stdout, re.M), stdout


def test_an_analysis_output_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "run" / "metrics").mkdir(parents=True)
    (tmp_path / "taken").write_text("")
    code, _, stderr = analyze_inprocess(f"run_dir={tmp_path / 'run'}", f"output_dir={tmp_path / 'taken'}")
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert f"output_dir: cannot create {tmp_path / 'taken'}: {tmp_path / 'taken'} is a file" in stderr


# ------------------------------------------------------------------------------------------- spectra.prepare
def test_prepare_disk_full_in_np_save_is_one_line(tmp_path):
    """numpy's short write is an OSError without errno; it reaches the entrypoint as ENOSPC, naming the file."""
    from spectra.data.shards import _ShardWriter

    writer = _ShardWriter(tmp_path, 1 << 20)
    writer.add(np.arange(10))
    short_write = OSError("40 requested and 0 written")
    free = shutil.disk_usage(tmp_path)._replace(free=0)
    with mock.patch("numpy.save", side_effect=short_write), mock.patch("shutil.disk_usage", return_value=free):
        with pytest.raises(OSError) as error:
            writer.flush()
    assert error.value.errno == errno.ENOSPC
    assert disk_fault(error.value) == f"the disk is full (writing {tmp_path / 'tokens-00000.npy'})"


def test_prepare_makes_no_hydra_run_folder(tmp_path, monkeypatch):
    """From a folder where outputs/ cannot be made (a file here; read-only alike), preparation still runs its own
    checks: Hydra is given no run folder to create."""
    import contextlib
    import io
    import sys

    from spectra.prepare import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").write_text("not a folder")
    stderr = io.StringIO()
    argv = ["spectra.prepare", "model=tiny_llama", "data=synthetic"]
    with mock.patch.object(sys, "argv", argv), contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as end:
        cli()
    assert end.value.code == 2
    assert stderr.getvalue() == "spectra: error: data: is 'synthetic'; preparation needs data=slimpajama\n"


# ----------------------------------------------------------------------------------------------- spectra.sql
def test_sql_on_a_folder_with_commas_and_brackets(tmp_path):
    """Every Hydra sweep job folder has commas (DuckDB's file_search_path is comma-separated) and a list-valued
    override gives it [ ] (a glob character class): the views read the files by absolute path."""
    import polars as pl

    from spectra.analysis.exports import ViewSource, duckdb_views
    from spectra.sql import views

    run = tmp_path / "0_data.n_samples=3,metrics.names=[entropy,k_eff]"
    (run / "metrics").mkdir(parents=True)
    (run / "analysis").mkdir()
    for first in (0, 2):
        pl.DataFrame({"sample_id": [first, first + 1], "layer": [0, 0], "head": [0, 0], "token_pos": [1, 1],
                      "entropy": [0.5, 0.25]}).write_parquet(run / "metrics" / f"part-{first:06d}.parquet")  # fmt: skip
    for table in ("heads", "correlations", "positions"):
        pl.DataFrame({"layer": [0]}).write_parquet(run / "analysis" / f"{table}.parquet")
    duckdb_views([ViewSource("r", run, run / "analysis", ["entropy"])], run / "analysis" / "duckdb_views.sql")
    connection = views(run / "analysis")
    assert connection.sql("SELECT count(*), sum(entropy) FROM metrics").fetchall() == [(4, 1.5)]
    os.remove(run / "analysis" / "correlations.parquet")
    with pytest.raises(SpectraError, match=r"duckdb_views\.sql: its views cannot be opened .*correlations\.parquet"):
        views(run / "analysis")


# ------------------------------------------------------------------------------------------------ credentials
def test_a_token_shaped_value_is_refused_without_any_environment_variable(tmp_path, monkeypatch):
    for name in ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    token = "hf_" + "a1B2" * 9
    code, _, stderr = run_spectra_inprocess(*TINY, f"logger.entity={token}", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2 and stderr.startswith("spectra: error: logger.entity: credentials are never taken") and token not in stderr
    assert not (tmp_path / "run").exists()


def test_a_secret_in_a_config_dir_yaml_is_refused_before_anything_is_written(tmp_path):
    extra = tmp_path / "conf" / "logger"
    extra.mkdir(parents=True)
    (extra / "mine.yaml").write_text("defaults: [base_logger, _self_]\nname: none\nentity: hf_" + "x9" * 18 + "\n")
    code, _, stderr = run_spectra_inprocess(
        "--config-dir", str(tmp_path / "conf"), *TINY, "logger=mine", f"hydra.run.dir={tmp_path / 'run'}"
    )
    assert code == 2 and stderr.startswith("spectra: error: logger.entity: credentials are never taken"), stderr
    assert not list((tmp_path / "run").rglob("*")) if (tmp_path / "run").exists() else True  # Hydra's empty folder
