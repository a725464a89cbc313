"""Capture cost against the forward pass the model runs anyway, on the same inputs, in one process.

For each context length and batch size: loads `hardware.batch_size` samples of real text (data=builtin unless
overridden), then each round runs, back to back so all three see the same machine load:
  decoder forward  the base model (no LM head) with its own SDPA attention: the work the capture runs too
  full forward     the whole model, logits included: what a user's own forward pass costs
  capture          `--batches` batches in a row as a run captures them: Spectra's attention function, the copy
                   to the host, and the run's writer (hardware.parquet_codec, hardware.writer_threads, manifest,
                   checksums, numerics guard) writing batch n while batch n+1 is captured, until every part is on
                   disk; capture_s is that time per batch (steady state, the last part's tail included)
The ratios are medians of the per-round ratios (a burst of load from other jobs spoils one round, not the
ratio); the main figure is capture / decoder forward, per batch. The capture's peak RSS is sampled in the warm-up
rounds (a sampler thread would slow the timed ones). The first line says which machine, threads and library
versions produced the figures: figures from two machines are only comparable when those agree.

    python scripts/bench.py 512 2048 8192 model=smollm2_135m hardware.num_threads=2
    python scripts/bench.py 512 8192 --batch-sizes 1,max --json model=llama3_8b_random hardware=h100   # on a GPU
    python scripts/bench.py 512 --json metrics.storage_dtype=float16 model=tiny_llama
    python scripts/bench.py --writer --json hardware=h100          # the writer alone, no model, no GPU

`--writer` times the config's writer alone on this machine: `--parts` parts of one batch each (the config's model
shape, batch size and context length; no weights are loaded) with synthetic metric values drawn to resemble real
SmolLM2 attention (synthetic_metrics), through the run's writer with its manifest and checksums. It prints
writer_rows_per_s, bytes_per_row and the writer's CPU time per row (which other jobs on the machine disturb less).

Arguments with '=' are Hydra overrides of the run config (same groups as `python -m spectra.run`); plain
integers are context lengths. `--batch-sizes` takes integers and `max` (CUDA only: the largest batch, doubling
from hardware.batch_size, whose capture fits in GPU memory). `--json` prints one JSON object per result instead
of a table row.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import numba
import numpy as np
import psutil
import torch
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from spectra.capture.hook import ATTENTION_NAME, AttentionCapture, metrics_to_host  # noqa: E402
from spectra.capture.numerics import NumericsGuard  # noqa: E402
from spectra.config.paths import config_dir  # noqa: E402
from spectra.config.schema import checked_config, register_configs  # noqa: E402
from spectra.models.checks import load_model_config  # noqa: E402
from spectra.data.load import load_samples  # noqa: E402
from spectra.errors import SpectraError  # noqa: E402
from spectra.models.loading import config_shape, load_model  # noqa: E402
from spectra.store.manifest import Manifest  # noqa: E402
from spectra.store.writer import PartWriter, metric_schema  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Targets of capture / decoder forward (issues 11 and 19), by device type and context length.
TARGETS = {"cpu": {512: 1.25, 2048: 1.5, 8192: 2.0}, "cuda": {512: 1.5, 8192: 1.5}}


def machine() -> dict:
    """What the figures depend on: processor, SIMD level, threads, library versions, GPU."""
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": psutil.cpu_count(logical=True),
        "simd": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "numba_threads": numba.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "numba": numba.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


class PeakRss:
    """The process's largest resident set while the block runs, sampled every 5 ms (ru_maxrss would also count
    the full forward's logits, which the capture never allocates)."""

    def __enter__(self):
        self.peak = psutil.Process().memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        process = psutil.Process()
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, process.memory_info().rss)

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()


@torch.inference_mode()
def time_forward(forward, input_ids: torch.Tensor, device: torch.device) -> float:
    synchronize(device)
    started = time.perf_counter()
    forward(input_ids=input_ids, use_cache=False)
    synchronize(device)
    return time.perf_counter() - started


def run_writer(cfg, directory: Path, schema) -> PartWriter:
    """The writer a run opens (spectra/run.py): the config's codec and threads, a manifest, the numerics guard."""
    directory.mkdir(parents=True)
    guard = NumericsGuard(list(cfg.metrics.names), cfg.metrics.storage_dtype, "record")
    manifest = Manifest(directory / "manifest.jsonl", {"bench": cfg.hardware.parquet_codec})
    return PartWriter(
        directory / "metrics",
        schema,
        manifest=manifest,
        codec=cfg.hardware.parquet_codec,
        threads=cfg.hardware.writer_threads,
        check=guard.check,
    )


def time_capture(capture: AttentionCapture, input_ids, sample_ids, names, schema, cfg, directory: Path, batches: int):
    """(seconds per batch, seconds from the last batch handed over until every part was on disk, rows per batch,
    bytes per row) for `batches` batches captured in a row, from input ids to closed Parquet parts."""
    started = time.perf_counter()
    with run_writer(cfg, directory, schema) as writer:
        for batch in range(batches):
            metrics = capture.run(input_ids)
            writer.put(sample_ids + batch * len(sample_ids), metrics_to_host(metrics, names))
        handed_over = time.perf_counter()
    finished = time.perf_counter()
    return (finished - started) / batches, finished - handed_over, writer.rows // batches, writer.bytes / writer.rows


def print_profile(capture: AttentionCapture, input_ids, sample_ids, names, schema, cfg, directory: Path) -> None:
    """One more capture under torch's profiler: where its time goes, op by op (device time first on a GPU)."""
    cuda = input_ids.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as profiler:
        time_capture(capture, input_ids, sample_ids, names, schema, cfg, directory, 1)
        synchronize(input_ids.device)
    averages = profiler.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",):
        try:
            table = averages.table(sort_by=key, row_limit=20)
        except (KeyError, AttributeError, ValueError):  # the sort key's name changed across torch versions
            continue
        print(f"profile of one capture, T={input_ids.shape[1]}, by {key}:\n{table}", file=sys.stderr, flush=True)
        return


def batch_inputs(model, tokenizer, cfg, context_length: int, batch_size: int) -> torch.Tensor:
    """(batch_size, T) token ids: hardware.batch_size samples of the config's data, rows repeated up to batch_size
    (the capture's cost does not depend on which text a row holds twice)."""
    cfg.data.context_length = context_length
    cfg.data.n_samples = cfg.hardware.batch_size
    samples = load_samples(cfg.data, tokenizer, model.config.vocab_size)
    ids = torch.from_numpy(np.stack([s.input_ids for s in samples]))  # (hardware.batch_size, T)
    return ids.repeat(-(-batch_size // len(samples)), 1)[:batch_size].to(model.device)


def largest_batch(model, tokenizer, cfg, context_length: int) -> int:
    """The largest batch, doubling from hardware.batch_size, whose capture and full forward (logits included, with
    the capture on: more than either needs alone) fit in GPU memory."""
    fits, size = 0, cfg.hardware.batch_size
    with AttentionCapture.from_config(model, cfg.metrics, cfg.hardware) as capture:
        while size <= 4096:
            try:
                input_ids = batch_inputs(model, tokenizer, cfg, context_length, size)
                metrics = capture.run(input_ids)
                metrics_to_host(metrics, list(cfg.metrics.names)).wait()
                with torch.inference_mode():
                    model(input_ids=input_ids, use_cache=False)
            except torch.cuda.OutOfMemoryError:
                break
            finally:
                metrics = None
                torch.cuda.empty_cache()
            fits, size = size, size * 2
    if not fits:
        raise SpectraError(f"no batch fits in GPU memory at {context_length} tokens, not even hardware.batch_size")
    return fits


def bench_context(
    model, tokenizer, cfg, context_length: int, batch_size: int, options: argparse.Namespace
) -> dict:
    input_ids = batch_inputs(model, tokenizer, cfg, context_length, batch_size)  # (B, T)
    sample_ids = np.arange(batch_size)
    names = list(cfg.metrics.names)
    schema = metric_schema(names, cfg.metrics.storage_dtype)
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)

    decoder_s, forward_s, capture_s, drain_s = [], [], [], []
    peak_rss = 0
    plain = model.config._attn_implementation  # the model's own attention (SDPA) for the plain passes
    with (
        AttentionCapture.from_config(model, cfg.metrics, cfg.hardware) as capture,
        tempfile.TemporaryDirectory(prefix="spectra-bench-") as scratch,
    ):
        for repeat in range(options.warmup + options.repeats):  # warm-up rounds are not counted
            model.set_attn_implementation(plain)
            decoder = time_forward(model.base_model, input_ids, model.device)
            forward = time_forward(model, input_ids, model.device)
            model.set_attn_implementation(ATTENTION_NAME)
            # The memory sampler wakes every 5 ms and takes the GIL: it runs in the warm-up rounds only, so that it
            # does not slow the timed ones (in every round when there is no warm-up).
            with PeakRss() if repeat < options.warmup or options.warmup == 0 else nullcontext() as rss:
                seconds, drain, rows, size = time_capture(
                    capture, input_ids, sample_ids, names, schema, cfg, Path(scratch) / f"round-{repeat}",
                    options.batches,
                )  # fmt: skip
            peak_rss = max(peak_rss, rss.peak if rss is not None else 0)
            if repeat >= options.warmup:
                decoder_s.append(decoder)
                forward_s.append(forward)
                capture_s.append(seconds)
                drain_s.append(drain)
        if options.profile:
            print_profile(capture, input_ids, sample_ids, names, schema, cfg, Path(scratch) / "profiled")

    captured = statistics.median(capture_s)
    result = {
        "context_length": context_length,
        "decoder_forward_s": round(statistics.median(decoder_s), 6),
        "forward_s": round(statistics.median(forward_s), 6),
        "capture_s": round(captured, 6),  # per batch, over `batches` batches in a row, every part on disk
        # After the last batch was handed to the writer, until every part was on disk: what writing adds that
        # capturing the next batch did not hide (once per run, however many batches).
        "drain_s": round(statistics.median(drain_s), 6),
        # Medians of the per-round ratios: each pairs passes run back to back.
        "capture_over_decoder": round(statistics.median(c / d for c, d in zip(capture_s, decoder_s)), 3),
        "capture_over_forward": round(statistics.median(c / f for c, f in zip(capture_s, forward_s)), 3),
        "capture_over_decoder_rounds": [round(c / d, 3) for c, d in zip(capture_s, decoder_s)],
        "tokens_per_s": round(input_ids.numel() / captured, 1),
        "decoder_tokens_per_s": round(input_ids.numel() / statistics.median(decoder_s), 1),
        "rows_per_s": round(rows / captured, 1),
        "bytes_per_row": round(size, 3),
        "capture_peak_rss_mb": round(peak_rss / 2**20, 1),
        "batch_size": batch_size,
        "batches": options.batches,
        "repeats": len(capture_s),
        "storage_dtype": cfg.metrics.storage_dtype,
        "parquet_codec": cfg.hardware.parquet_codec,
        "writer_threads": cfg.hardware.writer_threads,
        "device": str(model.device),
        "model": cfg.model.name,
        "data": cfg.data.name,
    }
    target = TARGETS.get(model.device.type, {}).get(context_length)
    if target is not None:
        result["target"] = target
        result["target_met"] = result["capture_over_decoder"] <= target
    if model.device.type == "cuda":
        result["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(model.device) / 2**20, 1)
    return result


def synthetic_metrics(shape: tuple[int, int, int, int], names: list[str], seed: int = 0) -> dict[str, np.ndarray]:
    """name -> (L, B, H, T) metric values drawn to resemble SmolLM2-135M's real attention.

    Fitted to 1.1 M real rows (8 windows of 512 tokens of data=builtin, all 30 layers x 9 heads): log query norm
    per head ~ N(log 14.5, 0.20), per token +- 0.125; entropy = r ln(t + 1) with r around a per-head level
    (real: median 0.43, 5-95% 0.10-0.81); ln max_attn = 0.29 - 0.58 entropy + N(0, 0.35) and ln k_eff = 0.09 +
    1.07 entropy + N(0, 0.46), both clipped to their possible ranges (least-squares fits of the real rows).
    Written with the project's encodings they take as many bytes per row as the real rows, within ~2%.
    """
    rng = np.random.default_rng(seed)
    layers, _, heads, tokens = shape
    keys = np.arange(1, tokens + 1, dtype=np.float64)  # keys query t attends to
    level = (layers, 1, heads, 1)
    ratio = np.clip(rng.uniform(0.15, 0.75, level) + rng.normal(0, 0.15, shape), 0, 1)
    entropy = ratio * np.log(keys)
    values = {
        "query_norm": 14.5 * np.exp(rng.normal(0, 0.2, level) + rng.normal(0, 0.125, shape)),
        "entropy": entropy,
        "max_attn": np.clip(np.exp(0.29 - 0.58 * entropy + rng.normal(0, 0.35, shape)), 1 / keys, 1),
        "k_eff": np.clip(np.rint(np.exp(0.09 + 1.07 * entropy + rng.normal(0, 0.46, shape))), 1, keys),
    }
    # Extended metrics (metrics=extended): positive values of a similar spread. Stored sample-major, as
    # metrics_to_host hands a GPU's batch to the writer: (L, B, H, T) views of (B, L, H, T) arrays.
    return {
        name: np.ascontiguousarray(
            (values[name] if name in values else rng.lognormal(0, 1, shape))
            .astype(np.int32 if name == "k_eff" else np.float32)
            .transpose(1, 0, 2, 3)
        ).transpose(1, 0, 2, 3)
        for name in names
    }


def bench_writer(cfg, options: argparse.Namespace) -> dict:
    """The config's writer alone: `--parts` batches of synthetic metrics per round, put as a run puts them."""
    shape = config_shape(load_model_config(cfg.model)[0])  # the model's config only, no weights
    batch, tokens = cfg.hardware.batch_size, cfg.data.context_length
    names = list(cfg.metrics.names)
    schema = metric_schema(names, cfg.metrics.storage_dtype)
    metrics = synthetic_metrics((shape["layers"], batch, shape["heads"], tokens), names)
    rates, cpu_ns = [], []
    with tempfile.TemporaryDirectory(prefix="spectra-bench-writer-") as scratch:
        for repeat in range(options.warmup + options.repeats):
            started, cpu_started = time.perf_counter(), time.process_time()
            with run_writer(cfg, Path(scratch) / f"round-{repeat}", schema) as writer:
                for part in range(options.parts):
                    writer.put(np.arange(part * batch, (part + 1) * batch), metrics)
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
            if repeat >= options.warmup:
                rates.append(writer.rows / seconds)
                cpu_ns.append(cpu / writer.rows * 1e9)
                bytes_per_row = writer.bytes / writer.rows
    return {
        "writer_rows_per_s": round(statistics.median(rates)),
        "bytes_per_row": round(bytes_per_row, 3),
        "writer_cpu_ns_per_row": round(statistics.median(cpu_ns), 1),  # all threads' CPU time, by rows written
        "rounds_rows_per_s": [round(rate) for rate in rates],
        "parquet_codec": cfg.hardware.parquet_codec,
        "writer_threads": cfg.hardware.writer_threads,
        "parts": options.parts,
        "rows_per_part": writer.rows // options.parts,
        "shape": {"layers": shape["layers"], "batch": batch, "heads": shape["heads"], "tokens": tokens},
        "storage_dtype": cfg.metrics.storage_dtype,
        "values": "synthetic, fitted to SmolLM2-135M attention (scripts/bench.py synthetic_metrics)",
        "model": cfg.model.name,
        "machine": machine(),
    }


def print_row(result: dict) -> None:
    cuda = f"  CUDA peak {result['cuda_peak_mb']:,.0f} MB" if "cuda_peak_mb" in result else ""
    target = ""
    if "target" in result:
        target = f"  target <= {result['target']}: {'met' if result['target_met'] else 'NOT met'}"
    rounds = " ".join(f"{r:.2f}" for r in result["capture_over_decoder_rounds"])
    print(
        f"T={result['context_length']:>5} B={result['batch_size']}  decoder forward {result['decoder_forward_s']:.3f} s"
        f"  full forward {result['forward_s']:.3f} s  capture {result['capture_s']:.3f} s (drain {result['drain_s']:.3f} s)  "
        f"capture/decoder {result['capture_over_decoder']:.2f} (rounds {rounds})  "
        f"capture/full {result['capture_over_forward']:.2f}  {result['tokens_per_s']:,.0f} tokens/s  "
        f"{result['bytes_per_row']:.2f} B/row  capture peak RSS {result['capture_peak_rss_mb']:,.0f} MB{cuda}{target}",
        flush=True,
    )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("args", nargs="*", help="context lengths (integers) and Hydra overrides (key=value)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per context length (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (0 for very long contexts)")
    parser.add_argument("--batches", type=int, default=3, help="batches captured in a row per round (steady state)")
    parser.add_argument("--batch-sizes", default=None, help="e.g. 1,8 or 1,max; default: hardware.batch_size")
    parser.add_argument("--json", action="store_true", help="one JSON object per result")
    parser.add_argument("--profile", action="store_true", help="then one capture under torch's profiler (stderr)")
    parser.add_argument("--writer", action="store_true", help="time the config's writer alone (no model, no GPU)")
    parser.add_argument("--parts", type=int, default=8, help="--writer: parts (batches) written per round")
    options = parser.parse_intermixed_args(argv)
    overrides = [a for a in options.args if "=" in a]
    lengths = [a for a in options.args if "=" not in a]
    if not all(a.isdigit() and int(a) > 0 for a in lengths):
        parser.error(f"context lengths must be positive integers, got {lengths}")
    lengths = [int(a) for a in lengths] or [512]
    if options.repeats < 1 or options.warmup < 0 or options.batches < 1 or options.parts < 1:
        parser.error("--repeats, --batches and --parts must be >= 1 and --warmup >= 0")
    sizes = (options.batch_sizes or "").split(",") if options.batch_sizes else []
    if not all(size == "max" or (size.isdigit() and int(size) > 0) for size in sizes):
        parser.error(f"--batch-sizes takes positive integers and max, got {options.batch_sizes}")

    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = checked_config(compose(config_name="config", overrides=overrides))
    if options.writer:
        result = bench_writer(cfg, options)
        if options.json:
            print(json.dumps(result), flush=True)
        else:
            print(
                f"writer {result['parquet_codec']} x {result['writer_threads']} threads: "
                f"{result['writer_rows_per_s'] / 1e6:.2f} M rows/s ({result['writer_cpu_ns_per_row']:.0f} ns CPU/row), "
                f"{result['bytes_per_row']:.2f} B/row, {result['parts']} parts of {result['rows_per_part']:,} rows",
                flush=True,
            )
        return
    if "max" in sizes and not cfg.hardware.device.startswith("cuda"):
        parser.error("--batch-sizes max needs a CUDA device (hardware=h100 or a10g)")
    model, tokenizer = load_model(cfg.model, cfg.hardware)
    info = machine()
    if options.json:
        print(json.dumps({"machine": info}), flush=True)
    else:
        print("machine: " + ", ".join(f"{key} {value}" for key, value in info.items()), flush=True)
    for context_length in lengths:
        for size in sizes or [str(cfg.hardware.batch_size)]:
            batch_size = largest_batch(model, tokenizer, cfg, context_length) if size == "max" else int(size)
            result = bench_context(model, tokenizer, cfg, context_length, batch_size, options)
            if options.json:
                print(json.dumps(result), flush=True)
            else:
                print_row(result)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except SpectraError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        sys.exit(2)
