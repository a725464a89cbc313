"""The numerics guard: non-finite metrics counted per layer and head; the run stops naming where (default), or
keeps and counts them (run.on_nonfinite=record).

The model is a tiny Llama checkpoint with NaN planted in two heads' query projections, as a corrupted
checkpoint would have: those heads' metrics are NaN, every other head's stay finite. Both heads are in the last
layer: a NaN head's output reaches every head of the layers after it through o_proj on some torch/transformers
versions (torch 2.13 with transformers 5.25 does; 5.24 returned zeros), and the test must not depend on that.

    python -m pytest tests/test_numerics.py -q
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from checkpoints import TINY, hub_model_overrides, save_tiny_checkpoint
from conftest import run_spectra_inprocess

from spectra.capture.numerics import NumericsGuard, nonfinite_counts

POISONED = ((2, 0), (2, 3))  # (layer, head), in the last of TINY's 3 layers
ARGS = ["data=synthetic", "data.context_length=8", "data.n_samples=3", "hardware.batch_size=2", "logger=none"]


def test_counts_match_numpy_and_storage_overflow_counts():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)  # (L, B, H, T)
    values[0, 1, 2, 3] = np.nan
    values[1, 0, 3, 0] = np.inf
    values[1, 2, 3, 4] = -np.inf
    big = np.zeros_like(values)
    big[1, 1, 0, 2] = 1e5  # finite in float32, inf once stored as float16
    metrics = {"entropy": values, "query_norm": big, "k_eff": np.ones((2, 3, 4, 5), dtype=np.int32)}

    counts = nonfinite_counts(metrics, "float32")
    assert set(counts) == {"entropy", "query_norm"}
    np.testing.assert_array_equal(counts["entropy"], (~np.isfinite(values)).sum(axis=(1, 3)))
    assert counts["query_norm"].shape == (2, 4) and counts["query_norm"].sum() == 0
    stored16 = nonfinite_counts(metrics, "float16")
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(stored16["query_norm"], (~np.isfinite(big.astype(np.float16))).sum(axis=(1, 3)))
    assert stored16["query_norm"][1, 0] == 1
    # Rounding to float16: 65504 is its largest value, 65519.99 still rounds down to it, 65520 rounds to inf.
    edge = np.zeros((1, 1, 1, 3), np.float32)
    edge[0, 0, 0] = [65504.0, 65519.99, -65504.0]
    assert nonfinite_counts({"entropy": edge}, "float16")["entropy"].sum() == 0
    edge[0, 0, 0, 2] = -65520.0
    assert nonfinite_counts({"entropy": edge}, "float16")["entropy"].tolist() == [[1]]

    guard = NumericsGuard(["entropy", "query_norm", "k_eff"], "float32", "error")
    with pytest.raises(Exception, match=r"first at layer 0 head 2 \(1 values of entropy\), 3 values in 2 "):
        guard.check(metrics, [7, 8, 9])


@pytest.fixture(scope="module")
def poisoned_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("poisoned")
    save_tiny_checkpoint(directory, nan_query_heads=POISONED)
    return directory


def expected_counts(samples: int, tokens: int) -> np.ndarray:
    """(L, H) non-finite values over the three float metrics: every token of every sample in a poisoned head."""
    counts = np.zeros((TINY["num_hidden_layers"], TINY["num_attention_heads"]), dtype=np.int64)
    for layer, head in POISONED:
        counts[layer, head] = 3 * samples * tokens  # query_norm, entropy, max_attn
    return counts


def test_nonfinite_stops_the_run_naming_layer_and_head(tmp_path, poisoned_checkpoint):
    code, stdout, stderr = run_spectra_inprocess(
        *hub_model_overrides(poisoned_checkpoint), *ARGS, f"hydra.run.dir={tmp_path / 'run'}"
    )
    lines = [line for line in stderr.splitlines() if line.startswith("spectra:")]  # not the progress bars
    assert code == 2 and "Traceback" not in stderr
    assert lines == [
        "spectra: error: non-finite attention metrics (NaN or inf) in samples [0, 1]: first at layer 2 head 0 "
        "(48 values of query_norm, entropy, max_attn), 96 values in 2 (layer, head) pairs in all; the model "
        "overflowed (try hardware.dtype=float32 or bfloat16), or set run.on_nonfinite=record to keep and count them"
    ]
    assert not list((tmp_path / "run" / "metrics").glob("*.parquet"))  # the bad batch was not written


def test_record_keeps_values_and_counts_them_in_run_json(tmp_path, poisoned_checkpoint):
    run_dir = tmp_path / "run"
    code, stdout, stderr = run_spectra_inprocess(
        *hub_model_overrides(poisoned_checkpoint), *ARGS, "run.on_nonfinite=record", f"hydra.run.dir={run_dir}"
    )
    assert code == 0, stderr
    assert "non-finite metric values kept" in stdout

    expected = expected_counts(samples=3, tokens=8)
    recorded = json.loads((run_dir / "run.json").read_text())["nonfinite"]
    assert recorded["total"] == expected.sum() == 2 * 3 * 3 * 8
    assert {(e["layer"], e["head"]): e["count"] for e in recorded["by_layer_head"]} == {
        (int(l), int(h)): int(expected[l, h]) for l, h in zip(*expected.nonzero())
    }

    # The Parquet columns hold exactly those values, counted independently of Spectra.
    rows = pl.read_parquet(run_dir / "metrics" / "*.parquet")
    from_disk = np.zeros_like(expected)
    for name in ("query_norm", "entropy", "max_attn"):
        bad = rows.filter(~pl.col(name).is_finite()).group_by("layer", "head").len()
        for layer, head, count in bad.iter_rows():
            from_disk[layer, head] += count
    np.testing.assert_array_equal(from_disk, expected)
