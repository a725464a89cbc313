"""The fused Triton metrics kernel, here in Triton's interpreter on the CPU (conftest sets TRITON_INTERPRET=1
where there is no GPU; with one, the compiled kernel runs): k_eff equals the sort definition on the kernel's own
probabilities on every row (adversarial rows, real SmolLM2 rows), and the other metrics match float64 eager
attention with windows, softcap, QK-norm, GQA and padding masks; hardware.metrics_kernel end to end.

    TRITON_INTERPRET=1 python -m pytest tests/test_triton_metrics.py
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
import transformers
from conftest import attention_inputs, compose_config, run_spectra_inprocess
from reference import reference_metrics
from test_architectures import assert_matches_reference as assert_matches_eager
from test_architectures import eager_reference, input_ids, tiny_config, tiny_model
from test_fast_metrics import THRESHOLDS, adversarial_rows

pytest.importorskip("triton")  # scripts/setup.sh installs it; without it, metrics_kernel=triton is refused

from spectra.capture import metrics, triton_metrics  # noqa: E402
from spectra.capture.triton_kernels import CANDIDATES  # noqa: E402
from spectra.capture.hook import AttentionCapture  # noqa: E402
from spectra.capture.metrics import attention_metrics, k_eff_from_probs  # noqa: E402
from spectra.config.schema import checked_config  # noqa: E402
from spectra.errors import ConfigError  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and not triton_metrics.interpreted(), reason="no GPU and no TRITON_INTERPRET=1"
)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def kernel_k_eff_and_probs(query, key, scaling, threshold, allowed=None, softcap=None, sliding_window=None):
    """(metrics of the kernel as the capture gets them, undecided rows settled; the kernel's own p, (B*H*T, T))."""
    args = (query.to(DEVICE), key.to(DEVICE), scaling)
    allowed = allowed.to(DEVICE) if allowed is not None else None
    got = metrics._layer_metrics_triton(*args, threshold, allowed, softcap, sliding_window)
    probs = triton_metrics.layer_probabilities(*args, allowed, softcap, sliding_window)
    return {name: value.cpu() for name, value in got.items()}, probs.cpu()


def assert_k_eff_is_the_sort_definition(got, probs, threshold):
    """Every row: k_eff = k_eff_from_probs of the kernel's own p; max_attn is its largest p, sink_attn its p_0."""
    expected = k_eff_from_probs(probs, threshold)
    k_eff = got["k_eff"].reshape(-1)
    mismatched = (k_eff != expected).nonzero().flatten()
    assert mismatched.numel() == 0, (threshold, mismatched[:5].tolist(), k_eff[mismatched[:5]], expected[mismatched[:5]])
    np.testing.assert_array_equal(got["max_attn"].reshape(-1).numpy(), probs.max(-1).values.numpy())
    np.testing.assert_array_equal(got["sink_attn"].reshape(-1).numpy(), probs[:, 0].numpy())


def embedded_rows(rows: torch.Tensor):
    """Scores whose softmax is each given probability row: (query, key, allowed) for one sequence in which query
    S - 1 + i sees keys 0..S-1 with s_j = ln p_i[j] (keys with p = 0 hidden by the mask); the earlier queries are
    uniform over their causal keys (ties). rows (n, S)."""
    n, width = rows.shape
    seq_len = width + n - 1
    key = torch.zeros(seq_len, n)
    key[:width] = torch.where(rows > 0, rows.clamp(min=1e-45).log(), torch.zeros(())).T  # k_j[i] = ln p_i[j]
    query = torch.zeros(seq_len, n)
    query[width - 1 :] = torch.eye(n)  # q_t = e_i: s_tj = ln p_i[j]
    allowed = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    allowed[width - 1 :, :] = False
    allowed[width - 1 :, :width] = rows > 0
    return query[None, None], key[None, None], allowed[None, None]


@pytest.mark.parametrize("seq_len", [1, 2, 7, 64])
def test_k_eff_equals_the_sort_definition_on_adversarial_rows(seq_len):
    rows = adversarial_rows(seq_len, torch.Generator().manual_seed(seq_len))
    query, key, allowed = embedded_rows(rows)
    # Every threshold on the short rows; the interpreter's time per launch keeps the longer ones to three.
    for threshold in THRESHOLDS if seq_len <= 7 else (0.5, 0.9, 1.0):
        got, probs = kernel_k_eff_and_probs(query, key, 1.0, threshold, allowed)
        assert_k_eff_is_the_sort_definition(got, probs, threshold)
        # The rows are the adversarial ones, to float32 rounding of ln and exp.
        np.testing.assert_allclose(probs[-rows.shape[0] :, : rows.shape[1]].numpy(), rows.numpy(), atol=2e-6)


def test_ties_past_the_candidate_set_and_thresholds_near_one():
    """A uniform row of 100 keys is one bit pattern with more values than the candidates hold (the binary search
    over equal values); at threshold 1.0 many rows fall a hair short and take the rounding-bound path."""
    generator = torch.Generator().manual_seed(4)
    query = torch.randn(1, 2, 100, 4, generator=generator) * torch.tensor([0.0, 1.5])[None, :, None, None]
    key = torch.randn(1, 1, 100, 4, generator=generator)
    for threshold in (0.9, 1.0):
        got, probs = kernel_k_eff_and_probs(query, key, 1.0, threshold)
        assert_k_eff_is_the_sort_definition(got, probs, threshold)
        uniform = got["k_eff"][0, 0]  # head 0: q = 0, every visible key ties
        assert 90 <= uniform[-1] <= 100 and uniform[-1] > CANDIDATES


def test_real_smollm2_rows(smollm2, monkeypatch):
    """Real queries and keys (after RoPE) of SmolLM2 layers on real text: k_eff is the sort definition on the
    kernel's p, and every metric matches float64 attention of the same q and k."""
    model, tokenizer = smollm2
    ids = torch.tensor([tokenizer("Attention sinks, delimiters and the lazy dog. " * 12)["input_ids"][:48]])
    received = attention_inputs(model, ids, monkeypatch)
    for layer in (0, 14):  # a layer of broad heads and a layer of peaked ones
        query, key, scaling = received[layer]
        got, probs = kernel_k_eff_and_probs(query, key, scaling, 0.9)
        assert_k_eff_is_the_sort_definition(got, probs, 0.9)
        reference, _ = reference_metrics(query.double(), key.double(), scaling, 0.9, None)
        for name in ("entropy", "max_attn", "sink_attn", "attn_distance", "max_logit", "lse"):
            np.testing.assert_allclose(got[name].double().numpy(), reference[name], atol=1e-4, rtol=1e-4, err_msg=name)
        clear = ~reference["k_eff_ambiguous"]
        np.testing.assert_array_equal(got["k_eff"].numpy()[clear], reference["k_eff"][clear])


def architecture_config(arch: str) -> transformers.PretrainedConfig:
    """test_architectures' tiny configs, and a tiny Gemma 3: QK-norm, a 7-token window on layer 0, GQA."""
    if arch != "gemma3":
        return tiny_config(arch)
    return transformers.Gemma3TextConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, initializer_range=0.3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=7, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gemma3"])
def test_capture_with_the_triton_kernel_matches_eager_float64(arch, monkeypatch):
    """Sliding windows (mistral: from the mask SDPA gets), soft-capping with windows (gemma2), QK-norm (gemma3),
    GQA, every metric against float64 eager attention of the same weights."""
    model, ids = tiny_model(architecture_config(arch)), input_ids()
    with AttentionCapture(model, k_eff_threshold=0.9, extended=True, metrics_kernel="triton") as capture:
        got = capture.run(ids)
    assert_matches_eager(got, eager_reference(model, ids, monkeypatch))


def test_padding_mask_and_huge_scores_match_the_other_paths_and_float64():
    """A padding mask (left padding in sample 0, one key hidden in sample 1), scores far beyond exp's range, GQA."""
    from test_fast_metrics import assert_matches_reference, numpy_metrics

    generator = torch.Generator().manual_seed(5)
    query = torch.randn(2, 4, 30, 8, generator=generator) * 6
    key = torch.randn(2, 2, 30, 8, generator=generator) * 6
    allowed = torch.ones(2, 1, 30, 30, dtype=torch.bool)
    allowed[0, 0, :, :7] = False
    allowed[0, 0, torch.arange(7), torch.arange(7)] = True
    allowed[1, 0, 10:, 3] = False
    got = attention_metrics(query, key, 1.0, 0.9, allowed=allowed, extended=True, metrics_kernel="triton")
    numba = attention_metrics(query, key, 1.0, 0.9, allowed=allowed, extended=True, metrics_kernel="numba")
    for name in got._fields:
        if getattr(got, name) is not None:
            torch.testing.assert_close(getattr(got, name), getattr(numba, name), atol=1e-4, rtol=1e-4)
    assert_matches_reference(got, numpy_metrics(query, key, 1.0, 0.9, allowed), 0.9)
    _, probs = kernel_k_eff_and_probs(query, key, 1.0, 0.9, allowed)
    assert (probs.view(2, 4, 30, 30)[0, :, 7:, :7] == 0).all()  # padding keys get p = 0 exactly


def test_nan_scores_and_rows_without_keys():
    """NaN scores give NaN metrics and k_eff 0 (for the numerics guard); a row with every key hidden gives
    entropy NaN, max_attn inf, k_eff 1, as the torch path does."""
    query = torch.ones(1, 1, 5, 4)
    key = torch.ones(1, 1, 5, 4)
    key[0, 0, 2, 0] = float("nan")
    allowed = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    allowed[0, 0, 1, :] = False
    got, _ = kernel_k_eff_and_probs(query, key, 1.0, 0.9, allowed)
    assert got["k_eff"][0, 0].tolist() == [1, 1, 0, 0, 0]
    assert torch.isnan(got["entropy"][0, 0, 2:]).all() and torch.isnan(got["max_attn"][0, 0, 2:]).all()
    assert torch.isnan(got["entropy"][0, 0, 1]) and got["max_attn"][0, 0, 1] == float("inf")
    assert got["entropy"][0, 0, 0] == 0 and got["max_attn"][0, 0, 0] == 1


def test_unsupported_layers_fall_back_to_torch(monkeypatch):
    query, key = torch.randn(1, 2, 8, 320), torch.randn(1, 2, 8, 320)
    assert metrics.metrics_path("triton", query, key, None) == ("torch", "head_dim 320 > 256")
    assert metrics.metrics_path("auto", query, key, None) == ("numba", None)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    kernel, reason = metrics.metrics_path("triton", query[..., :8], key[..., :8], None)
    assert kernel == "torch" and "TRITON_INTERPRET=1" in reason
    with pytest.raises(ValueError, match="one of"):
        metrics.metrics_path("cuda", query, key, None)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["hardware.metrics_kernel=fast"], "must be one of auto, numba, torch, triton"),
        (["hardware.metrics_kernel=numba", "hardware=h100"], "numba runs on the CPU only"),
        (["hardware.metrics_kernel=triton"], "set TRITON_INTERPRET=1"),
    ],
)
def test_bad_metrics_kernel_names_the_key(overrides, message, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError) as error:
        checked_config(compose_config(*overrides))
    assert error.value.key == "hardware.metrics_kernel" and message in str(error.value)
    monkeypatch.setattr(metrics, "triton_importable", lambda: False)
    monkeypatch.setattr("spectra.config.schema.triton_importable", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ConfigError, match="triton is not installed"):
        checked_config(compose_config("hardware.metrics_kernel=triton"))


def test_run_with_the_triton_kernel_writes_the_default_runs_metrics(tmp_path):
    """`spectra.run hardware.metrics_kernel=triton` (in the interpreter here) writes what the default run writes,
    within the tests' tolerances, and its log names each layer's path once."""
    common = ("model=tiny_llama", "data=synthetic", "data.context_length=24", "data.n_samples=1", "logger=none")
    frames, logs = {}, {}
    for kernel in ("auto", "triton"):
        out = tmp_path / kernel
        code, _, stderr = run_spectra_inprocess(*common, f"hardware.metrics_kernel={kernel}", f"hydra.run.dir={out}")
        assert code == 0, stderr
        frames[kernel] = pl.read_parquet(out / "metrics" / "*.parquet").sort("layer", "head", "token_pos")
        logs[kernel] = [line.split(" - ", 1)[1] for line in (out / "run.log").read_text().splitlines()
                        if "attention metrics on the" in line]  # fmt: skip
    for kernel, path in (("auto", "numba"), ("triton", "triton")):
        assert logs[kernel] == [f"layer {i}: attention metrics on the {path} path" for i in range(3)]
    default, triton = frames["auto"], frames["triton"]
    assert default.height == triton.height == 3 * 8 * 24
    for name in ("query_norm", "entropy", "max_attn"):
        np.testing.assert_allclose(triton[name].to_numpy(), default[name].to_numpy(), atol=1e-4, rtol=1e-4)
    agree = (triton["k_eff"].to_numpy() == default["k_eff"].to_numpy()).mean()
    assert agree > 0.99  # equal but where float32 rounding of two different exps moves a prefix across 0.9


COMPILE_FOR_H100 = """
import sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from spectra.capture import triton_kernels as kernels

pointers = {"q_ptr": "*fp32", "k_ptr": "*fp32", "mask_ptr": "*u8", "out_ptr": "*fp32", "k_eff_ptr": "*i32",
            "flag_ptr": "*i32", "scratch_ptr": "*fp32", "probs_ptr": "*fp32", "slot_ptr": "*i32"}
names = kernels.attention_metrics_kernel.arg_names
for write_probs in (False, True):
    constants = dict(HAS_SOFTCAP=True, HAS_WINDOW=True, HAS_MASK=True, PRECISION="tf32", WRITE_PROBS=write_probs,
                     BLOCK_M=kernels.BLOCK_M, BLOCK_N=kernels.BLOCK_N, BLOCK_D=64, LEVELS=kernels.LEVELS,
                     CANDIDATES=kernels.CANDIDATES, CHUNK=kernels.CHUNK, NARROW_PASSES=kernels.NARROW_PASSES)
    signature = {name: pointers.get(name) or ("constexpr" if name in constants else
                 "fp32" if name in ("scale", "softcap", "threshold") else "i32") for name in names}
    source = ASTSource(kernels.attention_metrics_kernel, signature,
                       constexprs={(names.index(name),): value for name, value in constants.items()})
    binary = compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "enable_fp_fusion": False})
    print("cubin", write_probs, len(binary.asm["cubin"]))
"""


@pytest.mark.slow
def test_the_kernel_compiles_for_an_h100_without_one(tmp_path):
    """The interpreter accepts what the compiler may not (non-constexpr globals, loop-carried types): compile both
    modes, every feature on, to an sm_90 cubin with triton's own ptxas; no GPU needed (~10 s of CPU)."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_H100], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line.split()[:2] for line in result.stdout.splitlines()] == [["cubin", "False"], ["cubin", "True"]]
