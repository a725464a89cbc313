"""Numerics guard: count non-finite metric values (NaN, inf) per layer and head, and stop or record them.

A float16 model can overflow (a query norm past 65504 becomes inf) and NaN logits propagate into every later
layer's queries; either way the metrics of that layer and head are not numbers. Values are checked as they will
be stored, so a float32 value that overflows metrics.storage_dtype=float16 counts too.

    run.on_nonfinite=error   (default) stop before the batch is written, naming layer, head, metric and samples
    run.on_nonfinite=record  keep the values (NaN/inf in the Parquet columns), count them in run.json

    python -m spectra.run model=tiny_llama data=synthetic hardware.dtype=float16 run.on_nonfinite=record
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from spectra.errors import SpectraError

STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}


def nonfinite_counts(metrics: dict[str, np.ndarray], storage_dtype: str = "float32") -> dict[str, np.ndarray]:
    """metric name -> (L, H) int64 count of non-finite values over batch and tokens; integer metrics skipped.

    metrics: name -> (L, B, H, T) numpy array, the batch's host copy (checking on the device would synchronise
    with it; the writer's threads call this, in batch order, while the next batch is captured).
    """
    counts = {}
    for name, values in metrics.items():
        if values.dtype.kind != "f":
            continue
        stored = STORAGE_DTYPES[storage_dtype]
        # NaN propagates through min and max, and rounding to the stored type is monotonic: when both extremes are
        # finite as stored, every value is. Two vectorized passes, no temporary, for the batch that has none.
        with np.errstate(over="ignore"):
            extremes = np.array([values.min(), values.max()]).astype(stored)
            if np.isfinite(extremes).all():
                counts[name] = np.zeros((values.shape[0], values.shape[2]), dtype=np.int64)
            else:
                counts[name] = (~np.isfinite(values.astype(stored, copy=False))).sum(axis=(1, 3))  # (L, H)
    return counts


class NumericsGuard:
    """Accumulates the counts over a run; raises on the first non-finite value unless recording."""

    def __init__(self, names: Sequence[str], storage_dtype: str, on_nonfinite: str):
        self.names = list(names)
        self.storage_dtype = storage_dtype
        self.on_nonfinite = on_nonfinite
        self.counts: np.ndarray | None = None  # (L, H) over all float metrics written

    def check(self, metrics: dict[str, np.ndarray], sample_ids: Sequence[int]) -> None:
        per_metric = nonfinite_counts({name: metrics[name] for name in self.names}, self.storage_dtype)
        if not per_metric:
            return
        batch_counts = sum(per_metric.values())  # (L, H)
        self.counts = batch_counts if self.counts is None else self.counts + batch_counts
        if self.on_nonfinite == "error" and batch_counts.any():
            raise SpectraError(self._message(per_metric, batch_counts, sample_ids))

    @staticmethod
    def _message(per_metric: dict[str, np.ndarray], batch_counts: np.ndarray, sample_ids: Sequence[int]) -> str:
        layers, heads = batch_counts.nonzero()
        layer, head = int(layers[0]), int(heads[0])  # the first layer it appeared in
        metrics = [name for name, counts in per_metric.items() if counts[layer, head]]
        return (
            f"non-finite attention metrics (NaN or inf) in samples {list(sample_ids)}: first at layer {layer} "
            f"head {head} ({int(batch_counts[layer, head])} values of {', '.join(metrics)}), "
            f"{int(batch_counts.sum())} values in {len(layers)} (layer, head) pairs in all; the model overflowed "
            "(try hardware.dtype=float32 or bfloat16), or set run.on_nonfinite=record to keep and count them"
        )


def nonfinite_summary(counts_per_rank: Sequence[np.ndarray | None]) -> dict:
    """For run.json: the total over all ranks' (L, H) counts, and the count of every (layer, head) that had any."""
    present = [counts for counts in counts_per_rank if counts is not None]
    if not present:
        return {"total": 0, "by_layer_head": []}
    counts = sum(present)
    layers, heads = counts.nonzero()
    return {
        "total": int(counts.sum()),
        "by_layer_head": [{"layer": int(l), "head": int(h), "count": int(counts[l, h])} for l, h in zip(layers, heads)],
    }
