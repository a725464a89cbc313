"""Token shards: SlimPajama tokenized once, windowed at read time for any context length.

A prepared folder (`data.data_dir`) holds:
    manifest.json        written last: tokenizer identity, corpus, settings, counts per source, shard list
    documents.parquet    one row per kept document, in corpus order: document_id, source, chars, tokens (full
                         tokenized length), stored, shard, offset -- the document ids live here
    tokens-NNNNN.npy     int32 token streams of the documents laid end to end (memory-mapped when read)

Each document's tokens are stored up to `max_windows_per_doc * max_prepared_length`, which is all that any
context length up to `data.max_prepared_length` can use, so a sweep over `data.context_length` needs one
preparation. Windows are cut per document: window k of a document is its tokens [k*T, (k+1)*T) with T the
context length (T-1 text tokens after a BOS with data.add_bos=true), remainder dropped, at most
`max_windows_per_doc` windows.

The folder is built under a hidden temporary name next to `data.data_dir` and renamed when complete, so an
interrupted preparation leaves nothing that looks finished. The prototype's `.npz` shards (an `input_ids`
array of shape [N, L]) are read too: each row is a document.

    python -m spectra.prepare model=tiny_llama data=slimpajama data.local_path=<files> data.data_dir=data/sp
    python -m spectra.run model=tiny_llama data=shards data.data_dir=data/sp data.context_length=128
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
import tokenize
import weakref
import zipfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig
from tqdm import tqdm

from spectra.data.sample import Sample, check_available, choose
from spectra.data.slimpajama import corpus_description, read_documents
from spectra.errors import ConfigError, SpectraError

MANIFEST = "manifest.json"
DOCUMENTS = "documents.parquet"
FORMAT = "spectra-token-shards"
FORMAT_VERSION = 1
SHARD_TOKENS = 1 << 26  # 256 MiB of int32 per shard file
TOKENIZE_BATCH = 256  # documents per call of the (Rust, multi-threaded) fast tokenizer


# ----------------------------------------------------------------------------------------------- identity
_IDENTITIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def tokenizer_identity(tokenizer) -> dict:
    """Name plus a hash of everything that decides token ids (vocab, merges, normalizer, pre-tokenizer)."""
    if tokenizer not in _IDENTITIES:  # hashing Llama-3's 9 MB tokenizer.json takes about a second
        _IDENTITIES[tokenizer] = _identity(tokenizer)
    return dict(_IDENTITIES[tokenizer])


def _identity(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        # Truncation and padding are call-time settings some loaders switch on; they do not change the ids.
        spec.pop("truncation", None)
        spec.pop("padding", None)
        canonical = json.dumps(spec, sort_keys=True)
    else:
        canonical = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "name_or_path": str(tokenizer.name_or_path),
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "sha256": hashlib.sha256(canonical.encode()).hexdigest(),
    }


def preparation_settings(data_cfg: DictConfig) -> dict:
    """Everything that decides what a preparation holds, besides the tokenizer; equal settings reuse it."""
    for key in ("min_chars", "max_windows_per_doc", "max_prepared_length"):
        minimum = 0 if key == "min_chars" else 1
        if data_cfg[key] < minimum:
            raise ConfigError(f"data.{key}", f"must be >= {minimum}, got {data_cfg[key]}")
    return {
        "corpus": corpus_description(data_cfg),
        "sources": list(data_cfg.sources),
        "min_chars": data_cfg.min_chars,
        "max_windows_per_doc": data_cfg.max_windows_per_doc,
        "max_prepared_length": data_cfg.max_prepared_length,
    }


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """A damaged or truncated shard-folder file ends in one line naming it."""
    try:
        yield
    # numpy parses an .npy header with ast.literal_eval: a damaged one raises SyntaxError or tokenize's TokenError.
    except (OSError, ValueError, KeyError, TypeError, IndexError, EOFError, zipfile.BadZipFile, SyntaxError,
            tokenize.TokenError) as error:  # fmt: skip
        what = " ".join(str(error).split())[:200] or type(error).__name__
        raise SpectraError(
            f"{path}: damaged or unreadable ({what}); prepare the shards again into a new data.data_dir"
        ) from None


def read_manifest(data_dir: Path) -> dict | None:
    path = data_dir / MANIFEST
    if not path.is_file():
        return None
    with _reading(path):
        manifest = json.loads(path.read_text())
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SpectraError(f"{path}: not a Spectra token-shard manifest")
    if (problem := manifest_problem(manifest)) is not None:
        raise SpectraError(f"{path}: {problem}; the file is damaged: prepare the shards again into a new data.data_dir")
    return manifest


def manifest_problem(manifest: dict) -> str | None:
    """What is wrong with the shape of a manifest every reader indexes into (None: nothing)."""

    def count(value, minimum: int = 0) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= minimum

    tokenizer, settings, documents = (manifest.get(k) for k in ("tokenizer", "settings", "documents"))
    shards, counts = manifest.get("shards"), manifest.get("counts", {})
    if not isinstance(tokenizer, dict) or not all(isinstance(tokenizer.get(k), str) for k in ("name_or_path", "sha256")):
        return "tokenizer must be an object with name_or_path and sha256"
    if not isinstance(settings, dict) or not all(count(settings.get(k), 1) for k in
                                                 ("max_prepared_length", "max_windows_per_doc")):  # fmt: skip
        return "settings must be an object with max_prepared_length and max_windows_per_doc >= 1"
    if not isinstance(settings.get("sources", []), list) or not count(settings.get("min_chars", 0)):
        return "settings.sources must be a list and settings.min_chars a count"
    if not isinstance(documents, dict) or not count(documents.get("count")) or documents.get("file") != DOCUMENTS:
        return f"documents must be an object with file {DOCUMENTS!r} and a count"
    if not isinstance(shards, list) or not shards:
        return "shards must be a non-empty list"
    for shard in shards:
        # A plain file name: a manifest must not point a reader outside its folder.
        if not (isinstance(shard, dict) and isinstance(shard.get("file"), str) and count(shard.get("tokens"))
                and Path(shard["file"]).name == shard["file"] and shard["file"] not in ("", ".", "..")):  # fmt: skip
            return f"shard entry {str(shard)[:80]} must be an object with a file name and a token count"
    corpus = settings.get("corpus")
    if not isinstance(corpus, dict) or not ({"hub_id", "split"} <= corpus.keys() or "local_path" in corpus):
        return "settings.corpus must be an object with hub_id and split, or local_path"
    columns = ("read", "short", "kept", "tokens", "stored")
    if not isinstance(counts, dict) or not all(isinstance(c, dict) and all(count(c.get(k)) for k in columns)
                                               for c in counts.values()):  # fmt: skip
        return f"counts must be an object of per-source objects with the counts {', '.join(columns)}"
    return None


def check_tokenizer(manifest: dict, tokenizer, data_dir: Path) -> None:
    ours = tokenizer_identity(tokenizer)
    theirs = manifest["tokenizer"]
    if ours["sha256"] != theirs["sha256"]:
        raise ConfigError(
            "data.data_dir",
            f"'{data_dir}' was tokenized with {theirs['name_or_path']} (sha256 {theirs['sha256'][:12]}), not with "
            f"this model's tokenizer {ours['name_or_path']} (sha256 {ours['sha256'][:12]}); prepare again for "
            "this model into another data.data_dir",
        )


# ------------------------------------------------------------------------------------------- preparation
def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


class _ShardWriter:
    """Lays documents' tokens end to end in int32 .npy files of about `shard_tokens` tokens each."""

    def __init__(self, directory: Path, shard_tokens: int):
        self.directory, self.shard_tokens = directory, shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[dict] = []

    def add(self, tokens: np.ndarray) -> tuple[int, int]:
        """Queues one document's tokens; returns (shard index, offset within the shard)."""
        if self.pending and self.pending_tokens + len(tokens) > self.shard_tokens:
            self.flush()
        place = (len(self.shards), self.pending_tokens)
        self.pending.append(tokens)
        self.pending_tokens += len(tokens)
        return place

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"tokens-{len(self.shards):05d}.npy"
        stream = np.concatenate(self.pending).astype(np.int32, copy=False)  # (tokens,)
        try:
            np.save(self.directory / name, stream)
        except OSError as error:
            if error.errno is not None:
                raise
            # numpy's short write ("N requested and M written") carries no errno: a full disk or quota, as a rule.
            full = shutil.disk_usage(self.directory).free < stream.nbytes + (1 << 20)
            if full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.directory / name)) from None
            raise SpectraError(f"{self.directory / name}: could not be written ({error}); is the disk healthy?") from None
        _fsync(self.directory / name)
        self.shards.append({"file": name, "tokens": int(len(stream))})
        self.pending, self.pending_tokens = [], 0


def _tokenized(tokenizer, documents, min_chars: int, sources: set[str], counts: dict):
    """(document, stripped text, token ids) for kept documents, tokenized in batches; fills `counts`."""
    batch = []

    def encode(batch):
        ids = tokenizer([text for _, text in batch], add_special_tokens=False)["input_ids"]
        return [(document, text, np.asarray(tokens, dtype=np.int64)) for (document, text), tokens in zip(batch, ids)]

    for document in documents:
        per_source = counts.setdefault(document.source, {"read": 0, "kept": 0, "short": 0, "tokens": 0, "stored": 0})
        per_source["read"] += 1
        if sources and document.source not in sources:
            continue
        text = document.text.strip()
        if len(text) < min_chars:
            per_source["short"] += 1
            continue
        batch.append((document, text))
        if len(batch) == TOKENIZE_BATCH:
            yield from encode(batch)
            batch = []
    if batch:
        yield from encode(batch)


def _build(data_cfg: DictConfig, settings: dict, tokenizer, directory: Path, shard_tokens: int) -> dict:
    """Tokenizes and writes a complete preparation into `directory`; returns its manifest."""
    counts: dict[str, dict] = {}
    store_limit = settings["max_windows_per_doc"] * settings["max_prepared_length"]
    writer = _ShardWriter(directory, shard_tokens)
    rows: dict[str, list] = {k: [] for k in ("document_id", "source", "chars", "tokens", "stored", "shard", "offset")}
    # A with-block: an error or Ctrl-C ends the progress bar's line, so the one error line starts on its own.
    with tqdm(read_documents(data_cfg), desc="tokenize", unit="doc", dynamic_ncols=True, file=sys.stderr) as documents:
        kept = _tokenized(tokenizer, documents, settings["min_chars"], set(settings["sources"]), counts)
        for document, text, tokens in kept:
            stored = tokens[:store_limit]
            shard, offset = writer.add(stored)
            record = {"document_id": document.document_id, "source": document.source, "chars": len(text),
                      "tokens": len(tokens), "stored": len(stored), "shard": shard, "offset": offset}  # fmt: skip
            for key, value in record.items():
                rows[key].append(value)
            counts[document.source]["kept"] += 1
            counts[document.source]["tokens"] += len(tokens)
            counts[document.source]["stored"] += len(stored)
    writer.flush()
    if not rows["document_id"]:
        raise SpectraError(
            f"no document in {settings['corpus']} passed the filter (data.sources={settings['sources']}, "
            f"data.min_chars={settings['min_chars']}); sources seen: {sorted(counts) or 'none'}"
        )
    types = {"document_id": pa.string(), "source": pa.string(), "chars": pa.int64(), "tokens": pa.int64(),
             "stored": pa.int64(), "shard": pa.int32(), "offset": pa.int64()}  # fmt: skip
    table = pa.table({key: pa.array(values, types[key]) for key, values in rows.items()})
    pq.write_table(table, directory / DOCUMENTS, compression="zstd")
    _fsync(directory / DOCUMENTS)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer_identity(tokenizer),
        "settings": settings,
        "counts": dict(sorted(counts.items())),
        "documents": {"file": DOCUMENTS, "count": table.num_rows},
        "shards": writer.shards,
        "created_at": datetime.now(timezone.utc).isoformat(),
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _fsync(directory / MANIFEST)
    return manifest


def _check_reusable(manifest: dict, settings: dict, tokenizer, data_dir: Path) -> dict:
    check_tokenizer(manifest, tokenizer, data_dir)
    for key, wanted in settings.items():
        if manifest["settings"].get(key) != wanted:
            raise ConfigError(
                "data.data_dir",
                f"'{data_dir}' holds a preparation with other settings ({key}: {manifest['settings'].get(key)} "
                f"there, {wanted} asked for); use another data.data_dir, or data=shards to read it as it is",
            )
    return manifest


def prepare(data_cfg: DictConfig, tokenizer, shard_tokens: int = SHARD_TOKENS) -> tuple[dict, bool]:
    """(manifest, whether it was built now): reuses `data.data_dir` when it holds the same preparation."""
    if not data_cfg.data_dir:
        raise ConfigError("data.data_dir", "is not set; give the folder the shards go to")
    data_dir = Path(data_cfg.data_dir)
    settings = preparation_settings(data_cfg)
    if (manifest := read_manifest(data_dir)) is not None:
        return _check_reusable(manifest, settings, tokenizer, data_dir), False
    if data_dir.exists() and (not data_dir.is_dir() or any(data_dir.iterdir())):
        raise ConfigError(
            "data.data_dir", f"'{data_dir}' exists but holds no {MANIFEST}; give a new or empty folder"
        )
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{data_dir.name}.inprogress-", dir=data_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(building, 0o777 & ~umask)  # mkdtemp makes it private; the finished folder gets the usual mode
    try:
        manifest = _build(data_cfg, settings, tokenizer, building, shard_tokens)
        try:
            os.rename(building, data_dir)  # replaces an empty folder; fails if another preparation got there first
        except OSError:
            if (theirs := read_manifest(data_dir)) is None:
                raise
            shutil.rmtree(building)
            return _check_reusable(theirs, settings, tokenizer, data_dir), False
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return manifest, True


# ----------------------------------------------------------------------------------------------- reading
def window_counts(lengths: np.ndarray, text_tokens: int, max_windows: int | None) -> np.ndarray:
    """Non-overlapping windows per document: floor(length / text_tokens), capped at max_windows."""
    counts = np.asarray(lengths, dtype=np.int64) // text_tokens
    return counts if max_windows is None else np.minimum(counts, max_windows)


def locate(chosen: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Global window indices (documents' windows laid end to end) -> (document index, window index)."""
    ends = np.cumsum(counts)  # window index one past each document's last
    documents = np.searchsorted(ends, chosen, side="right")
    return documents, chosen - (ends[documents] - counts[documents])


class Windows:
    """Documents' token streams, from which windows of one context length are cut.

    streams(i) -> document i's stored tokens; ids/sources/lengths describe the documents.
    """

    def __init__(self, streams, document_ids, sources, lengths, max_windows: int | None, where: str):
        self.streams, self.document_ids, self.sources = streams, document_ids, sources
        self.lengths, self.max_windows, self.where = np.asarray(lengths), max_windows, where

    def count(self, context_length: int, n_samples: int, add_bos: bool) -> int:
        """n_samples, once checked against the windows there are (none is cut)."""
        text_tokens = context_length - 1 if add_bos else context_length
        available = int(window_counts(self.lengths, text_tokens, self.max_windows).sum())
        check_available(available, n_samples, f"{self.where} at data.context_length={context_length}")
        return n_samples

    def samples(self, context_length: int, n_samples: int, seed: int, add_bos: bool, bos_token_id):
        text_tokens = context_length - 1 if add_bos else context_length
        counts = window_counts(self.lengths, text_tokens, self.max_windows)
        chosen = choose(int(counts.sum()), n_samples, seed, f"{self.where} at data.context_length={context_length}")
        samples = []
        for sample_id, (document, window) in enumerate(zip(*locate(chosen, counts))):
            start = int(window) * text_tokens
            ids = np.asarray(self.streams(int(document))[start : start + text_tokens], dtype=np.int64)
            if add_bos:
                ids = np.concatenate([[bos_token_id], ids])
            samples.append(Sample(sample_id, ids, self.sources[document], self.document_ids[document], int(window)))
        return samples


def prepared_windows(data_dir: Path, manifest: dict, context_length: int) -> Windows:
    prepared = manifest["settings"]["max_prepared_length"]
    if context_length > prepared:
        raise ConfigError(
            "data.context_length",
            f"{context_length} exceeds the {prepared} tokens '{data_dir}' was prepared for; prepare again with "
            f"data.max_prepared_length>={context_length} into another data.data_dir",
        )
    with _reading(data_dir / DOCUMENTS):
        table = pq.read_table(data_dir / DOCUMENTS)
        shard, offset, stored = (table.column(k).to_numpy().astype(np.int64) for k in ("shard", "offset", "stored"))
        document_ids, sources = table.column("document_id").to_pylist(), table.column("source").to_pylist()
    shards = []
    for entry in manifest["shards"]:
        with _reading(data_dir / entry["file"]):
            shards.append(np.load(data_dir / entry["file"], mmap_mode="r", allow_pickle=False))  # (tokens,)
            if shards[-1].shape != (entry["tokens"],) or not np.issubdtype(shards[-1].dtype, np.integer):
                raise ValueError(
                    f"{shards[-1].dtype} of shape {shards[-1].shape}, the manifest lists {entry['tokens']:,} token ids"
                )
    sizes = np.array([entry["tokens"] for entry in manifest["shards"]], dtype=np.int64)
    with _reading(data_dir / DOCUMENTS):  # every document's span must lie inside a shard the manifest lists
        if len(shard) != manifest["documents"]["count"]:
            raise ValueError(f"{len(shard):,} documents, the manifest lists {manifest['documents']['count']:,}")
        inside = (shard >= 0) & (shard < len(sizes)) & (offset >= 0) & (stored >= 0)
        if not inside.all() or (offset + stored > sizes[shard]).any():
            raise ValueError("a document's shard, offset or length points outside the shards")
    return Windows(
        lambda i: shards[shard[i]][offset[i] : offset[i] + stored[i]],
        document_ids,
        sources,
        stored,
        manifest["settings"]["max_windows_per_doc"],
        f"'{data_dir}'",
    )


def npz_windows(path: Path, context_length: int, vocab_size: int) -> Windows:
    """The prototype's shards: every row of each file's `input_ids` [N, L] is a document of L tokens."""
    files = sorted(path.glob("*.npz")) if path.is_dir() else [path]
    arrays = []
    for file in files:
        with _reading(file), np.load(file, allow_pickle=False) as shard:
            if "input_ids" not in shard or shard["input_ids"].ndim != 2:
                raise SpectraError(f"{file}: a .npz shard needs an 'input_ids' array of shape [N, L]")
            ids = shard["input_ids"]  # (N, L)
        if not np.issubdtype(ids.dtype, np.integer):  # 549.51 must not become token 549
            raise SpectraError(
                f"{file}: input_ids are {ids.dtype}, not integers; token ids must be stored as an integer array"
            )
        arrays.append(ids)
    for file, ids in zip(files, arrays):
        if context_length > ids.shape[1]:
            raise ConfigError(
                "data.context_length", f"{context_length} exceeds the {ids.shape[1]}-token rows of {file}"
            )
        if ids.size and (ids.max() >= vocab_size or ids.min() < 0):
            raise SpectraError(
                f"{file}: token id {int(ids.max())} does not fit this model's vocabulary of {vocab_size}; "
                "these shards were made with another tokenizer"
            )
    rows = [(ids, file, row) for file, ids in zip(files, arrays) for row in range(len(ids))]
    return Windows(
        lambda i: rows[i][0][rows[i][2]],
        [f"{file.name}:{row}" for _, file, row in rows],
        ["prototype-npz"] * len(rows),
        [ids.shape[1] for ids, _, _ in rows],
        None,
        f"'{path}'",
    )


def load_windows(data_cfg: DictConfig, tokenizer, vocab_size: int, prepare_if_missing: bool) -> Windows:
    """The windows of `data.data_dir`: prepared shards (checked against the tokenizer) or prototype .npz."""
    if not data_cfg.data_dir:
        raise ConfigError("data.data_dir", "is not set; point it at a folder made by python -m spectra.prepare")
    data_dir = Path(data_cfg.data_dir)
    if prepare_if_missing:
        manifest, built = prepare(data_cfg, tokenizer)
        if built:
            print(f"spectra: prepared {manifest['documents']['count']} documents into {data_dir}", file=sys.stderr)
        return prepared_windows(data_dir, manifest, data_cfg.context_length)
    if not data_dir.exists():
        raise ConfigError(
            "data.data_dir", f"'{data_dir}' does not exist; prepare it with python -m spectra.prepare data=slimpajama"
        )
    if (manifest := read_manifest(data_dir) if data_dir.is_dir() else None) is not None:
        check_tokenizer(manifest, tokenizer, data_dir)
        return prepared_windows(data_dir, manifest, data_cfg.context_length)
    if data_dir.suffix == ".npz" or (data_dir.is_dir() and any(data_dir.glob("*.npz"))):
        return npz_windows(data_dir, data_cfg.context_length, vocab_size)
    raise ConfigError(
        "data.data_dir",
        f"'{data_dir}' holds neither {MANIFEST} nor .npz shards; prepare it with python -m spectra.prepare",
    )
