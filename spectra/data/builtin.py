"""The built-in corpus: the standard library's docstrings, real English prose that every Python has, offline.

    python -m spectra.run data=builtin data.context_length=256 data.n_samples=4
"""

from __future__ import annotations

import importlib
import inspect
import warnings

import numpy as np

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
