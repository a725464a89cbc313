"""Gemma 3 270M, real trained weights (model=gemma3_270m): a 640-token capture crosses the 512-token sliding
window of its local layers. Compared with eager float64 attention: the queries and keys the model attends with
(after q_norm/k_norm and RoPE) are recorded from a float64 copy, and every metric is recomputed from them naively
over the full T x T matrix with a mask built here from the config's layer types and window.

    python -m pytest tests/test_gemma3.py -s      # -s prints the measured differences per metric
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import causal_mask, recorded_eager_attention, reference_metrics

from spectra.capture.hook import AttentionCapture
from spectra.capture.metrics import METRIC_FIELDS

SEQ_LEN, THRESHOLD, TOLERANCE = 640, 0.9, 1e-4


def layer_windows(model) -> list[int | None]:
    config = model.config
    return [config.sliding_window if kind == "sliding_attention" else None for kind in config.layer_types]


@pytest.fixture(scope="module")
def input_ids(gemma3) -> torch.Tensor:
    """BOS, then a block of 160 seeded token ids repeated: a trained model's copying heads attend sharply."""
    block = torch.randint(1000, 100_000, (160,), generator=torch.Generator().manual_seed(0))
    ids = block.repeat(SEQ_LEN // 160)
    ids[0] = gemma3.config.bos_token_id
    return ids[None]  # (1, T)


@pytest.fixture(scope="module")
def measured(gemma3, input_ids):
    """(captured metrics, per-layer float64 reference, the float32 model's q_norm and q_proj outputs and, under the
    capture, its decoder's output)."""
    queries: dict[str, list[torch.Tensor]] = {"q_norm": [], "q_proj": [], "decoder": []}
    hooks = [
        getattr(layer.self_attn, name).register_forward_hook(lambda _m, _i, out, name=name: queries[name].append(out))
        for layer in gemma3.model.layers
        for name in ("q_norm", "q_proj")
    ]
    decoder = gemma3.model.register_forward_hook(lambda _m, _i, out: queries["decoder"].append(out.last_hidden_state))
    hooks.append(decoder)
    try:
        with AttentionCapture(gemma3, k_eff_threshold=THRESHOLD, extended=True) as capture:
            got = capture.run(input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    with pytest.MonkeyPatch.context() as monkeypatch:
        received, weights = recorded_eager_attention(gemma3, input_ids, monkeypatch)
    reference = []
    for (query, key, value, mask, scaling, softcap), eager_probs, window in zip(
        received, weights, layer_windows(gemma3)
    ):
        metrics, probs = reference_metrics(query, key, scaling, THRESHOLD, window, softcap, value)
        # The mask built here is the model's own, and so is p (eager upcasts its softmax to float32).
        assert torch.equal((mask == 0)[0, 0], causal_mask(SEQ_LEN, window))
        torch.testing.assert_close(probs, eager_probs, rtol=0, atol=1e-6)
        reference.append({**metrics, "query": query, "key": key, "scaling": scaling})
    return got, reference, queries


def test_gemma3_shape_and_layer_kinds(gemma3):
    config = gemma3.config
    assert (config.model_type, config.num_hidden_layers, config.num_attention_heads) == ("gemma3_text", 18, 4)
    assert (config.num_key_value_heads, config.head_dim, config.vocab_size) == (1, 256, 262_144)
    assert layer_windows(gemma3) == ([512] * 5 + [None]) * 3
    assert gemma3.config._attn_implementation == "sdpa"  # the capture hands each call on to SDPA


def test_gemma3_matches_eager_float64(measured):
    got, reference, _ = measured
    assert set(got) == set(METRIC_FIELDS)
    assert got["entropy"].shape == (18, 1, 4, SEQ_LEN)
    differences = {}
    for name in METRIC_FIELDS:
        value = got[name].double().numpy()[:, 0]  # (L, H, T)
        expected = np.stack([layer[name][0] for layer in reference])
        if name == "k_eff":
            clear = ~np.stack([layer["k_eff_ambiguous"][0] for layer in reference])
            assert clear.mean() > 0.95  # the comparison covers nearly every row
            np.testing.assert_array_equal(value[clear], expected[clear])
            differences[name] = f"{int((value != expected).sum())} of {value.size} rows differ, all within 1e-6 of the threshold"
            continue
        # As test_architectures: |difference| <= 1e-4 + 1e-4 |expected|. attn_distance reaches ~500 tokens and
        # lse ~10, where float32 itself resolves only ~1e-4 and ~1e-6 absolute.
        np.testing.assert_allclose(value, expected, rtol=TOLERANCE, atol=TOLERANCE, err_msg=name)
        difference = np.abs(value - expected)
        relative = (difference / np.maximum(np.abs(expected), 1e-12)).max()
        differences[name] = f"{difference.max():.2e} (relative {relative:.1e}; largest |value| {np.abs(expected).max():.3g})"
    print("\nGemma 3 270M, 640 tokens: max |capture - eager float64|:")
    for name, difference in differences.items():
        print(f"  {name:<14}{difference}")
    # Trained attention: heads differ, and many rows are sharp (the comparison is not on near-uniform rows).
    entropy = got["entropy"][:, 0, :, -1]
    assert entropy.std() > 0.5 and (got["max_attn"] > 0.9).float().mean() > 0.02


def test_gemma3_query_norm_is_after_q_norm(measured):
    """query_norm is the norm of the query the attention uses: q_norm's output (RoPE then only rotates it)."""
    got, reference, queries = measured
    after_norm = torch.stack(queries["q_norm"])[:, 0].norm(dim=-1)  # (L, H, T)
    torch.testing.assert_close(got["query_norm"][:, 0], after_norm, rtol=1e-5, atol=1e-5)
    projected = torch.stack(queries["q_proj"])[:, 0].unflatten(-1, (4, 256)).transpose(1, 2).norm(dim=-1)  # (L, H, T)
    assert ((projected - after_norm).abs() / after_norm).median() > 0.1  # q_proj's norm is another quantity


def test_gemma3_output_unchanged_by_capture(gemma3, input_ids, measured):
    """The decoder's output under the capture (in `measured`) is the plain model's, bit for bit: the LM head, which
    the capture does not touch, then makes the same logits of it."""
    (captured,) = measured[2]["decoder"]
    with torch.no_grad():
        plain = gemma3.model(input_ids=input_ids, use_cache=False).last_hidden_state
    assert captured.shape == (1, SEQ_LEN, gemma3.config.hidden_size) and torch.equal(plain, captured)
    assert gemma3.config._attn_implementation == "sdpa"


def test_gemma3_window_matters(gemma3, measured):
    """Past t = 512 a local layer's metrics are those of its window: the same scores without it differ."""
    got, reference, _ = measured
    local = 0
    layer = reference[local]
    unwindowed, _ = reference_metrics(layer["query"], layer["key"], layer["scaling"], THRESHOLD, window=None)
    late = slice(512, SEQ_LEN)
    assert (layer["visible_keys"][0, :, -1] == 512).all()
    for name in ("entropy", "sink_attn", "lse"):
        captured = got[name][local, 0, :, late].double().numpy()
        np.testing.assert_allclose(captured, layer[name][0, :, late], atol=TOLERANCE, rtol=0)
        assert np.abs(captured - unwindowed[name][0, :, late]).max() > 100 * TOLERANCE, name
    windows = layer_windows(gemma3)
    sink = got["sink_attn"][:, 0, :, late]  # (L, H, T - 512)
    assert all(bool((sink[i] == 0).all()) == (w is not None) for i, w in enumerate(windows))
    assert int(got["k_eff"][local].max()) <= 512

