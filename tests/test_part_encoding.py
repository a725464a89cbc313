"""Metric parts are encoded for size without changing a bit: what polars reads back is what was written."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from spectra.store.writer import metric_schema, metric_table, write_parquet_atomic

NAMES = ["query_norm", "entropy", "max_attn", "k_eff"]


def _metrics(rng: np.random.Generator, layers=3, batch=2, heads=4, tokens=3000) -> dict[str, np.ndarray]:
    shape = (layers, batch, heads, tokens)
    floats = {name: rng.lognormal(0.0, 2.0, shape).astype(np.float32) for name in NAMES[:3]}
    # Values a lossy or reordering encoder would betray: signed zero, subnormals, infinities, NaN, extremes.
    special = np.array([0.0, -0.0, 1e-45, -1e-40, np.inf, -np.inf, np.nan, 65504.0], np.float32)  # 65504: float16 max
    floats["entropy"].reshape(-1)[: special.size] = special
    k_eff = np.minimum(rng.integers(1, 50, shape).cumsum(axis=-1), np.arange(1, tokens + 1)).astype(np.int32)
    return floats | {"k_eff": k_eff}


@pytest.mark.parametrize("storage_dtype", ["float32", "float16"])
def test_part_round_trips_bit_for_bit(tmp_path, storage_dtype):
    rng = np.random.default_rng(0)
    schema = metric_schema(NAMES, storage_dtype)
    table = metric_table(np.array([7, 8]), _metrics(rng), schema)
    size = write_parquet_atomic(table, tmp_path / "part.parquet")

    back = pl.read_parquet(tmp_path / "part.parquet")
    assert back.to_arrow().schema == table.schema
    for name in table.column_names:
        written = table.column(name).to_numpy()
        read = back[name].to_numpy()
        assert read.dtype == written.dtype, name
        assert read.tobytes() == written.tobytes(), name  # bits, so NaN and -0.0 count too
    assert size == (tmp_path / "part.parquet").stat().st_size


def test_token_pos_is_delta_encoded_and_smaller_than_a_dictionary(tmp_path):
    table = metric_table(np.array([0]), _metrics(np.random.default_rng(1), batch=1), metric_schema(NAMES))
    write_parquet_atomic(table, tmp_path / "part.parquet")
    chunk = pq.ParquetFile(tmp_path / "part.parquet").metadata.row_group(0)
    columns = {chunk.column(i).path_in_schema: chunk.column(i) for i in range(chunk.num_columns)}
    assert "DELTA_BINARY_PACKED" in columns["token_pos"].encodings
    assert "BYTE_STREAM_SPLIT" in columns["entropy"].encodings
    assert columns["layer"].has_dictionary_page

    pq.write_table(table.select(["token_pos"]), tmp_path / "dictionary.parquet", compression="zstd")
    dictionary = pq.ParquetFile(tmp_path / "dictionary.parquet").metadata.row_group(0).column(0)
    assert columns["token_pos"].total_compressed_size < dictionary.total_compressed_size / 5
