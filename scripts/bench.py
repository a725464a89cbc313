"""Capture cost against the forward pass the model runs anyway, on the same inputs, in one process.

For each context length: loads `hardware.batch_size` samples, then alternates a plain forward pass (the model's
own SDPA attention, no capture) with a full capture (Spectra's attention function, device-to-host copy, Parquet
part written and closed), so both see the same machine load. Prints medians over the repeats (the ratio
is the median of the per-round ratios).

    python scripts/bench.py 512 2048 model=smollm2_135m hardware.num_threads=2
    python scripts/bench.py 8192 --warmup 0 --repeats 1 model=smollm2_135m hardware.num_threads=2
    python scripts/bench.py 512 --json metrics.storage_dtype=float16 model=tiny_llama

Arguments with '=' are Hydra overrides of the run config (same groups as `python -m spectra.run`); plain
integers are context lengths. `--json` prints one JSON object per context length instead of a table row.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
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


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@torch.inference_mode()
def time_forward(model, input_ids: torch.Tensor) -> float:
    synchronize(model.device)
    started = time.perf_counter()
    model(input_ids=input_ids, use_cache=False)
    synchronize(model.device)
    return time.perf_counter() - started


def time_capture(capture: AttentionCapture, input_ids, sample_ids, names, schema, directory: Path):
    """(seconds, rows, bytes on disk) for one batch, from input ids to a closed Parquet part."""
    started = time.perf_counter()
    with PartWriter(directory, schema) as writer:
        metrics = capture.run(input_ids)
        writer.put(sample_ids, metrics_to_host(metrics, names))
    return time.perf_counter() - started, writer.rows, writer.bytes


def bench_context(model, tokenizer, cfg, context_length: int, repeats: int, warmup: int) -> dict:
    cfg.data.context_length = context_length
    cfg.data.n_samples = cfg.hardware.batch_size
    samples = load_samples(cfg.data, tokenizer, model.config.vocab_size)
    input_ids = torch.from_numpy(np.stack([s.input_ids for s in samples])).to(model.device)  # (B, T)
    sample_ids = np.array([s.sample_id for s in samples])
    names = list(cfg.metrics.names)
    schema = metric_schema(names, cfg.metrics.storage_dtype)
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)

    forward_s, capture_s = [], []
    plain = model.config._attn_implementation  # the model's own attention (SDPA) for the plain pass
    with (
        AttentionCapture.from_config(model, cfg.metrics, cfg.hardware) as capture,
        tempfile.TemporaryDirectory(prefix="spectra-bench-") as scratch,
    ):
        for repeat in range(warmup + repeats):  # warm-up rounds are not counted
            model.set_attn_implementation(plain)
            forward = time_forward(model, input_ids)
            model.set_attn_implementation(ATTENTION_NAME)
            seconds, rows, size = time_capture(
                capture, input_ids, sample_ids, names, schema, Path(scratch) / f"round-{repeat}"
            )
            if repeat >= warmup:
                forward_s.append(forward)
                capture_s.append(seconds)

    forward, captured = statistics.median(forward_s), statistics.median(capture_s)
    result = {
        "context_length": context_length,
        "forward_s": round(forward, 6),
        "capture_s": round(captured, 6),
        # Median of the per-round ratios: each pairs a forward and a capture run back to back, so a burst of load
        # from other jobs spoils one round, not the ratio.
        "capture_over_forward": round(statistics.median(c / f for c, f in zip(capture_s, forward_s)), 3),
        "tokens_per_s": round(input_ids.numel() / captured, 1),
        "rows_per_s": round(rows / captured, 1),
        "bytes_per_row": round(size / rows, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "batch_size": input_ids.shape[0],
        "repeats": len(capture_s),
        "forward_s_min": round(min(forward_s), 6),
        "capture_s_min": round(min(capture_s), 6),
        "storage_dtype": cfg.metrics.storage_dtype,
        "device": str(model.device),
        "threads": torch.get_num_threads(),
    }
    if model.device.type == "cuda":
        result["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(model.device) / 2**20, 1)
    return result


def print_row(result: dict) -> None:
    cuda = f", CUDA peak {result['cuda_peak_mb']:,.0f} MB" if "cuda_peak_mb" in result else ""
    print(
        f"T={result['context_length']:>5} B={result['batch_size']}  forward {result['forward_s']:.3f} s  "
        f"capture {result['capture_s']:.3f} s  capture/forward {result['capture_over_forward']:.2f}  "
        f"{result['tokens_per_s']:,.0f} tokens/s  {result['rows_per_s']:,.0f} rows/s  "
        f"{result['bytes_per_row']:.2f} B/row  peak RSS {result['peak_rss_mb']:,.0f} MB{cuda}  "
        f"(median of {result['repeats']}; min forward {result['forward_s_min']:.3f} s, "
        f"min capture {result['capture_s_min']:.3f} s)",
        flush=True,
    )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("args", nargs="*", help="context lengths (integers) and Hydra overrides (key=value)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per context length (after 1 warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (0 for very long contexts)")
    parser.add_argument("--json", action="store_true", help="one JSON object per context length")
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
    for context_length in lengths:
        result = bench_context(model, tokenizer, cfg, context_length, options.repeats, options.warmup)
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
