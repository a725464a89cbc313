"""spectra/models/converted.py: a GGUF model's converted copy loads the model transformers builds from the GGUF
itself, bit for bit (weights, config, tokenizer, captured metrics), and the file is parsed once to make it; a damaged
copy is set aside and made again; a cache that refuses writes changes nothing but the speed. On the first two blocks
of the real SmolLM2 GGUF (real Q4_1 and Q8_0 tensors, the real 49,152-token vocabulary), cut by
scripts/gguf_layers.py, whose output is checked here too: each parse of that vocabulary takes seconds, so the
parses are shared between the tests."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import sys

import gguf
import numpy as np
import pytest
import torch
import transformers
from conftest import REPO, compose_config

from spectra.capture.hook import AttentionCapture
from spectra.models import converted
from spectra.models.loading import load_model, package_dir

sys.path.insert(0, str(REPO / "scripts"))
import gguf_layers  # noqa: E402

TEXT = "<|im_start|>user\nAttention sinks, délimiteurs and the lazy dog 42.<|im_end|>"


@contextlib.contextmanager
def recorded_parses():
    """Every GGUF file parsed in this block, as (path, reader)."""
    parses = []
    parse = gguf.GGUFReader

    def recorded(path, mode="r"):
        parses.append((str(path), parse(path, mode)))
        return parses[-1][1]

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(gguf, "GGUFReader", recorded)
        yield parses


@pytest.fixture(scope="module")
def two_blocks(tmp_path_factory):
    """(the real SmolLM2 GGUF, its first two blocks as `python scripts/gguf_layers.py <in> <out> 2` writes them, the
    full file as the script parsed it)."""
    model = compose_config("model=smollm2_135m").model  # the embedded default's package and file
    source = package_dir(model.package) / model.gguf_file
    target = tmp_path_factory.mktemp("gguf") / "two.gguf"
    printed = io.StringIO()
    with recorded_parses() as parses, contextlib.redirect_stdout(printed):
        gguf_layers.main([str(source), str(target), "2"])
    assert printed.getvalue().startswith(f"gguf_layers: {target}: first 2 blocks, 20 tensors, "), printed.getvalue()
    ((parsed, full),) = parses
    assert parsed == str(source)
    return source, target, full


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, two_blocks):
    """(GGUF folder, converted-copy root, the model and tokenizer loaded from the GGUF, the same from its copy, the
    two-block file as the loads parsed it)."""
    folder, cache = two_blocks[1].parent, tmp_path_factory.mktemp("cache")
    cfg = compose_config("model=smollm2_135m", f"model.path={folder}", "model.package=null", "model.gguf_file=two.gguf")
    loads = []
    from_pretrained = transformers.AutoModelForCausalLM.from_pretrained

    def recorded(location, **options):
        loads.append((location, options))
        return from_pretrained(location, **options)

    with pytest.MonkeyPatch.context() as monkeypatch, recorded_parses() as parses:
        monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recorded)
        from_gguf = load_model(cfg.model, cfg.hardware)  # transformers reads the GGUF; the copy is kept
        assert [options.get("gguf_file") for _, options in loads] == ["two.gguf"]
        # Read for the config, the weights and the copy's tokenizer: one parse serves all three.
        assert [path for path, _ in parses] == [str(two_blocks[1])]
        assert not converted._PARSED  # the copy replaces the file: its parse is not kept
        from_copy = load_model(cfg.model, cfg.hardware)
        assert len(parses) == 1
    root = cache / "spectra" / "models" / "converted"
    (copy,) = root.iterdir()
    assert loads[-1][0] == str(copy) and "gguf_file" not in loads[-1][1]
    return folder, root, from_gguf, from_copy, parses[0][1]


def captured(model, tokenizer):
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    with AttentionCapture(model, k_eff_threshold=0.9, extended=True) as capture:
        return ids, capture.run(ids)


def test_the_converted_copy_is_the_gguf_model_bit_for_bit(loaded):
    folder, root, (reference, reference_tokenizer), (model, tokenizer), _ = loaded
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
    folder, root, _, _, _ = loaded
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
    folder, _, (model, _), _, _ = loaded
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


# ---- scripts/gguf_layers.py: the first N blocks, every kept tensor and all metadata but the block count byte for
# byte. (That layers 0..N-1 then compute exactly what the full model's do was checked once with transformers; here
# the file itself is checked, which is what that rests on.) The script's main runs in this process, and its
# refusals are called on the file it parsed.


def test_first_two_blocks_keep_everything_else(two_blocks, loaded):
    full, part = two_blocks[2], loaded[4]  # the written file as transformers parsed it
    assert part.get_field("llama.block_count").contents() == 2
    expected = [t.name for t in full.tensors if not t.name.startswith("blk.") or int(t.name.split(".")[1]) < 2]
    assert [t.name for t in part.tensors] == expected
    assert len(expected) == 2 + 2 * 9  # token_embd, output_norm; nine tensors a block
    by_name = {t.name: t for t in full.tensors}
    for tensor in part.tensors:
        assert tensor.tensor_type == by_name[tensor.name].tensor_type, tensor.name
        assert np.array_equal(tensor.data, by_name[tensor.name].data), tensor.name
    changed = {
        name
        for name, field in full.fields.items()
        if not name.startswith("GGUF.") and part.get_field(name).contents() != field.contents()
    }
    assert changed == {"llama.block_count"}
    assert set(part.fields) == set(full.fields)


@pytest.mark.parametrize("layers", ["0", "31", "-1"])
def test_block_count_out_of_range_is_one_line(two_blocks, tmp_path, monkeypatch, layers):
    monkeypatch.setattr(gguf_layers.gguf, "GGUFReader", lambda path: two_blocks[2])  # the file parsed once, above
    target = tmp_path / "x.gguf"
    with pytest.raises(SystemExit) as refused:
        gguf_layers.main([str(two_blocks[0]), str(target), layers])
    assert refused.value.code == f"gguf_layers: error: the model has 30 blocks; N must be in 1..30, got {layers}"
    assert not target.exists()


def test_target_must_differ_from_source(two_blocks, capsys):
    with pytest.raises(SystemExit) as refused:
        gguf_layers.main([str(two_blocks[0]), str(two_blocks[0]), "2"])
    assert refused.value.code == 2 and "error: target must differ from source" in capsys.readouterr().err
