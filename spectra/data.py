"""Samples for a capture run: fixed-length token windows, each recorded with where it came from.

    builtin    the standard library's docstrings: real English prose that every Python has, offline
    synthetic  seeded uniformly random token ids
    slimpajama SlimPajama-6B (hub or local files), prepared into token shards in data.data_dir first if needed
    shards     token shards already in data.data_dir (spectra.prepare's, or the prototype's .npz)

Every sample has exactly `data.context_length` tokens, so batches need no padding and no attention mask.
Which windows a run takes is decided by `data.seed` alone.

    python -m spectra.run data=builtin data.context_length=256 data.n_samples=4
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from dataclasses import dataclass

import numpy as np
from omegaconf import DictConfig

from spectra.errors import ConfigError

# Modules with long prose docstrings; a fixed list so the corpus is the same on every machine with the same
# Python version (the version is recorded in run.json).
BUILTIN_MODULES = (
    "argparse", "ast", "asyncio.base_events", "asyncio.streams", "asyncio.tasks", "calendar", "cmd", "codecs",
    "collections", "concurrent.futures._base", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "doctest", "email.message", "enum", "fractions", "ftplib", "functools",
    "gettext", "heapq", "http.client", "http.cookiejar", "imaplib", "inspect", "ipaddress", "json", "logging",
    "logging.handlers", "mailbox", "multiprocessing.pool", "nntplib", "numbers", "optparse", "os", "pathlib",
    "pdb", "pickle", "poplib", "pprint", "pydoc", "queue", "random", "re", "sched", "secrets", "shlex", "shutil",
    "smtplib", "socket", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "trace", "typing", "unittest.case", "unittest.mock", "urllib.parse", "urllib.request",
    "uuid", "warnings", "weakref", "xml.dom.minidom", "zipfile",
)  # fmt: skip


@dataclass
class Sample:
    sample_id: int
    input_ids: np.ndarray  # (context_length,) int64
    source: str  # corpus or subset the window came from
    document_id: str  # document within the source
    window_index: int  # position of the window within its document (or corpus stream)


def module_document(module_name: str) -> str:
    """A module's docstring followed by those of its public classes, functions and methods, in source order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nntplib and friends warn that they are deprecated
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return ""
    parts = [inspect.getdoc(module) or ""]
    for name, member in sorted(vars(module).items()):
        if name.startswith("_") or getattr(member, "__module__", None) != module_name:
            continue
        if inspect.isclass(member) or inspect.isfunction(member):
            parts.append(inspect.getdoc(member) or "")
        if inspect.isclass(member):
            for method_name, method in sorted(vars(member).items()):
                if not method_name.startswith("_") and inspect.isfunction(method):
                    parts.append(inspect.getdoc(method) or "")
    return "\n\n".join(part.strip() for part in parts if part and part.strip())


def builtin_windows(tokenizer, context_length: int, add_bos: bool) -> list[tuple[np.ndarray, str, int]]:
    """All non-overlapping windows of the standard-library corpus: (token ids, first module, window index).

    The modules' token streams are laid end to end so any context length is served; the remainder is dropped.
    """
    documents = [(name, module_document(name)) for name in BUILTIN_MODULES]
    documents = [(name, text) for name, text in documents if text]
    encoded = tokenizer([text + "\n\n" for _, text in documents], add_special_tokens=False)["input_ids"]
    stream = np.concatenate([np.asarray(ids, dtype=np.int64) for ids in encoded])
    owner = np.concatenate([np.full(len(ids), i) for i, ids in enumerate(encoded)])

    text_tokens = context_length - 1 if add_bos else context_length
    windows = []
    for index in range(len(stream) // text_tokens):
        start = index * text_tokens
        ids = stream[start : start + text_tokens]
        if add_bos:
            ids = np.concatenate([[tokenizer.bos_token_id], ids])
        windows.append((ids, documents[owner[start]][0], index))
    return windows


def choose(n_available: int, n_samples: int, seed: int, what: str) -> np.ndarray:
    """Seeded choice of n_samples indices out of n_available, in corpus order."""
    if n_samples > n_available:
        raise ConfigError("data.n_samples", f"{n_samples} asked for, but {what} holds only {n_available} windows")
    return np.sort(np.random.default_rng(seed).choice(n_available, size=n_samples, replace=False))


def load_samples(data_cfg: DictConfig, tokenizer, vocab_size: int) -> list[Sample]:
    if data_cfg.add_bos and data_cfg.context_length < 2:
        raise ConfigError("data.context_length", "must be >= 2 with data.add_bos=true")
    if data_cfg.name == "builtin":
        windows = builtin_windows(tokenizer, data_cfg.context_length, data_cfg.add_bos)
        chosen = choose(len(windows), data_cfg.n_samples, data_cfg.seed, "the built-in corpus")
        return [
            Sample(sample_id, windows[i][0], "python-stdlib-docstrings", windows[i][1], windows[i][2])
            for sample_id, i in enumerate(chosen)
        ]
    if data_cfg.name == "synthetic":
        rng = np.random.default_rng(data_cfg.seed)
        ids = rng.integers(0, vocab_size, size=(data_cfg.n_samples, data_cfg.context_length), dtype=np.int64)
        if data_cfg.add_bos:
            ids[:, 0] = tokenizer.bos_token_id
        return [Sample(i, ids[i], "synthetic", f"seed-{data_cfg.seed}", i) for i in range(data_cfg.n_samples)]
    if data_cfg.name in ("slimpajama", "shards"):
        from spectra.shards import load_windows  # imported here: spectra.shards imports Sample from this module

        windows = load_windows(data_cfg, tokenizer, vocab_size, prepare_if_missing=data_cfg.name == "slimpajama")
        return windows.samples(
            data_cfg.context_length, data_cfg.n_samples, data_cfg.seed, data_cfg.add_bos, tokenizer.bos_token_id
        )
    raise ConfigError(
        "data.name", f"unknown data source {data_cfg.name!r}; known: builtin, synthetic, slimpajama, shards"
    )
