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

import os

import numpy as np
from omegaconf import DictConfig

from spectra.data.builtin import builtin_windows
from spectra.data.sample import Sample, choose
from spectra.data.shards import load_windows
from spectra.errors import ConfigError, SpectraError


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits_in_memory(data_cfg: DictConfig) -> None:
    """The samples' token ids are held in memory for the whole run: refuse, before allocating, a count that would
    take more than half of this machine's memory (int64 ids)."""
    needed = data_cfg.n_samples * data_cfg.context_length * 8
    if needed > physical_memory() // 2:
        raise ConfigError(
            "data.n_samples",
            f"{data_cfg.n_samples:,} samples x {data_cfg.context_length:,} tokens need {needed / 2**30:,.1f} GiB of "
            f"token ids in memory, more than half of this machine's {physical_memory() / 2**30:,.1f} GiB; split the "
            "samples over several runs",
        )


def load_samples(data_cfg: DictConfig, tokenizer, vocab_size: int, count_only: bool = False) -> list[Sample] | int:
    """The run's samples; with count_only, only how many there will be, checked against what the data holds
    without building them (a dry run of 1e8 samples must not hold 1e8 windows)."""
    if data_cfg.add_bos and data_cfg.context_length < 2:
        raise ConfigError("data.context_length", "must be >= 2 with data.add_bos=true")
    if data_cfg.name == "builtin":
        windows = builtin_windows(tokenizer, data_cfg.context_length, data_cfg.add_bos)
        chosen = choose(len(windows), data_cfg.n_samples, data_cfg.seed, "the built-in corpus")
        if count_only:
            return len(chosen)
        check_fits_in_memory(data_cfg)
        return [
            Sample(sample_id, windows[i][0], "python-stdlib-docstrings", windows[i][1], windows[i][2])
            for sample_id, i in enumerate(chosen)
        ]
    if data_cfg.name == "synthetic":
        if count_only:
            return data_cfg.n_samples
        check_fits_in_memory(data_cfg)
        rng = np.random.default_rng(data_cfg.seed)
        ids = rng.integers(0, vocab_size, size=(data_cfg.n_samples, data_cfg.context_length), dtype=np.int64)
        if data_cfg.add_bos:
            ids[:, 0] = tokenizer.bos_token_id
        return [Sample(i, ids[i], "synthetic", f"seed-{data_cfg.seed}", i) for i in range(data_cfg.n_samples)]
    if data_cfg.name in ("slimpajama", "shards"):
        windows = load_windows(data_cfg, tokenizer, vocab_size, prepare_if_missing=data_cfg.name == "slimpajama")
        count = windows.count(data_cfg.context_length, data_cfg.n_samples, data_cfg.add_bos)  # enough windows?
        if count_only:
            return count
        check_fits_in_memory(data_cfg)
        samples = windows.samples(
            data_cfg.context_length, data_cfg.n_samples, data_cfg.seed, data_cfg.add_bos, tokenizer.bos_token_id
        )
        for sample in samples:  # a shard damaged in place shows as ids the embedding would index out of range
            if sample.input_ids.min() < 0 or sample.input_ids.max() >= vocab_size:
                raise SpectraError(
                    f"{data_cfg.data_dir}: window {sample.document_id}:{sample.window_index} holds token ids outside "
                    f"this model's vocabulary of {vocab_size}; the shards are damaged or were made with another "
                    "tokenizer"
                )
        return samples
    raise ConfigError(
        "data.name", f"unknown data source {data_cfg.name!r}; known: builtin, synthetic, slimpajama, shards"
    )
