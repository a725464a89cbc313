"""Mistral, Qwen2, Gemma 2 and GPT-NeoX under capture, and the extended metrics, against eager float64 attention.

Each architecture is a tiny random model built here with transformers' config class (2 layers, vocab 256). The
float32 model runs under AttentionCapture with the implementation transformers picked for it (SDPA, or eager for
Gemma 2, which SDPA cannot run). Its float64 copy runs eager attention with output_attentions=True. A recorder
around the copy's own `eager_attention_forward` keeps what each layer received (query, key, mask, scaling,
softcap), from which the reference scores and p are computed naively in float64 over the full T x T matrix; p
is checked against output_attentions (which eager computes with a float32 softmax, hence not used directly).

    python -m pytest tests/test_architectures.py
"""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import polars as pl
import pytest
import torch
import transformers
from conftest import compose_config, run_spectra
from omegaconf import OmegaConf
from reference import metrics_from_probs
from transformers import AutoModelForCausalLM

from spectra.capture.hook import AttentionCapture
from spectra.capture.metrics import (
    DEFAULT_METRIC_FIELDS,
    EXTENDED_METRIC_FIELDS,
    METRIC_FIELDS,
    attention_metrics,
)
from spectra.config.schema import checked_config
from spectra.errors import SpectraError
from spectra.models.loading import load_model

BATCH, SEQ_LEN, WINDOW, SOFTCAP, THRESHOLD = 2, 24, 7, 1.5, 0.9
TOLERANCE = 1e-4
COMMON = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, initializer_range=0.3)


def tiny_config(arch: str) -> transformers.PretrainedConfig:
    """Small, but with the feature that makes each architecture different switched on and mattering."""
    if arch == "mistral":  # every layer slides; the window is well inside the sequence
        return transformers.MistralConfig(
            **COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=WINDOW
        )
    if arch == "qwen2":  # q/k/v biases (randomised below); layer 1 slides, layer 0 does not
        return transformers.Qwen2Config(
            **COMMON,
            num_attention_heads=4,
            num_key_value_heads=2,
            use_sliding_window=True,
            sliding_window=WINDOW,
            max_window_layers=1,
        )
    if arch == "gemma2":  # soft-capped scores, alternating sliding/full layers, scaling from query_pre_attn_scalar
        return transformers.Gemma2Config(
            **COMMON,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=8,
            sliding_window=WINDOW,
            attn_logit_softcapping=SOFTCAP,
            query_pre_attn_scalar=6,
        )
    if arch == "gpt_neox":  # rotary on a quarter of each head's dimensions, fused qkv with bias
        return transformers.GPTNeoXConfig(**COMMON, num_attention_heads=2, rotary_pct=0.25)
    raise ValueError(arch)


def tiny_model(config: transformers.PretrainedConfig, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, **options).eval()
    with torch.no_grad():  # transformers initialises biases to 0, which would hide a bias the capture mishandled
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(std=0.5)
    return model


def input_ids() -> torch.Tensor:
    return torch.randint(0, COMMON["vocab_size"], (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(1))


def modeling_module(model: torch.nn.Module):
    """The modeling_<arch> module whose eager_attention_forward the model's attention calls."""
    attention = next(m for m in model.modules() if type(m).__name__.endswith("Attention"))
    return sys.modules[type(attention).__module__]


def eager_reference(model: torch.nn.Module, ids: torch.Tensor, monkeypatch) -> list[dict[str, np.ndarray]]:
    """Per layer, every metric from a float64 eager run of the same weights (independent of spectra.metrics)."""
    reference = copy.deepcopy(model).to(torch.float64)
    reference.set_attn_implementation("eager")
    modeling = modeling_module(reference)
    eager, received = modeling.eager_attention_forward, []

    def recorder(module, query, key, value, attention_mask, **kwargs):
        received.append((query, key, value, attention_mask, kwargs.get("scaling"), kwargs.get("softcap")))
        return eager(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(modeling, "eager_attention_forward", recorder)
    with torch.no_grad():
        weights = reference(input_ids=ids, use_cache=False, output_attentions=True).attentions
    monkeypatch.setattr(modeling, "eager_attention_forward", eager)
    assert len(received) == len(weights) == COMMON["num_hidden_layers"]

    layers = []
    positions = torch.arange(SEQ_LEN, dtype=torch.float64)
    for (query, key, value, mask, scaling, softcap), eager_probs in zip(received, weights):
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # (B, H, T, D), as repeat_kv does
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)  # (B, H, T, D)
        scores = query @ key.transpose(-1, -2) * scaling  # (B, H, T, T)
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        allowed = (mask == 0).expand_as(scores)  # the eager mask: 0 where allowed, dtype-min elsewhere
        masked = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(masked, dim=-1)  # (B, H, T, T) float64
        # The reconstruction is the model's own computation: output_attentions holds the same p, up to the
        # float32 softmax transformers' eager attention upcasts to (`softmax(..., dtype=torch.float32)`).
        torch.testing.assert_close(probs, eager_probs, rtol=0, atol=1e-6)

        layers.append(
            {
                **metrics_from_probs(probs.numpy(), THRESHOLD),  # entropy, max_attn, k_eff, k_eff_ambiguous
                "query_norm": query.norm(dim=-1).numpy(),
                "sink_attn": probs[..., 0].numpy(),
                "attn_distance": (probs * (positions[:, None] - positions[None, :])).sum(-1).numpy(),
                "max_logit": masked.amax(-1).numpy(),
                "lse": torch.logsumexp(masked, dim=-1).numpy(),
                "key_norm": key.norm(dim=-1).numpy(),
                "value_norm": value.norm(dim=-1).numpy(),
                "output_norm": (probs @ value).norm(dim=-1).numpy(),  # (B, H, T): the head's output, float64
                "visible_keys": allowed.sum(-1).numpy(),
            }
        )
    return layers


def assert_matches_reference(got: dict[str, torch.Tensor], reference: list[dict[str, np.ndarray]]) -> None:
    for layer, expected in enumerate(reference):
        for name in METRIC_FIELDS:
            value = got[name][layer].numpy()
            if name == "k_eff":
                clear = ~expected["k_eff_ambiguous"]  # rows whose cumulative mass passes near the threshold
                np.testing.assert_array_equal(value[clear], expected["k_eff"][clear], err_msg=f"layer {layer}")
                assert clear.mean() > 0.95
            else:
                np.testing.assert_allclose(
                    value, expected[name], rtol=TOLERANCE, atol=TOLERANCE, err_msg=f"{name}, layer {layer}"
                )


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "gemma2", "gpt_neox"])
def test_architecture_matches_eager_float64(arch, monkeypatch):
    model, ids = tiny_model(tiny_config(arch)), input_ids()
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    previous = model.config._attn_implementation
    assert previous == ("eager" if arch == "gemma2" else "sdpa")

    # block_bytes this small gives a block of a few query rows: the block loop and its boundaries are exercised.
    with AttentionCapture(model, k_eff_threshold=THRESHOLD, block_bytes=8 * 2**10, extended=True) as capture:
        with torch.no_grad():
            captured_logits = model(input_ids=ids, use_cache=False).logits
        got = capture.run(ids)
    assert model.config._attn_implementation == previous
    # The capture hands the call to the same implementation: the model's outputs are bit-identical.
    assert torch.equal(captured_logits, logits)
    assert set(got) == set(METRIC_FIELDS)
    assert got["entropy"].shape == (COMMON["num_hidden_layers"], BATCH, model.config.num_attention_heads, SEQ_LEN)

    reference = eager_reference(model, ids, monkeypatch)
    assert_matches_reference(got, reference)

    # The feature each architecture is here for is really in play.
    last_row_keys = [int(layer["visible_keys"][0, 0, -1]) for layer in reference]
    expected_keys = {
        "mistral": [WINDOW, WINDOW],
        "qwen2": [SEQ_LEN, WINDOW],
        "gemma2": [WINDOW, SEQ_LEN],
        "gpt_neox": [SEQ_LEN, SEQ_LEN],
    }[arch]
    assert last_row_keys == expected_keys
    assert (got["sink_attn"][:, :, :, WINDOW:] == 0).all() == (arch == "mistral")


def test_softcap_and_window_change_the_metrics(monkeypatch):
    """Gemma 2's cap and window move the metrics well beyond the tolerance: the comparison above can fail."""
    model, ids = tiny_model(tiny_config("gemma2")), input_ids()
    reference = eager_reference(model, ids, monkeypatch)
    queries, keys = [], []

    def keep(module, query, key, value, attention_mask, **kwargs):
        queries.append(query), keys.append(key)
        return eager(module, query, key, value, attention_mask, **kwargs)

    modeling = modeling_module(model)
    eager = modeling.eager_attention_forward
    monkeypatch.setattr(modeling, "eager_attention_forward", keep)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    scaling = model.model.layers[0].self_attn.scaling

    sliding = attention_metrics(queries[0], keys[0], scaling, softcap=SOFTCAP, sliding_window=WINDOW, extended=True)
    uncapped = attention_metrics(queries[0], keys[0], scaling, sliding_window=WINDOW, extended=True)
    unwindowed = attention_metrics(queries[0], keys[0], scaling, softcap=SOFTCAP, extended=True)
    np.testing.assert_allclose(sliding.entropy.numpy(), reference[0]["entropy"], atol=TOLERANCE)
    assert np.abs(uncapped.entropy.numpy() - reference[0]["entropy"]).max() > 100 * TOLERANCE
    assert np.abs(uncapped.max_logit.numpy()).max() > SOFTCAP  # uncapped scores exceed the cap
    assert np.abs(unwindowed.entropy.numpy() - reference[0]["entropy"]).max() > 100 * TOLERANCE


def test_default_capture_computes_only_the_four():
    model = tiny_model(tiny_config("mistral"))
    with AttentionCapture(model) as capture:
        got = capture.run(input_ids())
    assert tuple(got) == DEFAULT_METRIC_FIELDS
    assert set(DEFAULT_METRIC_FIELDS) | set(EXTENDED_METRIC_FIELDS) == set(METRIC_FIELDS)


def test_metric_configs_default_to_the_four():
    assert list(checked_config(compose_config()).metrics.names) == list(DEFAULT_METRIC_FIELDS)
    assert list(checked_config(compose_config("metrics=extended")).metrics.names) == list(METRIC_FIELDS)
    subset = checked_config(compose_config("metrics.names=[entropy,sink_attn,key_norm]"))
    assert list(subset.metrics.names) == ["entropy", "sink_attn", "key_norm"]


def test_extended_metrics_at_position_zero():
    """Token 0 sees only itself: p_0 = 1, distance 0, and its one score is both max_logit and lse."""
    model = tiny_model(tiny_config("qwen2"))
    with AttentionCapture(model, extended=True) as capture:
        got = capture.run(input_ids())
    first = {name: got[name][..., 0] for name in METRIC_FIELDS}
    assert torch.equal(first["sink_attn"], torch.ones_like(first["sink_attn"]))
    assert torch.equal(first["attn_distance"], torch.zeros_like(first["attn_distance"]))
    torch.testing.assert_close(first["lse"], first["max_logit"])
    assert (got["lse"] >= got["max_logit"] - 1e-6).all()
    assert (got["attn_distance"] <= torch.arange(SEQ_LEN)).all()


def test_bidirectional_attention_is_refused():
    config = tiny_config("gemma2")
    config.use_bidirectional_attention = True
    model = tiny_model(config)
    with AttentionCapture(model) as capture, pytest.raises(SpectraError, match="bidirectionally"):
        capture.run(input_ids())


def test_attention_sinks_are_refused():
    """GPT-OSS adds learned sink logits (s_aux) to the softmax denominator, which the metrics do not model."""
    config = transformers.GptOssConfig(
        **COMMON,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=2,
        num_experts_per_tok=1,
        sliding_window=WINDOW,
    )
    refusal = r"sink logits to the softmax \(s_aux\)"
    with AttentionCapture(tiny_model(config)) as capture, pytest.raises(SpectraError, match=refusal):
        capture.run(input_ids())


def test_bias_in_the_mask_is_refused():
    """An ALiBi-style bias folded into an additive mask changes the scores: refused, not read as 'allowed'."""
    model = tiny_model(tiny_config("gemma2"))
    distance = torch.arange(SEQ_LEN)[:, None] - torch.arange(SEQ_LEN)[None, :]  # (T, T) t - j
    blocked = torch.finfo(torch.float32).min
    mask = torch.where(distance >= 0, -0.5 * distance.float(), blocked)[None, None]  # (1, 1, T, T), passed as-is
    with AttentionCapture(model) as capture, pytest.raises(SpectraError, match="adds a bias .* through the mask"):
        with torch.no_grad():
            model(input_ids=input_ids(), attention_mask=mask.expand(BATCH, 1, -1, -1), use_cache=False)
    assert capture._layers == {}  # refused before any layer's metrics were kept


def test_a_callers_mask_is_what_counts():
    """A 4D mask passed to the model goes to every layer as it is: Gemma 2's eager attention then does not slide,
    and neither do the metrics (the window argument is only used when there is no mask)."""
    model = tiny_model(tiny_config("gemma2"))
    distance = torch.arange(SEQ_LEN)[:, None] - torch.arange(SEQ_LEN)[None, :]  # (T, T) t - j
    mask = torch.where(distance >= 0, 0.0, torch.finfo(torch.float32).min)[None, None].expand(BATCH, 1, -1, -1)
    with AttentionCapture(model, extended=True) as capture, torch.no_grad():
        model(input_ids=input_ids(), attention_mask=mask, use_cache=False)
    sliding_layer = capture._layers[0]  # layer 0 is a sliding layer when the model builds its own masks
    assert (sliding_layer.sink_attn[..., WINDOW:] > 0).all()
    assert int(sliding_layer.k_eff.max()) > WINDOW


@pytest.mark.slow  # ~10 s: importing and building flex attention's block mask
def test_unreadable_mask_is_refused():
    """flex_attention passes a BlockMask: Spectra cannot tell which keys it allows, so it does not guess."""
    model = tiny_model(tiny_config("mistral"), attn_implementation="flex_attention")
    with AttentionCapture(model) as capture, pytest.raises(SpectraError, match="BlockMask.*attn_implementation='sdpa'"):
        capture.run(input_ids())


def test_softcap_under_sdpa_is_refused():
    """transformers 5.24 refuses SDPA for every soft-capping model; should one run SDPA anyway, the cap is lost."""
    model = tiny_model(tiny_config("gemma2"))
    model.config._attn_implementation_internal = "sdpa"  # bypasses transformers' own check, as a future one might
    # No `with`: leaving would hand the model back to SDPA, which transformers refuses for Gemma 2.
    capture = AttentionCapture(model).__enter__()
    with pytest.raises(SpectraError, match="ignores the cap; load the model with attn_implementation='eager'"):
        capture.run(input_ids())


@pytest.mark.parametrize("name", ["tiny_mistral", "tiny_qwen2", "tiny_gemma2", "tiny_pythia"])
def test_tiny_model_configs_capture_without_changing_logits(name):
    """Each conf/model/tiny_<arch>.yaml builds its architecture, and capture leaves its logits bit-identical."""
    cfg = checked_config(compose_config(f"model={name}"))
    config = transformers.AutoConfig.for_model(**OmegaConf.to_container(cfg.model.architecture))
    torch.manual_seed(cfg.model.seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
        with AttentionCapture(model, extended=True) as capture:
            captured_logits = model(input_ids=ids, use_cache=False).logits
            got = capture.run(ids)
    assert torch.equal(captured_logits, logits)
    assert all(torch.isfinite(value.float()).all() for value in got.values())
    # A 16-token window on a 40-token context: position 0 drops out of every sliding layer's view, and only there.
    window = getattr(config, "sliding_window", None) or 16
    default_kind = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
    layer_types = getattr(config, "layer_types", None) or [default_kind] * config.num_hidden_layers  # Mistral: None
    for layer, kind in enumerate(layer_types):
        past_window = got["sink_attn"][layer, ..., window:]
        assert bool((past_window == 0).all()) == (kind == "sliding_attention"), (name, layer)
    assert name not in ("tiny_mistral", "tiny_gemma2") or "sliding_attention" in layer_types


def test_gemma2_checkpoint_with_extended_metrics_through_the_entrypoint(tmp_path):
    """model=gemma2_2b model.path=<local checkpoint> metrics=extended: a Gemma 2 checkpoint (tiny_gemma2's shape,
    saved as a hub download would be) loads with eager attention, and the nine columns hold a direct capture."""
    checkpoint = tmp_path / "gemma2-tiny"
    cfg = checked_config(compose_config("model=tiny_gemma2"))
    model, tokenizer = load_model(cfg.model, cfg.hardware)
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)

    overrides = ("model=gemma2_2b", f"model.path={checkpoint}", "data=synthetic", "data.context_length=24")
    result = run_spectra(tmp_path, *overrides, "data.n_samples=2", "metrics=extended", "hardware.batch_size=2")
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["model"]["class"] == "Gemma2ForCausalLM"
    frame = pl.read_parquet(tmp_path / "run" / "metrics" / "*.parquet")
    frame = frame.sort("sample_id", "layer", "head", "token_pos")
    assert frame.columns == ["sample_id", "layer", "head", "token_pos", *METRIC_FIELDS]
    assert frame.schema["k_eff"] == pl.Int32
    assert all(frame.schema[name] == pl.Float32 for name in METRIC_FIELDS if name != "k_eff")
    assert frame.height == 2 * 2 * 8 * 24

    loaded, _ = load_model(checked_config(compose_config(*overrides)).model, cfg.hardware)
    assert loaded.config._attn_implementation == "eager"
    ids = torch.tensor(pl.read_parquet(tmp_path / "run" / "samples.parquet")["input_ids"].to_list())  # (2, 24)
    with AttentionCapture(loaded, extended=True) as capture:
        direct = capture.run(ids)  # name -> (L, B, H, T)
    for name in METRIC_FIELDS:
        expected = direct[name].permute(1, 0, 2, 3).reshape(-1).numpy()  # rows ordered (sample, layer, head, token)
        np.testing.assert_array_equal(frame[name].to_numpy(), expected, err_msg=name)
