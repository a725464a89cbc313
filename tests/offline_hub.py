"""The Hugging Face hub made unreachable for one test, whatever this machine's network: its endpoint becomes a local
port that takes no connection (bound, never listening), and HF_HUB_OFFLINE is unset (conftest sets it for every
other test), so Spectra's own probe (spectra/hub.py) must find the hub away."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


@contextmanager
def unreachable_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Yields the endpoint. huggingface_hub, transformers (through it) and datasets read these settings when called."""
    import datasets
    from huggingface_hub import constants

    from spectra.hub import hub_reachable

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(datasets.config, "HF_ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
        hub_reachable.cache_clear()
        try:
            yield endpoint
        finally:
            hub_reachable.cache_clear()
