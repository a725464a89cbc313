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


def k_eff_fast(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """The same integers as `k_eff_from_probs`, several times faster on CPU. probs (..., S) -> (...) int32."""
    return _k_eff_from_negated(probs.neg(), threshold)


def _k_eff_from_negated(negated: torch.Tensor, threshold: float) -> torch.Tensor:
    """k_eff of probs = -negated, overwriting `negated` (it is scratch): no temporaries the size of the block.

    The same integers as `k_eff_from_probs`, by construction: an ascending sort of -p, negated back, is p sorted
    descending (equal values are interchangeable); the running sum is the same `cumsum` over the same values in
    the same order; and since that running sum never decreases, a binary search for the threshold counts exactly
    the prefixes still short of it. The gain is the sort: on CPU numpy's SIMD sort (x86-simd-sort) is ~50x
    faster than torch.sort on these rows, and a search replaces the full-size compare-and-count.
    """
    seq_len = negated.shape[-1]
    rows = negated.reshape(-1, seq_len)  # (N, S), a view: the block is contiguous
    _sort_rows_ascending_(rows)  # -p ascending
    zero = torch.zeros(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)
    allowed = torch.searchsorted(rows, zero).clamp_(min=1)  # (N, 1) keys with p > 0 (-0.0 sorts with 0.0)
    cumulative = rows.neg_().cumsum_(dim=-1)  # (N, S) running sum of p descending, as in the reference
    # float32 comparison with float32(threshold), as `cumulative < threshold` does in the reference.
    below = torch.searchsorted(cumulative, zero.fill_(threshold))  # (N, 1) prefixes with sum < threshold
    # A row whose rounded total falls short of the threshold would count every key, masked ones included; the
    # reference caps k_eff at the number of allowed keys, and so does this.
    k_eff = torch.minimum(below + 1, allowed)
    return k_eff.to(torch.int32).reshape(negated.shape[:-1])


def _sort_rows_ascending_(rows: torch.Tensor) -> None:
    """Sorts each row of a contiguous (N, S) tensor in place."""
    if rows.device.type == "cpu":
        # numpy's sort shares the tensor's memory. One thread: splitting rows over a thread pool measured no
        # faster on 2 cores, where torch's own threads are still spinning after the previous op.
        rows.detach().numpy().sort(axis=-1)
    else:
        rows.copy_(rows.sort(dim=-1).values)


def _block_rows(batch: int, heads: int, seq_len: int, budget_bytes: int) -> int:
    """Query rows per block so that the block's work tensors (2 float32 + 1 bool per score) fit in the budget."""
    per_row = batch * heads * seq_len * 9
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

    query_norm = query.float().norm(dim=-1)  # (B, H, T)
    # Scaling q once costs T*D instead of a pass over every score.
    q = (query.float() * scaling).view(batch, kv_heads, groups, seq_len, head_dim)  # (B, KV, G, T, D)
    k_t = key.float().transpose(-1, -2)  # (B, KV, D, T)

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
        block = stop - start
        # (B, KV, G*R, D) @ (B, KV, D, S): one batched matmul per KV head, with no copy of k per query head.
        scores = (q[:, :, :, start:stop].reshape(batch, kv_heads, groups * block, head_dim) @ k_t[..., :stop]).view(
            batch, kv_heads, groups, block, stop
        )  # (B, KV, G, R, S)
        if softcap is not None:
            scores = scores.div_(softcap).tanh_().mul_(softcap)
        if allowed is None and sliding_window is None:
            # Keys before `start` are visible to every query of the block: only the (R, R) square at the
            # diagonal needs the causal mask.
            masked = scores[..., start:stop]  # (B, KV, G, R, R) view
            hidden = positions[start:stop, None] < positions[None, start:stop]  # (R, R) future keys
        else:
            masked = scores
            mask = positions[None, :stop] <= positions[start:stop, None]  # (R, S) causal
            if sliding_window is not None:
                mask = mask & (positions[None, :stop] > positions[start:stop, None] - sliding_window)
            if allowed is not None:
                block_allowed = allowed[:, 0, start:stop, :stop].unsqueeze(1).unsqueeze(1)  # (B|1, 1, 1, R, S)
                mask = mask & block_allowed
            hidden = ~mask
        masked.masked_fill_(hidden, float("-inf"))

        # Shift by the row max: exp(z) <= 1, the max entry is exactly exp(0) = 1, so max p = 1 / Z exactly.
        row_max = scores.amax(dim=-1, keepdim=True)  # (B, KV, G, R, 1)
        # z = s - max, in place. Clamped at -87 (exp(-87) ~ 1.6e-38, still a normal float): torch's vectorized exp
        # is ~5x slower on inputs whose exp underflows, and real attention rows are full of them. A key that far
        # below the max gets p ~ 1e-38 instead of ~0, which no metric can see; hidden keys are re-zeroed below.
        shifted = scores.sub_(row_max).clamp_(min=-87.0)
        exp_shifted = shifted.exp()
        (exp_shifted[..., start:stop] if masked is not scores else exp_shifted).masked_fill_(hidden, 0.0)
        partition = exp_shifted.sum(dim=-1, keepdim=True)
        # -sum p ln p = ln Z - sum(e z) / Z, without materialising p ln p (hidden keys: e = 0, z finite).
        expected_shift = shifted.mul_(exp_shifted).sum(dim=-1) / partition.squeeze(-1)
        block_entropy = partition.squeeze(-1).log() - expected_shift  # (B, KV, G, R)

        entropy[:, :, start:stop] = block_entropy.clamp(min=0.0).reshape(batch, heads, block)
        max_attn[:, :, start:stop] = partition.squeeze(-1).reciprocal().reshape(batch, heads, block)

        # --- extended metrics: per-row reductions of this block's tensors ---
        if extended:
            block_shape = (batch, heads, block)
            # Masked keys hold p = 0 and a finite distance, so they add nothing.
            distance = (positions[start:stop, None] - positions[None, :stop]).float()  # (R, S)
            sink_attn[:, :, start:stop] = (exp_shifted[..., 0] / partition.squeeze(-1)).reshape(block_shape)
            attn_distance[:, :, start:stop] = ((exp_shifted * distance).sum(dim=-1) / partition.squeeze(-1)).reshape(
                block_shape
            )
            max_logit[:, :, start:stop] = row_max.squeeze(-1).reshape(block_shape)
            lse[:, :, start:stop] = (row_max + partition.log()).squeeze(-1).reshape(block_shape)
        # --- end extended metrics ---

        # -p = e / (-Z): the probabilities, negated for k_eff's sort, in place (last: it overwrites e).
        negated_probs = exp_shifted.div_(partition.neg())
        k_eff[:, :, start:stop] = _k_eff_from_negated(negated_probs, k_eff_threshold).reshape(batch, heads, block)

    if extended:
        extended_metrics = (sink_attn, attn_distance, max_logit, lse, key_norm)
        return AttentionMetrics(query_norm, entropy, max_attn, k_eff, *extended_metrics)
    return AttentionMetrics(query_norm, entropy, max_attn, k_eff)


def prototype_scaling(head_dim: int) -> float:
    """The prototype's 1/sqrt(d) scaling, used with metrics.attention=pre_rope."""
    return 1.0 / math.sqrt(head_dim)
