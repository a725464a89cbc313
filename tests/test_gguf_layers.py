"""scripts/gguf_layers.py: the first N blocks of the real SmolLM2 GGUF, every kept tensor and all metadata but
the block count byte for byte. (That layers 0..N-1 then compute exactly what the full model's do was checked
once with transformers; here the file itself is checked, which is what that rests on.) The script runs as a
command once (conftest's smollm2_two_blocks); its refusals are called in this process on the parsed file, as
each parse of the 49,152-token vocabulary takes seconds."""

from __future__ import annotations

import sys

import gguf
import numpy as np
import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import gguf_layers  # noqa: E402


@pytest.fixture(scope="module")
def full(smollm2_two_blocks):
    return gguf.GGUFReader(smollm2_two_blocks[0])


def test_first_two_blocks_keep_everything_else(smollm2_two_blocks, full):
    part = gguf.GGUFReader(smollm2_two_blocks[1])
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
def test_block_count_out_of_range_is_one_line(smollm2_two_blocks, full, tmp_path, monkeypatch, capsys, layers):
    monkeypatch.setattr(gguf_layers.gguf, "GGUFReader", lambda path: full)  # the file parsed once, above
    target = tmp_path / "x.gguf"
    with pytest.raises(SystemExit) as refused:
        gguf_layers.main([str(smollm2_two_blocks[0]), str(target), layers])
    assert refused.value.code == f"gguf_layers: error: the model has 30 blocks; N must be in 1..30, got {layers}"
    assert not target.exists()


def test_target_must_differ_from_source(smollm2_two_blocks, capsys):
    with pytest.raises(SystemExit) as refused:
        gguf_layers.main([str(smollm2_two_blocks[0]), str(smollm2_two_blocks[0]), "2"])
    assert refused.value.code == 2 and "error: target must differ from source" in capsys.readouterr().err
