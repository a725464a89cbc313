"""What identifies the weights in a local checkpoint folder, cheaply: recorded in every run's settings, so that a
resume with other weights at the same model.path (a fine-tune saved over the original) is refused.

Per file: the size and a sha256 of the whole file for configs and indexes (small), and for weight files of
SAMPLES blocks of BLOCK bytes spread evenly over the file (start and end included). A re-save of changed weights
changes the bytes of every block that holds a tensor; copying or touching the folder changes nothing (no mtimes).
Reads at most ~1 MiB per weight file.

    python -m spectra.run model.path=/ckpt/llama hydra.run.dir=outputs/r1 run.resume=true   # refused if /ckpt changed
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from omegaconf import DictConfig

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
BLOCK = 1 << 16
SAMPLES = 16


def _sampled_sha256(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for offset in sorted({max(0, (size - BLOCK) * i // (SAMPLES - 1)) for i in range(SAMPLES)}):
            handle.seek(offset)
            digest.update(handle.read(BLOCK))
    return digest.hexdigest()[:16]


def checkpoint_digest(model_cfg: DictConfig) -> dict[str, str]:
    """{file name: '<size>:<hash>'} for the local checkpoint folder the model loads from; {} for a hub id, a
    package or random weights (their version is named by the config itself)."""
    location = model_cfg.path or (model_cfg.name_or_path if model_cfg.source != "random" else None)
    if not location or not Path(location).is_dir():
        return {}
    entries = {}
    for path in sorted(Path(location).iterdir()):
        if not path.is_file():
            continue
        size = path.stat().st_size
        if path.suffix in WEIGHT_SUFFIXES:
            entries[path.name] = f"{size}:{_sampled_sha256(path, size)}"
        elif path.suffix == ".json":  # config.json, *.index.json, tokenizer and generation configs
            entries[path.name] = f"{size}:{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"
    return entries
