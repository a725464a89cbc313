"""The capture measures the attention the model computes: compared with eager float64 attention on the
random-weight tiny Llama (grouped-query heads) and on the real SmolLM2-135M."""

from __future__ import annotations

import math

import numpy as np
import torch
from reference import eager_reference, metrics_from_probs

from spectra.capture.hook import AttentionCapture

TOLERANCE = 1e-4


def assert_matches_reference(captured: dict, reference: dict) -> None:
    for name in ("query_norm", "entropy", "max_attn"):
        got = captured[name].double().numpy()
        assert got.shape == reference[name].shape, name
        difference = np.abs(got - reference[name]).max()
        assert difference <= TOLERANCE, f"{name}: max |difference| {difference:.2e}"
    clear = ~reference["k_eff_ambiguous"]
    k_eff = captured["k_eff"].numpy()
    assert clear.mean() > 0.9  # the comparison below must cover most rows to mean anything
    np.testing.assert_array_equal(k_eff[clear], reference["k_eff"][clear])


def test_tiny_llama_matches_eager_float64(tiny_llama):
    input_ids = torch.randint(0, tiny_llama.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with AttentionCapture(tiny_llama, k_eff_threshold=0.9) as capture:
        captured = capture.run(input_ids)
    layers, heads = tiny_llama.config.num_hidden_layers, tiny_llama.config.num_attention_heads
    assert captured["entropy"].shape == (layers, 2, heads, 48)
    assert_matches_reference(captured, eager_reference(tiny_llama, input_ids, 0.9))


def test_smollm2_matches_eager_float64(smollm2):
    model, tokenizer = smollm2
    text = "The quick brown fox jumps over the lazy dog. " * 12
    input_ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][:96]])
    with AttentionCapture(model, k_eff_threshold=0.9) as capture:
        captured = capture.run(input_ids)
    reference = eager_reference(model, input_ids, 0.9)
    assert captured["entropy"].shape == (30, 1, 9, 96)
    assert_matches_reference(captured, reference)
    # A trained model's heads differ: the check above must not pass on near-constant values.
    assert reference["entropy"][:, 0, :, -1].std() > 0.1


def test_other_threshold_and_first_token(tiny_llama):
    input_ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(2))
    with AttentionCapture(tiny_llama, k_eff_threshold=0.5) as capture:
        captured = capture.run(input_ids)
    assert_matches_reference(captured, eager_reference(tiny_llama, input_ids, 0.5))
    # Token 0 attends only to itself: entropy exactly 0, max_attn exactly 1, k_eff 1.
    assert torch.all(captured["entropy"][..., 0] == 0)
    assert torch.all(captured["max_attn"][..., 0] == 1)
    assert torch.all(captured["k_eff"][..., 0] == 1)


def test_logits_unchanged_by_capture(tiny_llama, smollm2):
    for model in (tiny_llama, smollm2[0]):
        input_ids = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            plain = model(input_ids=input_ids).logits
        with AttentionCapture(model) as capture:
            with torch.no_grad():
                captured = model(input_ids=input_ids).logits
            capture.run(input_ids)  # and the capture did see every layer
        assert torch.equal(plain, captured)
        assert model.config._attn_implementation == "sdpa"  # restored on exit


@torch.no_grad()
def test_pre_rope_matches_direct_recomputation(tiny_llama):
    """metrics.attention=pre_rope: softmax(q k^T / sqrt(d)) from the projections, before the rotary embedding."""
    model = tiny_llama
    config = model.config
    input_ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(4))
    with AttentionCapture(model, k_eff_threshold=0.9, attention="pre_rope") as capture:
        captured = capture.run(input_ids)

    # Direct recomputation in float64 from each layer's input hidden states.
    hidden = model(input_ids=input_ids, output_hidden_states=True).hidden_states
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    seq_len = input_ids.shape[1]
    for index, layer in enumerate(model.model.layers):
        x = layer.input_layernorm(hidden[index]).double()
        attn = layer.self_attn
        q = (x @ attn.q_proj.weight.double().T).view(seq_len, heads, head_dim).transpose(0, 1)  # (H, T, D)
        k = (x @ attn.k_proj.weight.double().T).view(seq_len, kv_heads, head_dim).transpose(0, 1)  # (KV, T, D)
        k = k.repeat_interleave(heads // kv_heads, dim=0)  # (H, T, D)
        scores = q @ k.transpose(1, 2) / math.sqrt(head_dim)
        scores = scores.masked_fill(torch.ones(seq_len, seq_len).triu(1).bool(), float("-inf"))
        expected = metrics_from_probs(scores.softmax(-1).numpy(), 0.9)
        for name in ("entropy", "max_attn"):
            assert np.abs(captured[name][index, 0].double().numpy() - expected[name]).max() <= TOLERANCE
        clear = ~expected["k_eff_ambiguous"]
        np.testing.assert_array_equal(captured["k_eff"][index, 0].numpy()[clear], expected["k_eff"][clear])
        np.testing.assert_allclose(captured["query_norm"][index, 0].numpy(), q.norm(dim=-1).numpy(), atol=TOLERANCE)

    # And it is a different distribution from the one the model computes.
    with AttentionCapture(model, attention="post_rope") as capture:
        post = capture.run(input_ids)
    assert (post["entropy"] - captured["entropy"]).abs().max() > 1e-3
