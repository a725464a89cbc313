"""Per-token attention metrics: pure tensor math, no hooks, no I/O.

Given one layer's queries and keys (the tensors the model's attention function receives) this computes, for
every (batch, head, query position t), from the attention distribution p over the keys t may attend to:

    query_norm  ||q_t||_2
    entropy     -sum_j p_j ln p_j        (exact: 0 at t = 0, no epsilon)
    max_attn    max_j p_j
    k_eff       fewest keys whose largest probabilities sum to >= threshold

and, with `extended=True` (metrics=extended), from the same scores at almost no extra cost:

    sink_attn      p_0, the probability on position 0 (the attention-sink literature's statistic)
    attn_distance  sum_j p_j (t - j), the expected look-back distance
    max_logit      max_j s_j, the largest scaled (and, where the model caps, soft-capped) score
    lse            ln sum_j exp(s_j), the log-partition of the scaled scores
    key_norm       ||k_t||_2, the token's own key for the query head's KV head

The scores are the model's: scaling, then soft-capping `softcap * tanh(s / softcap)` (Gemma 2), then the
causal mask, a sliding window (key j visible from t iff t - j < window, as transformers' masks define it) and
the model's own mask.

Queries are processed in blocks so memory is bounded by a budget, not by T^2; each block touches only the keys
its queries may attend to (causal). Grouped-query heads are mapped as transformers' `repeat_kv` maps them:
query head h reads KV head h // (H / KV).

    python -m pytest tests/test_metrics.py
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class AttentionMetrics(NamedTuple):
    """One layer's metrics; field order is the Parquet column order."""

    query_norm: torch.Tensor  # (B, H, T) float32
    entropy: torch.Tensor  # (B, H, T) float32
    max_attn: torch.Tensor  # (B, H, T) float32
    k_eff: torch.Tensor  # (B, H, T) int32
    # Extended metrics: None unless attention_metrics(..., extended=True).
    sink_attn: torch.Tensor | None = None  # (B, H, T) float32
    attn_distance: torch.Tensor | None = None  # (B, H, T) float32
    max_logit: torch.Tensor | None = None  # (B, H, T) float32
    lse: torch.Tensor | None = None  # (B, H, T) float32
    key_norm: torch.Tensor | None = None  # (B, H, T) float32


METRIC_FIELDS = AttentionMetrics._fields
DEFAULT_METRIC_FIELDS = METRIC_FIELDS[:4]  # the four every run writes unless metrics.names says otherwise
EXTENDED_METRIC_FIELDS = METRIC_FIELDS[4:]  # computed only when one of them is asked for


def k_eff_from_probs(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """Fewest entries of each row whose largest values sum to >= threshold. probs (..., S) -> (...) int32.

    Masked keys must hold probability 0: they sort last and are never needed while the row sums to ~1.
    """
    sorted_probs = probs.sort(dim=-1, descending=True).values
    cumulative = sorted_probs.cumsum(dim=-1)
    # k_eff = 1 + #(prefixes still short of the threshold); a row whose rounded total falls a hair short of a
    # threshold of 1.0 would count every key, masked ones included, so cap at the number of allowed keys.
    k_eff = (cumulative < threshold).sum(dim=-1) + 1
    allowed = (probs > 0).sum(dim=-1).clamp(min=1)
    return torch.minimum(k_eff, allowed).to(torch.int32)


def _block_rows(batch: int, heads: int, seq_len: int, budget_bytes: int) -> int:
    """Query rows per block so that ~4 float32 (rows x keys) work tensors fit in the budget."""
    per_row = batch * heads * seq_len * 4 * 4
    return max(1, min(seq_len, budget_bytes // per_row))


def attention_metrics(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    k_eff_threshold: float = 0.9,
    allowed: torch.Tensor | None = None,
    block_bytes: int = 256 * 2**20,
    *,
    softcap: float | None = None,
    sliding_window: int | None = None,
    extended: bool = False,
) -> AttentionMetrics:
    """Metrics of softmax(scaling * q k^T) under a causal mask (and `allowed`, if given).

    query   (B, H, T, D)   as the model's attention function receives it (post-RoPE for Llama)
    key     (B, KV, T, D)  not repeated for grouped-query heads
    allowed (B or 1, 1, T, T) bool, True where query t may attend to key j; None means plain causal.
            Causality is applied in any case: transformers often passes no mask for causal-only batches.
    softcap        scores become softcap * tanh(scores / softcap) before masking, as Gemma 2 computes them
    sliding_window query t sees keys j with t - j < sliding_window (on top of `allowed`)
    extended       also compute the extended metrics (see the module docstring)
    """
    batch, heads, seq_len, head_dim = query.shape
    kv_heads = key.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} KV heads evenly")
    groups = heads // kv_heads

    q = query.float().view(batch, kv_heads, groups, seq_len, head_dim)  # (B, KV, G, T, D)
    k = key.float().unsqueeze(2)  # (B, KV, 1, T, D)
    query_norm = query.float().norm(dim=-1)  # (B, H, T)

    entropy = torch.empty(batch, heads, seq_len, dtype=torch.float32, device=query.device)
    max_attn = torch.empty_like(entropy)
    k_eff = torch.empty(batch, heads, seq_len, dtype=torch.int32, device=query.device)

    # --- extended metrics: allocation (nothing when not asked for) ---
    if extended:
        sink_attn = torch.empty_like(entropy)
        attn_distance = torch.empty_like(entropy)
        max_logit = torch.empty_like(entropy)
        lse = torch.empty_like(entropy)
        # Each query head h reads KV head h // G: (B, KV, T) -> (B, KV, G, T) -> (B, H, T)
        key_norm = key.float().norm(dim=-1).unsqueeze(2).expand(batch, kv_heads, groups, seq_len)
        key_norm = key_norm.reshape(batch, heads, seq_len)
    # --- end extended metrics ---

    rows = _block_rows(batch, heads, seq_len, block_bytes)
    positions = torch.arange(seq_len, device=query.device)
    for start in range(0, seq_len, rows):
        stop = min(seq_len, start + rows)
        # Queries start..stop-1 may only see keys 0..stop-1.
        scores = (q[:, :, :, start:stop] @ k[:, :, :, :stop].transpose(-1, -2)) * scaling  # (B, KV, G, R, S)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        mask = positions[None, :stop] <= positions[start:stop, None]  # (R, S) causal
        if sliding_window is not None:
            mask = mask & (positions[None, :stop] > positions[start:stop, None] - sliding_window)
        if allowed is not None:
            block_allowed = allowed[:, 0, start:stop, :stop].unsqueeze(1).unsqueeze(1)  # (B|1, 1, 1, R, S)
            mask = mask & block_allowed
        scores = scores.masked_fill(~mask, float("-inf"))

        # Shift by the row max: exp(z) <= 1, the max entry is exactly exp(0) = 1, so max p = 1 / Z exactly.
        row_max = scores.amax(dim=-1, keepdim=True)  # (B, KV, G, R, 1)
        shifted = scores - row_max
        exp_shifted = shifted.exp()
        partition = exp_shifted.sum(dim=-1, keepdim=True)
        probs = exp_shifted / partition
        # -sum p ln p = ln Z - sum p z, with z = s - max. Masked keys have p = 0 and z = -inf; zero them first.
        expected_shift = (probs * shifted.masked_fill(~mask, 0.0)).sum(dim=-1)
        block_entropy = partition.squeeze(-1).log() - expected_shift  # (B, KV, G, R)

        entropy[:, :, start:stop] = block_entropy.clamp(min=0.0).reshape(batch, heads, stop - start)
        max_attn[:, :, start:stop] = partition.squeeze(-1).reciprocal().reshape(batch, heads, stop - start)
        k_eff[:, :, start:stop] = k_eff_from_probs(probs, k_eff_threshold).reshape(batch, heads, stop - start)

        # --- extended metrics: per-row reductions of this block's tensors ---
        if extended:
            block_shape = (batch, heads, stop - start)
            # Masked keys hold p = 0 and a finite distance, so they add nothing.
            distance = (positions[start:stop, None] - positions[None, :stop]).float()  # (R, S)
            sink_attn[:, :, start:stop] = probs[..., 0].reshape(block_shape)
            attn_distance[:, :, start:stop] = (probs * distance).sum(dim=-1).reshape(block_shape)
            max_logit[:, :, start:stop] = row_max.squeeze(-1).reshape(block_shape)
            lse[:, :, start:stop] = (row_max + partition.log()).squeeze(-1).reshape(block_shape)
        # --- end extended metrics ---

    if extended:
        extended_metrics = (sink_attn, attn_distance, max_logit, lse, key_norm)
        return AttentionMetrics(query_norm, entropy, max_attn, k_eff, *extended_metrics)
    return AttentionMetrics(query_norm, entropy, max_attn, k_eff)


def prototype_scaling(head_dim: int) -> float:
    """The prototype's 1/sqrt(d) scaling, used with metrics.attention=pre_rope."""
    return 1.0 / math.sqrt(head_dim)
