"""The command line, checked before Hydra creates a run directory: Hydra's flags in any order, unknown config
options and keys, bad values (ranges, metric names), secrets on the command line, an unwritable or busy run folder,
and with -m every point of the sweep. Each mistake ends in one line (`spectra: error: <key>: <problem and fix>`).

    python -m spectra.run data.context_lenght=5          # one line naming the key
    python -m spectra.run -m data.n_samples=4,0          # names the sweep job; no job is started
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import (
    ConfigCompositionException,
    MissingConfigException,
    OverrideParseException,
)
from omegaconf import DictConfig, OmegaConf, open_dict

from spectra.config.plan import check_name_lengths, check_writable, output_key
from spectra.config.schema import checked_config
from spectra.config.secrets import check_no_secrets
from spectra.errors import ConfigError, SpectraError
from spectra.models.checks import check_model
from spectra.models.loading import model_location
from spectra.store.lock import FolderLock
from spectra.store.manifest import fingerprint, inspect_run_directory

# Hydra flags that do not run a capture (or that this check does not model); Hydra handles them alone.
UNCHECKED_FLAGS = ("help", "hydra_help", "info", "shell_completion", "cfg", "config_path", "config_dir",
                   "config_name", "experimental_rerun")  # fmt: skip
# Parquet bytes per row after zstd, from the measurements in /work/shared/NOTES.md (10.4 B/row with the four


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


def check_command_line(argv: list[str], conf_dir: str) -> list[tuple[DictConfig, Path]]:
    """Compose the config as `hydra.main` will and check it; raises SpectraError with one line. Returns each job's
    checked config and run folder (none for Hydra's own flags: --help, --cfg, ...).

    With -m, every point of the sweep is composed and checked (config, model, run folder) before the first job
    starts, so that a bad point in the middle does not stop a sweep half done."""
    args = hydra_parser().parse_args(argv)
    check_no_secrets(args.overrides)  # before anything else: even a help screen must not echo a credential
    if any(getattr(args, flag, None) for flag in UNCHECKED_FLAGS):
        return []
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        if not args.multirun:
            return [check_job(compose_job(args.overrides))]
        jobs = sweep_jobs(args.overrides)
        values: dict[str, set[str]] = {}  # key -> the overrides of it across jobs; swept keys have several
        for override in (o for job in jobs for o in job):
            values.setdefault(override.partition("=")[0], set()).add(override)
        models: dict = {}  # model configs read once per model, not once per point
        checked = []
        for number, job in enumerate(jobs):
            try:
                checked.append(check_job(compose_job(job), number, models))
            except SpectraError as error:
                point = " ".join(o for o in job if len(values[o.partition("=")[0]]) > 1)
                raise SpectraError(f"sweep job {number} ({point}): {error}; no job was started") from None
        return checked


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


def compose_job(overrides: list[str], config_name: str = "config") -> DictConfig:
    """One job's config with its hydra node; Hydra's errors become one line naming the key."""
    try:
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
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
            program = "spectra.run" if config_name == "config" else f"spectra.{config_name}"
            raise ConfigError(key, f"no such key; `python -m {program} --cfg job` lists them all") from None
        if key:
            raise ConfigError(key, str(cause).splitlines()[0]) from None
        raise SpectraError("; ".join(line.strip() for line in str(error).splitlines() if line.strip())) from None


def check_job(composed: DictConfig, number: int | None = None, models: dict | None = None) -> tuple[DictConfig, Path]:
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
    key = output_key(cfg, sweep=number is not None)
    check_name_lengths(out, key)
    check_writable(out, key)
    # Before Hydra starts: a process writing there now, another run there, or one to resume with other settings.
    FolderLock(out, key).check_free()
    inspect_run_directory(out, fingerprint(cfg), cfg.run.resume, key)
    return cfg, out

