"""The part writer: a pool of threads writing parts while the next batch is captured, with bounded memory, the
same bytes and manifest whatever the number of threads, and batches after a failure never listed; the codec per
hardware config; the copy to the host; `scripts/bench.py --writer`.

    python -m pytest tests/test_writer.py -q
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import threading
import time

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf
from conftest import REPO, compose_config

from spectra.capture.hook import metrics_to_host
from spectra.config.schema import checked_config
from spectra.errors import ConfigError
from spectra.store.manifest import Manifest, file_sha256, read_manifest
from spectra.store.writer import PartWriter, metric_schema

NAMES = ["query_norm", "entropy", "max_attn", "k_eff"]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench", REPO / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


bench = _load_bench()


def _batches(count: int, shape=(3, 2, 4, 300)) -> list[dict[str, np.ndarray]]:
    return [bench.synthetic_metrics(shape, NAMES, seed=seed) for seed in range(count)]


def _write(directory, batches, **writer_options) -> PartWriter:
    directory.mkdir(exist_ok=True)
    manifest = Manifest(directory / "manifest.jsonl", {"test": 1})
    with PartWriter(directory / "metrics", metric_schema(NAMES), manifest=manifest, **writer_options) as writer:
        for number, metrics in enumerate(batches):
            writer.put(np.array([2 * number, 2 * number + 1]), metrics)
    return writer


@pytest.mark.parametrize("codec", ["brotli", "zstd"])
def test_parts_and_manifest_do_not_depend_on_the_number_of_threads(tmp_path, codec):
    batches = _batches(6)
    one = _write(tmp_path / "one", batches, codec=codec, threads=1)
    three = _write(tmp_path / "three", batches, codec=codec, threads=3)

    names = [f"part-{2 * n:06d}.parquet" for n in range(6)]
    assert one.files == three.files == names  # batch order, whichever thread finished first
    for name in names:
        assert (tmp_path / "one/metrics" / name).read_bytes() == (tmp_path / "three/metrics" / name).read_bytes()
    assert (tmp_path / "one/manifest.jsonl").read_bytes() == (tmp_path / "three/manifest.jsonl").read_bytes()
    parts = read_manifest(tmp_path / "three/manifest.jsonl")[1]
    assert [p.part for p in parts] == names and [p.sample_ids for p in parts] == [[2 * n, 2 * n + 1] for n in range(6)]
    for part in parts:
        assert part.sha256 == file_sha256(tmp_path / "three/metrics" / part.part)
    assert three.rows == 6 * 3 * 2 * 4 * 300

    # What is read back is what was put: batch 4's sample 9 (second in the batch), layer 2, head 1.
    frame = pl.read_parquet(tmp_path / "three/metrics" / names[4])
    row = frame.filter((pl.col("sample_id") == 9) & (pl.col("layer") == 2) & (pl.col("head") == 1))
    assert row["token_pos"].to_list() == list(range(300))
    for name in NAMES:
        assert row[name].to_numpy().tobytes() == batches[4][name][2, 1, 1].tobytes(), name


def test_zstd_parts_use_split_streams_and_no_dictionaries(tmp_path):
    _write(tmp_path, _batches(1, shape=(4, 2, 3, 512)), codec="zstd")
    metadata = pq.ParquetFile(tmp_path / "metrics/part-000000.parquet").metadata
    chunk = metadata.row_group(0)
    columns = {chunk.column(i).path_in_schema: chunk.column(i) for i in range(chunk.num_columns)}
    for name, column in columns.items():
        assert column.compression == "ZSTD" and not column.has_dictionary_page, name
        split = "BYTE_STREAM_SPLIT" in column.encodings
        assert split == (name not in ("layer", "head")), name  # the 2-byte keys stay plain
    # Required columns (no nulls): no definition levels; readers still see the schema's types.
    assert all(metadata.schema.column(i).max_definition_level == 0 for i in range(metadata.num_columns))
    assert pq.read_schema(tmp_path / "metrics/part-000000.parquet").types == metric_schema(NAMES).types


def test_a_full_queue_makes_put_wait(tmp_path):
    release = threading.Event()
    checked = []

    def check(arrays, sample_ids):  # the guard's place: the first batch's check holds the only thread
        release.wait(10)
        checked.append(sample_ids)

    batches = _batches(4, shape=(1, 2, 1, 8))
    writer = PartWriter(tmp_path, metric_schema(NAMES), threads=1, check=check)
    for number in range(3):  # one being written, two waiting: threads + 1
        writer.put(np.array([2 * number, 2 * number + 1]), batches[number])
    fourth = threading.Thread(target=writer.put, args=(np.array([6, 7]), batches[3]))
    fourth.start()
    time.sleep(0.3)
    assert fourth.is_alive()  # blocked: memory holds no more batches than that
    release.set()
    fourth.join(10)
    writer.close()
    assert not fourth.is_alive() and checked == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert writer.files == [f"part-{n:06d}.parquet" for n in (0, 2, 4, 6)]


def test_a_failed_batch_stops_later_ones_and_earlier_ones_land(tmp_path):
    def check(arrays, sample_ids):
        if sample_ids[0] == 4:
            raise ValueError("batch 2 is bad")

    manifest = Manifest(tmp_path / "manifest.jsonl", {"test": 1})
    writer = PartWriter(tmp_path / "metrics", metric_schema(NAMES), manifest=manifest, threads=3, check=check)
    with pytest.raises(ValueError, match="batch 2 is bad"):
        with writer:
            for number, metrics in enumerate(_batches(5, shape=(2, 2, 2, 64))):
                writer.put(np.array([2 * number, 2 * number + 1]), metrics)
    kept = ["part-000000.parquet", "part-000002.parquet"]
    assert sorted(p.name for p in (tmp_path / "metrics").iterdir()) == kept  # nothing after it, not even unlisted
    assert [p.part for p in read_manifest(tmp_path / "manifest.jsonl")[1]] == kept
    with pytest.raises(ValueError, match="batch 2 is bad"):
        writer.put(np.array([10, 11]), _batches(1, shape=(2, 2, 2, 64))[0])


def test_codec_and_threads_come_from_the_hardware_config():
    cpu, h100 = (compose_config(f"hardware={name}") for name in ("cpu", "h100"))
    assert (cpu.hardware.parquet_codec, cpu.hardware.writer_threads) == ("brotli", 1)
    assert (h100.hardware.parquet_codec, h100.hardware.writer_threads) == ("zstd", 4)
    for key, value, message in [
        ("parquet_codec", "gzip", "must be one of brotli, zstd, got 'gzip'"),
        ("writer_threads", 0, "must be > 0, got 0"),
    ]:
        with pytest.raises(ConfigError, match=message) as bad:
            checked_config(OmegaConf.merge(cpu, {"hardware": {key: value}}))
        assert bad.value.key == f"hardware.{key}"


def test_synthetic_metrics_stay_inside_their_possible_ranges():
    metrics = bench.synthetic_metrics((2, 3, 4, 200), NAMES)
    keys = np.arange(1, 201)  # keys query t sees
    assert metrics["k_eff"].dtype == np.int32 and metrics["entropy"].dtype == np.float32
    assert (metrics["k_eff"] >= 1).all() and (metrics["k_eff"] <= keys).all()
    assert (metrics["entropy"] >= 0).all() and (metrics["entropy"] <= np.log(keys) + 1e-6).all()
    assert (metrics["max_attn"] >= (1 / keys).astype(np.float32)).all() and (metrics["max_attn"] <= 1).all()
    assert 0.1 < np.median(metrics["entropy"][..., -1] / np.log(200)) < 0.8  # spread over the heads, not degenerate


def test_bench_writer_prints_one_json_line():
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        bench.main(["--writer", "--json", "--parts", "3", "--repeats", "2", "--warmup", "0",
                    "hardware=h100", "model=tiny_llama", "data.context_length=64"])  # fmt: skip
    lines = stdout.getvalue().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["parquet_codec"] == "zstd" and result["writer_threads"] == 4 and result["parts"] == 3
    assert result["rows_per_part"] == 3 * 8 * 8 * 64  # tiny_llama: 3 layers x 8 heads; h100: batches of 8
    assert result["writer_rows_per_s"] > 0 and len(result["rounds_rows_per_s"]) == 2
    assert result["writer_rows_per_s"] == pytest.approx(float(np.median(result["rounds_rows_per_s"])), abs=1)
    assert 4 < result["bytes_per_row"] < 16 and result["writer_cpu_ns_per_row"] > 0
    assert result["machine"]["cores"] >= 1


def test_metrics_to_host_on_the_cpu_shares_memory():
    metrics = {"entropy": torch.rand(2, 1, 3, 5), "k_eff": torch.arange(30, dtype=torch.int32).view(2, 1, 3, 5)}
    host = metrics_to_host(metrics, ["entropy", "k_eff"]).wait()
    assert np.shares_memory(host["entropy"], metrics["entropy"].numpy())
    assert host["k_eff"].dtype == np.int32 and host["k_eff"].tolist() == metrics["k_eff"].tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_metrics_to_host_copies_from_the_gpu_into_pinned_memory_without_waiting():
    entropy = torch.randn(4, 2, 8, 3, device="cuda")  # (L, B, H, T)
    entropy[0, 1, 2] = torch.tensor([float("nan"), -0.0, float("inf")], device="cuda")
    k_eff = torch.arange(4 * 2 * 8 * 3, dtype=torch.int32, device="cuda").view(4, 2, 8, 3)
    k_eff[3, 1, 7, 2] = 2**31 - 1
    host = metrics_to_host({"entropy": entropy, "k_eff": k_eff}, ["k_eff", "entropy"]).wait()
    assert host["k_eff"].dtype == np.int32 and host["k_eff"].shape == (4, 2, 8, 3)
    np.testing.assert_array_equal(host["k_eff"], k_eff.cpu().numpy())
    np.testing.assert_array_equal(host["entropy"].view(np.uint32), entropy.cpu().numpy().view(np.uint32))  # bits
    # Sample-major in memory, as the Parquet rows are: the writer reorders nothing.
    assert host["entropy"].transpose(1, 0, 2, 3).flags.c_contiguous
    assert torch.from_numpy(host["k_eff"]).is_pinned()


def test_bench_batch_sizes_are_checked(capsys):
    for argv, message in [
        (["16", "--batch-sizes", "1,0"], "--batch-sizes takes positive integers and max, got 1,0"),
        (["16", "--batch-sizes", "1,max", "model=tiny_llama"], "--batch-sizes max needs a CUDA device"),
    ]:
        with pytest.raises(SystemExit) as stopped:
            bench.main(argv)
        assert stopped.value.code == 2 and message in capsys.readouterr().err
