"""spectra/models/converted.py: a GGUF model's converted copy loads the model transformers builds from the GGUF
itself, bit for bit (weights, config, tokenizer, captured metrics); a damaged copy is set aside and made again; a
cache that refuses writes changes nothing but the speed. On the first two blocks of the real SmolLM2 GGUF (real
Q4_1 and Q8_0 tensors, the real 49,152-token vocabulary), cut by scripts/gguf_layers.py (conftest)."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch
import transformers
from conftest import compose_config

from spectra.capture.hook import AttentionCapture
from spectra.models import converted
from spectra.models.loading import load_model
TEXT = "<|im_start|>user\nAttention sinks, délimiteurs and the lazy dog 42.<|im_end|>"


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, smollm2_two_blocks):
    """(GGUF folder, converted-copy root, the model and tokenizer loaded from the GGUF, the same from its copy)."""
    folder, cache = smollm2_two_blocks[1].parent, tmp_path_factory.mktemp("cache")
    cfg = compose_config("model=smollm2_135m", f"model.path={folder}", "model.package=null", "model.gguf_file=two.gguf")
    loads = []
    from_pretrained = transformers.AutoModelForCausalLM.from_pretrained

    def recorded(location, **options):
        loads.append((location, options))
        return from_pretrained(location, **options)

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recorded)
        from_gguf = load_model(cfg.model, cfg.hardware)  # transformers reads the GGUF; the copy is kept
        assert [options.get("gguf_file") for _, options in loads] == ["two.gguf"]
        from_copy = load_model(cfg.model, cfg.hardware)
    root = cache / "spectra" / "models" / "converted"
    (copy,) = root.iterdir()
    assert loads[-1][0] == str(copy) and "gguf_file" not in loads[-1][1]
    return folder, root, from_gguf, from_copy


def captured(model, tokenizer):
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    with AttentionCapture(model, k_eff_threshold=0.9, extended=True) as capture:
        return ids, capture.run(ids)


def test_the_converted_copy_is_the_gguf_model_bit_for_bit(loaded):
    folder, root, (reference, reference_tokenizer), (model, tokenizer) = loaded
    (copy,) = root.iterdir()
    record = json.loads((copy / converted.RECORD).read_text())
    assert record["source_sha256"] == converted.sha256_file(folder / "two.gguf")
    assert set(record["files"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert copy.name.startswith(record["source_sha256"][:16])

    expected = reference.state_dict()
    assert model.state_dict().keys() == expected.keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    assert type(model) is type(reference) and model.config.num_hidden_layers == 2
    for key, value in reference.config.to_dict().items():
        if key not in ("quantization_config", "_name_or_path", "transformers_version"):
            assert model.config.to_dict().get(key) == value, key
    assert tokenizer(TEXT)["input_ids"] == reference_tokenizer(TEXT)["input_ids"]
    assert tokenizer.chat_template == reference_tokenizer.chat_template
    assert (tokenizer.bos_token, tokenizer.eos_token) == (reference_tokenizer.bos_token, reference_tokenizer.eos_token)

    ids, got = captured(model, tokenizer)
    _, want = captured(reference, reference_tokenizer)
    assert ids.shape[1] > 15 and got.keys() == want.keys()
    for name, value in got.items():
        assert torch.equal(value, want[name]), name


def test_a_damaged_copy_is_set_aside(loaded, monkeypatch, caplog, tmp_path):
    folder, root, _, _ = loaded
    damaged = tmp_path / "cache" / "spectra" / "models" / "converted"
    shutil.copytree(root, damaged)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (copy,) = damaged.iterdir()
    assert converted.converted_copy(folder / "two.gguf") == copy
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # inside the last tensor, same size and (here) the same mtime: only the sha256 tells
    stat = weights.stat()
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    monkeypatch.setattr("spectra.models.assembled._DIGESTS", {})  # a new process: nothing hashed yet
    with caplog.at_level(logging.WARNING):
        assert converted.converted_copy(folder / "two.gguf") is None
    assert "the converted copy of two.gguf is damaged" in caplog.text and not copy.exists()


def test_a_cache_that_refuses_writes_or_other_dtypes_keep_no_copy(loaded, monkeypatch, caplog, tmp_path):
    folder, _, (model, _), _ = loaded
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def refuse(**_):
        raise OSError(30, "Read-only file system")

    with monkeypatch.context() as patched:
        patched.setattr(converted.tempfile, "mkdtemp", refuse)
        with caplog.at_level(logging.WARNING):
            assert converted.save_converted(folder / "two.gguf", model) is None
    assert "not keeping a converted copy of two.gguf (Read-only file system)" in caplog.text
    bfloat16 = transformers.AutoModelForCausalLM.from_config(model.config, dtype=torch.bfloat16)
    assert converted.save_converted(folder / "two.gguf", bfloat16) is None
    assert not list((tmp_path / "cache").rglob("*.safetensors"))
