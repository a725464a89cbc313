"""A model checked without its weights: a local checkpoint's files (config.json, every shard its index lists,
safetensors cut short, code that needs trust_remote_code), the model's config (from config files, GGUF metadata or
model.architecture), whether its attention reaches Spectra's capture function, the CUDA device and the context length.

    python -m spectra.run model=tiny_llama model.path=<a checkpoint folder> run.dry_run=true
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from spectra.errors import ConfigError, SpectraError
from spectra.models.converted import parsed_once
from spectra.models.loading import config_shape, gguf_source, hub_options, model_location, resolve_device

# Shape fields every attention model declares; each must be a whole number >= 1 (config_shape divides by heads).
SHAPE_FIELDS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size",
                "vocab_size", "max_position_embeddings")  # fmt: skip
# What a damaged config file or GGUF header raises while transformers parses it (struct.error: a GGUF cut short).
# StrictDataclassError: a field of the wrong type (rms_norm_eps given as a string).
UNREADABLE = (OSError, ValueError, EOFError, KeyError, IndexError, TypeError, struct.error, StrictDataclassError)


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
    for weights in sorted(directory.glob("*.bin")):
        check_torch_archive(weights)


def check_torch_archive(path: Path) -> None:
    """A cut-short pytorch_model.bin: torch.save writes a zip archive, whose directory sits at the end of the file,
    so a truncated copy has none; found from the file's last bytes, before any weight is read. (A file in torch's
    legacy pre-zip format does not start with 'PK' and is left to torch.)"""
    with open(path, "rb") as handle:
        if handle.read(2) != b"PK":
            return
    try:
        with zipfile.ZipFile(path):
            pass
    except (zipfile.BadZipFile, OSError) as error:
        raise SpectraError(f"{path}: truncated or damaged ({error}); copy the checkpoint again") from None


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
        for name in SHAPE_FIELDS:  # before transformers divides by them
            value = architecture.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"model.architecture.{name}", f"must be a whole number >= 1, got {value!r}")
        try:
            return AutoConfig.for_model(**architecture), None
        except (TypeError, ValueError, StrictDataclassError, ArithmeticError) as error:  # a wrong type or value
            message = " ".join(str(error).split())
            raise ConfigError("model.architecture", f"{message}; fix the value in the model config") from None

    location = model_location(model_cfg)
    options: dict = {"revision": model_cfg.revision, "trust_remote_code": model_cfg.trust_remote_code,
                     **hub_options(location)}  # fmt: skip
    read_from = location
    if model_cfg.source == "gguf":
        read_from, gguf = gguf_source(model_cfg, location)
        options.update(gguf)
    elif Path(location).is_dir():
        check_checkpoint_files(Path(location), model_cfg)
    try:
        with parsed_once():
            return AutoConfig.from_pretrained(read_from, **options), location
    except UNREADABLE as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if Path(location).is_dir():  # a local file is damaged or incomplete: the hub has nothing to do with it
            where = Path(location) / model_cfg.gguf_file if model_cfg.source == "gguf" else location
            raise SpectraError(f"cannot read the model config in {where} ({first}); is the file damaged?") from None
        raise SpectraError(
            f"cannot read the model config of '{location}': {first} -- without hub "
            "access, download the checkpoint elsewhere and pass model.path=<local dir>"
        ) from None


def check_shape(config: PretrainedConfig, model_cfg: DictConfig) -> None:
    """The shape a config declares, sane before anything is sized from it: whole numbers >= 1, KV heads dividing the
    query heads, a finite positive rotary base. Names the key (random weights) or the checkpoint it came from."""
    random = model_cfg.source == "random"
    where = "" if random else f" in the config of {model_cfg.path or model_cfg.name_or_path or model_cfg.package}"

    def refuse(name: str, problem: str) -> None:
        if random:
            raise ConfigError(f"model.architecture.{name}", f"{problem}; fix the value in the model config")
        raise SpectraError(f"{name}{where}: {problem}; the checkpoint's config is damaged or not a causal LM's")

    for name in SHAPE_FIELDS:
        value = getattr(config, name, None)
        if value is None and name in ("num_key_value_heads", "head_dim", "max_position_embeddings"):
            continue  # optional: defaults derive from the others
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            refuse(name, f"must be a whole number >= 1, got {value!r}")
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    if kv_heads and heads % kv_heads:
        refuse("num_key_value_heads", f"{kv_heads} does not divide num_attention_heads={heads}")
    if not getattr(config, "head_dim", None) and config.hidden_size < heads:
        refuse("hidden_size", f"{config.hidden_size} is smaller than num_attention_heads={heads}")
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": getattr(config, "rope_theta", None)}
    # One dict, or one per layer type (Gemma 3: full_attention, sliding_attention).
    for name, parameters in ({"": rope} if "rope_theta" in rope else rope).items():
        theta = parameters.get("rope_theta") if isinstance(parameters, dict) else None
        if theta is not None and not (isinstance(theta, (int, float)) and math.isfinite(theta) and theta > 0):
            refuse(".".join(filter(None, ("rope_parameters", name, "rope_theta"))),
                   f"must be a finite number > 0, got {theta!r}")  # fmt: skip


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


def check_model(cfg: DictConfig, cache: dict | None = None) -> tuple[PretrainedConfig, str | None, type | None, dict]:
    """The device, the model's config (read once per model when a cache is given), the context length."""
    check_device(cfg.hardware.device)
    cache = {} if cache is None else cache
    key = json.dumps(OmegaConf.to_container(cfg.model, resolve=True), sort_keys=True)
    if key not in cache:
        cache[key] = load_model_config(cfg.model)
    model_config, location = cache[key]
    check_shape(model_config, cfg.model)
    model_class = check_attention_reaches_capture(model_config)
    shape = config_shape(model_config)
    if shape["max_position_embeddings"] and cfg.data.context_length > shape["max_position_embeddings"]:
        raise ConfigError(
            "data.context_length",
            f"{cfg.data.context_length} exceeds the model's maximum of {shape['max_position_embeddings']} tokens",
        )
    return model_config, location, model_class, shape

