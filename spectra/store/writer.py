"""Parquet output of a run: metric part files written off the compute path, samples.parquet, run.json.

Layout of a run directory:
    metrics/part-<first sample id>.parquet   one part per batch; rows ordered (sample, layer, head, token)
    samples.parquet                          one row per sample: sample_id, token ids, source, document, window
    run.json                                 resolved config, versions, model shape, counts, timings

A part is written under a name no `*.parquet` glob matches, synced, then renamed, so a reader never sees a
half-written file: `polars.scan_parquet("<run>/metrics/*.parquet")` always reads complete parts. Once renamed, the
part is listed in the run's manifest (spectra/store/manifest.py), which is what makes a killed run resumable.
"""

from __future__ import annotations

import functools
import json
import math
import os
import queue
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from spectra.crashpoints import crash_point
from spectra.data.sample import Sample
from spectra.store.manifest import Manifest, PartRecord, file_sha256, fsync_directory, write_text_atomic

KEY_COLUMNS = {"sample_id": pa.int32(), "layer": pa.int16(), "head": pa.int16(), "token_pos": pa.int32()}
FLOAT_METRICS = ("query_norm", "entropy", "max_attn")


def metric_schema(names: Sequence[str], storage_dtype: str = "float32") -> pa.Schema:
    float_type = pa.float16() if storage_dtype == "float16" else pa.float32()
    fields = [pa.field(name, kind) for name, kind in KEY_COLUMNS.items()]
    fields += [pa.field(name, pa.int32() if name == "k_eff" else float_type) for name in names]
    return pa.schema(fields)


def metric_table(
    sample_ids: np.ndarray, metrics: dict[str, np.ndarray], schema: pa.Schema
) -> pa.Table:
    """Rows for one batch. metrics: name -> (L, B, H, T) array; rows come out ordered (sample, layer, head, token)."""
    layers, batch, heads, tokens = next(iter(metrics.values())).shape
    columns = {
        "sample_id": np.repeat(np.asarray(sample_ids, dtype=np.int32), layers * heads * tokens),
        **_layer_head_token(layers, batch, heads, tokens),
    }
    for field in schema:
        if field.name in metrics:
            values = np.ascontiguousarray(metrics[field.name].transpose(1, 0, 2, 3)).reshape(-1)  # (B*L*H*T,)
            columns[field.name] = values.astype(field.type.to_pandas_dtype(), copy=False)
    return pa.table(columns, schema=schema)


@functools.lru_cache(maxsize=2)  # a run's batches, and its last, smaller one
def _layer_head_token(layers: int, batch: int, heads: int, tokens: int) -> dict[str, pa.Array]:
    """The key columns every batch of this shape shares, built once (read-only arrays, shared by the threads)."""
    return {
        "layer": pa.array(np.tile(np.repeat(np.arange(layers, dtype=np.int16), heads * tokens), batch)),
        "head": pa.array(np.tile(np.repeat(np.arange(heads, dtype=np.int16), tokens), batch * layers)),
        "token_pos": pa.array(np.tile(np.arange(tokens, dtype=np.int32), batch * layers * heads)),
    }


def _splittable(kind: pa.DataType) -> bool:
    return pa.types.is_floating(kind) or kind in (pa.int32(), pa.int64())


# hardware.parquet_codec: what the metric parts are compressed with.
PARQUET_CODECS = ("brotli", "zstd")


def _write_options(schema: pa.Schema, codec: str) -> dict:
    """pq.write_table's encoding arguments for a part (or samples.parquet) of this schema."""
    splittable = [f.name for f in schema if _splittable(f.type)]
    if codec == "zstd":
        # Speed first (GPU configs): no dictionaries, 4-byte columns split into byte streams, zstd level 1 on all.
        # Per row, on one core of the 2-core machine (SmolLM2 rows, loaded machine, thread CPU time): 57 ns at
        # 10.07 B/row, against 87 ns with brotli's key encodings below and 372 ns with brotli itself. A split
        # token_pos ramp costs 0.008 B/row at 8192 tokens, plain bytes 0.07.
        return dict(
            compression="zstd",
            compression_level=1,
            use_dictionary=False,
            column_encoding=dict.fromkeys(splittable, "BYTE_STREAM_SPLIT"),
        )
    # Size first (the CPU default, where writing is ~4% of the capture):
    # Keys (sample, layer, head) are runs: dictionary + RLE, then zstd, makes them nearly free.
    # Values (float metrics, k_eff) are split into byte streams, then brotli: its context modelling of each
    # stream beats zstd's best level (SmolLM2, 512 tokens, float32: 9.98 B/row against 10.3 at zstd's default).
    # token_pos ramps within each (sample, layer, head): delta encoding packs it into a few bytes per 128 rows,
    # where a dictionary pays ~log2(T) bits a row (SmolLM2: 0.17 B/row at 2048 tokens, 0.70 at 8192; now 0.0002).
    ramps = [f.name for f in schema if f.name == "token_pos" and pa.types.is_integer(f.type)]
    keys = [f.name for f in schema if pa.types.is_integer(f.type) and f.name in KEY_COLUMNS.keys() - ramps]
    values = [name for name in splittable if name not in KEY_COLUMNS]
    return dict(
        compression={name: "brotli" if name in values else "zstd" for name in schema.names},
        compression_level={name: 5 if name in values else 3 for name in schema.names},
        use_dictionary=keys,
        column_encoding=dict.fromkeys(values, "BYTE_STREAM_SPLIT") | dict.fromkeys(ramps, "DELTA_BINARY_PACKED"),
    )


def write_parquet_atomic(table: pa.Table, path: Path, codec: str = "brotli") -> int:
    """Write, fsync and rename into place; returns the file's size in bytes."""
    temporary = path.with_name(path.name + ".inprogress")  # must not end in .parquet: readers' globs match it
    try:
        _write_parquet(table, temporary, codec)
    except BaseException:  # disk full, read-only, interrupted: no half-written file stays behind
        temporary.unlink(missing_ok=True)
        raise
    os.replace(temporary, path)
    fsync_directory(path.parent)
    return path.stat().st_size


def _write_parquet(table: pa.Table, temporary: Path, codec: str) -> None:
    """The file under its temporary name, synced."""
    # Columns without nulls are written as Parquet 'required': the writer then computes no definition levels, which
    # halves its fixed cost per column (~9 -> ~4.5 ns/row). Readers see the same types (polars: nullable as before).
    required = pa.schema([f.with_nullable(f.nullable and table.column(f.name).null_count > 0) for f in table.schema])
    pq.write_table(
        table.cast(required),
        temporary,
        max_rows_per_page=1 << 20,  # pages end at 1 MiB, not 20,000 rows: longer streams compress better (-0.06 B/row)
        **_write_options(table.schema, codec),
    )
    crash_point("parquet-written")
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())


class _Skipped(Exception):
    """A batch after one that failed: not checked, written or listed."""


class PartWriter:
    """Writes metric parts from a pool of `threads` threads while the caller captures the next batches.

    put() returns at once unless `threads + 1` batches already wait; then it waits, so memory stays bounded.
    Each part is written whole by one thread (pyarrow encodes and writes without holding the GIL), so its bytes do
    not depend on the number of threads. Two steps run in batch order, whatever thread holds the batch: `check`
    (called with the batch's host arrays and sample ids before its part is written; the numerics guard) and the
    manifest line, so the manifest lists parts in batch order. An exception in either, or in writing a part, stops
    that batch and every later one (a later part already on disk is deleted); earlier batches still land, and the
    first failure is raised in the caller's thread by put() or close().

    With a manifest, each part is recorded there once it has its final name, and the counts start from the
    parts the manifest already holds (those a resumed run keeps).
    """

    def __init__(
        self,
        directory: Path,
        schema: pa.Schema,
        manifest: Manifest | None = None,
        codec: str = "brotli",
        threads: int = 1,
        check: Callable[[dict[str, np.ndarray], list[int]], None] | None = None,
    ):
        self.directory = directory
        self.schema = schema
        self.manifest = manifest
        self.codec = codec
        self.check = check
        self.directory.mkdir(parents=True, exist_ok=True)
        kept = manifest.parts if manifest is not None else []
        self.rows = sum(part.rows for part in kept)
        self.bytes = sum(part.bytes for part in kept)
        self.files: list[str] = [part.part for part in kept]
        self._queue: queue.Queue = queue.Queue(maxsize=threads + 1)
        self._batches = 0  # batches put so far: the next one's place in the order
        self._order = threading.Condition()
        self._next = {"checked": 0, "recorded": 0}  # the batch whose turn it is, per ordered step
        self._stop = math.inf  # batches from this one on are skipped
        self._errors: dict[int, BaseException] = {}  # batch -> what stopped it
        self._threads = [
            threading.Thread(target=self._work, name=f"spectra-part-writer-{i}", daemon=True) for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            batch, sample_ids, metrics = item
            path = self.directory / f"part-{int(sample_ids[0]):06d}.parquet"
            written = False
            try:
                if batch >= self._stop:
                    continue
                # A batch on its way from the GPU: wait for its copy here, not in the capture's thread.
                arrays = metrics.wait() if hasattr(metrics, "wait") else metrics
                ids = [int(i) for i in sample_ids]
                with self._turn("checked", batch):
                    if self.check is not None:
                        self.check(arrays, ids)
                table = metric_table(sample_ids, arrays, self.schema)
                size = write_parquet_atomic(table, path, self.codec)
                written = True
                crash_point("part-renamed")
                checksum = file_sha256(path) if self.manifest is not None else None
                with self._turn("recorded", batch):
                    if self.manifest is not None:
                        settings = self.manifest.settings
                        self.manifest.record(PartRecord(path.name, ids, table.num_rows, size, checksum, settings))
                        crash_point("part-recorded")
                    self.bytes += size
                    self.rows += table.num_rows
                    self.files.append(path.name)
            except _Skipped:
                if written:  # after a failed batch: never listed, so not left where a *.parquet glob reads it
                    path.unlink(missing_ok=True)
            except BaseException as error:  # re-raised in the caller's thread
                with self._order:
                    self._errors[batch] = error
                    self._stop = min(self._stop, batch)
                    self._order.notify_all()

    @contextmanager
    def _turn(self, step: str, batch: int):
        """Runs the block once every earlier batch has done this step; raises _Skipped if an earlier batch failed."""
        with self._order:
            self._order.wait_for(lambda: self._next[step] == batch or batch >= self._stop)
            if batch >= self._stop:
                raise _Skipped
        yield  # the other threads wait for this batch's turn, so the block runs alone, outside the lock
        with self._order:
            self._next[step] += 1
            self._order.notify_all()

    def put(self, sample_ids: np.ndarray, metrics) -> None:
        """Queues one batch: metrics is name -> (L, B, H, T) numpy array, or an object whose wait() returns that
        once the arrays have arrived (spectra.capture.hook.metrics_to_host's copy from the GPU)."""
        self._raise_if_failed()
        self._queue.put((self._batches, sample_ids, metrics))
        self._batches += 1

    def close(self) -> None:
        """Waits until every queued part is on disk."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()
        self._threads = []
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        with self._order:
            if self._errors:
                raise self._errors[min(self._errors)]

    def __enter__(self) -> "PartWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def write_samples(path: Path, samples: Sequence[Sample]) -> None:
    table = pa.table(
        {
            "sample_id": pa.array([s.sample_id for s in samples], pa.int32()),
            "input_ids": pa.array([s.input_ids.tolist() for s in samples], pa.list_(pa.int32())),
            "source": pa.array([s.source for s in samples], pa.string()),
            "document_id": pa.array([s.document_id for s in samples], pa.string()),
            "window_index": pa.array([s.window_index for s in samples], pa.int32()),
        }
    )
    write_parquet_atomic(table, path)


def write_json_atomic(payload: dict, path: Path) -> None:
    write_text_atomic(json.dumps(payload, indent=2, default=str) + "\n", path)


def write_config_record(out: Path, job_config: DictConfig, hydra_config: DictConfig) -> None:
    """<run>/.hydra/{config,hydra,overrides}.yaml, as Hydra writes them, but only once the run is accepted.

    conf/config.yaml sets hydra.output_subdir=null so that Hydra itself never writes there: a refused command
    (another run in the folder, other settings on resume, a dry run) would otherwise overwrite the record.
    """
    folder = out / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    # Rewritten by every resume: new-then-rename, so a full disk or a kill keeps the earlier record whole.
    write_text_atomic(OmegaConf.to_yaml(job_config), folder / "config.yaml")
    write_text_atomic(OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_config})), folder / "hydra.yaml")
    write_text_atomic(OmegaConf.to_yaml(hydra_config.overrides.task), folder / "overrides.yaml")
