"""Whether the Hugging Face hub answers, asked once per process: the models and the SlimPajama corpus both come
from it, and without network its clients retry for ~30 s with a dozen warnings before failing. Knowing it is
away, they read their local caches only and a miss is one line at once.

    HF_ENDPOINT=http://127.0.0.1:9 python -m spectra.prepare model=tiny_llama data=slimpajama   # the line at once
"""

from __future__ import annotations

import functools
import socket
import urllib.parse


@functools.cache
def hub_reachable() -> bool:
    """False under HF_HUB_OFFLINE=1, or when the endpoint's host takes no connection within 3 s."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urllib.parse.urlparse(constants.ENDPOINT)
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((url.hostname or "huggingface.co", port), timeout=3).close()
    except OSError:
        return False
    return True

