"""Credentials never come from the command line: Hydra copies every override into .hydra/, multirun.yaml and sweep
job folder names. Checked on the parsed overrides, before Hydra starts, by every entrypoint.

    WANDB_API_KEY=... python -m spectra.run logger=wandb           # the way in
    python -m spectra.run +logger.api_key=...                      # refused in one line, nothing written
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterator

from hydra.errors import HydraException

from spectra.errors import ConfigError

SECRET_KEY = re.compile(r"(^|_)(token|api_?key|secret|password)$", re.IGNORECASE)  # last part of the key
SECRET_ENVIRONMENT = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
# Values shaped like a credential even when no environment variable holds it: a Hugging Face token, a W&B key
# (40 hex digits, or the newer prefixed form). A 40-hex model.revision is a commit, not a key.
TOKEN_VALUE = re.compile(r"\bhf_[A-Za-z0-9]{30,}|\bwandb_v\d+_[A-Za-z0-9_]{30,}|^[0-9a-f]{40}$")
REFUSED = (
    "credentials are never taken from the command line or a config file (Hydra would copy them into .hydra/, "
    "multirun.yaml, run.json and job folder names); set WANDB_API_KEY or HF_TOKEN in the environment instead"
)


def looks_like_token(key: str, value: Any, secrets: set[str]) -> bool:
    text = str(value)
    if any(secret in text for secret in secrets):
        return True
    return bool(TOKEN_VALUE.search(text)) and not key.endswith("revision")


def check_config_for_secrets(config: dict) -> None:
    """The composed config (a --config-dir YAML included) holds no value shaped like a credential."""
    secrets = {os.environ[name] for name in SECRET_ENVIRONMENT if len(os.environ.get(name, "")) >= 8}
    for name, leaf in _leaves("", config):
        name = name.lstrip(".")
        if looks_like_token(name, leaf, secrets) or (SECRET_KEY.search(name.rpartition(".")[2]) and leaf):
            raise ConfigError(name, REFUSED)


def check_arguments_for_secrets(argv: list[str]) -> None:
    """For entrypoints that need no other command-line check (spectra.prepare, spectra.analyze)."""
    from hydra._internal.utils import get_args_parser

    check_no_secrets(get_args_parser().parse_args(argv).overrides)


def check_no_secrets(overrides: list[str]) -> None:
    """Refuses a credential anywhere in the overrides: a key named like one (also inside a dict value), or a value
    (quoted, in a list, in a dict, among sweep values) that holds WANDB_API_KEY's or HF_TOKEN's value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    # Too short to be a real credential: a token "1" must not make data.n_samples=1 look like one.
    secrets = {os.environ[name] for name in SECRET_ENVIRONMENT if len(os.environ.get(name, "")) >= 8}
    refused = (
        "credentials are never taken from the command line (Hydra would copy them into .hydra/, multirun.yaml and "
        f"job folder names); set {' or '.join(SECRET_ENVIRONMENT[:2])} in the environment instead"
    )
    for text in overrides:
        try:
            override = OverridesParser.create().parse_override(text)
        except HydraException:  # a syntax error: composing reports it, unless the raw text holds a credential
            if any(secret in text for secret in secrets):
                raise ConfigError(text.lstrip("+~").partition("=")[0], refused) from None
            continue
        key = override.get_key_element().lstrip("+~")
        values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
        for name, leaf in _leaves(key, values):
            if SECRET_KEY.search(name.rpartition(".")[2]) or looks_like_token(name, leaf, secrets):
                raise ConfigError(name, refused)


def _leaves(key: str, value: Any) -> Iterator[tuple[str, Any]]:
    """(key, value) for every scalar in a parsed override value; dict entries extend the key."""
    if isinstance(value, dict):
        for name, item in value.items():
            yield from _leaves(f"{key}.{name}", item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _leaves(key, item)
    else:
        yield key, value
