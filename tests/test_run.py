"""The real entrypoint, end to end: run directory layout, row counts, column types, bad config values."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch
from conftest import REPO, compose_config, run_spectra

from spectra.capture.hook import AttentionCapture
from spectra.config.schema import checked_config
from spectra.data.load import load_samples
from spectra.errors import ConfigError
from spectra.models.loading import load_model

TINY = ("model=tiny_llama", "data=synthetic", "data.context_length=24", "data.n_samples=5", "hardware.batch_size=2")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("tiny")
    result = run_spectra(tmp_path, *TINY, "logger=none")
    assert result.returncode == 0, result.stderr
    return tmp_path / "run", result


def test_run_directory_layout_and_row_count(tiny_run):
    run_dir, result = tiny_run
    parts = sorted(p.name for p in (run_dir / "metrics").iterdir())
    # 5 samples in batches of 2 -> 3 parts, named by their first sample id; no temporary files left behind
    assert parts == ["part-000000.parquet", "part-000002.parquet", "part-000004.parquet"]
    frame = pl.read_parquet(run_dir / "metrics" / "*.parquet")
    layers, heads, tokens, samples = 3, 8, 24, 5
    assert frame.height == samples * layers * heads * tokens
    assert frame.schema == pl.Schema(
        {
            "sample_id": pl.Int32, "layer": pl.Int16, "head": pl.Int16, "token_pos": pl.Int32,
            "query_norm": pl.Float32, "entropy": pl.Float32, "max_attn": pl.Float32, "k_eff": pl.Int32,
        }
    )  # fmt: skip
    # every (sample, layer, head, token) exactly once
    assert frame.select(pl.struct("sample_id", "layer", "head", "token_pos").n_unique()).item() == frame.height
    assert frame["k_eff"].min() >= 1 and (frame["k_eff"] <= frame["token_pos"] + 1).all()

    record = json.loads((run_dir / "run.json").read_text())
    assert record["counts"]["rows"] == record["counts"]["expected_rows"] == frame.height
    assert (record["model"]["layers"], record["model"]["heads"], record["model"]["kv_heads"]) == (3, 8, 2)
    assert record["config"]["data"]["context_length"] == tokens
    assert record["versions"]["torch"] == torch.__version__
    assert record["timing"]["tokens_per_second"] > 0
    assert "Spectra run complete" in result.stdout and f"{frame.height:,}" in result.stdout
    # What README's Output section lists, and nothing else; run.log holds this run's lines only (one per layer)
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".hydra", ".spectra.lock", "manifest.jsonl", "metrics", "run.json", "run.log", "samples.parquet"
    ]
    paths = [line for line in (run_dir / "run.log").read_text().splitlines() if "attention metrics on the" in line]
    assert len(paths) == layers, paths


def test_written_values_equal_a_direct_capture(tiny_run):
    """The Parquet rows hold what the capture computed for those very samples."""
    run_dir, _ = tiny_run
    samples = pl.read_parquet(run_dir / "samples.parquet").sort("sample_id")
    assert samples["sample_id"].to_list() == list(range(5))
    assert samples["source"].unique().to_list() == ["synthetic"]
    input_ids = torch.tensor(samples["input_ids"].to_list())  # (5, 24)

    cfg = compose_config(*TINY)
    model, _ = load_model(cfg.model, cfg.hardware)
    with AttentionCapture(model) as capture:
        expected = capture.run(input_ids)  # name -> (L, B, H, T)
    frame = pl.read_parquet(run_dir / "metrics" / "*.parquet").sort("sample_id", "layer", "head", "token_pos")
    for name in ("query_norm", "entropy", "max_attn", "k_eff"):
        values = expected[name].permute(1, 0, 2, 3).reshape(-1).numpy()  # (B*L*H*T,) in row order
        np.testing.assert_array_equal(frame[name].to_numpy(), values)


BUILTIN = ("model=tiny_llama", "data=builtin", "data.context_length=64", "data.n_samples=3")


def test_builtin_corpus_windows_are_real_text():
    cfg = compose_config(*BUILTIN)
    _, tokenizer = load_model(cfg.model, cfg.hardware)
    samples = load_samples(cfg.data, tokenizer, 128256)
    assert [len(s.input_ids) for s in samples] == [64, 64, 64]
    assert len({tuple(s.input_ids) for s in samples}) == 3
    text = tokenizer.decode(samples[0].input_ids)
    assert sum(c.isalpha() for c in text) > 0.5 * len(text)  # prose, not noise
    again = load_samples(cfg.data, tokenizer, 128256)
    assert [s.input_ids.tolist() for s in again] == [s.input_ids.tolist() for s in samples]  # seeded
    other = load_samples(compose_config(*BUILTIN, "data.seed=1").data, tokenizer, 128256)
    assert [s.window_index for s in other] != [s.window_index for s in samples]


def test_too_many_samples_names_the_key_and_the_count():
    cfg = compose_config("model=tiny_llama", "data=builtin", "data.context_length=4096", "data.n_samples=1000")
    _, tokenizer = load_model(cfg.model, cfg.hardware)
    with pytest.raises(ConfigError, match=r"data.n_samples: 1000 asked for, but the built-in corpus holds only \d+"):
        load_samples(cfg.data, tokenizer, 128256)


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.context_length=0", "data.context_length: must be > 0"),
        ("data.n_samples=-3", "data.n_samples: must be > 0"),
        ("hardware.batch_size=0", "hardware.batch_size: must be > 0"),
        ("metrics.k_eff_threshold=1.5", "metrics.k_eff_threshold: must be in (0, 1]"),
        ("metrics.k_eff_threshold=0", "metrics.k_eff_threshold: must be in (0, 1]"),
        ("metrics.attention=pre-rope", "metrics.attention: must be post_rope or pre_rope"),
        ("metrics.names=[entropy,perplexity]", "metrics.names: unknown metric(s) ['perplexity']"),
        ("hardware.dtype=float8", "hardware.dtype: must be one of"),
        ("hardware.device=tpu", "hardware.device: must be cpu, cuda or cuda:N"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as error:
        checked_config(compose_config(override))
    assert message in str(error.value)


def test_plus_override_of_unknown_key_is_rejected():
    with pytest.raises(ConfigError, match="data.context_lenght"):
        checked_config(compose_config("+data.context_lenght=5"))


def test_entrypoint_reports_bad_config_in_one_line(tmp_path):
    result = run_spectra(tmp_path, "model=tiny_llama", "data.n_samples=0", "logger=none")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "spectra: error: data.n_samples: must be > 0, got 0"
    assert "Traceback" not in result.stderr


def test_typo_in_key_is_rejected_by_the_schema(tmp_path):
    result = run_spectra(tmp_path, "data.context_lenght=5", "logger=none")
    assert result.returncode != 0
    assert "context_lenght" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "group", sorted(p.name for p in (REPO / "conf").iterdir() if p.is_dir() and p.name not in ("hydra",))
)
def test_every_config_file_composes(group):
    options = sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))
    assert options
    for option in options:
        cfg = checked_config(compose_config(f"{group}={option}"))
        assert cfg[group] is not None


@pytest.mark.slow
def test_default_model_through_the_entrypoint(tmp_path):
    """The README's main job, shortened: the embedded SmolLM2 on the built-in corpus."""
    result = run_spectra(tmp_path, "data.context_length=32", "data.n_samples=2", "logger=none")
    assert result.returncode == 0, result.stderr
    frame = pl.scan_parquet(tmp_path / "run" / "metrics" / "*.parquet")
    assert frame.select(pl.len()).collect().item() == 2 * 30 * 9 * 32
    samples = pl.read_parquet(tmp_path / "run" / "samples.parquet")
    assert samples["source"].to_list() == ["python-stdlib-docstrings"] * 2
