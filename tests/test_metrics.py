"""The pure metric math against numpy in float64, without a model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import metrics_from_probs

from spectra.capture.metrics import attention_metrics, k_eff_from_probs


def numpy_reference(query, key, scaling, threshold, allowed=None):
    q = query.double().numpy()  # (B, H, T, D)
    k = key.double().numpy()  # (B, KV, T, D)
    groups = q.shape[1] // k.shape[1]
    k = np.repeat(k, groups, axis=1)  # query head h reads KV head h // groups
    scores = np.einsum("bhtd,bhsd->bhts", q, k) * scaling
    seq_len = q.shape[2]
    mask = np.tril(np.ones((seq_len, seq_len), dtype=bool))
    if allowed is not None:
        mask = mask & allowed.numpy()[:, 0][:, None]
    scores = np.where(mask, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    result = metrics_from_probs(probs, threshold)
    result["query_norm"] = np.linalg.norm(q, axis=-1)
    return result


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("block_bytes", [1, 2**30])  # one query row per block, and everything in one block
def test_metrics_match_numpy(heads, kv_heads, block_bytes):
    generator = torch.Generator().manual_seed(heads * 10 + kv_heads)
    query = torch.randn(2, heads, 37, 16, generator=generator) * 2
    key = torch.randn(2, kv_heads, 37, 16, generator=generator) * 2
    got = attention_metrics(query, key, 0.25, 0.9, block_bytes=block_bytes)
    expected = numpy_reference(query, key, 0.25, 0.9)
    for name in ("query_norm", "entropy", "max_attn"):
        np.testing.assert_allclose(getattr(got, name).double().numpy(), expected[name], atol=1e-5, rtol=0)
    clear = ~expected["k_eff_ambiguous"]
    np.testing.assert_array_equal(got.k_eff.numpy()[clear], expected["k_eff"][clear])
    assert got.k_eff.dtype == torch.int32


def test_mask_restricts_keys_like_a_sliding_window():
    seq_len, window = 20, 4
    positions = torch.arange(seq_len)
    allowed = (positions[None, :] > positions[:, None] - window)[None, None]  # (1, 1, T, T)
    generator = torch.Generator().manual_seed(7)
    query = torch.randn(1, 2, seq_len, 8, generator=generator)
    key = torch.randn(1, 1, seq_len, 8, generator=generator)
    got = attention_metrics(query, key, 1.0, 0.9, allowed=allowed)
    expected = numpy_reference(query, key, 1.0, 0.9, allowed)
    np.testing.assert_allclose(got.entropy.double().numpy(), expected["entropy"], atol=1e-5)
    # at most `window` keys are visible, so no row can need more
    assert got.k_eff.max() <= window
    assert float(got.entropy.max()) <= np.log(window) + 1e-5


def test_uniform_attention_has_known_values():
    """Identical keys: p is uniform over 0..t, so entropy = ln(t+1), max = 1/(t+1), k_eff = ceil(0.9 (t+1))."""
    seq_len = 30
    query = torch.randn(1, 1, seq_len, 4)
    key = torch.ones(1, 1, seq_len, 4)
    got = attention_metrics(query, key, 1.0, 0.9)
    count = np.arange(1, seq_len + 1)
    np.testing.assert_allclose(got.entropy[0, 0].numpy(), np.log(count), atol=1e-5)
    np.testing.assert_allclose(got.max_attn[0, 0].numpy(), 1 / count, rtol=1e-5)
    # the cumulative sum of 1/n terms is not exact in floating point, so allow the rows where 0.9 (t+1) is whole
    expected = np.ceil(0.9 * count - 1e-6)
    exact = np.abs(0.9 * count - np.round(0.9 * count)) > 1e-3
    np.testing.assert_array_equal(got.k_eff[0, 0].numpy()[exact], expected[exact])


def test_entropy_is_exact_for_peaked_rows():
    """No epsilon bias: a near one-hot row has entropy near 0, not inflated by a log(p + eps) term."""
    query = torch.zeros(1, 1, 3, 2)
    query[..., 0] = 100.0
    key = torch.tensor([[[[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]]])
    got = attention_metrics(query, key, 1.0, 0.9)
    # row 2: logits (100, 0, 0) -> p = (1, e^-100, e^-100) up to rounding: entropy ~ 2 * 100 * e^-100
    assert float(got.entropy[0, 0, 2]) == pytest.approx(0.0, abs=1e-30)
    assert int(got.k_eff[0, 0, 2]) == 1


def test_k_eff_threshold_one_counts_only_allowed_keys():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25, 0.0, 0.0]])
    assert k_eff_from_probs(probs, 1.0).tolist() == [4]
    assert k_eff_from_probs(probs, 0.5).tolist() == [2]
    assert k_eff_from_probs(torch.tensor([[0.7, 0.2, 0.1]]), 0.9).tolist() == [2]


def test_heads_must_share_kv_heads_evenly():
    with pytest.raises(ValueError, match="5 query heads cannot share 2 KV heads"):
        attention_metrics(torch.randn(1, 5, 4, 8), torch.randn(1, 2, 4, 8), 1.0)
