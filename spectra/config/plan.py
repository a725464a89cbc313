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
    samples: list[Sample]  # empty in a dry run, which counts them instead
    n_samples: int
    out: Path
    resume: ResumeState


def output_key(cfg: DictConfig, sweep: bool | None = None) -> str:
    """The key that chose the run folder, for messages: a sweep's jobs live under hydra.sweep.dir, not hydra.run.dir.
    sweep=None: asked of Hydra (inside a job); the command-line check says which it is."""
    if cfg.run.output_dir:
        return "run.output_dir"
    if sweep is None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        sweep = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    return "hydra.sweep.dir" if sweep else "hydra.run.dir"


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


def check_name_lengths(directory: Path, key: str) -> None:
    """Every folder name in the path fits the filesystem (255 bytes on ext4, xfs, tmpfs): a sweep job's folder is
    named after its overrides, and a long list of values would otherwise fail half way with ENAMETOOLONG."""
    existing = directory
    while existing != existing.parent and not os.path.isdir(existing):  # isdir: False, not an error, if too long
        existing = existing.parent
    try:
        limit = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for part in directory.parts:
        if len(os.fsencode(part)) > limit:
            raise ConfigError(
                key,
                f"the folder name {part[:40]}... is {len(os.fsencode(part))} bytes, more than the {limit} this "
                "filesystem allows; choose a shorter directory (a sweep names each job's folder after its overrides: sweep "
                "shorter values, or set hydra.sweep.subdir)",
            )


def preflight(cfg: DictConfig, out: Path) -> Plan:
    """All checks that need no weights; cfg has passed checked_config. Changes nothing on disk."""
    model_config, location, model_class, shape = check_model(cfg)
    check_name_lengths(out, output_key(cfg))
    check_writable(out, output_key(cfg))
    tokenizer = load_tokenizer(cfg.model, location)
    if cfg.run.dry_run:  # counted, not built: a dry run of 1e8 samples must not hold them
        samples, n_samples = [], load_samples(cfg.data, tokenizer, model_config.vocab_size, count_only=True)
    else:
        samples = load_samples(cfg.data, tokenizer, model_config.vocab_size)
        n_samples = len(samples)
    resume = inspect_run_directory(out, fingerprint(cfg), cfg.run.resume, output_key(cfg), samples or None)
    return Plan(model_config, model_class, shape, samples, n_samples, out, resume)

