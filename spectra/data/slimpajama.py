"""Raw SlimPajama documents: from the Hugging Face hub, or from local files in SlimPajama's own format.

A SlimPajama row is `text` plus `meta.redpajama_set_name` (the source, e.g. RedPajamaC4). Local files may be
Parquet (as the hub stores DKYoon/SlimPajama-6B), JSONL, or zstd-compressed JSONL (`.jsonl.zst`, as the
original SlimPajama release ships). `data.local_path` is a file, a folder (searched recursively) or a glob.

Documents come out in a fixed order (files sorted by path, rows in file order), each with an id that points
back to its row: `<file path relative to local_path>:<row>` or `<split>:<row>` for the hub.

    python -m spectra.prepare model=tiny_llama data=slimpajama data.local_path=/data/slimpajama-6b/test
"""

from __future__ import annotations

import glob
import io
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from omegaconf import DictConfig

from spectra.errors import ConfigError, SpectraError
from spectra.hub import hub_reachable

SUFFIXES = (".parquet", ".jsonl", ".jsonl.zst")


@dataclass
class Document:
    document_id: str  # where the row came from: "<file>:<row>" or "<split>:<row>"
    source: str  # meta.redpajama_set_name
    text: str  # as stored, not yet stripped


def file_format(path: Path) -> str | None:
    name = path.name
    return next((suffix for suffix in SUFFIXES if name.endswith(suffix)), None)


def local_files(local_path: str) -> tuple[Path, list[Path]]:
    """(base the document ids are relative to, the SlimPajama files local_path names, sorted)."""
    path = Path(local_path).expanduser()
    if any(char in local_path for char in "*?["):
        files = [Path(p) for p in glob.glob(str(path), recursive=True)]
        base = Path(_literal_prefix(local_path)).expanduser()
    elif path.is_dir():
        files, base = list(path.rglob("*")), path
    elif path.is_file():
        files, base = [path], path.parent
    else:
        raise ConfigError("data.local_path", f"'{local_path}' does not exist; give a file, a folder or a glob")
    files = sorted(f for f in files if f.is_file() and file_format(f))
    if not files:
        raise ConfigError(
            "data.local_path", f"'{local_path}' holds no {', '.join(SUFFIXES)} files in SlimPajama's format"
        )
    return base, files


def _literal_prefix(pattern: str) -> str:
    """The folder part of a glob before its first wildcard: document ids are relative to it."""
    cut = min(i for i, char in enumerate(pattern) if char in "*?[")
    return str(Path(pattern[:cut] + "x").parent)


def _source(meta) -> str:
    # The hub's Parquet stores meta as a struct; some dumps store it as a JSON string.
    if isinstance(meta, str):
        meta = json.loads(meta)
    if not isinstance(meta, dict) or "redpajama_set_name" not in meta:
        raise KeyError("meta.redpajama_set_name")
    return meta["redpajama_set_name"]


def _rows(path: Path) -> Iterator[tuple[str, object]]:
    """(text, meta) per row of one file."""
    kind = file_format(path)
    if kind == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=["text", "meta"]):
            yield from zip(batch.column("text").to_pylist(), batch.column("meta").to_pylist())
        return
    if kind == ".jsonl.zst":
        handle = io.TextIOWrapper(_zstd_stream(path), encoding="utf-8")
    else:
        handle = open(path, encoding="utf-8")
    with handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"line {number} is a JSON {type(row).__name__}, not an object")
                yield row["text"], row["meta"]


def _zstd_stream(path: Path) -> io.BufferedReader:
    """The decompressed bytes; a file cut short raises ValueError instead of ending early without a word
    (zstandard's stream_reader treats a truncated frame as the end of the data)."""
    import zstandard

    class Checked(io.RawIOBase):
        def __init__(self):
            self.source = open(path, "rb")
            self.decompressor = zstandard.ZstdDecompressor().decompressobj()
            self.buffer = b""

        def readable(self) -> bool:
            return True

        def readinto(self, target) -> int:
            while not self.buffer:
                chunk = self.source.read(1 << 20)
                if not chunk:
                    if not self.decompressor.eof:
                        raise ValueError("the zstd stream ends in the middle of a frame: the file is truncated")
                    return 0
                if self.decompressor.eof:  # several frames laid end to end
                    self.decompressor = zstandard.ZstdDecompressor().decompressobj()
                try:
                    self.buffer = self.decompressor.decompress(chunk)
                except zstandard.ZstdError as error:  # not zstd at all, or damaged inside a frame
                    raise ValueError(f"not a valid zstd stream ({error})") from None
            size = min(len(target), len(self.buffer))
            target[:size], self.buffer = self.buffer[:size], self.buffer[size:]
            return size

        def close(self) -> None:
            self.source.close()
            super().close()

    return io.BufferedReader(Checked())


def read_local(local_path: str) -> Iterator[Document]:
    base, files = local_files(local_path)
    for path in files:
        name = path.relative_to(base).as_posix() if path.is_relative_to(base) else path.as_posix()
        try:
            for row, (text, meta) in enumerate(_rows(path)):
                if not isinstance(text, str):
                    raise ValueError(f"row {row}: text is {text!r:.40}, not a string")
                yield Document(f"{name}:{row}", _source(meta), text)
        except (KeyError, ValueError, EOFError) as error:  # bad JSON or UTF-8, a missing column, a cut zstd frame
            raise SpectraError(
                f"{path}: not in SlimPajama's format (text plus meta.redpajama_set_name), or damaged: "
                f"{str(error).splitlines()[0]}"
            ) from None
        except OSError as error:  # a damaged Parquet file (pyarrow's errors are OSError), an unreadable file
            raise SpectraError(f"{path}: cannot be read ({str(error).splitlines()[0]})") from None


def read_hub(hub_id: str, split: str) -> Iterator[Document]:
    """The hub's rows; from datasets' local cache only when the hub is away (hub_reachable), so that a miss is one
    line at once instead of ~25 s of retries. Loaded when called (not a generator): a failure comes before the
    caller's progress bar is drawn."""
    try:
        import datasets
    except ImportError as error:
        raise SpectraError(f"cannot load {hub_id} from the Hugging Face hub: {error}; pip install datasets") from None
    reachable = hub_reachable()
    try:
        with _cache_only(datasets, not reachable):
            dataset = datasets.load_dataset(hub_id, split=split)
    except OSError as error:  # ConnectionError is an OSError
        if not reachable:
            from huggingface_hub import constants

            raise ConfigError(
                "data.hub_id",
                f"{hub_id} (split {split}) is not in the local datasets cache ({datasets.config.HF_DATASETS_CACHE}) "
                f"and the Hugging Face hub ({constants.ENDPOINT}) is unreachable: pass SlimPajama's own files with "
                "data.local_path=<.parquet, .jsonl or .jsonl.zst file, folder or glob>, or data.data_dir=<a folder "
                "already prepared for this model>, or run where the hub is reachable",
            ) from None
        raise SpectraError(
            f"cannot load {hub_id} (split {split}) from the Hugging Face hub: {str(error).splitlines()[0]} -- "
            "without hub access, download its Parquet files elsewhere and pass data.local_path=<file, folder or glob>"
        ) from None
    except ValueError as error:  # an unknown split
        raise ConfigError("data.split", str(error).splitlines()[0]) from None
    return (Document(f"{split}:{row}", _source(example["meta"]), example["text"])
            for row, example in enumerate(dataset))  # fmt: skip


@contextmanager
def _cache_only(datasets, offline: bool) -> Iterator[None]:
    """HF_HUB_OFFLINE for this one call. datasets and huggingface_hub read the variable when they are imported,
    which may have happened already in this process (a test, a sweep), so their module settings are set instead."""
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    if offline:
        datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def corpus_description(data_cfg: DictConfig) -> dict:
    """What a preparation reads, as recorded in the manifest: the hub id and split, or the local files."""
    if data_cfg.local_path:
        base, files = local_files(data_cfg.local_path)
        return {
            "local_path": data_cfg.local_path,
            "files": [{"name": f.relative_to(base).as_posix(), "bytes": f.stat().st_size} for f in files],
        }
    return {"hub_id": data_cfg.hub_id, "split": data_cfg.split}


def read_documents(data_cfg: DictConfig) -> Iterator[Document]:
    """Every raw document, unfiltered, in a fixed order."""
    if data_cfg.local_path:
        return read_local(data_cfg.local_path)
    return read_hub(data_cfg.hub_id, data_cfg.split)
