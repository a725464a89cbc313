"""Capture: route every attention call of a transformers model through Spectra's attention function.

The function is registered with transformers' `AttentionInterface` and selected with
`model.set_attn_implementation`, so it receives exactly what the model's own attention would: q and k after
RoPE, k not yet repeated for grouped-query heads, the model's scaling and mask. It reduces the layer to its
per-token metrics on the spot (memory does not grow with depth), then hands the call to transformers' SDPA
attention so the model's outputs are unchanged.

    with AttentionCapture(model, k_eff_threshold=0.9) as capture:
        metrics = capture.run(input_ids)        # name -> (layers, B, H, T) tensor
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from spectra.errors import SpectraError
from spectra.metrics import METRIC_FIELDS, attention_metrics, prototype_scaling

ATTENTION_NAME = "spectra_capture"


def _allowed_from_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The model's mask as bool 'may attend' (B or 1, 1, T, S); None means plain causal."""
    if attention_mask is None:
        return None
    if attention_mask.dtype == torch.bool:
        return attention_mask
    # Additive float masks hold 0 where attention is allowed and a large negative number elsewhere.
    return attention_mask == 0


class AttentionCapture:
    """Context manager that swaps the model's attention implementation for the capturing one.

    attention: "post_rope" measures the model's own attention. "pre_rope" reproduces the prototype's analysis,
    softmax(q k^T / sqrt(d)) from q and k taken before the rotary embedding (a different distribution, kept for
    comparison); it needs `q_proj`/`k_proj` modules on each attention block, as Llama-family models have.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        k_eff_threshold: float = 0.9,
        attention: str = "post_rope",
        block_bytes: int = 256 * 2**20,
    ):
        self.model = model
        self.k_eff_threshold = k_eff_threshold
        self.attention = attention
        self.block_bytes = block_bytes
        self._layers: dict[int, Any] = {}
        self._pre_rope: dict[tuple[int, str], torch.Tensor] = {}
        self._hooks: list[Any] = []
        self._previous_implementation: str | None = None

    def __enter__(self) -> "AttentionCapture":
        # The mask function must be registered under the same name, or transformers silently passes no mask.
        AttentionInterface.register(ATTENTION_NAME, self._attention)
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
        self._previous_implementation = self.model.config._attn_implementation
        self.model.set_attn_implementation(ATTENTION_NAME)
        if self.model.config._attn_implementation != ATTENTION_NAME:
            raise SpectraError(
                f"{type(self.model).__name__} does not route attention through transformers' AttentionInterface, "
                "so Spectra cannot see its attention; this architecture is not supported"
            )
        if self.attention == "pre_rope":
            self._hook_projections()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self.model.set_attn_implementation(self._previous_implementation)

    def _hook_projections(self) -> None:
        attention_modules = [m for m in self.model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]
        if not attention_modules:
            raise SpectraError(
                "metrics.attention=pre_rope needs q_proj/k_proj projections on each attention block; "
                f"{type(self.model).__name__} has none"
            )
        for module in attention_modules:
            for name in ("q_proj", "k_proj"):
                store = self._pre_rope

                def save(_mod, _inputs, output, key=(module.layer_idx, name)):
                    store[key] = output

                self._hooks.append(getattr(module, name).register_forward_hook(save))

    def _attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layer = module.layer_idx
        if self.attention == "pre_rope":
            batch, _, seq_len, head_dim = query.shape
            # (B, T, H*D) -> (B, H, T, D), as the model does before applying RoPE
            q = self._pre_rope.pop((layer, "q_proj")).view(batch, seq_len, -1, head_dim).transpose(1, 2)
            k = self._pre_rope.pop((layer, "k_proj")).view(batch, seq_len, -1, head_dim).transpose(1, 2)
            self._layers[layer] = attention_metrics(
                q, k, prototype_scaling(head_dim), self.k_eff_threshold, None, self.block_bytes
            )
        else:
            self._layers[layer] = attention_metrics(
                query,
                key,
                scaling if scaling is not None else module.scaling,
                self.k_eff_threshold,
                _allowed_from_mask(attention_mask),
                self.block_bytes,
            )
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """One forward pass; returns metric name -> (layers, B, H, T) on the model's device."""
        self._layers.clear()
        self.model(input_ids=input_ids, use_cache=False)
        if not self._layers:
            raise SpectraError(
                f"{type(self.model).__name__}'s attention never reached the capture function; "
                "this architecture computes attention outside transformers' AttentionInterface"
            )
        layers = [self._layers[i] for i in sorted(self._layers)]
        return {name: torch.stack([getattr(m, name) for m in layers]) for name in METRIC_FIELDS}
