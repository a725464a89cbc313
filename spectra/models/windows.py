"""Which keys each layer's query may see, read from the model config: the rule the analysis divides by.

    attention_windows(config) -> [None, 16, None, ...]    one entry per layer: None = full causal attention
                                                           (query t sees t + 1 keys), W = a sliding window
                                                           (query t sees the min(t + 1, W) keys t - W < j <= t)

transformers states it two ways: `layer_types` ("full_attention" / "sliding_attention" per layer: Gemma 2 and 3,
Qwen2 with use_sliding_window, most recent models), or, without layer_types, a `sliding_window` that applies to
every layer (Mistral). A layer type that is neither (e.g. Llama 4's "chunked_attention") is recorded by name: its
visible keys follow another rule, and the analysis leaves its ratios undefined rather than guess.

    python -m spectra.run model=tiny_gemma2 data=synthetic data.context_length=64   # run.json: model.attention_windows
"""

from __future__ import annotations

from transformers import PretrainedConfig

WindowRule = int | str | None


def attention_windows(config: PretrainedConfig) -> list[WindowRule]:
    layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not types:
        return [window if window else None] * layers
    rules: list[WindowRule] = []
    for kind in types:
        if kind == "full_attention":
            rules.append(None)
        elif kind == "sliding_attention" and window:
            rules.append(int(window))
        else:
            rules.append(str(kind))
    return rules
