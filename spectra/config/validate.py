"""Everything that can be checked before weights load, and the dry run that prints what a run would do.

Two stages, both ending in one line (`spectra: error: <key>: <what is wrong and the fix>`, exit 2):
  check_command_line  before Hydra creates a run directory: unknown config options and keys, bad values
                      (ranges, metric names), secrets on the command line, an unwritable run directory
  preflight           inside the run, without the weights: the model's config file (shape, maximum context,
                      whether its attention reaches the capture function), checkpoint files and shards, the
                      samples the data holds, CUDA, and the output directory (another run there; on resume, the
                      same settings)

    python -m spectra.run model=tiny_llama data=synthetic run.dry_run=true
    python -m spectra.run model=smollm2_135m data.context_length=1024 data.n_samples=64 run.dry_run=true
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from hydra import compose, initialize_config_dir
from hydra.errors import (
    ConfigCompositionException,
    MissingConfigException,
    OverrideParseException,
)
from omegaconf import DictConfig, OmegaConf, open_dict
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from spectra.capture.metrics import _block_rows
from spectra.config.schema import checked_config
from spectra.data.load import load_samples
from spectra.data.sample import Sample
from spectra.config.secrets import check_no_secrets
from spectra.errors import ConfigError, SpectraError
from spectra.models.loading import (
    config_shape,
    load_tokenizer,
    model_location,
    resolve_device,
)
from spectra.store.lock import FolderLock
from spectra.store.manifest import ResumeState, fingerprint, inspect_run_directory

# Hydra flags that do not run a capture (or that this check does not model); Hydra handles them alone.
UNCHECKED_FLAGS = ("help", "hydra_help", "info", "shell_completion", "cfg", "config_path", "config_dir",
                   "config_name", "experimental_rerun")  # fmt: skip
# Parquet bytes per row after zstd, from the measurements in /work/shared/NOTES.md (10.4 B/row with the four
# metrics in float32, 5.3 B/row in float16); real attention compresses somewhat differently.
KEY_BYTES_PER_ROW = 0.3
METRIC_BYTES_PER_ROW = {"float32": 3.0, "float16": 1.35, "k_eff": 1.1}


def hydra_parser():
    """Hydra's own parser (so flags mean what they mean there), its usage dump turned into one SpectraError."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def error(message: str):
        raise SpectraError(f"{message} (see --help)")

    parser.error = error
    return parser


def flags_first(argv: list[str]) -> list[str]:
    """The command line with Hydra's flags (and their values) moved before the overrides, in their own order.

    Hydra's parser stops taking flags at the first override, so `python -m spectra.run a=1 -m b=1,2` is an
    argparse error there; an override never starts with '-', so the reordering cannot change its meaning.
    """
    parser = hydra_parser()
    takes_value = {
        option: action.nargs for action in parser._actions for option in action.option_strings if action.nargs != 0
    }
    flags, overrides, last = [], [], []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if not token.startswith("-"):
            overrides.append(token)
            continue
        following = argv[i] if i < len(argv) else None
        if token not in takes_value:  # a switch, or the value given as --flag=value
            flags.append(token)
        elif takes_value[token] != "?":
            if following is None:  # its value is missing: last, so argparse says so rather than eat an override
                last.append(token)
            else:
                flags += [token, following]
                i += 1
        # nargs "?" (--info [topic]): the next token is its value unless it is an override or another flag; with
        # no value it goes last, where it cannot swallow an override.
        elif following is None or "=" in following or following.startswith("-"):
            last.append(token)
        else:
            flags += [token, following]
            i += 1
    argv = flags + overrides + last
    parser.parse_args(argv)  # any other argparse-level mistake: one line
    return argv


def check_command_line(argv: list[str], conf_dir: str) -> None:
    """Compose the config as `hydra.main` will and check it; raises SpectraError with one line.

    With -m, every point of the sweep is composed and checked (config, model, run folder) before the first job
    starts, so that a bad point in the middle does not stop a sweep half done."""
    args = hydra_parser().parse_args(argv)
    check_no_secrets(args.overrides)  # before anything else: even a help screen must not echo a credential
    if any(getattr(args, flag, None) for flag in UNCHECKED_FLAGS):
        return
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        if not args.multirun:
            check_job(_composed(args.overrides))
            return
        jobs = sweep_jobs(args.overrides)
        values: dict[str, set[str]] = {}  # key -> the overrides of it across jobs; swept keys have several
        for override in (o for job in jobs for o in job):
            values.setdefault(override.partition("=")[0], set()).add(override)
        models: dict = {}  # model configs read once per model, not once per point
        for number, job in enumerate(jobs):
            try:
                check_job(_composed(job), number, models)
            except SpectraError as error:
                point = " ".join(o for o in job if len(values[o.partition("=")[0]]) > 1)
                raise SpectraError(f"sweep job {number} ({point}): {error}; no job was started") from None


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The overrides of every job a -m command runs, as Hydra's basic sweeper expands them (its `params` from
    the chosen hydra/sweeper config first, the command line after and winning)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    try:
        master = GlobalHydra.instance().hydra.compose_config("config", overrides, run_mode=RunMode.MULTIRUN)
        sweeper = master.hydra.sweeper
        if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
            return [list(overrides)]  # another sweeper chooses its own points: check the command line only
        params = [f"{key}={value}" for key, value in (sweeper.get("params") or {}).items()]
        parsed = OverridesParser.create().parse_overrides(params + list(overrides))
        return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    except (ConfigCompositionException, MissingConfigException, OverrideParseException):
        pass
    # The sweep's own config does not compose (a bad value or key): the command line's points alone, so that
    # composing the first of them reports the mistake with the usual message.
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    except (OverrideParseException, ValueError):
        return [list(overrides)]


def _composed(overrides: list[str]) -> DictConfig:
    """One job's config with its hydra node; Hydra's errors become one line naming the key."""
    try:
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)
    except MissingConfigException as error:
        group, _, name = (error.missing_cfg_file or "config/?").rpartition("/")
        options = [o for o in error.options or [] if not o.startswith("base_")]
        raise ConfigError(group, f"no option {name!r}; choose one of {', '.join(options)}") from None
    except OverrideParseException as error:
        raise ConfigError(error.override, error.message.splitlines()[0]) from None
    except ConfigCompositionException as error:
        cause = error.__cause__
        key = getattr(cause, "full_key", None)
        if key and "not in" in str(cause):
            raise ConfigError(key, "no such key; `python -m spectra.run --cfg job` lists them all") from None
        if key:
            raise ConfigError(key, str(cause).splitlines()[0]) from None
        raise SpectraError("; ".join(line.strip() for line in str(error).splitlines() if line.strip())) from None


def check_job(composed: DictConfig, number: int | None = None, models: dict | None = None) -> None:
    """One run's config, its run folder, and (for a sweep's jobs) its model's config and context length."""
    job = OmegaConf.to_container(composed)
    job.pop("hydra")
    cfg = checked_config(OmegaConf.create(job))
    if cfg.model.source == "hub":
        model_location(cfg.model)  # an empty name, or a model.path that is no folder (cheap; gguf may assemble)
    if number is None:
        out = Path(cfg.run.output_dir or composed.hydra.run.dir)
    else:
        with open_dict(composed):
            composed.hydra.job.num = number
        out = Path(cfg.run.output_dir or Path(composed.hydra.sweep.dir) / composed.hydra.sweep.subdir)
        check_model(cfg, models)
    check_writable(out, output_key(cfg))
    # Before Hydra starts: a process writing there now, another run there, or one to resume with other settings.
    FolderLock(out, output_key(cfg)).check_free()
    inspect_run_directory(out, fingerprint(cfg), cfg.run.resume, output_key(cfg))


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


def _location_key(model_cfg: DictConfig) -> str:
    return "model.path" if model_cfg.path else "model.package" if model_cfg.package else "model.name_or_path"


def check_checkpoint_files(directory: Path, model_cfg: DictConfig) -> None:
    """A local Hugging Face checkpoint: config.json, every weight shard its index lists, no unrequested code."""
    key = _location_key(model_cfg)
    if not (directory / "config.json").is_file():
        raise ConfigError(key, f"no config.json in {directory}; point it at a Hugging Face checkpoint directory")
    config = read_json(directory / "config.json")
    if "auto_map" in config and config.get("model_type") not in CONFIG_MAPPING and not model_cfg.trust_remote_code:
        raise ConfigError(
            "model.trust_remote_code",
            f"{directory} needs its own Python code (auto_map in config.json, model_type "
            f"{config.get('model_type')!r} unknown to transformers); set model.trust_remote_code=true only if "
            "you trust that code",
        )
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            shards = sorted(set(read_json(index).get("weight_map", {}).values()))
            missing = [shard for shard in shards if not (directory / shard).is_file()]
            if missing:
                raise ConfigError(
                    key,
                    f"{directory} lacks {len(missing)} of the {len(shards)} weight shards {index_name} lists "
                    f"({missing[0]} first); copy the complete checkpoint",
                )
            break
    else:
        if not any((directory / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")):
            raise ConfigError(
                key, f"no weights in {directory} (model.safetensors, a sharded index, or pytorch_model.bin)"
            )
    for weights in sorted(directory.glob("*.safetensors")):
        check_safetensors_size(weights)


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (ValueError, OSError) as error:  # ValueError: bad JSON or UTF-8
        raise SpectraError(f"{path}: not valid JSON ({str(error).splitlines()[0]}); the file is damaged") from None
    if not isinstance(value, dict):
        raise SpectraError(f"{path}: holds {type(value).__name__}, not a JSON object; the file is damaged")
    return value


def check_safetensors_size(path: Path) -> None:
    """A cut-short .safetensors file, found from its header alone (8 bytes of length, then JSON whose tensors'
    data_offsets say where the file ends), before any weight is read."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            header_bytes = int.from_bytes(handle.read(8), "little")
            if header_bytes > size - 8:
                raise ValueError(f"its header claims {header_bytes:,} bytes")
            header = json.loads(handle.read(header_bytes))
        ends = [tensor["data_offsets"][1] for name, tensor in header.items() if name != "__metadata__"]
        end = 8 + header_bytes + max(ends, default=0)
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise SpectraError(f"{path}: not a readable safetensors file ({error}); the file is damaged") from None
    if size < end:
        raise SpectraError(f"{path}: truncated ({size:,} of {end:,} bytes); copy the checkpoint again")


def load_model_config(model_cfg: DictConfig) -> tuple[PretrainedConfig, str | None]:
    """(the model's config, its location) read from config files or GGUF metadata; no weights are loaded."""
    if model_cfg.source == "random":
        architecture = OmegaConf.to_container(model_cfg.architecture, resolve=True)
        if "model_type" not in architecture:
            raise ConfigError("model.architecture.model_type", "is required for model.source=random")
        if architecture["model_type"] not in CONFIG_MAPPING:
            raise ConfigError(
                "model.architecture.model_type",
                f"{architecture['model_type']!r} is not a model type transformers knows (e.g. llama, mistral)",
            )
        try:
            return AutoConfig.for_model(**architecture), None
        except (TypeError, ValueError, StrictDataclassError) as error:  # a field of the wrong type or value
            message = " ".join(str(error).split())
            raise ConfigError("model.architecture", f"{message}; fix the value in the model config") from None

    location = model_location(model_cfg)
    options: dict = {"revision": model_cfg.revision, "trust_remote_code": model_cfg.trust_remote_code}
    if model_cfg.source == "gguf":
        if not model_cfg.gguf_file or not (Path(location) / model_cfg.gguf_file).is_file():
            raise ConfigError("model.gguf_file", f"no GGUF file '{model_cfg.gguf_file}' in {location}")
        options["gguf_file"] = model_cfg.gguf_file
    elif Path(location).is_dir():
        check_checkpoint_files(Path(location), model_cfg)
    try:
        return AutoConfig.from_pretrained(location, **options), location
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0]
        if Path(location).is_dir():  # a local file is damaged or incomplete: the hub has nothing to do with it
            where = Path(location) / model_cfg.gguf_file if model_cfg.source == "gguf" else location
            raise SpectraError(f"cannot read the model config in {where} ({first}); is the file damaged?") from None
        raise SpectraError(
            f"cannot read the model config of '{location}': {first} -- without hub "
            "access, download the checkpoint elsewhere and pass model.path=<local dir>"
        ) from None


def check_attention_reaches_capture(config: PretrainedConfig) -> type | None:
    """The causal-LM class, refused when its attention bypasses transformers' AttentionInterface (or it has none)."""
    if getattr(config, "auto_map", None):
        return None  # code shipped with the checkpoint: checked once loaded (AttentionCapture.__enter__)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_class is None:
        raise ConfigError("model", f"model_type {config.model_type!r} has no causal language model in transformers")
    if not model_class.is_backend_compatible():
        raise ConfigError(
            "model",
            f"{model_class.__name__} (model_type {config.model_type!r}) computes attention in its own code, not "
            "through transformers' AttentionInterface (or has no attention), so Spectra's capture function would "
            "never see it; choose a model whose class supports the interface (llama, mistral, qwen2, gpt2, ...)",
        )
    return model_class


def check_device(device: str) -> None:
    resolve_device(device)  # no CUDA at all
    index = device.partition(":")[2]
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        last = torch.cuda.device_count() - 1
        raise ConfigError("hardware.device", f"{device} asked for, but the CUDA devices here are cuda:0 to cuda:{last}")


@dataclass
class Plan:
    """What preflight learned: enough to run, or to print a dry run."""

    model_config: PretrainedConfig
    model_class: type | None
    shape: dict
    samples: list[Sample]
    out: Path
    resume: ResumeState


def output_key(cfg: DictConfig) -> str:
    return "run.output_dir" if cfg.run.output_dir else "hydra.run.dir"


def check_model(cfg: DictConfig, cache: dict | None = None) -> tuple[PretrainedConfig, str | None, type | None, dict]:
    """The device, the model's config (read once per model when a cache is given), the context length."""
    check_device(cfg.hardware.device)
    cache = {} if cache is None else cache
    key = json.dumps(OmegaConf.to_container(cfg.model, resolve=True), sort_keys=True)
    if key not in cache:
        cache[key] = load_model_config(cfg.model)
    model_config, location = cache[key]
    model_class = check_attention_reaches_capture(model_config)
    shape = config_shape(model_config)
    if shape["max_position_embeddings"] and cfg.data.context_length > shape["max_position_embeddings"]:
        raise ConfigError(
            "data.context_length",
            f"{cfg.data.context_length} exceeds the model's maximum of {shape['max_position_embeddings']} tokens",
        )
    return model_config, location, model_class, shape


def preflight(cfg: DictConfig, out: Path) -> Plan:
    """All checks that need no weights; cfg has passed checked_config. Changes nothing on disk."""
    model_config, location, model_class, shape = check_model(cfg)
    check_writable(out, output_key(cfg))
    tokenizer = load_tokenizer(cfg.model, location)
    samples = load_samples(cfg.data, tokenizer, model_config.vocab_size)
    resume = inspect_run_directory(out, fingerprint(cfg), cfg.run.resume, output_key(cfg), samples)
    return Plan(model_config, model_class, shape, samples, out, resume)


def _size(n_bytes: float) -> str:
    if n_bytes < 1024:
        return f"{n_bytes:,.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n_bytes /= 1024
        if n_bytes < 1024 or unit == "TiB":
            break
    return f"{n_bytes:,.1f} {unit}"


def parameter_count(plan: Plan) -> int | None:
    """Counted on the meta device: shapes only, no memory, no weights read."""
    if plan.model_class is None:
        return None
    with torch.device("meta"):
        model = plan.model_class(plan.model_config)
    return sum(p.numel() for p in model.parameters())


def dry_run_report(cfg: DictConfig, plan: Plan) -> str:
    shape, samples = plan.shape, plan.samples
    tokens = cfg.data.context_length
    batch = min(cfg.hardware.batch_size, len(samples))
    rows_per_sample = shape["layers"] * shape["heads"] * tokens
    rows = len(samples) * rows_per_sample
    names = list(cfg.metrics.names)
    bytes_per_row = KEY_BYTES_PER_ROW + sum(
        METRIC_BYTES_PER_ROW["k_eff" if name == "k_eff" else cfg.metrics.storage_dtype] for name in names
    )
    weight_bytes = torch.empty(0, dtype=getattr(torch, cfg.hardware.dtype)).element_size()
    parameters = parameter_count(plan)
    weights = (
        f"{parameters / 1e6:,.1f}M parameters = {_size(parameters * weight_bytes)} in {cfg.hardware.dtype}"
        if parameters
        else "parameter count unknown (remote code)"
    )
    budget = cfg.hardware.attention_block_mb * 2**20
    block = _block_rows(batch, shape["heads"], tokens, budget)
    scores = batch * shape["heads"] * tokens * tokens * 4  # (B, H, T, T) float32, were it held at once
    metrics_per_layer = batch * shape["heads"] * tokens * 4 * len(names)  # (B, H, T) per metric
    done = len(plan.resume.completed)
    if cfg.run.resume and (done or plan.resume.leftovers):
        output = (
            f"resume: {done} of {len(samples)} samples done in {sum(map(len, plan.resume.kept.values()))} part(s), "
            f"{len(plan.resume.leftovers)} leftover file(s) to delete"
        )
    else:
        output = "new run"
    return "\n".join(
        [
            "Spectra dry run: checks passed; no weights loaded, no capture output written",
            f"  model      {cfg.model.name} ({shape['model_type']}): {shape['layers']} layers x {shape['heads']} "
            f"heads, {shape['kv_heads']} KV heads, head_dim {shape['head_dim']}, "
            f"max {shape['max_position_embeddings']} positions; {weights}",
            f"  samples    {len(samples)} x {tokens} tokens = {len(samples) * tokens:,} tokens "
            f"({cfg.data.name}), {-(-len(samples) // batch)} batches of {batch}",
            f"  rows       {rows:,} = samples x layers x heads x tokens ({rows_per_sample:,} per sample)",
            f"  disk       ~{_size(rows * bytes_per_row)} estimated ({bytes_per_row:.1f} B/row: {len(names)} metric "
            f"columns, {cfg.metrics.storage_dtype})",
            f"  memory     per layer and batch: attention scores B x H x T x T float32 would be {_size(scores)}; "
            f"computed {block} query rows at a time within hardware.attention_block_mb="
            f"{cfg.hardware.attention_block_mb}; metrics {_size(metrics_per_layer)}",
            f"  output     {plan.out} ({output})",
            "  run it     the same command without run.dry_run=true",
        ]
    )
