"""Independent reference for the capture: transformers' eager attention with output_attentions=True, run on a
float64 copy of the model, and the metrics computed from those weights in numpy."""

from __future__ import annotations

import copy
import sys

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


def recorded_eager_attention(model, input_ids: torch.Tensor, monkeypatch) -> tuple[list[tuple], tuple]:
    """Runs a float64 copy of the model with eager attention and output_attentions=True, keeping what each layer
    handed its `eager_attention_forward`: [(query, key, mask, scaling, softcap)] per layer, and the attention
    weights eager returned. Query and key are the ones the model attends with (after RoPE and any q/k norm)."""
    reference = copy.deepcopy(model).to(torch.float64)
    reference.set_attn_implementation("eager")
    attention = next(m for m in reference.modules() if type(m).__name__.endswith("Attention"))
    modeling = sys.modules[type(attention).__module__]
    eager, received = modeling.eager_attention_forward, []

    def recorder(module, query, key, value, attention_mask, **kwargs):
        received.append((query, key, attention_mask, kwargs.get("scaling"), kwargs.get("softcap")))
        return eager(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(modeling, "eager_attention_forward", recorder)
    try:
        with torch.no_grad():  # the decoder stack alone: the reference needs no logits
            weights = reference.base_model(input_ids=input_ids, use_cache=False, output_attentions=True).attentions
    finally:
        monkeypatch.setattr(modeling, "eager_attention_forward", eager)
    return received, weights


def causal_mask(seq_len: int, window: int | None) -> torch.Tensor:
    """(T, T) bool, True where query t may attend to key j: j <= t, and t - window < j with a window."""
    distance = torch.arange(seq_len)[:, None] - torch.arange(seq_len)[None, :]  # (T, T) t - j
    return (distance >= 0) & ((distance < window) if window else True)


def reference_metrics(
    query: torch.Tensor, key: torch.Tensor, scaling: float, threshold: float, window: int | None, softcap=None
) -> tuple[dict[str, np.ndarray], torch.Tensor]:
    """Every metric of one layer, naively in float64 over the full T x T matrix, with a causal mask built here
    (query t sees keys t - window < j <= t when window is set); returns (metrics, p as (B, H, T, T))."""
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # (B, H, T, D), as repeat_kv does
    scores = query @ key.transpose(-1, -2) * scaling  # (B, H, T, T)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    allowed = causal_mask(query.shape[-2], window)
    distance = torch.arange(query.shape[-2])[:, None] - torch.arange(query.shape[-2])[None, :]  # (T, T) t - j
    masked = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(masked, dim=-1)
    metrics = {
        **metrics_from_probs(probs.numpy(), threshold),  # entropy, max_attn, k_eff, k_eff_ambiguous
        "query_norm": query.norm(dim=-1).numpy(),
        "sink_attn": probs[..., 0].numpy(),
        "attn_distance": (probs * distance.to(probs.dtype)).sum(-1).numpy(),
        "max_logit": masked.amax(-1).numpy(),
        "lse": torch.logsumexp(masked, dim=-1).numpy(),
        "key_norm": key.norm(dim=-1).numpy(),
        "visible_keys": allowed.sum(-1).expand(probs.shape[:-1]).numpy(),
    }
    return metrics, probs
