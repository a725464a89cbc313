"""Capture: route every attention call of a transformers model through Spectra's attention function.

The function is registered with transformers' `AttentionInterface` and selected with
`model.set_attn_implementation`, so it receives exactly what the model's own attention would: q and k after
RoPE, k not yet repeated for grouped-query heads, the model's scaling and mask. It reduces the layer to its
per-token metrics on the spot (memory does not grow with depth), then hands the call to the implementation the
model ran before (SDPA, or for "eager" the model's own `eager_attention_forward`, which e.g. Gemma 2 needs for
its soft-capping), so the model's outputs are unchanged. The metrics use the scores that implementation uses:
its scaling, `softcap` and `sliding_window` arguments and its mask. Architectures whose attention adds
something the metrics cannot see (relative-position biases, sink logits, bidirectional attention) are refused.

    with AttentionCapture(model, k_eff_threshold=0.9) as capture:
        metrics = capture.run(input_ids)        # name -> (layers, B, H, T) tensor
"""

from __future__ import annotations

import inspect
import logging
import sys
from typing import Any, Callable

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from spectra.capture.metrics import (
    EXTENDED_METRIC_FIELDS,
    METRIC_FIELDS,
    attention_metrics,
    metrics_path,
    prototype_scaling,
)
from spectra.crashpoints import crash_point
from spectra.errors import SpectraError

ATTENTION_NAME = "spectra_capture"
logger = logging.getLogger(__name__)

# Attention-function arguments that change the scores in ways the metrics do not model (found by reading every
# `attention_interface(...)` call in transformers 5.24): a model passing one of them is refused, not measured.
UNMODELLED_SCORE_ARGUMENTS = {
    "position_bias": "adds a relative-position bias to the attention scores",
    "s_aux": "adds learned attention-sink logits to the softmax",
    "sinks": "adds learned attention-sink logits to the softmax",
}
# Implementations that accept `softcap` but drop it (torch's SDPA has no soft-capping).
IGNORES_SOFTCAP = ("sdpa",)


def _allowed_from_mask(attention_mask: torch.Tensor | None, model_name: str) -> torch.Tensor | None:
    """The model's mask as bool 'may attend' (B or 1, 1, T, S); None means plain causal."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        raise SpectraError(
            f"{model_name} passes its attention mask as {type(attention_mask).__name__} "
            f"{getattr(attention_mask, 'shape', '')}, which Spectra cannot read; load the model with "
            "attn_implementation='sdpa' or 'eager'"
        )
    if attention_mask.dtype == torch.bool:
        return attention_mask
    # Additive float masks hold 0 where attention is allowed and a large negative number elsewhere; anything
    # else (an ALiBi-style bias folded into the mask) would change the scores without the metrics knowing.
    allowed = attention_mask == 0
    blocked = attention_mask <= torch.finfo(attention_mask.dtype).min / 2
    if not bool((allowed | blocked).all()):
        raise SpectraError(
            f"{model_name} adds a bias to its attention scores through the mask; Spectra's metrics would not "
            "match its attention, so this architecture is not supported"
        )
    return allowed


def _eager_attention(module: torch.nn.Module) -> Callable:
    """The `eager_attention_forward` the module's own forward calls when the model runs 'eager'."""
    # The forward's globals, not the class's module: a subclass may inherit its parent's forward. unwrap
    # reaches through decorators such as transformers' deprecate_kwarg.
    forward = inspect.unwrap(type(module).forward)
    eager = getattr(forward, "__globals__", {}).get("eager_attention_forward")
    if eager is None:
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise SpectraError(
            f"{type(module).__name__} runs eager attention but its module defines no eager_attention_forward for "
            "Spectra to call; load the model with attn_implementation='sdpa'"
        )
    return eager


def _value_and_output_norms(value: torch.Tensor, attn_output: torch.Tensor, heads: int) -> dict[str, torch.Tensor]:
    """value_norm and output_norm (B, H, T) float32 from the tensors the model's attention used and returned.

    value       (B, KV, T, D) not repeated for grouped-query heads: query head h reads KV head h // (H / KV)
    attn_output (B, T, H, D)  sum_j p_j v_j per head, before o_proj, as transformers' implementations return it
    """
    batch, kv_heads, seq_len, _ = value.shape
    value_norm = value.float().norm(dim=-1)  # (B, KV, T)
    value_norm = value_norm.unsqueeze(2).expand(batch, kv_heads, heads // kv_heads, seq_len).reshape(batch, heads, seq_len)
    return {"value_norm": value_norm, "output_norm": attn_output.float().norm(dim=-1).transpose(1, 2)}


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
        extended: bool = False,
        metrics_kernel: str = "auto",
    ):
        self.model = model
        self.k_eff_threshold = k_eff_threshold
        self.attention = attention
        self.block_bytes = block_bytes
        self.extended = extended  # also compute metrics.EXTENDED_METRIC_FIELDS
        self.metrics_kernel = metrics_kernel  # hardware.metrics_kernel
        self._paths_logged: set[int] = set()  # layers whose metrics path the log already named
        self._layers: dict[int, Any] = {}
        self._pre_rope: dict[tuple[int, str], torch.Tensor] = {}
        self._hooks: list[Any] = []
        self._previous_implementation: str | None = None

    @classmethod
    def from_config(cls, model: torch.nn.Module, metrics_cfg, hardware_cfg) -> "AttentionCapture":
        """The capture a run's `metrics` and `hardware` config groups describe."""
        return cls(
            model,
            k_eff_threshold=metrics_cfg.k_eff_threshold,
            attention=metrics_cfg.attention,
            block_bytes=hardware_cfg.attention_block_mb * 2**20,
            extended=any(name in EXTENDED_METRIC_FIELDS for name in metrics_cfg.names),
            metrics_kernel=hardware_cfg.metrics_kernel,
        )

    def __enter__(self) -> "AttentionCapture":
        previous = self.model.config._attn_implementation or "eager"
        mask_function = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(previous)
        if previous == ATTENTION_NAME or mask_function is None or (
            previous != "eager" and previous not in ALL_ATTENTION_FUNCTIONS
        ):
            raise SpectraError(
                f"{type(self.model).__name__} runs attn_implementation={previous!r}, which Spectra cannot pass the "
                "attention on to; load the model with attn_implementation='sdpa' or 'eager'"
            )
        # The mask function must be registered under the same name, or transformers silently passes no mask; it is
        # the previous implementation's, so the delegate gets the mask it expects (eager: additive float).
        AttentionInterface.register(ATTENTION_NAME, self._attention)
        AttentionMaskInterface.register(ATTENTION_NAME, mask_function)
        self._previous_implementation = previous
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

    def _refuse_unfaithful(self, module: torch.nn.Module, kwargs: dict) -> None:
        """Raise if this call's attention is one the metrics cannot reproduce."""
        name = type(module).__name__
        for argument, what in UNMODELLED_SCORE_ARGUMENTS.items():
            if kwargs.get(argument) is not None:
                raise SpectraError(
                    f"{name} {what} ({argument}); Spectra's metrics would not match its attention, "
                    "so this architecture is not supported"
                )
        if kwargs.get("is_causal") is False or getattr(module, "is_causal", True) is False:
            raise SpectraError(f"{name} attends bidirectionally; Spectra measures causal attention only")
        if kwargs.get("softcap") is not None and self._previous_implementation in IGNORES_SOFTCAP:
            raise SpectraError(
                f"{name} soft-caps its attention scores but runs attn_implementation="
                f"'{self._previous_implementation}', which ignores the cap; load the model with "
                "attn_implementation='eager'"
            )

    def _log_path(self, layer: int, query, key, allowed) -> None:
        """Says once per layer which kernel computes its metrics, and why when it is not the one asked for."""
        if layer in self._paths_logged:
            return
        self._paths_logged.add(layer)
        kernel, reason = metrics_path(self.metrics_kernel, query, key, allowed)
        because = f" ({self.metrics_kernel} cannot: {reason})" if reason else ""
        logger.info("layer %d: attention metrics on the %s path%s", layer, kernel, because)

    def _attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layer = module.layer_idx
        self._refuse_unfaithful(module, kwargs)
        if self.attention == "pre_rope":
            batch, _, seq_len, head_dim = query.shape
            # (B, T, H*D) -> (B, H, T, D), as the model does before applying RoPE
            q = self._pre_rope.pop((layer, "q_proj")).view(batch, seq_len, -1, head_dim).transpose(1, 2)
            k = self._pre_rope.pop((layer, "k_proj")).view(batch, seq_len, -1, head_dim).transpose(1, 2)
            self._log_path(layer, q, k, None)
            self._layers[layer] = attention_metrics(
                q, k, prototype_scaling(head_dim), self.k_eff_threshold, None, self.block_bytes, extended=self.extended,
                metrics_kernel=self.metrics_kernel,
            )
        else:
            allowed = _allowed_from_mask(attention_mask, type(module).__name__)
            self._log_path(layer, query, key, allowed)
            self._layers[layer] = attention_metrics(
                query,
                key,
                scaling if scaling is not None else module.scaling,
                self.k_eff_threshold,
                allowed,
                self.block_bytes,
                softcap=kwargs.get("softcap"),
                # A mask, when there is one, already carries the window and is all SDPA and eager attention
                # read (a caller's own 4D mask may even drop it); with none, implementations such as flash
                # attention apply the window from this argument.
                sliding_window=kwargs.get("sliding_window") if attention_mask is None else None,
                extended=self.extended,
                metrics_kernel=self.metrics_kernel,
            )
        crash_point("attention-layer")  # tests: SIGKILL mid-batch
        if self._previous_implementation == "eager":
            delegate = _eager_attention(module)
        else:
            delegate = ALL_ATTENTION_FUNCTIONS[self._previous_implementation]
        result = delegate(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        if self.extended:
            self._layers[layer] = self._layers[layer]._replace(**_value_and_output_norms(value, result[0], query.shape[1]))
        return result

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """One forward pass; returns metric name -> (layers, B, H, T) on the model's device."""
        self._layers.clear()
        # The decoder stack without the LM head: the metrics need no logits, and at 8K tokens SmolLM2's
        # (T, vocab) float32 logits alone would take 1.6 GB.
        self.model.base_model(input_ids=input_ids, use_cache=False)
        if not self._layers:
            raise SpectraError(
                f"{type(self.model).__name__}'s attention never reached the capture function; "
                "this architecture computes attention outside transformers' AttentionInterface"
            )
        layers = [self._layers[i] for i in sorted(self._layers)]
        computed = [name for name in METRIC_FIELDS if getattr(layers[0], name) is not None]
        return {name: torch.stack([getattr(m, name) for m in layers]) for name in computed}


class HostMetrics:
    """A batch's metrics on their way to host memory; wait() returns name -> numpy array once they have arrived."""

    def __init__(self, arrays: dict[str, np.ndarray], copied: "torch.cuda.Event | None" = None):
        self._arrays = arrays
        self._copied = copied

    def wait(self) -> dict[str, np.ndarray]:
        if self._copied is not None:
            self._copied.synchronize()  # blocks this thread only (a writer's), without holding the GIL
        return self._arrays


def metrics_to_host(metrics: dict[str, torch.Tensor], names: list[str]) -> HostMetrics:
    """The named metrics' way to the host: one asynchronous device-to-host copy per batch, none per layer.

    On a CUDA device the copy goes into pinned memory without waiting for it: the caller queues the next batch's
    kernels while the writer's thread waits in wait(). Every metric is 4 bytes per value, so the int32 ones travel
    bit-for-bit as float32 in one stacked tensor, laid out sample-major as the Parquet rows are, so that the
    writer does not reorder them (8 ns/row of a writer thread's time at batch 8). On the CPU the arrays share the
    tensors' memory: no copy at all.
    """
    device = metrics[names[0]].device
    if device.type != "cuda":
        return HostMetrics({name: metrics[name].cpu().numpy() for name in names})
    stacked = torch.stack([metrics[name].transpose(0, 1).view(torch.float32) for name in names])  # (M, B, L, H, T)
    pinned = torch.empty(stacked.shape, dtype=torch.float32, pin_memory=True)
    pinned.copy_(stacked, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(device))
    host = pinned.numpy()  # shares the pinned memory, and keeps it alive as long as the arrays live
    return HostMetrics(
        {
            name: host[i].view(np.int32 if metrics[name].dtype == torch.int32 else np.float32).transpose(1, 0, 2, 3)
            for i, name in enumerate(names)
        },  # name -> (L, B, H, T) views
        copied,
    )
