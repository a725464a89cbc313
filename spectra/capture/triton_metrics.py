"""Launch side of the Triton metrics kernel (spectra/capture/triton_kernels.py): dtypes, grid, scratch, what the
kernel cannot cover, and the rows it hands back to the sort definition. The math is in the kernel file.

On a CUDA device the kernel is compiled; on the CPU it runs only in Triton's interpreter (TRITON_INTERPRET=1 set
before triton is imported), which is how the tests check it without a GPU:

    TRITON_INTERPRET=1 python -m spectra.run hardware.metrics_kernel=triton data.context_length=128 data.n_samples=1
"""

from __future__ import annotations

import os

import torch
import triton

from spectra.capture import triton_kernels as kernels

MAX_HEAD_DIM = 256  # one (BLOCK_M, head_dim) query tile and a (head_dim, BLOCK_N) key tile in registers
# Rows the kernel could not decide exist only for thresholds within ~n 2^-29 of 1 (see the kernel file); above
# this bound on n, or this close to 1, the launcher looks for them (one device-to-host sync per layer).
UNDECIDED_POSSIBLE_THRESHOLD = 1.0 - 2.0**-9
UNDECIDED_POSSIBLE_KEYS = 2**16


def tile_sizes() -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, CHUNK) for this launch. The interpreter pays per operation, not per element: larger
    tiles, fewer operations. On a GPU, smaller ones keep the narrowing pass's (M, N, LEVELS) tensors and the
    candidates' (M, CHUNK, CANDIDATES) comparisons in registers."""
    return (64, 64, kernels.CANDIDATES) if interpreted() else (kernels.BLOCK_M, kernels.BLOCK_N, kernels.CHUNK)


def interpreted() -> bool:
    """True when triton runs kernels in its interpreter (TRITON_INTERPRET, as triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def unsupported_reason(query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor | None) -> str | None:
    """Why the kernel cannot compute this layer's metrics (the caller falls back to the torch path), or None."""
    batch, _, seq_len, head_dim = query.shape
    if query.device.type == "cpu" and not interpreted():
        return "on the CPU the Triton kernel runs only in Triton's interpreter (TRITON_INTERPRET=1)"
    if query.device.type not in ("cpu", "cuda"):
        return f"device {query.device.type} is not a CUDA GPU"
    if head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} > {MAX_HEAD_DIM}"
    if key.shape[2] != seq_len:
        return f"{key.shape[2]} keys for {seq_len} queries (a KV cache)"
    if allowed is not None and (
        allowed.dim() != 4 or allowed.shape[1] != 1 or tuple(allowed.shape[2:]) != (seq_len, seq_len)
        or allowed.shape[0] not in (1, batch)
    ):  # fmt: skip
        return f"an attention mask of shape {tuple(allowed.shape)}"
    return None


def _launch(query, key, scaling, threshold, allowed, softcap, sliding_window, write_probs=None, slots=None):
    """Runs the kernel once; returns (out (6, N), k_eff (N,), flag (N,)) or, with write_probs, fills it."""
    batch, heads, seq_len, head_dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    device = query.device
    # bf16 values are exact in TF32 (8 of its 10 mantissa bits), so TF32 tensor cores lose nothing on them; float32
    # models need IEEE fp32 products (TF32 would round their inputs).
    precision = "tf32" if query.dtype == torch.bfloat16 and not interpreted() else "ieee"
    q, k = query.float(), key.float()  # the interpreter's bf16 dot multiplies raw bits: always fp32 operands
    n_rows = batch * heads * seq_len
    if allowed is not None:
        mask = allowed.view(torch.uint8) if allowed.dtype == torch.bool else allowed.to(torch.uint8)
        mask_strides = (0 if mask.shape[0] == 1 else mask.stride(0), mask.stride(2), mask.stride(3))
    else:
        mask, mask_strides = q, (0, 0, 0)  # never read (HAS_MASK false)
    if write_probs is None:
        out = torch.empty(len(kernels.OUT_FIELDS), n_rows, dtype=torch.float32, device=device)
        k_eff = torch.empty(n_rows, dtype=torch.int32, device=device)
        flag = torch.empty(n_rows, dtype=torch.int32, device=device)
        scratch = torch.empty(n_rows, kernels.CANDIDATES, dtype=torch.float32, device=device)
        probs, slots = out, k_eff  # unused in this mode
    else:
        out = k_eff = flag = scratch = write_probs  # unused in this mode
        probs = write_probs
    block_m, block_n, chunk = tile_sizes()
    grid = (triton.cdiv(groups * seq_len, block_m), batch * kv_heads)
    kernels.attention_metrics_kernel[grid](
        q, k, mask, out, k_eff, flag, scratch, probs, slots,
        *q.stride(), *k.stride(), *mask_strides,
        seq_len, head_dim, heads, kv_heads, groups, n_rows, float(scaling),
        float(softcap) if softcap is not None else 1.0,
        int(sliding_window) if sliding_window is not None else 0,
        float(threshold),
        HAS_SOFTCAP=softcap is not None, HAS_WINDOW=sliding_window is not None, HAS_MASK=allowed is not None,
        PRECISION=precision, WRITE_PROBS=write_probs is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        LEVELS=kernels.LEVELS, CANDIDATES=kernels.CANDIDATES, CHUNK=chunk, NARROW_PASSES=kernels.NARROW_PASSES,
        num_warps=8,  # the narrowing pass's (M, N, LEVELS) float64 sums spread over more threads
        # No fused multiply-adds: the compiler could contract scale * (q . k) - m in one pass and not in another,
        # and every pass must compute the same p bit for bit.
        enable_fp_fusion=False,
    )  # fmt: skip
    return out, k_eff, flag


def layer_probabilities(query, key, scaling, allowed=None, softcap=None, sliding_window=None, rows=None):
    """The kernel's own probabilities p for the given flattened (b, h, t) rows (all when None): (n, T) float32,
    computed by the same program and tiles as the metrics, so bit-identical to the p behind k_eff."""
    batch, heads, seq_len, _ = query.shape
    n_rows = batch * heads * seq_len
    if rows is None:
        rows = torch.arange(n_rows, device=query.device)
    slots = torch.full((n_rows,), -1, dtype=torch.int32, device=query.device)
    slots[rows] = torch.arange(len(rows), dtype=torch.int32, device=query.device)
    probs = torch.zeros(len(rows), seq_len, dtype=torch.float32, device=query.device)
    _launch(query, key, scaling, 0.5, allowed, softcap, sliding_window, write_probs=probs, slots=slots)
    return probs


def layer_metrics(query, key, scaling, threshold, allowed=None, softcap=None, sliding_window=None):
    """entropy, max_attn, k_eff, sink_attn, attn_distance, max_logit, lse as (B, H, T) tensors, plus the rows the
    kernel left undecided: None, or (flattened row ids, their p as (n, T)) for the sort definition to settle.

    query (B, H, T, D), key (B, KV, T, D) not repeated; allowed (B or 1, 1, T, T) bool or None; causality always.
    """
    batch, heads, seq_len, _ = query.shape
    out, k_eff, flag = _launch(query, key, scaling, threshold, allowed, softcap, sliding_window)
    result = {name: out[i].view(batch, heads, seq_len) for i, name in enumerate(kernels.OUT_FIELDS)}
    result["k_eff"] = k_eff.view(batch, heads, seq_len)
    undecided = None
    if interpreted() or threshold > UNDECIDED_POSSIBLE_THRESHOLD or seq_len > UNDECIDED_POSSIBLE_KEYS:
        rows = flag.nonzero().flatten()
        if rows.numel():
            undecided = rows, layer_probabilities(query, key, scaling, allowed, softcap, sliding_window, rows)
    return result, undecided
