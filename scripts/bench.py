"""Capture cost against the forward pass the model runs anyway, on the same inputs, in one process.

For each context length: loads `hardware.batch_size` samples of real text (data=builtin unless overridden), then
each round runs, back to back so all three see the same machine load:
  decoder forward  the base model (no LM head) with its own SDPA attention: the work the capture runs too
  full forward     the whole model, logits included: what a user's own forward pass costs
  capture          Spectra's attention function, device-to-host copy, Parquet part written and closed
The ratios are medians of the per-round ratios (a burst of load from other jobs spoils one round, not the
ratio); the main figure is capture / decoder forward. The capture's peak RSS is sampled in the warm-up rounds
(a sampler thread would slow the timed ones). The first line says which machine, threads and library versions
produced the figures: figures from two machines are only comparable when those agree.

    python scripts/bench.py 512 2048 8192 model=smollm2_135m hardware.num_threads=2
    python scripts/bench.py 512 2048 8192 --json model=llama3_8b_random hardware=h100     # on a GPU
    python scripts/bench.py 512 --json metrics.storage_dtype=float16 model=tiny_llama

Arguments with '=' are Hydra overrides of the run config (same groups as `python -m spectra.run`); plain
integers are context lengths. `--json` prints one JSON object per context length instead of a table row.
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
from spectra.config.schema import checked_config, register_configs  # noqa: E402
from spectra.data.load import load_samples  # noqa: E402
from spectra.errors import SpectraError  # noqa: E402
from spectra.models.loading import load_model  # noqa: E402
from spectra.config.paths import config_dir  # noqa: E402
from spectra.store.writer import PartWriter, metric_schema  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Targets of capture / decoder forward (issue 11), by device type and context length.
TARGETS = {"cpu": {512: 1.25, 2048: 1.5, 8192: 2.0}, "cuda": {512: 1.2, 8192: 1.5}}


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


def time_capture(capture: AttentionCapture, input_ids, sample_ids, names, schema, directory: Path):
    """(seconds, seconds of them until the metrics were on the host, rows, bytes on disk) for one batch, from
    input ids to a closed Parquet part."""
    started = time.perf_counter()
    with PartWriter(directory, schema) as writer:
        metrics = capture.run(input_ids)
        writer.put(sample_ids, metrics_to_host(metrics, names))
        on_host = time.perf_counter() - started
    return time.perf_counter() - started, on_host, writer.rows, writer.bytes


def print_profile(capture: AttentionCapture, input_ids, sample_ids, names, schema, directory: Path) -> None:
    """One more capture under torch's profiler: where its time goes, op by op (device time first on a GPU)."""
    cuda = input_ids.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as profiler:
        time_capture(capture, input_ids, sample_ids, names, schema, directory)
        synchronize(input_ids.device)
    averages = profiler.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",):
        try:
            table = averages.table(sort_by=key, row_limit=20)
        except (KeyError, AttributeError, ValueError):  # the sort key's name changed across torch versions
            continue
        print(f"profile of one capture, T={input_ids.shape[1]}, by {key}:\n{table}", file=sys.stderr, flush=True)
        return


def bench_context(
    model, tokenizer, cfg, context_length: int, repeats: int, warmup: int, profile: bool = False
) -> dict:
    cfg.data.context_length = context_length
    cfg.data.n_samples = cfg.hardware.batch_size
    samples = load_samples(cfg.data, tokenizer, model.config.vocab_size)
    input_ids = torch.from_numpy(np.stack([s.input_ids for s in samples])).to(model.device)  # (B, T)
    sample_ids = np.array([s.sample_id for s in samples])
    names = list(cfg.metrics.names)
    schema = metric_schema(names, cfg.metrics.storage_dtype)
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)

    decoder_s, forward_s, capture_s, write_s = [], [], [], []
    peak_rss = 0
    plain = model.config._attn_implementation  # the model's own attention (SDPA) for the plain passes
    with (
        AttentionCapture.from_config(model, cfg.metrics, cfg.hardware) as capture,
        tempfile.TemporaryDirectory(prefix="spectra-bench-") as scratch,
    ):
        for repeat in range(warmup + repeats):  # warm-up rounds are not counted
            model.set_attn_implementation(plain)
            decoder = time_forward(model.base_model, input_ids, model.device)
            forward = time_forward(model, input_ids, model.device)
            model.set_attn_implementation(ATTENTION_NAME)
            # The memory sampler wakes every 5 ms and takes the GIL: it runs in the warm-up rounds only, so that it
            # does not slow the timed ones (in every round when there is no warm-up).
            with PeakRss() if repeat < warmup or warmup == 0 else nullcontext() as rss:
                seconds, on_host, rows, size = time_capture(
                    capture, input_ids, sample_ids, names, schema, Path(scratch) / f"round-{repeat}"
                )
            peak_rss = max(peak_rss, rss.peak if rss is not None else 0)
            if repeat >= warmup:
                decoder_s.append(decoder)
                forward_s.append(forward)
                capture_s.append(seconds)
                write_s.append(seconds - on_host)
        if profile:
            print_profile(capture, input_ids, sample_ids, names, schema, Path(scratch) / "profiled")

    captured = statistics.median(capture_s)
    result = {
        "context_length": context_length,
        "decoder_forward_s": round(statistics.median(decoder_s), 6),
        "forward_s": round(statistics.median(forward_s), 6),
        "capture_s": round(captured, 6),
        "write_s": round(statistics.median(write_s), 6),  # of capture_s: Parquet part written after the metrics
        # Medians of the per-round ratios: each pairs passes run back to back.
        "capture_over_decoder": round(statistics.median(c / d for c, d in zip(capture_s, decoder_s)), 3),
        "capture_over_forward": round(statistics.median(c / f for c, f in zip(capture_s, forward_s)), 3),
        "capture_over_decoder_rounds": [round(c / d, 3) for c, d in zip(capture_s, decoder_s)],
        "tokens_per_s": round(input_ids.numel() / captured, 1),
        "rows_per_s": round(rows / captured, 1),
        "bytes_per_row": round(size / rows, 3),
        "capture_peak_rss_mb": round(peak_rss / 2**20, 1),
        "batch_size": input_ids.shape[0],
        "repeats": len(capture_s),
        "storage_dtype": cfg.metrics.storage_dtype,
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


def print_row(result: dict) -> None:
    cuda = f"  CUDA peak {result['cuda_peak_mb']:,.0f} MB" if "cuda_peak_mb" in result else ""
    target = ""
    if "target" in result:
        target = f"  target <= {result['target']}: {'met' if result['target_met'] else 'NOT met'}"
    rounds = " ".join(f"{r:.2f}" for r in result["capture_over_decoder_rounds"])
    print(
        f"T={result['context_length']:>5} B={result['batch_size']}  decoder forward {result['decoder_forward_s']:.3f} s"
        f"  full forward {result['forward_s']:.3f} s  capture {result['capture_s']:.3f} s (write {result['write_s']:.3f} s)  "
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
    parser.add_argument("--json", action="store_true", help="one JSON object per context length")
    parser.add_argument("--profile", action="store_true", help="then one capture under torch's profiler (stderr)")
    options = parser.parse_intermixed_args(argv)
    overrides = [a for a in options.args if "=" in a]
    lengths = [a for a in options.args if "=" not in a]
    if not all(a.isdigit() and int(a) > 0 for a in lengths):
        parser.error(f"context lengths must be positive integers, got {lengths}")
    lengths = [int(a) for a in lengths] or [512]
    if options.repeats < 1 or options.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")

    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = checked_config(compose(config_name="config", overrides=overrides))
    model, tokenizer = load_model(cfg.model, cfg.hardware)
    info = machine()
    if options.json:
        print(json.dumps({"machine": info}), flush=True)
    else:
        print("machine: " + ", ".join(f"{key} {value}" for key, value in info.items()), flush=True)
    for context_length in lengths:
        result = bench_context(
            model, tokenizer, cfg, context_length, options.repeats, options.warmup, options.profile
        )
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
