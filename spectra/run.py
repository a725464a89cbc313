"""Capture per-token attention metrics into a run directory of Parquet files.

    python -m spectra.run                                            # SmolLM2-135M, built-in corpus, CPU
    python -m spectra.run model=tiny_llama data=synthetic data.context_length=64
    python -m spectra.run model=llama3_8b hardware=h100 data=slimpajama
    python -m spectra.run -m data.context_length=256,512 data.n_samples=4,8     # a sweep
    python -m spectra.run --cfg job                                   # show the composed config
    python -m spectra.run -m hydra/sweeper=standard_sweep             # the study's standard sweep
    python -m spectra.run -m hydra/launcher=submitit_local data.n_samples=4,8   # jobs as separate processes
    torchrun --standalone --nproc_per_node=2 -m spectra.run           # ranks split the samples (distributed.py)
    python -m spectra.run model=tiny_llama data=synthetic run.dry_run=true           # check, print the plan
    python -m spectra.run hydra.run.dir=<a killed run> run.resume=true               # finish a killed run

Reads top to bottom: check config -> load model -> load samples -> capture batch by batch -> write -> report.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shlex
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import spectra
from spectra.capture.hook import AttentionCapture, metrics_to_host
from spectra.capture.numerics import NumericsGuard, nonfinite_summary
from spectra.config.paths import config_dir, hydra_entrypoint
from spectra.config.schema import checked_config, register_configs
from spectra.config.command_line import check_command_line, flags_first
from spectra.config.dry_run import dry_run_estimate, dry_run_report, sweep_total
from spectra.config.plan import Plan, output_key, preflight
from spectra.errors import SpectraError, ends_in_one_line, stop_signals_as_interrupt
from spectra.launch.distributed import (
    World,
    gathered,
    joined,
    rank_device,
    same_directory,
    share,
)
from spectra.models.loading import describe, load_weights
from spectra.models.windows import attention_windows
from spectra.store.manifest import (
    Manifest,
    batch_done,
    delete_leftovers,
    fingerprint,
    listed_parts,
    manifest_path,
    misaligned_batches,
)
from spectra.store.lock import FolderLock
from spectra.store.writer import (
    PartWriter,
    metric_schema,
    write_config_record,
    write_json_atomic,
    write_samples,
)
from spectra.tracking.tracker import Tracker, start_tracker

register_configs()


def run_directory(cfg: DictConfig) -> Path:
    if cfg.run.output_dir:
        return Path(cfg.run.output_dir)
    return Path(HydraConfig.get().runtime.output_dir)


def versions() -> dict[str, str]:
    import polars
    import pyarrow
    import transformers

    return {
        "spectra": spectra.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "pyarrow": pyarrow.__version__,
        "polars": polars.__version__,
    }


def finished_run_timing(out: Path, plan: Plan, samples: int) -> dict | None:
    """A resume of a run that had finished captures nothing: keep the timings of the attempts that did the work
    (this attempt's would read 0 tokens/s). None when there is work left, or no earlier run.json."""
    record = out / "run.json"
    if len(plan.resume.completed) < samples or not record.is_file():
        return None
    try:
        return json.loads(record.read_text()).get("timing")
    except (OSError, ValueError):
        return None


def capture(
    cfg: DictConfig,
    out: Path | None = None,
    world: World = World(),
    tracker: Tracker = Tracker(),
    plan: Plan | None = None,
) -> dict:
    """The whole run (this rank's share of it under torchrun); returns what run.json records."""
    cfg = checked_config(cfg)
    out = out or run_directory(cfg)
    started = time.perf_counter()
    started_at = datetime.now(timezone.utc).isoformat()
    plan = plan or preflight(cfg, out)  # every check that needs no weights; changes nothing on disk
    if len(plan.resume.completed) == len(plan.samples) and plan.resume.previous_record:
        return finished_already(plan, cfg, out, world)  # a sweep's resume passes its finished jobs this way

    model = load_weights(cfg.model, cfg.hardware, plan.model_config)  # preflight read the config and tokenized
    # attention_windows: the keys each layer's queries see, which the analysis divides its ratios by.
    shape = {**describe(model), "attention_windows": attention_windows(model.config)}
    samples = plan.samples
    out.mkdir(parents=True, exist_ok=True)
    own = share(samples, world)  # this rank's samples; all of them without torchrun
    refusals = [why for why in gathered(world, misaligned_batches(own, cfg.hardware.batch_size, plan.resume)) if why]
    if refusals:
        raise SpectraError(refusals[0])
    earlier_timing = finished_run_timing(out, plan, len(samples)) if world.is_main else None
    if world.is_main:
        delete_leftovers(plan.resume, out, fingerprint(cfg))
    gathered(world, None)  # rank 0 has deleted the leftovers before any rank writes a part of the same name
    manifest_file = manifest_path(out, world.rank if world.size > 1 else None)
    manifest = Manifest(
        manifest_file, fingerprint(cfg), plan.resume.kept_parts(manifest_file), shape["attention_windows"]
    )
    resumed_samples = len(plan.resume.completed)  # all ranks' kept parts
    resumed_rows = sum(part.rows for kept in plan.resume.kept.values() for part in kept)
    if world.is_main:
        write_samples(out / "samples.parquet", samples)

    names = list(cfg.metrics.names)
    schema = metric_schema(names, cfg.metrics.storage_dtype)
    batch_size = cfg.hardware.batch_size
    tokens_total = len(samples) * cfg.data.context_length
    own_tokens = len(own) * cfg.data.context_length
    guard = NumericsGuard(names, cfg.metrics.storage_dtype, cfg.run.on_nonfinite)
    capture_started = time.perf_counter()
    with (
        AttentionCapture.from_config(model, cfg.metrics, cfg.hardware) as attention,
        PartWriter(
            out / "metrics",
            schema,
            manifest=manifest,
            codec=cfg.hardware.parquet_codec,
            threads=cfg.hardware.writer_threads,
            check=guard.check,  # in batch order, on each batch's host copy, before its part is written
        ) as writer,
        tqdm(
            total=own_tokens, unit="tok", unit_scale=True, desc="capture", dynamic_ncols=True, disable=not world.is_main
        ) as progress,
    ):
        for first in range(0, len(own), batch_size):
            batch = own[first : first + batch_size]
            if batch_done(batch, plan.resume.completed):  # written by the attempt this run resumes
                progress.update(len(batch) * cfg.data.context_length)
                continue
            input_ids = torch.from_numpy(np.stack([s.input_ids for s in batch])).to(model.device)  # (B, T)
            metrics = attention.run(input_ids)  # name -> (L, B, H, T), on the model's device
            # One asynchronous device-to-host copy per batch: a writer thread waits for it, checks it and writes
            # the part while this thread captures the next batch (a full queue makes put wait).
            writer.put(np.array([s.sample_id for s in batch]), metrics_to_host(metrics, names))
            progress.update(input_ids.numel())
            done = first + len(batch)
            tracker.log_progress(
                samples=done,
                samples_total=len(own),
                tokens=done * cfg.data.context_length,
                rows=done * shape["layers"] * shape["heads"] * cfg.data.context_length,
                seconds=time.perf_counter() - capture_started,
            )
    capture_seconds = time.perf_counter() - capture_started
    # Every rank's parts are on disk once all ranks get here; run.json counts what all manifests list (also the
    # parts of ranks an earlier attempt had and this one has not).
    capture_seconds = max(gathered(world, capture_seconds))
    parts = listed_parts(out).values()
    written = {"rows": sum(p.rows for p in parts), "part_files": len(parts)}
    written["metric_bytes"] = sum(p.bytes for p in parts)

    record = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "versions": versions(),
        "model": shape,
        "device": str(model.device),
        "counts": {
            "samples": len(samples),
            "tokens": tokens_total,
            "rows": written["rows"],
            "expected_rows": len(samples) * shape["layers"] * shape["heads"] * cfg.data.context_length,
            "part_files": written["part_files"],
            "metric_bytes": written["metric_bytes"],
            "samples_resumed": resumed_samples,
        },
        "nonfinite": nonfinite_summary(gathered(world, guard.counts)),
        "timing": earlier_timing or {
            "started_at": started_at,
            "wall_seconds": time.perf_counter() - started,
            "capture_seconds": capture_seconds,
            # This attempt's work only: a resumed run skipped the samples kept from earlier attempts.
            "tokens_per_second": (len(samples) - resumed_samples) * cfg.data.context_length / capture_seconds,
            "rows_per_second": (written["rows"] - resumed_rows) / capture_seconds,
        },
        "output_dir": str(out.resolve()),
        "world_size": world.size,
    }
    if world.is_main:
        write_json_atomic(record, out / "run.json")
    return record


def finished_already(plan: Plan, cfg: DictConfig, out: Path, world: World) -> dict:
    """A resumed run with every part intact: no weights loaded, the record (and its timings) kept."""
    if world.is_main:
        delete_leftovers(plan.resume, out, fingerprint(cfg))  # only temporary files can be left; run.json stays
    return plan.resume.previous_record


def reading_code(run_dir: str) -> str:
    if not set("*?[]") & set(run_dir):
        return f"polars.scan_parquet('{run_dir}/metrics/*.parquet')"
    # A sweep job's folder named after a list-valued override: a glob pattern would read [ ] as a character class.
    return f"polars.scan_parquet(sorted(Path('{run_dir}/metrics').glob('part-*.parquet')), glob=False)"


def print_summary(record: dict) -> None:
    counts, timing, shape = record["counts"], record["timing"], record["model"]
    print(
        f"\nSpectra run complete: {record['output_dir']}\n"
        f"  model      {record['config']['model']['name']} ({shape['layers']} layers x {shape['heads']} heads, "
        f"{shape['kv_heads']} KV heads, {shape['dtype']} on {record['device']})\n"
        f"  samples    {counts['samples']} x {record['config']['data']['context_length']} tokens\n"
        f"  rows       {counts['rows']:,} in {counts['part_files']} part files, "
        f"{counts['metric_bytes'] / 2**20:.1f} MiB ({counts['metric_bytes'] / max(counts['rows'], 1):.2f} B/row)\n"
        f"  throughput {timing['tokens_per_second']:,.0f} tokens/s, {timing['rows_per_second']:,.0f} rows/s "
        f"(capture {timing['capture_seconds']:.1f} s, wall {timing['wall_seconds']:.1f} s)\n"
        f"  read with  {reading_code(record['output_dir'])}"
    )
    if record["nonfinite"]["total"]:
        print(f"  WARNING    {record['nonfinite']['total']:,} non-finite metric values kept; see nonfinite in run.json")


def writer_lock(out: Path, cfg: DictConfig, world: World):
    """The run directory's lock, held by rank 0 for the run's life (the other ranks write only under its cover)."""
    if not world.is_main or cfg.run.dry_run:  # a dry run writes nothing, not even the lock file
        return nullcontext()
    return FolderLock(out, output_key(cfg))


def record_config(out: Path, composed: DictConfig) -> None:
    """Once the run is accepted: .hydra/ (Hydra's own writing is turned off in conf/config.yaml) and run.log (each
    layer's metrics path, from capture/hook.py). The previous run's run.log handler goes first: in one process
    (a basic-launcher sweep, the tests) a later run's lines must not land in an earlier run's file."""
    write_config_record(out, composed, HydraConfig.get())
    root = logging.getLogger()
    for previous in [h for h in root.handlers if getattr(h, "spectra_run_log", False)]:
        root.removeHandler(previous)
        previous.close()
    handler = logging.FileHandler(out / "run.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    handler.spectra_run_log = True
    root.addHandler(handler)


def main(composed: DictConfig) -> dict | None:
    """The run, once Hydra has composed its config (cli below). Returns the run.json record: a submitit launcher
    receives it in the job's JobReturn and tells the sweep's outcome (spectra/launch/job_outcomes.py)."""
    out = None

    # Asked for only on a fault, by when `out` may name the run directory.
    def after_disk_fault() -> str:
        return resume_hint(composed, out, "free space, then ")

    def after_interrupt() -> str:
        return resume_hint(composed, out)

    # Ctrl-C, SIGTERM or SIGHUP (stop_signals_as_interrupt): parts in flight have landed before the line is printed.
    with ends_in_one_line(after_disk_fault, after_interrupt):
        with joined() as world:
            cfg = checked_config(composed)
            cfg.hardware.device = rank_device(cfg.hardware.device, world)
            out = same_directory(world, run_directory(cfg))
            with writer_lock(out, cfg, world):  # one writer per run directory; a second process is refused
                plan = preflight(cfg, out)  # every check that needs no weights, before W&B starts; writes nothing
                gathered(world, None)  # every rank has looked at the run directory before any rank changes it
                if cfg.run.dry_run:
                    if world.is_main:
                        print(dry_run_report(cfg, plan))
                    return None
                if world.is_main:
                    record_config(out, composed)
                # A finished run's resume captures nothing, so it starts no W&B run; a resumed one continues its own.
                finished = len(plan.resume.completed) == len(plan.samples) and plan.resume.previous_record
                tracking = Tracker() if finished else start_tracker(cfg, out, world)
                with tracking as tracker:  # finishes the W&B run even when capture fails
                    record = capture(cfg, out, world, tracker, plan)
                    tracker.log_results(record)
    if world.is_main:
        print_summary(record)
    return record


def resume_hint(composed: DictConfig, out: Path | None, first: str = "") -> str:
    """What was kept, and the command that finishes the run (or sweep): 'N finished part(s) are kept; finish the
    run with: <command>'."""
    if out is None:
        return "nothing was written"
    parts = len(listed_parts(out)) if out.is_dir() else 0
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        kept = f"the finished jobs and {parts} finished part(s) of this one are kept"
        return f"{kept}; {first}finish the sweep with: {resume_command(composed, out)}"
    kept = f"{parts} finished part(s) are kept" if parts else "no part was finished"
    return f"{kept}; {first}{'finish' if parts else 'restart'} the run with: {resume_command(composed, out)}"


def resume_command(composed: DictConfig, out: Path) -> str:
    """The command that started this process, quoted for a POSIX shell, with run.resume=true and its folder: in a
    sweep every job's folder is found again (finished jobs are skipped), so the sweep's folder is given."""
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        key, folder = "hydra.sweep.dir", HydraConfig.get().sweep.dir
    else:
        key, folder = ("run.output_dir" if composed.run.output_dir else "hydra.run.dir"), str(out)
    arguments = [a for a in sys.argv[1:] if not a.lstrip("+~").startswith(("run.resume=", f"{key}="))]
    arguments += ["run.resume=true", f"{key}={folder}"]
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if ranks > 1:
        program = f"torchrun --nproc_per_node={ranks} -m spectra.run"
    else:  # the interpreter as it was typed (.venv/bin/python, python3, ...) when started as python -m spectra.run
        typed = sys.orig_argv[:3] if len(sys.orig_argv) >= 3 else []
        python = typed[0] if typed[1:3] == ["-m", "spectra.run"] else "python"
        program = f"{shlex.quote(python)} -m spectra.run"
    return " ".join([program, *map(shlex.quote, arguments)])


def dry_run(jobs: list[tuple[DictConfig, Path]]) -> None:
    """Each job's plan (preflight only: no weights, no samples built, nothing written), and a sweep's total. Under
    torchrun, rank 0 alone prints it."""
    totals = []
    for cfg, out in jobs:
        report, total = dry_run_estimate(cfg, preflight(cfg, out))
        totals.append(total)
        if int(os.environ.get("RANK", "0")) == 0:
            print(report)
    if len(jobs) > 1 and int(os.environ.get("RANK", "0")) == 0:
        print(sweep_total(totals))


def cli() -> None:
    """`python -m spectra.run`: a bad command line ends in one line, before Hydra creates a run directory."""
    try:
        sys.argv[1:] = flags_first(sys.argv[1:])  # `-m` anywhere: Hydra reads sys.argv itself
        jobs = check_command_line(sys.argv[1:], config_dir())
        if jobs and all(cfg.run.dry_run for cfg, _ in jobs):
            dry_run(jobs)  # here, not under Hydra, which would leave an empty run folder behind
            return
    except SpectraError as error:
        print(f"spectra: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("spectra: interrupted (SIGINT) while checking the command line; nothing was written", file=sys.stderr)
        sys.exit(130)
    with stop_signals_as_interrupt():  # queued parts land, W&B finishes as interrupted, the run can be resumed
        hydra_entrypoint(main, "config", "spectra")


if __name__ == "__main__":
    cli()
