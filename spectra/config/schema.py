"""Typed schemas for every config group, registered with Hydra's ConfigStore.

Each group YAML in conf/ starts from its schema (`defaults: [base_<group>]`), so a typo'd key or a wrong type
is rejected by Hydra with the key's name. `checked_config` re-merges the composed config into the schema,
which also catches keys smuggled in with a leading `+`, then checks values Hydra cannot (ranges, choices).

    python -m spectra.run --cfg job          # print the composed, documented config
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf
from omegaconf import DictConfig, OmegaConf

from spectra.capture.metrics import DEFAULT_METRIC_FIELDS, METRICS_KERNELS, triton_importable
from spectra.capture.metrics import METRIC_FIELDS as METRIC_NAMES
from spectra.config.secrets import check_config_for_secrets
from spectra.errors import ConfigError
from spectra.launch.distributed import format_launch_time
from spectra.launch.sweep_folders import job_folder
from spectra.store.writer import PARQUET_CODECS

DTYPES = ("float32", "bfloat16", "float16", "float64")
LOGGER_MODES = ("auto", "online", "offline", "disabled")
INT32_MAX = 2**31 - 1
SEED_MAX = 2**63 - 1
MAX_THREADS = 1024  # more threads than any node has cores; a typo (100000) would make torch spawn them all


@dataclass
class ModelConfig:
    name: str = "unnamed"  # short label used in run names and run.json
    source: str = "hub"  # hub | gguf | random
    name_or_path: str = ""  # hub id (source=hub) or directory holding the files
    path: Optional[str] = None  # local checkpoint directory; overrides name_or_path when set
    package: Optional[str] = None  # Python package whose folder holds the files (the embedded default model)
    gguf_file: Optional[str] = None  # file name inside that folder (source=gguf)
    # The package holds chunks and an assemble() that joins them into gguf_file; Spectra assembles it once into
    # the user cache and reuses it (spectra/models/assembled.py).
    assembled: bool = False
    tokenizer: Optional[str] = None  # tokenizer location when it differs from the model's ("pkg:<package>/<dir>")
    revision: Optional[str] = None  # hub revision (branch, tag or commit)
    trust_remote_code: bool = False  # runs code from the checkpoint; only on explicit opt-in
    architecture: dict[str, Any] = field(default_factory=dict)  # source=random: model_type plus config kwargs
    seed: int = 0  # source=random: weight initialisation seed


@dataclass
class DataConfig:
    name: str = "builtin"  # builtin | synthetic | slimpajama | shards
    context_length: int = 512  # tokens per sample (non-overlapping windows)
    n_samples: int = 8  # samples captured in this run
    seed: int = 0  # which windows are taken, and the synthetic token ids
    add_bos: bool = False  # put the tokenizer's BOS token first in every window
    data_dir: Optional[str] = None  # slimpajama | shards: folder of prepared token shards (or prototype .npz)
    local_path: Optional[str] = None  # slimpajama: SlimPajama-format file, folder or glob instead of the hub
    hub_id: str = "DKYoon/SlimPajama-6B"  # slimpajama: dataset on the Hugging Face hub
    split: str = "test"  # slimpajama: hub split
    sources: list[str] = field(  # slimpajama: meta.redpajama_set_name values kept; empty keeps every source
        default_factory=lambda: [
            "RedPajamaCommonCrawl", "RedPajamaC4", "RedPajamaWikipedia", "RedPajamaStackExchange",
        ]
    )  # fmt: skip
    min_chars: int = 200  # slimpajama: documents shorter than this (after stripping whitespace) are dropped
    max_windows_per_doc: int = 20  # slimpajama: at most this many windows from one document
    max_prepared_length: int = 8192  # slimpajama: longest context_length the shards serve without re-preparing


@dataclass
class MetricsConfig:
    names: list[str] = field(default_factory=lambda: list(DEFAULT_METRIC_FIELDS))  # columns written
    k_eff_threshold: float = 0.9  # k_eff: fewest keys whose largest probabilities sum to >= this
    # post_rope: the attention the model computes. pre_rope: the prototype's softmax(q k^T / sqrt(d)) from
    # q and k before the rotary embedding -- a different distribution, kept for comparison only.
    attention: str = "post_rope"
    storage_dtype: str = "float32"  # float32 | float16 for the float metric columns on disk


@dataclass
class HardwareConfig:
    device: str = "cpu"  # cpu | cuda | cuda:N
    dtype: str = "float32"  # model weights and activations: float32 | bfloat16 | float16 | float64
    batch_size: int = 1  # samples per forward pass
    num_threads: Optional[int] = None  # torch CPU threads; None leaves torch's default
    attention_block_mb: int = 256  # memory budget for one block of a layer's attention scores
    # What reduces the scores to metrics: auto (numba on the CPU, triton on a CUDA GPU when triton imports, torch
    # otherwise) | numba (the CPU kernels) | torch (torch ops, any device) | triton (the fused kernel; on the CPU
    # only in Triton's interpreter, TRITON_INTERPRET=1). A layer the chosen kernel cannot cover runs on torch.
    metrics_kernel: str = "auto"
    # Metric parts on disk: brotli is the smallest (~9.9 B/row, ~2.5 M rows/s per writer thread); zstd (level 1)
    # writes ~6x faster for ~2% more bytes, what a GPU's output rate needs (docs/performance.md, the writer).
    parquet_codec: str = "brotli"
    writer_threads: int = 1  # parts written at once, one thread each, while the next batches are captured


@dataclass
class LoggerConfig:
    name: str = "none"  # none | wandb
    # auto: online when W&B credentials exist (WANDB_API_KEY or `wandb login`), offline otherwise, never a
    # prompt; a WANDB_MODE environment variable decides instead when set. online | offline | disabled: as asked.
    mode: str = "auto"
    project: str = "spectra"  # W&B project
    entity: Optional[str] = None  # W&B user or team; None: the account's default entity
    group: Optional[str] = None  # runs shown together; None: one group per multirun (its sweep directory)
    tags: list[str] = field(default_factory=list)  # W&B run tags
    job_type: str = "capture"  # W&B job type, to filter captures from analysis runs
    run_name: Optional[str] = None  # None: the model name followed by the command-line overrides
    quantiles: list[float] = field(default_factory=lambda: [0.05, 0.25, 0.5, 0.75, 0.95])  # in summary tables


@dataclass
class RunConfig:
    output_dir: Optional[str] = None  # where outputs go; None: Hydra's run directory
    resume: bool = False  # finish the run already in the output directory: skip its completed samples
    dry_run: bool = False  # validate, print what the run would do (shape, rows, bytes, memory), load no weights
    on_nonfinite: str = "error"  # NaN/inf metrics: error stops naming layer and head; record keeps and counts them


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    run: RunConfig = field(default_factory=RunConfig)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="data", name="base_data", node=DataConfig)
    cs.store(group="metrics", name="base_metrics", node=MetricsConfig)
    cs.store(group="hardware", name="base_hardware", node=HardwareConfig)
    cs.store(group="logger", name="base_logger", node=LoggerConfig)
    # hydra/launcher=submitit_local runs Spectra's subclass of the plugin's launcher (spectra/launch/submitit_local.py:
    # each job's outcome in the terminal), with the plugin's fields. A YAML file of that name in conf/ would not
    # shadow the plugin's entry, and Hydra's plugin scan runs every plugin module again (re-storing the entry),
    # even one imported before: so the scan goes first, then the entry is replaced.
    Plugins.instance()
    cs.store(
        group="hydra/launcher",
        name="submitit_local",
        node=LocalQueueConf(_target_="hydra_plugins.spectra_launchers.SpectraLocalLauncher"),
        provider="spectra",
    )
    # conf/config.yaml's hydra.run.dir: Hydra's `now`, but one folder for all torchrun ranks.
    OmegaConf.register_new_resolver("spectra.launch_time", format_launch_time, replace=True)
    # conf/config.yaml's hydra.sweep.subdir: a resumed sweep finds each job's folder by its overrides, not its number.
    OmegaConf.register_new_resolver("spectra.job_folder", job_folder, replace=True)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def checked_config(cfg: DictConfig) -> DictConfig:
    """The composed config merged into the schema and checked; raises ConfigError naming the key."""
    # Before anything is written: a --config-dir YAML is copied to .hydra/ and run.json like the command line.
    check_config_for_secrets(OmegaConf.to_container(cfg, resolve=False))
    try:
        # Merge a plain container: merging the composed DictConfig lets keys added with `+` through.
        cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.to_container(cfg, resolve=False))
    except Exception as error:  # omegaconf's errors carry the full key; keep only the first line for people
        key = getattr(error, "full_key", None) or "config"
        raise ConfigError(key, str(error).splitlines()[0]) from None

    name = cfg.model.name
    # The run folder is outputs/<date>/<time>_<model.name>: a separator or a leading dot would put it elsewhere.
    _require(
        bool(name) and not set(name) & set("/\\\0") and not name.startswith(".") and len(name) <= 100,
        "model.name",
        f"{name[:60]!r} is not a folder-safe label (no / or \\, no leading dot, at most 100 characters); "
        "it names the run folder",
    )
    _require(cfg.model.source in ("hub", "gguf", "random"), "model.source", "must be one of hub, gguf, random")
    _require(
        not cfg.model.assembled or bool(cfg.model.package and cfg.model.gguf_file),
        "model.assembled",
        "needs model.package (the package that assembles the file) and model.gguf_file (its name)",
    )
    # Sample ids and token positions are int32 columns; seeds go to numpy and torch, which take 0 .. 2**63 - 1.
    for key in ("data.context_length", "data.n_samples"):
        value = OmegaConf.select(cfg, key)
        _require(value > 0, key, f"must be > 0, got {value}")
        _require(value <= INT32_MAX, key, f"must be <= {INT32_MAX:,} (stored as int32), got {value:,}")
    for key in ("data.seed", "model.seed"):
        value = OmegaConf.select(cfg, key)
        _require(0 <= value <= SEED_MAX, key, f"must be in 0 .. {SEED_MAX:,} (2**63 - 1), got {value:,}")
    _require(cfg.hardware.batch_size > 0, "hardware.batch_size", f"must be > 0, got {cfg.hardware.batch_size}")
    _require(cfg.hardware.dtype in DTYPES, "hardware.dtype", f"must be one of {', '.join(DTYPES)}")
    _require(
        cfg.hardware.attention_block_mb > 0,
        "hardware.attention_block_mb",
        f"must be > 0, got {cfg.hardware.attention_block_mb}",
    )
    _require(
        cfg.hardware.parquet_codec in PARQUET_CODECS,
        "hardware.parquet_codec",
        f"must be one of {', '.join(PARQUET_CODECS)}, got {cfg.hardware.parquet_codec!r}",
    )
    _require(
        cfg.hardware.writer_threads > 0,
        "hardware.writer_threads",
        f"must be > 0, got {cfg.hardware.writer_threads}",
    )
    threads = cfg.hardware.num_threads
    _require(
        threads is None or threads > 0,
        "hardware.num_threads",
        f"must be > 0, or null for torch's default; got {threads}",
    )
    _require(
        threads is None or threads <= MAX_THREADS,
        "hardware.num_threads",
        f"must be <= {MAX_THREADS} (threads are started, one per number), or null for torch's default; got {threads}",
    )
    threshold = cfg.metrics.k_eff_threshold
    _require(0 < threshold <= 1, "metrics.k_eff_threshold", f"must be in (0, 1], got {threshold}")
    _require(
        cfg.metrics.attention in ("post_rope", "pre_rope"),
        "metrics.attention",
        f"must be post_rope or pre_rope, got {cfg.metrics.attention!r}",
    )
    unknown = [name for name in cfg.metrics.names if name not in METRIC_NAMES]
    _require(not unknown, "metrics.names", f"unknown metric(s) {unknown}; known: {', '.join(METRIC_NAMES)}")
    _require(len(cfg.metrics.names) > 0, "metrics.names", "must name at least one metric")
    repeated = sorted({name for name in cfg.metrics.names if list(cfg.metrics.names).count(name) > 1})
    _require(not repeated, "metrics.names", f"names {repeated} more than once; each metric is one Parquet column")
    _require(
        cfg.metrics.storage_dtype in ("float32", "float16"),
        "metrics.storage_dtype",
        f"must be float32 or float16, got {cfg.metrics.storage_dtype!r}",
    )
    _require(cfg.logger.name in ("none", "wandb"), "logger.name", f"must be none or wandb, got {cfg.logger.name!r}")
    _require(
        cfg.logger.mode in LOGGER_MODES, "logger.mode", f"must be one of {', '.join(LOGGER_MODES)}, got {cfg.logger.mode!r}"
    )
    _require(all(0 <= q <= 1 for q in cfg.logger.quantiles), "logger.quantiles", "must lie in [0, 1]")
    device = cfg.hardware.device
    _require(
        device == "cpu" or device == "cuda" or device.startswith("cuda:"),
        "hardware.device",
        f"must be cpu, cuda or cuda:N, got {device!r}",
    )
    kernel = cfg.hardware.metrics_kernel
    _require(
        kernel in METRICS_KERNELS,
        "hardware.metrics_kernel",
        f"must be one of {', '.join(METRICS_KERNELS)}, got {kernel!r}",
    )
    _require(
        kernel != "numba" or device == "cpu",
        "hardware.metrics_kernel",
        f"numba runs on the CPU only; with hardware.device={device} use auto, triton or torch",
    )
    _require(
        kernel != "triton" or triton_importable(),
        "hardware.metrics_kernel",
        "triton is not installed; `pip install triton` (scripts/setup.sh does) or use auto",
    )
    _require(
        kernel != "triton" or device != "cpu" or os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"),
        "hardware.metrics_kernel",
        "triton on the CPU runs only in Triton's interpreter: set TRITON_INTERPRET=1 (slow; for tests) or use auto",
    )
    _require(
        cfg.run.on_nonfinite in ("error", "record"),
        "run.on_nonfinite",
        f"must be error or record, got {cfg.run.on_nonfinite!r}",
    )
    return cfg
