"""The capture on CUDA (the torch path of spectra/capture/metrics.py) against eager float64 attention on the
CPU, for tiny_llama and the real SmolLM2; skipped without a CUDA GPU. scripts/gpu_check.sh runs these.

    python -m pytest -m gpu tests/test_gpu.py
"""

from __future__ import annotations

import copy

import pytest
import torch
from reference import eager_reference
from test_capture import assert_matches_reference

from spectra.capture.hook import AttentionCapture

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine"),
]


def capture_on_cuda(model, input_ids: torch.Tensor, threshold: float = 0.9) -> dict:
    on_gpu = copy.deepcopy(model).to("cuda")
    with AttentionCapture(on_gpu, k_eff_threshold=threshold) as capture:
        captured = capture.run(input_ids.to("cuda"))
    assert captured["entropy"].device.type == "cuda"
    return {name: values.cpu() for name, values in captured.items()}


def test_tiny_llama_on_cuda_matches_eager_float64(tiny_llama):
    input_ids = torch.randint(0, tiny_llama.config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(1))
    assert_matches_reference(capture_on_cuda(tiny_llama, input_ids), eager_reference(tiny_llama, input_ids, 0.9))


def test_smollm2_on_cuda_matches_eager_float64(smollm2):
    model, tokenizer = smollm2
    text = "The quick brown fox jumps over the lazy dog. " * 60
    input_ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][:512]])
    assert_matches_reference(capture_on_cuda(model, input_ids), eager_reference(model, input_ids, 0.9))


def test_capture_leaves_cuda_logits_unchanged(smollm2):
    model, tokenizer = smollm2
    on_gpu = copy.deepcopy(model).to("cuda")
    input_ids = torch.tensor([tokenizer("Attention sinks and delimiters. " * 20)["input_ids"][:128]], device="cuda")
    with torch.inference_mode():
        plain = on_gpu(input_ids=input_ids).logits
        with AttentionCapture(on_gpu) as capture:
            capture.run(input_ids)
            captured = on_gpu(input_ids=input_ids).logits
    assert torch.equal(plain, captured)
