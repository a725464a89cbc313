"""Spectra: per-token attention metrics from Hugging Face causal language models.

    python -m spectra.run                                  # SmolLM2-135M on the built-in corpus, CPU
    python -m spectra.run model=llama3_8b hardware=h100    # Llama-3-8B on a large GPU
"""

import os as _os
import sys as _sys

__version__ = "0.1.0"


def _interrupted_while_starting(kind, value, traceback) -> None:
    """Ctrl-C while `python -m spectra.<x>` still imports torch and transformers (seconds, before any entrypoint
    can catch it): one line and exit 130 instead of an import traceback. Nothing has been written by then."""
    if issubclass(kind, KeyboardInterrupt):
        print("spectra: interrupted (SIGINT) while starting; nothing was written", file=_sys.stderr, flush=True)
        _sys.stdout.flush()
        _os._exit(130)  # an excepthook cannot choose the exit status; nothing is left to clean up
    _sys.__excepthook__(kind, value, traceback)


# Only for Spectra's own entrypoints: a library user importing spectra keeps Python's behaviour. The package is
# imported while `-m spectra.<x>` is being located, so sys.orig_argv (what was typed) names the module.
if "-m" in _sys.orig_argv[:-1] and _sys.orig_argv[_sys.orig_argv.index("-m") + 1].startswith("spectra."):
    _sys.excepthook = _interrupted_while_starting
