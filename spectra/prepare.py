"""Prepare SlimPajama token shards with a model's tokenizer, as their own step (no model weights are loaded).

Composes the same conf/ as spectra.run; a capture with the same model and data settings then reads the shards.

    python -m spectra.prepare model=llama3_8b data=slimpajama                       # hub, test split
    python -m spectra.prepare model=tiny_llama data=slimpajama data.local_path='/data/sp6b/*.jsonl.zst' \
        data.data_dir=data/sp-local
    python -m spectra.run model=tiny_llama data=shards data.data_dir=data/sp-local data.context_length=256
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig

from spectra.config.paths import hydra_entrypoint
from spectra.config.schema import checked_config, register_configs
from spectra.data.shards import prepare
from spectra.config.secrets import check_arguments_for_secrets
from spectra.errors import ConfigError, SpectraError, ends_in_one_line, stop_signals_as_interrupt
from spectra.models.loading import load_tokenizer, model_location

register_configs()


def tokenizer_for(model_cfg: DictConfig):
    """The model's tokenizer alone: its own files, or model.tokenizer where the config names one."""
    return load_tokenizer(model_cfg, None if model_cfg.tokenizer else model_location(model_cfg))


def print_summary(manifest: dict, data_dir: str, built: bool) -> None:
    settings, counts = manifest["settings"], manifest["counts"]
    print(f"\nSpectra shards {'prepared' if built else 'already prepared (reused)'}: {Path(data_dir).resolve()}")
    print(f"  tokenizer  {manifest['tokenizer']['name_or_path']} (sha256 {manifest['tokenizer']['sha256'][:12]})")
    print(f"  corpus     {settings['corpus'].get('hub_id') or settings['corpus'].get('local_path')}")
    print(
        f"  settings   min_chars={settings['min_chars']} max_windows_per_doc={settings['max_windows_per_doc']} "
        f"max_prepared_length={settings['max_prepared_length']}"
    )
    print(f"  {'source':<24}{'read':>9}{'short':>8}{'kept':>8}{'tokens':>13}{'stored':>13}")
    for source, c in counts.items():
        note = "" if not settings["sources"] or source in settings["sources"] else "  (excluded source)"
        print(f"  {source:<24}{c['read']:>9}{c['short']:>8}{c['kept']:>8}{c['tokens']:>13,}{c['stored']:>13,}{note}")
    stored = sum(shard["tokens"] for shard in manifest["shards"])
    shards = len(manifest["shards"])
    print(f"  total      {manifest['documents']['count']} documents, {stored:,} tokens stored in {shards} shard(s)")


def main(cfg: DictConfig) -> None:
    # A fault leaves nothing behind: shards.prepare removes the half-built folder.
    with ends_in_one_line(
        lambda: "nothing was kept; free space (or choose a writable data.data_dir), then run the same command",
        lambda: "nothing was kept; run the same command again",
    ):
        cfg = checked_config(cfg)
        if cfg.data.name != "slimpajama":
            raise ConfigError("data", f"is {cfg.data.name!r}; preparation needs data=slimpajama")
        manifest, built = prepare(cfg.data, tokenizer_for(cfg.model))
    print_summary(manifest, cfg.data.data_dir, built)


def cli() -> None:
    try:
        check_arguments_for_secrets(sys.argv[1:])  # before Hydra copies the overrides anywhere
    except SpectraError as error:
        print(f"spectra: error: {error}", file=sys.stderr)
        sys.exit(2)
    if not any(arg.startswith(("hydra.run.dir=", "++hydra.run.dir=")) for arg in sys.argv[1:]):
        # Preparation writes only data.data_dir: no run folder for Hydra to make (outputs/ may not be writable).
        # First, not last: argparse takes no override after options such as `--cfg job`.
        sys.argv.insert(1, "hydra.run.dir=.")
    with stop_signals_as_interrupt():
        hydra_entrypoint(main, "config", "spectra")


if __name__ == "__main__":
    cli()
