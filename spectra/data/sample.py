"""One sample: a fixed-length token window and where it came from; the seeded choice of windows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spectra.errors import ConfigError


@dataclass
class Sample:
    sample_id: int
    input_ids: np.ndarray  # (context_length,) int64
    source: str  # corpus or subset the window came from
    document_id: str  # document within the source
    window_index: int  # position of the window within its document (or corpus stream)


def choose(n_available: int, n_samples: int, seed: int, what: str) -> np.ndarray:
    """Seeded choice of n_samples indices out of n_available, in corpus order."""
    check_available(n_available, n_samples, what)
    return np.sort(np.random.default_rng(seed).choice(n_available, size=n_samples, replace=False))


def check_available(n_available: int, n_samples: int, what: str) -> None:
    if n_samples > n_available:
        raise ConfigError("data.n_samples", f"{n_samples} asked for, but {what} holds only {n_available} windows")
