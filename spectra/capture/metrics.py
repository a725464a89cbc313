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
    value_norm     ||v_t||_2, the token's own value for the query head's KV head      } filled in by the capture
    output_norm    ||sum_j p_j v_j||_2, the head's output before o_proj (Kobayashi et } hook from the tensors the
                   al., 2020: weights alone miss how much each head writes)           } model's attention returns

The scores are the model's: scaling, then soft-capping `softcap * tanh(s / softcap)` (Gemma 2), then the
causal mask, a sliding window (key j visible from t iff t - j < window, as transformers' masks define it) and
the model's own mask.

Queries are processed in blocks so memory is bounded by a budget, not by T^2; each block touches only the keys
its queries may attend to (causal). Grouped-query heads are mapped as transformers' `repeat_kv` maps them:
query head h reads KV head h // (H / KV).

    python -m pytest tests/test_metrics.py
"""

from __future__ import annotations

import importlib.util
import math
from typing import NamedTuple

import numpy as np
import torch

from spectra.capture import cpu_kernels


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
    value_norm: torch.Tensor | None = None  # (B, H, T) float32, set by capture.hook
    output_norm: torch.Tensor | None = None  # (B, H, T) float32, set by capture.hook


METRIC_FIELDS = AttentionMetrics._fields
DEFAULT_METRIC_FIELDS = METRIC_FIELDS[:4]  # the four every run writes unless metrics.names says otherwise
EXTENDED_METRIC_FIELDS = METRIC_FIELDS[4:]  # computed only when one of them is asked for
OUTPUT_METRIC_FIELDS = ("value_norm", "output_norm")  # need the attention's output: set by the capture hook


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
    """The same integers as `k_eff_from_probs`, without sorting whole rows. probs (..., S) -> (...) int32."""
    seq_len = probs.shape[-1]
    rows = probs.reshape(-1, seq_len).float().contiguous()  # (N, S)
    ones = torch.ones(rows.shape[0], device=probs.device)
    if rows.device.type != "cpu":
        return _k_eff_topk(rows, ones, threshold).reshape(probs.shape[:-1])
    out = np.empty(rows.shape[0], dtype=np.int32)
    lo = np.zeros(rows.shape[0], dtype=np.int64)
    hi = np.full(rows.shape[0], seq_len, dtype=np.int64)
    cpu_kernels.k_eff_rows(rows.numpy(), ones.numpy(), lo, hi, threshold, out)
    return torch.from_numpy(out).reshape(probs.shape[:-1])


def _k_eff_topk(e: torch.Tensor, partition: torch.Tensor, threshold: float, first: int = 128) -> torch.Tensor:
    """k_eff on devices without the CPU kernels: the top-K keys of every row (a top-K prefix is exactly the
    sort's prefix), K grown 8x only for the rows whose top-K mass is still short of the threshold.

    Hidden keys must hold e = 0. The running sum is accumulated in float64, so the prefix sums do not depend on
    how the device's scan splits the row.
    """
    rows, seq_len = e.shape
    k_eff = torch.empty(rows, dtype=torch.int32, device=e.device)
    allowed = (e > 0).sum(dim=-1).clamp_(min=1)
    pending = torch.arange(rows, device=e.device)
    top = min(first, seq_len)
    while pending.numel():
        values = torch.topk(e[pending], top, dim=-1, sorted=True).values  # (P, K) descending
        cumulative = (values / partition[pending, None]).double().cumsum(dim=-1).float()  # (P, K)
        below = (cumulative < threshold).sum(dim=-1)
        done = (cumulative[:, -1] >= threshold) | (top >= allowed[pending])
        k_eff[pending[done]] = torch.minimum(below[done] + 1, allowed[pending[done]]).to(torch.int32)
        pending = pending[~done]
        top = min(top * 8, seq_len)
    return k_eff


METRICS_KERNELS = ("auto", "numba", "torch", "triton")  # hardware.metrics_kernel


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def metrics_path(
    requested: str, query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor | None
) -> tuple[str, str | None]:
    """(kernel that computes this layer: numba | torch | triton, why it is not the one asked for or None).

    auto: numba on the CPU, triton on a CUDA device when triton imports, torch otherwise. What the Triton kernel
    cannot cover falls back to the torch path, which runs on any device.
    """
    if requested not in METRICS_KERNELS:
        raise ValueError(f"metrics kernel must be one of {METRICS_KERNELS}, got {requested!r}")
    device = query.device.type
    kernel = requested
    if requested == "auto":
        kernel = "numba" if device == "cpu" else "triton" if device == "cuda" and triton_importable() else "torch"
    if kernel == "numba" and device != "cpu":
        raise ValueError(f"the numba kernels run on the CPU only, not on {device}")
    if kernel == "triton":
        from spectra.capture import triton_metrics

        reason = triton_metrics.unsupported_reason(query, key, allowed)
        if reason is not None:
            return "torch", reason
    return kernel, None


def _padded(keys: int) -> int:
    """keys rounded up to a multiple of 16 (float32 rows of whole 64-byte lines)."""
    return -(-keys // 16) * 16


def _block_rows(batch: int, heads: int, seq_len: int, budget_bytes: int) -> int:
    """Query rows per block so that the block's work tensors (2 float32 + 1 bool per score) fit in the budget,
    in equal blocks, and at least 4 of them from 256 tokens on: a block computes the square of scores up to its
    diagonal in full, so one or two blocks per layer compute up to 2x the causal scores (4: 1.25x)."""
    per_row = batch * heads * seq_len * 9
    most = max(1, min(seq_len, budget_bytes // per_row))
    blocks = max(-(-seq_len // most), min(4, -(-seq_len // 64)))
    return -(-seq_len // blocks)


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
    metrics_kernel: str = "auto",
) -> AttentionMetrics:
    """Metrics of softmax(scaling * q k^T) under a causal mask (and `allowed`, if given).

    query   (B, H, T, D)   as the model's attention function receives it (post-RoPE for Llama)
    key     (B, KV, T, D)  not repeated for grouped-query heads
    allowed (B or 1, 1, T, T) bool, True where query t may attend to key j; None means plain causal.
            Causality is applied in any case: transformers often passes no mask for causal-only batches.
    softcap        scores become softcap * tanh(scores / softcap) before masking, as Gemma 2 computes them
    sliding_window query t sees keys j with t - j < sliding_window (on top of `allowed`)
    extended       also compute the extended metrics (see the module docstring)
    metrics_kernel auto | numba | torch | triton (see `metrics_path`)
    """
    batch, heads, seq_len, head_dim = query.shape
    kv_heads = key.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} KV heads evenly")
    groups = heads // kv_heads
    device = query.device

    query_norm = query.float().norm(dim=-1)  # (B, H, T)
    # Scaling q once costs T*D instead of a pass over every score.
    q = (query.float() * scaling).view(batch, kv_heads, groups, seq_len, head_dim)  # (B, KV, G, T, D)
    k_t = key.float().transpose(-1, -2)  # (B, KV, D, T)

    out = {
        name: torch.empty(batch, heads, seq_len, dtype=torch.float32, device=device)
        for name in METRIC_FIELDS
        if name not in OUTPUT_METRIC_FIELDS
    }
    out["k_eff"] = torch.empty(batch, heads, seq_len, dtype=torch.int32, device=device)
    out["query_norm"] = query_norm
    if extended:
        # Each query head h reads KV head h // G: (B, KV, T) -> (B, KV, G, T) -> (B, H, T)
        key_norm = key.float().norm(dim=-1).unsqueeze(2).expand(batch, kv_heads, groups, seq_len)
        out["key_norm"] = key_norm.reshape(batch, heads, seq_len)

    kernel, _ = metrics_path(metrics_kernel, query, key, allowed)
    if kernel == "triton":
        out |= _layer_metrics_triton(query, key, scaling, k_eff_threshold, allowed, softcap, sliding_window)
        return AttentionMetrics(*(out.get(name) if extended or name in DEFAULT_METRIC_FIELDS else None
                                  for name in METRIC_FIELDS))
    reduce_block = _reduce_block_cpu if kernel == "numba" else _reduce_block_torch
    rows = _block_rows(batch, heads, seq_len, block_bytes)
    # One scratch tensor holds every block's scores, rows padded to 16 keys (64 bytes): a fresh multi-MB tensor
    # per block paid its page faults on every block, and an unaligned row stride slows the CPU matmul (the two
    # together made it 1.7x slower at 8192 tokens on this project's CPUs).
    scratch = torch.empty(batch * heads * rows * _padded(seq_len), device=device)
    positions = torch.arange(seq_len, device=device)
    for start in range(0, seq_len, rows):
        stop = min(seq_len, start + rows)
        block = stop - start
        # Keys the block's queries may see: up to stop - 1 (causal), from start - window + 1 (sliding window;
        # only when no mask is given, since a given mask already carries the window).
        window = sliding_window if allowed is None else None
        first_key = max(0, start - window + 1) if window is not None else 0
        # Padded with keys no row sees (future ones, or ones before the window): outside every row's [lo, hi)
        last_key = min(seq_len, first_key + _padded(stop - first_key))
        first_key = max(0, last_key - _padded(stop - first_key))
        width = last_key - first_key
        # (B, KV, G*R, D) @ (B, KV, D, S): one batched matmul per KV head, with no copy of k per query head.
        queries = q[:, :, :, start:stop].reshape(batch, kv_heads, groups * block, head_dim)
        scores = scratch[: batch * heads * block * width].view(batch, kv_heads, groups * block, width)
        torch.matmul(queries, k_t[..., first_key:last_key], out=scores)
        scores = scores.view(batch, kv_heads, groups, block, width)
        if softcap is not None:
            scores = scores.div_(softcap).tanh_().mul_(softcap)
        if allowed is not None or sliding_window is not None:
            key_pos = positions[first_key:last_key]
            mask = key_pos[None, :] <= positions[start:stop, None]  # (R, S) causal
            if sliding_window is not None:
                mask = mask & (key_pos[None, :] > positions[start:stop, None] - sliding_window)
            if allowed is not None:
                block_allowed = allowed[:, 0, start:stop, first_key:last_key].unsqueeze(1).unsqueeze(1)  # (B|1,1,1,R,S)
                mask = mask & block_allowed
            scores.masked_fill_(~mask, float("-inf"))
        # Each row's visible key range [lo, hi) within the block's keys: causal, and the window when known.
        query_pos = positions[start:stop]
        hi = query_pos + 1 - first_key
        lo = (query_pos - window + 1 - first_key).clamp_(min=0) if window is not None else torch.zeros_like(hi)
        block_metrics = reduce_block(scores, lo, hi, first_key, query_pos, k_eff_threshold, extended)
        for name, values in block_metrics.items():
            out[name][:, :, start:stop] = values.reshape(batch, heads, block)

    return AttentionMetrics(*(out.get(name) if extended or name in DEFAULT_METRIC_FIELDS else None
                              for name in METRIC_FIELDS))


def _layer_metrics_triton(query, key, scaling, threshold, allowed, softcap, sliding_window) -> dict[str, torch.Tensor]:
    """The whole layer in the Triton kernel (no score block in memory); rows it leaves undecided (thresholds within
    ~n 2^-29 of 1 only) get the sort definition on the kernel's own probabilities."""
    from spectra.capture import triton_metrics

    result, undecided = triton_metrics.layer_metrics(query, key, scaling, threshold, allowed, softcap, sliding_window)
    if undecided is not None:
        rows, probs = undecided
        result["k_eff"].view(-1)[rows] = k_eff_from_probs(probs.cpu(), threshold).to(rows.device)
    return result


def _reduce_block_cpu(scores, lo, hi, first_key, query_pos, threshold, extended) -> dict[str, torch.Tensor]:
    """One block's per-row metrics with the CPU kernels. scores (B, KV, G, R, S), masked keys -inf."""
    width = scores.shape[-1]
    rows = scores.reshape(-1, width)  # (N, S), N = B*KV*G*R, a view: the block is contiguous; row r: query r % R
    entropy = np.empty(rows.shape[0], dtype=np.float32)
    max_attn = np.empty_like(entropy)
    k_eff = np.empty(rows.shape[0], dtype=np.int32)
    sums = np.empty((4, rows.shape[0] if extended else 0), dtype=np.float32)
    cpu_kernels.row_metrics(
        rows.numpy(), lo.numpy(), hi.numpy(), first_key, query_pos.numpy(), threshold, entropy, max_attn, k_eff, sums
    )
    result = {"entropy": entropy, "max_attn": max_attn, "k_eff": k_eff}
    if extended:
        result |= {"sink_attn": sums[0], "attn_distance": sums[1], "max_logit": sums[2], "lse": sums[3]}
    return {name: torch.from_numpy(values) for name, values in result.items()}


def _reduce_block_torch(scores, lo, hi, first_key, query_pos, threshold, extended) -> dict[str, torch.Tensor]:
    """The same per-row metrics with torch operations, for any device. scores (B, KV, G, R, S), hidden keys -inf.

    The block arrives with keys past each query's range already -inf only where a mask was applied; apply the
    causal range here (keys outside [lo, hi) hidden) so both paths see the same keys.
    """
    width = scores.shape[-1]
    key_index = torch.arange(width, device=scores.device)
    outside = (key_index[None, :] < lo[:, None]) | (key_index[None, :] >= hi[:, None])  # (R, S)
    scores.masked_fill_(outside, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)  # (B, KV, G, R, 1)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    # Clamped as the CPU kernels clamp (see cpu_kernels.MIN_SHIFTED_SCORE); hidden keys stay -inf and get e = 0.
    shifted = scores.sub_(row_max)
    shifted = torch.where(shifted == float("-inf"), shifted, shifted.clamp(min=float(cpu_kernels.MIN_SHIFTED_SCORE)))
    e = shifted.exp()
    partition = e.sum(dim=-1)  # (B, KV, G, R)
    # -sum p ln p = ln Z - sum(e z) / Z (hidden keys: e = 0, and 0 * -inf is kept out)
    weighted_shift = torch.where(e > 0, e * shifted, torch.zeros_like(e)).sum(dim=-1)
    result = {
        "entropy": (partition.log() - weighted_shift / partition).clamp(min=0.0),
        "max_attn": partition.reciprocal(),
    }
    rows = e.reshape(-1, width)
    result["k_eff"] = _k_eff_topk(rows, partition.reshape(-1), threshold).view(partition.shape)
    if extended:
        key_pos = (first_key + key_index).float()
        sink = e[..., 0] / partition if first_key == 0 else torch.zeros_like(partition)
        result |= {
            "sink_attn": sink,
            "attn_distance": query_pos.float() - (e @ key_pos) / partition,
            "max_logit": row_max.squeeze(-1),
            "lse": row_max.squeeze(-1) + partition.log(),
        }
    return result


def prototype_scaling(head_dim: int) -> float:
    """The prototype's 1/sqrt(d) scaling, used with metrics.attention=pre_rope."""
    return 1.0 / math.sqrt(head_dim)
