"""The fast paths give the defined answers: fast k_eff = the sort-based definition, blocked = unblocked,
both against float64 numpy; the one-copy host transfer, the hardware configs and scripts/bench.py.

    python -m pytest tests/test_fast_metrics.py
"""

from __future__ import annotations

import json
import subprocess
import sys

import conftest
import numpy as np
import pytest
import torch
from conftest import REPO, compose_config

from spectra.capture.hook import metrics_to_host
from spectra.capture.metrics import attention_metrics, k_eff_fast, k_eff_from_probs
from spectra.config.schema import checked_config

THRESHOLDS = (0.1, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)


def adversarial_rows(seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """(N, S) probability rows built to trip a selection that is not the sorted cumulative sum."""
    rows = []
    for allowed in sorted({min(max(1, n), seq_len) for n in (1, 2, 3, seq_len // 2, seq_len - 1, seq_len)}):
        uniform = torch.zeros(seq_len)
        uniform[:allowed] = 1.0 / allowed  # every key ties; 1/3 and friends do not sum to exactly 1
        rows.append(uniform)
        one_hot = torch.zeros(seq_len)
        one_hot[allowed - 1] = 1.0
        rows.append(one_hot)
        # Quantized to 1/16: many ties, and prefix sums that hit 0.5, 0.75, 0.9375, 1.0 exactly.
        counts = torch.randint(0, 4, (allowed,), generator=generator).float()
        counts[0] += 1
        quantized = torch.zeros(seq_len)
        quantized[:allowed] = counts / counts.sum()
        rows.append(quantized)
        peaked = torch.zeros(seq_len)
        peaked[:allowed] = torch.softmax(torch.randn(allowed, generator=generator) * 8, dim=0)
        rows.append(peaked)
        flat = torch.zeros(seq_len)
        flat[:allowed] = torch.softmax(torch.randn(allowed, generator=generator) * 0.1, dim=0)
        rows.append(flat)
    if seq_len < 5:
        return torch.stack(rows)
    # Threshold hit exactly in binary: the second-largest prefix is 0.5 + 0.25 = 0.75.
    exact = torch.zeros(seq_len)
    exact[:4] = torch.tensor([0.25, 0.5, 0.125, 0.125])
    rows.append(exact)
    # Two equal maxima with masked (zero) keys between them, shuffled.
    scattered = torch.zeros(seq_len)
    scattered[torch.randperm(seq_len, generator=generator)[:5]] = torch.tensor([0.3, 0.3, 0.2, 0.1, 0.1])
    rows.append(scattered)
    return torch.stack(rows)


def k_eff_float64(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Independent definition: fewest largest probabilities (float64) whose sum reaches the threshold."""
    ordered = -np.sort(-probs, axis=-1)
    cumulative = np.cumsum(ordered, axis=-1)
    k_eff = (cumulative < threshold - 1e-9).sum(-1) + 1
    return np.minimum(k_eff, np.maximum((probs > 0).sum(-1), 1))


@pytest.mark.parametrize("seq_len", [1, 2, 7, 64, 513])
def test_fast_k_eff_equals_sort_definition_on_adversarial_rows(seq_len):
    generator = torch.Generator().manual_seed(seq_len)
    probs = adversarial_rows(seq_len, generator)
    for threshold in THRESHOLDS:
        fast = k_eff_fast(probs, threshold)
        assert fast.dtype == torch.int32 and fast.shape == probs.shape[:-1]
        assert torch.equal(fast, k_eff_from_probs(probs, threshold)), threshold


def test_fast_k_eff_agrees_with_float64_away_from_the_threshold():
    generator = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(300, 40, generator=generator) * 3, dim=-1)
    for threshold in (0.5, 0.9):
        expected = k_eff_float64(probs.double().numpy(), threshold)
        # Only rows whose float64 prefix sums stay clear of the threshold have one right answer.
        cumulative = np.cumsum(-np.sort(-probs.double().numpy(), axis=-1), axis=-1)
        clear = np.abs(cumulative - threshold).min(-1) > 1e-5
        got = k_eff_fast(probs, threshold).numpy()
        np.testing.assert_array_equal(got[clear], expected[clear])
    # Hand-checkable rows: a uniform row of 10 needs 9 keys for 0.9 (0.9 is not exact in binary; 0.5 is).
    assert k_eff_fast(torch.full((1, 10), 0.1), 0.5).tolist() == [5]
    assert k_eff_fast(torch.tensor([[0.0, 1.0, 0.0]]), 1.0).tolist() == [1]


def test_fast_k_eff_keeps_batch_shape():
    generator = torch.Generator().manual_seed(2)
    probs = torch.softmax(torch.randn(2, 3, 5, 200, 64, generator=generator) * 2, dim=-1)
    fast = k_eff_fast(probs, 0.9)
    assert fast.shape == (2, 3, 5, 200)
    assert torch.equal(fast, k_eff_from_probs(probs, 0.9))


def numpy_metrics(query, key, scaling, threshold, allowed=None):
    """float64 reference from the definitions: softmax, -sum p ln p, max p, sorted k_eff."""
    q, k = query.double().numpy(), key.double().numpy()
    k = np.repeat(k, q.shape[1] // k.shape[1], axis=1)  # query head h reads KV head h // groups
    scores = np.einsum("bhtd,bhsd->bhts", q, k) * scaling
    mask = np.tril(np.ones(scores.shape[-2:], dtype=bool))
    if allowed is not None:
        mask = mask & allowed.numpy()[:, 0][:, None]
    scores = np.where(mask, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    logs = np.log(np.where(probs > 0, probs, 1.0))
    return {
        "query_norm": np.linalg.norm(q, axis=-1),
        "entropy": -(probs * logs).sum(-1),
        "max_attn": probs.max(-1),
        "probs": probs,
    }


def assert_matches_reference(got, expected, threshold):
    for name in ("query_norm", "entropy", "max_attn"):
        np.testing.assert_allclose(getattr(got, name).double().numpy(), expected[name], atol=2e-5, rtol=1e-5)
    probs = expected["probs"]
    cumulative = np.cumsum(-np.sort(-probs, axis=-1), axis=-1)
    clear = np.abs(cumulative - threshold).min(-1) > 1e-5
    np.testing.assert_array_equal(got.k_eff.numpy()[clear], k_eff_float64(probs, threshold)[clear])
    assert clear.mean() > 0.9


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (3, 1)])
def test_blocked_equals_unblocked_and_float64(heads, kv_heads):
    generator = torch.Generator().manual_seed(heads + kv_heads)
    query = torch.randn(2, heads, 45, 16, generator=generator) * 2
    key = torch.randn(2, kv_heads, 45, 16, generator=generator) * 2
    whole = attention_metrics(query, key, 0.3, 0.9, block_bytes=2**34)  # one block
    for budget in (1, 5000, 40_000):  # one query row per block, and ragged blocks
        blocked = attention_metrics(query, key, 0.3, 0.9, block_bytes=budget)
        for name in ("query_norm", "entropy", "max_attn"):
            torch.testing.assert_close(getattr(blocked, name), getattr(whole, name), atol=1e-6, rtol=1e-6)
        assert torch.equal(blocked.k_eff, whole.k_eff)
    assert_matches_reference(whole, numpy_metrics(query, key, 0.3, 0.9), 0.9)


def test_blocked_equals_unblocked_with_softcap_window_and_extended_metrics():
    generator = torch.Generator().manual_seed(9)
    query = torch.randn(2, 6, 40, 8, generator=generator) * 3
    key = torch.randn(2, 2, 40, 8, generator=generator) * 3
    options = dict(softcap=20.0, sliding_window=9, extended=True)
    whole = attention_metrics(query, key, 0.5, 0.9, block_bytes=2**34, **options)
    blocked = attention_metrics(query, key, 0.5, 0.9, block_bytes=3000, **options)
    for name in whole._fields:
        torch.testing.assert_close(getattr(blocked, name), getattr(whole, name), atol=1e-5, rtol=1e-5)
    # The window hides everything 9 or more positions back: k_eff and the look-back distance stay inside it.
    assert whole.k_eff.max() <= 9 and whole.attn_distance.max() <= 8 + 1e-4
    assert whole.sink_attn[..., 9:].abs().max() == 0  # position 0 is outside every later query's window


def test_blocked_mask_hides_keys_even_with_huge_scores():
    """Masked keys get probability 0 however large their score, in every block; extreme scores stay finite."""
    generator = torch.Generator().manual_seed(5)
    query = torch.randn(2, 4, 30, 8, generator=generator) * 6  # scores far beyond exp's float32 range
    key = torch.randn(2, 2, 30, 8, generator=generator) * 6
    allowed = torch.ones(2, 1, 30, 30, dtype=torch.bool)
    allowed[0, 0, :, :7] = False  # left padding in sample 0 ...
    allowed[0, 0, torch.arange(7), torch.arange(7)] = True  # ... whose own positions still see themselves
    allowed[1, 0, 10:, 3] = False  # one key hidden from later queries in sample 1
    whole = attention_metrics(query, key, 1.0, 0.9, allowed=allowed, block_bytes=2**34)
    blocked = attention_metrics(query, key, 1.0, 0.9, allowed=allowed, block_bytes=1)
    for name in ("query_norm", "entropy", "max_attn", "k_eff"):
        # Scores of size ~300 round at ~3e-5 in float32, and differently for different matmul shapes.
        torch.testing.assert_close(getattr(blocked, name), getattr(whole, name), atol=1e-4, rtol=1e-4)
        assert torch.isfinite(getattr(whole, name).double()).all()
    assert_matches_reference(whole, numpy_metrics(query, key, 1.0, 0.9, allowed), 0.9)
    # Threshold 1.0: rows whose float32 total falls short count every key with p > 0, so a hidden key with a
    # tiny nonzero probability would show up here.
    visible = (torch.ones(30, 30, dtype=torch.bool).tril() & allowed[:, 0]).sum(-1)  # (B, T)
    for scale in (1.0, 1e-3):  # as above, and near-uniform rows
        full = attention_metrics(query * scale, key * scale, 1.0, 1.0, allowed=allowed, block_bytes=1000)
        assert (full.k_eff <= visible[:, None, :]).all()
    assert (full.k_eff == visible[:, None, :]).float().mean() > 0.3  # near-uniform rows need every key


def test_metrics_to_host_is_bit_exact():
    metrics = {
        "entropy": torch.tensor([[[[0.1, float("nan"), -0.0]]]]),
        "k_eff": torch.tensor([[[[1, 2**31 - 1, 7]]]], dtype=torch.int32),
    }
    host = metrics_to_host(metrics, ["k_eff", "entropy"]).wait()
    assert host["k_eff"].dtype == np.int32 and host["k_eff"].tolist() == [[[[1, 2**31 - 1, 7]]]]
    np.testing.assert_array_equal(host["entropy"].view(np.uint32), metrics["entropy"].numpy().view(np.uint32))


def test_a_fresh_interpreter_loads_the_kernels_from_disk():
    """Compiled once per machine: a new process (a second run) finds every kernel in numba's on-disk cache and
    compiles none (conftest compiled them before the tests; without cache=True each process compiles ~16 s)."""
    code = """
import torch
from spectra.capture import cpu_kernels
from spectra.capture.metrics import attention_metrics, k_eff_fast
metrics = attention_metrics(torch.randn(1, 4, 40, 8), torch.randn(1, 2, 40, 8), 0.35, extended=True)
k_eff_fast(torch.softmax(torch.randn(3, 40), -1), 0.9)
for kernel in (cpu_kernels.row_metrics, cpu_kernels.k_eff_rows):
    print(sum(kernel.stats.cache_hits.values()), sum(kernel.stats.cache_misses.values()))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["1", "0", "1", "0"], result.stdout  # (hits, misses) of each entry kernel


@pytest.mark.parametrize("hardware", ["cpu", "a10g", "h100"])
def test_hardware_configs_compose(hardware):
    cfg = checked_config(compose_config(f"hardware={hardware}"))
    assert cfg.hardware.batch_size >= 1 and cfg.hardware.attention_block_mb >= 1
    assert cfg.hardware.device == ("cpu" if hardware == "cpu" else "cuda")


def test_bench_prints_the_documented_json(capsys):
    """scripts/bench.py's main, in this process (its imports are the suite's): the JSON lines the README documents."""
    sys.path.insert(0, str(REPO / "scripts"))
    import bench

    bench.main(["16", "24", "--json", "--repeats", "1", "model=tiny_llama", "data=synthetic",
                "metrics.storage_dtype=float16"])  # fmt: skip
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    machine = lines.pop(0)["machine"]
    assert machine["torch_threads"] >= 1 and machine["torch"] == torch.__version__ and machine["cpu"]
    assert [line["context_length"] for line in lines] == [16, 24]
    for line in lines:
        for key in ("decoder_forward_s", "forward_s", "capture_s", "capture_over_decoder", "capture_over_forward",
                    "tokens_per_s", "rows_per_s", "bytes_per_row", "capture_peak_rss_mb"):  # fmt: skip
            assert line[key] > 0, key
        assert line["data"] == "synthetic" and line["repeats"] == 1
        # 1 round: the medians are that round's ratios
        assert line["capture_over_decoder"] == pytest.approx(line["capture_s"] / line["decoder_forward_s"], rel=0.01)
        assert line["capture_over_forward"] == pytest.approx(line["capture_s"] / line["forward_s"], rel=0.01)
        assert line["tokens_per_s"] == pytest.approx(line["context_length"] / line["capture_s"], rel=0.01)
        # tiny_llama: 3 layers x 8 heads x T rows per sample
        assert line["rows_per_s"] == pytest.approx(3 * 8 * line["context_length"] / line["capture_s"], rel=0.01)
    with pytest.raises(SystemExit) as refused:
        bench.main(["abc", "model=tiny_llama"])
    assert refused.value.code == 2 and "context lengths must be positive integers" in capsys.readouterr().err
