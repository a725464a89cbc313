"""Independent reference for the capture: transformers' eager attention with output_attentions=True, run on a
float64 copy of the model, and the metrics computed from those weights in numpy."""

from __future__ import annotations

import copy

import numpy as np
import torch


def metrics_from_probs(probs: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """probs (..., T, S) float64 rows of attention weights -> entropy, max_attn, k_eff (..., T), plus
    `k_eff_ambiguous`: rows whose sorted cumulative mass passes within 1e-6 of the threshold."""
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1.0)), 0.0)
    cumulative = np.cumsum(-np.sort(-probs, axis=-1), axis=-1)
    k_eff = np.argmax(cumulative >= threshold, axis=-1) + 1
    # a row that never reaches the threshold (rounding at 1.0) needs every key it may attend to
    k_eff = np.where(cumulative[..., -1] >= threshold, k_eff, (probs > 0).sum(-1))
    return {
        "entropy": -plogp.sum(-1),
        "max_attn": probs.max(-1),
        "k_eff": k_eff,
        "k_eff_ambiguous": (np.abs(cumulative - threshold) < 1e-6).any(-1),
    }


@torch.no_grad()
def eager_reference(model, input_ids: torch.Tensor, threshold: float = 0.9) -> dict[str, np.ndarray]:
    """name -> (L, B, H, T) float64 arrays from eager float64 attention; query_norm from the q projection."""
    reference = copy.deepcopy(model).to(torch.float64)
    reference.set_attn_implementation("eager")
    config = reference.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    queries = {}
    hooks = [
        layer.self_attn.q_proj.register_forward_hook(
            lambda _m, _i, out, i=i: queries.__setitem__(i, out)
        )
        for i, layer in enumerate(reference.model.layers)
    ]
    try:
        out = reference(input_ids=input_ids, output_attentions=True, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()

    probs = torch.stack(out.attentions).numpy()  # (L, B, H, T, T)
    result = metrics_from_probs(probs, threshold)
    batch, seq_len = input_ids.shape
    # RoPE rotates pairs of coordinates, so the norm of q before RoPE equals the norm after it.
    q = torch.stack([queries[i] for i in sorted(queries)])  # (L, B, T, H*D)
    q = q.view(len(queries), batch, seq_len, -1, head_dim).transpose(2, 3)  # (L, B, H, T, D)
    result["query_norm"] = q.norm(dim=-1).numpy()
    return result
