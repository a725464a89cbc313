"""A GGUF model converted once: its dequantized weights, config and tokenizer as an ordinary checkpoint folder.

Reading a GGUF file is slow in transformers, and not for the dequantization: it parses the whole file (every token
of the vocabulary, one Python object at a time) each time it reads it, for the config, the tokenizer and the
weights, and builds a tensor-name map per tensor. A parse took ~6.5 s for SmolLM2-135M and ~27 s for Gemma 3 270M
on this project's 2-core machine; from a safetensors folder both load in about a second. So the first load of a
GGUF file parses it once for all its reads (`parsed_once`) and saves what it produced (float32 weights, exactly the
values dequantization gave; the config; the tokenizer) into the user cache, and later loads read that folder
instead:

    $XDG_CACHE_HOME/spectra/models/converted/<sha256 of the GGUF, 16 hex>-transformers-<version>/

The folder is named after the GGUF's content and the transformers version that converted it, so another file or
another converter never meets a stale copy. Its files' sha256 are listed in `spectra-converted.json` and checked
once per process, like the assembled Gemma 3 file (~0.5 s per GB): a copy that differs is set aside and the GGUF is
read again. A copy is written only from float32 weights, built in a temporary folder and renamed into place whole;
where the cache cannot be written (read-only, full) the run goes on from the GGUF and says so in run.log.
SmolLM2 takes 0.54 GB there, Gemma 3 1.1 GB.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import gguf as gguf_package
import safetensors.torch
import torch
import transformers

from spectra.models.assembled import cache_dir, sha256_file, sha256_once, verified

log = logging.getLogger(__name__)

RECORD = "spectra-converted.json"

# The reader of the GGUF file being converted, keyed by its path, size and mtime. transformers parses the whole
# file each time it reads one (measured on this project's 2-core machine: ~6.5 s and 170 MB for SmolLM2's
# 49,152-token vocabulary, ~27 s and 700 MB for Gemma 3's 262,144), and a first run reads it four times. The reader
# only reads, so one serves every read; save_converted drops it once the copy replaces the file.
_PARSED: dict[tuple, object] = {}


@contextlib.contextmanager
def parsed_once():
    """Within this block, transformers' GGUF reads (it imports gguf.GGUFReader when it reads) share one parse."""
    original = gguf_package.GGUFReader

    def reader(path, mode="r"):
        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns, mode)
        if key not in _PARSED:
            _PARSED.clear()  # one file at a time: a parse holds its whole vocabulary as Python objects
            _PARSED[key] = original(path, mode)
        return _PARSED[key]

    gguf_package.GGUFReader = reader
    try:
        yield
    finally:
        gguf_package.GGUFReader = original


def copy_dir(gguf: Path) -> Path:
    return cache_dir() / "converted" / f"{sha256_once(gguf)[:16]}-transformers-{transformers.__version__}"


def converted_copy(gguf: Path) -> Path | None:
    """The folder of gguf's verified converted copy, or None when there is none (or it was damaged: set aside)."""
    folder = copy_dir(gguf)
    try:
        record = json.loads((folder / RECORD).read_text())
        files = record["files"]
        intact = record["source_sha256"] == sha256_once(gguf) and all(
            verified(folder / name, digest) for name, digest in files.items()
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        intact = False
    if intact:
        return folder
    log.warning("%s: the converted copy of %s is damaged; reading the GGUF file again", folder, gguf.name)
    shutil.rmtree(folder, ignore_errors=True)  # derived data: the GGUF makes it again
    return None


def save_converted(gguf: Path, model: transformers.PreTrainedModel) -> Path | None:
    """Save model (just loaded from gguf, on the CPU) with gguf's tokenizer as its converted copy; the copy, or None
    when the weights are not float32 (another dtype would not hold the dequantized values) or the cache refuses."""
    if any(p.dtype != torch.float32 for p in model.parameters()) or model.device.type != "cpu":
        return None
    folder = copy_dir(gguf)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".partial"))
    except OSError as error:
        log.warning("not keeping a converted copy of %s (%s): later runs read the GGUF again", gguf.name, error.strerror or error)
        return None
    try:
        with parsed_once():
            tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # transformers refuses save_pretrained for a model loaded from GGUF (it counts as quantized): the config
        # without its GGUF quantization entry, and the tensors as they are (save_model drops tied duplicates).
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(building)
        safetensors.torch.save_model(model, str(building / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(building)
        files = {path.name: sha256_file(path) for path in sorted(building.iterdir()) if path.is_file()}
        record = {"source": str(gguf), "source_sha256": sha256_once(gguf),
                  "transformers": transformers.__version__, "files": files}  # fmt: skip
        (building / RECORD).write_text(json.dumps(record, indent=1) + "\n")
        for path in (building, *building.iterdir()):  # mkdtemp's 0700 would hide a shared cache from other users
            path.chmod(0o755 if path.is_dir() else 0o644)
        try:
            os.rename(building, folder)
        except OSError:
            if not (folder / RECORD).is_file():  # a process beside this one renamed its copy first: same content
                raise
    except OSError as error:
        log.warning("not keeping a converted copy of %s (%s): later runs read the GGUF again", gguf.name, error.strerror or error)
        return None
    finally:
        shutil.rmtree(building, ignore_errors=True)
    _PARSED.clear()  # later reads load the copy
    log.info("kept a converted copy of %s in %s: later runs load it in seconds", gguf.name, folder)
    return folder
