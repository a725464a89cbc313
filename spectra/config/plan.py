"""The run plan: every check a run needs short of its weights (model config, tokenizer, samples, run folder and
what a resume keeps), made once and handed to the capture, or printed by a dry run. Changes nothing on disk.

    python -m spectra.run model=tiny_llama data=synthetic run.dry_run=true
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig
from transformers import PretrainedConfig

from spectra.data.load import load_samples
from spectra.data.sample import Sample
from spectra.errors import ConfigError
from spectra.models.checks import check_model
from spectra.models.loading import load_tokenizer
from spectra.store.manifest import ResumeState, fingerprint, inspect_run_directory

@dataclass
class Plan:
    """What preflight learned: enough to run, or to print a dry run."""

    model_config: PretrainedConfig
    model_class: type | None
    shape: dict
    samples: list[Sample]
    out: Path
    resume: ResumeState


def output_key(cfg: DictConfig) -> str:
    return "run.output_dir" if cfg.run.output_dir else "hydra.run.dir"


def check_writable(directory: Path, key: str) -> None:
    """The directory, or the nearest folder above it that exists, must be a writable folder."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(key, f"cannot create {directory}: {existing} is a file; choose another directory")
    try:  # a real probe: os.access says yes to root, and some filesystems (/proc, read-only mounts) refuse anyway
        os.rmdir(tempfile.mkdtemp(prefix=".spectra-probe-", dir=existing))
    except OSError as error:
        raise ConfigError(key, f"cannot write to {existing} ({error.strerror}); choose a writable directory") from None



def preflight(cfg: DictConfig, out: Path) -> Plan:
    """All checks that need no weights; cfg has passed checked_config. Changes nothing on disk."""
    model_config, location, model_class, shape = check_model(cfg)
    check_writable(out, output_key(cfg))
    tokenizer = load_tokenizer(cfg.model, location)
    samples = load_samples(cfg.data, tokenizer, model_config.vocab_size)
    resume = inspect_run_directory(out, fingerprint(cfg), cfg.run.resume, output_key(cfg), samples)
    return Plan(model_config, model_class, shape, samples, out, resume)

