"""k_eff without a full sort is the sort definition (`k_eff_from_probs`), integer for integer: the CPU kernels'
selection and the torch top-K path used on GPUs, on adversarial rows, on masked and windowed rows, and on many
thousands of rows of real SmolLM2 attention; and the torch path (the GPU's) matches the float64 reference.

    python -m pytest tests/test_k_eff.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import compose_config
from test_fast_metrics import THRESHOLDS, adversarial_rows, assert_matches_reference, numpy_metrics

from spectra.capture import cpu_kernels, metrics
from spectra.capture.metrics import _k_eff_topk, attention_metrics, k_eff_fast, k_eff_from_probs
from spectra.data.load import load_samples


def kernel_k_eff(probs: torch.Tensor, threshold: float, lo=None, hi=None) -> torch.Tensor:
    rows = probs.reshape(-1, probs.shape[-1]).contiguous()
    lo = np.zeros(rows.shape[0], dtype=np.int64) if lo is None else lo
    hi = np.full(rows.shape[0], rows.shape[1], dtype=np.int64) if hi is None else hi
    out = np.empty(rows.shape[0], dtype=np.int32)
    cpu_kernels.k_eff_rows(rows.numpy(), np.ones(rows.shape[0], dtype=np.float32), lo, hi, threshold, out)
    return torch.from_numpy(out)


def topk_k_eff(probs: torch.Tensor, threshold: float, first: int = 4) -> torch.Tensor:
    rows = probs.reshape(-1, probs.shape[-1])
    return _k_eff_topk(rows, torch.ones(rows.shape[0]), threshold, first=first)


@pytest.mark.parametrize("seq_len", [1, 2, 7, 64, 513, 2049])
def test_both_paths_equal_the_sort_definition_on_adversarial_rows(seq_len):
    probs = adversarial_rows(seq_len, torch.Generator().manual_seed(seq_len))
    for threshold in THRESHOLDS:
        expected = k_eff_from_probs(probs, threshold)
        assert torch.equal(k_eff_fast(probs, threshold), expected), threshold
        assert torch.equal(kernel_k_eff(probs, threshold), expected), threshold
        # first=4 forces the top-K path through its growth steps (4, 32, 256, ...)
        assert torch.equal(topk_k_eff(probs, threshold), expected), threshold


def test_key_ranges_see_only_their_keys():
    """Rows limited to keys lo:hi (a sliding window, causal prefix) equal the definition on those keys alone,
    whatever the keys outside hold."""
    generator = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(400, 300, generator=generator) * 2, dim=-1)
    lo = torch.randint(0, 150, (400,), generator=generator)
    hi = lo + torch.randint(1, 150, (400,), generator=generator)
    inside = (torch.arange(300)[None, :] >= lo[:, None]) & (torch.arange(300)[None, :] < hi[:, None])
    windowed = torch.where(inside, probs, torch.zeros_like(probs))
    windowed = windowed / windowed.sum(-1, keepdim=True)
    noisy = torch.where(inside, windowed, torch.rand(400, 300, generator=generator))  # garbage outside
    for threshold in (0.5, 0.9, 1.0):
        got = kernel_k_eff(noisy, threshold, lo.numpy(), hi.numpy())
        assert torch.equal(got, k_eff_from_probs(windowed, threshold)), threshold
        assert (got <= hi - lo).all()


@pytest.fixture(scope="module")
def real_attention(smollm2):
    """Post-softmax attention of the real SmolLM2 on real text: (rows, T) float32, every layer and head."""
    model, tokenizer = smollm2
    cfg = compose_config("model=smollm2_135m", "data.context_length=320", "data.n_samples=1")
    ids = torch.from_numpy(load_samples(cfg.data, tokenizer, model.config.vocab_size)[0].input_ids)[None]
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            attentions = model(input_ids=ids, output_attentions=True, use_cache=False).attentions
    finally:
        model.set_attn_implementation(previous)
    return torch.cat([a.reshape(-1, a.shape[-1]) for a in attentions]).float().contiguous()  # (L*H*T, T)


def test_both_paths_equal_the_sort_definition_on_real_attention(real_attention):
    assert real_attention.shape[0] > 80_000  # 30 layers x 9 heads x 320 queries
    for threshold in (0.5, 0.9, 0.99):
        expected = k_eff_from_probs(real_attention, threshold)
        assert torch.equal(k_eff_fast(real_attention, threshold), expected), threshold
        assert torch.equal(topk_k_eff(real_attention, threshold, first=16), expected), threshold
    # Real attention is peaked: most rows need few keys, which is what the selection exploits.
    assert k_eff_from_probs(real_attention, 0.9).float().median() < 64


def test_fused_row_metrics_equal_the_definitions_on_their_own_probabilities(real_attention):
    """The kernel that computes every metric from scores gives, on the probabilities it computes itself,
    k_eff = the sort definition and max_attn = max p; scores are real (log attention), causal rows."""
    scores = real_attention.clamp(min=1e-30).log()[:20_000].contiguous()  # (N, T), lse 0, masked keys -69
    seq_len = scores.shape[1]
    query_pos = torch.arange(scores.shape[0]) % seq_len
    lo, hi = torch.zeros_like(query_pos), query_pos + 1
    scores[torch.arange(seq_len)[None, :] >= hi[:, None]] = float("-inf")
    n = scores.shape[0]
    entropy, max_attn = np.empty(n, np.float32), np.empty(n, np.float32)
    k_eff = np.empty(n, np.int32)
    for threshold in (0.5, 0.9):
        cpu_kernels.row_metrics(
            scores.numpy(), lo.numpy(), hi.numpy(), 0, query_pos.numpy(), threshold, entropy, max_attn, k_eff,
            np.empty((4, 0), np.float32),
        )  # fmt: skip
        probs = np.zeros(scores.shape, np.float32)
        cpu_kernels.row_probabilities(scores.numpy(), lo.numpy(), hi.numpy(), probs)
        assert torch.equal(torch.from_numpy(k_eff), k_eff_from_probs(torch.from_numpy(probs), threshold))
        np.testing.assert_allclose(max_attn, probs.max(-1), rtol=1e-6)
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
        # The kernel's exp against float64: the probabilities of the real rows to float32 accuracy.
        np.testing.assert_allclose(probs, real_attention[:20_000].numpy(), atol=2e-6)


@pytest.mark.parametrize("options", [{}, {"softcap": 20.0, "sliding_window": 9, "extended": True}])
def test_torch_path_matches_the_cpu_kernels_and_float64(monkeypatch, options):
    """The torch implementation (what runs on a GPU), forced on the CPU, against the kernels and the reference."""
    generator = torch.Generator().manual_seed(11)
    query = torch.randn(2, 6, 70, 16, generator=generator) * 2
    key = torch.randn(2, 3, 70, 16, generator=generator) * 2
    kernels = attention_metrics(query, key, 0.3, 0.9, block_bytes=20_000, **options)
    monkeypatch.setattr(metrics, "_reduce_block_cpu", metrics._reduce_block_torch)
    torch_path = attention_metrics(query, key, 0.3, 0.9, block_bytes=20_000, **options)
    for name in kernels._fields:
        if getattr(kernels, name) is not None:
            torch.testing.assert_close(getattr(torch_path, name), getattr(kernels, name), atol=2e-5, rtol=2e-5)
    if not options:
        assert_matches_reference(torch_path, numpy_metrics(query, key, 0.3, 0.9), 0.9)


def test_row_max_matches_numpy_on_signed_zeros_infinities_and_negatives():
    """The row max is taken on integer keys (cpu_kernels._row_max); the float order must survive the mapping."""
    rng = np.random.default_rng(7)
    rows = [
        np.array([-3.5, -1.25, -7.0], np.float32),
        np.array([-np.inf, -np.inf, -2.0], np.float32),
        np.array([-0.0, -1e-30], np.float32),
        np.array([-0.0, 0.0, -1.0], np.float32),
        np.array([np.inf, 3.0], np.float32),
        np.array([-np.inf] * 5, np.float32),
        np.array([1e-45, -1e-45, 0.0], np.float32),
        (rng.standard_normal(1000) * 50).astype(np.float32),
    ]
    for row in rows:
        got = cpu_kernels._row_max(row)
        assert got == row.max() and np.signbit(got) == np.signbit(row.max()), row
