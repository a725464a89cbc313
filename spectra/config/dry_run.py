"""The dry run's report: what a run would do (model shape, samples, rows, disk, memory, output), from the plan alone.

    python -m spectra.run model=tiny_llama data=synthetic run.dry_run=true
    python -m spectra.run model=smollm2_135m data.context_length=1024 data.n_samples=64 run.dry_run=true
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from spectra.capture.metrics import _block_rows
from spectra.config.plan import Plan

# metrics in float32, 5.3 B/row in float16); real attention compresses somewhat differently.
KEY_BYTES_PER_ROW = 0.3
METRIC_BYTES_PER_ROW = {"float32": 3.0, "float16": 1.35, "k_eff": 1.1}


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


@dataclass
class SpeedBasis:
    """Seconds per token of a measured capture, s(T) = per_token + per_context_token * T, fitted to two context
    lengths; scaled to another model by parameters (the forward) and by layers x heads (the metrics' per-row work)."""

    per_token: float
    per_context_token: float
    parameters: float
    layer_heads: int
    first_run_seconds: float  # once per machine: Numba compiles the CPU kernels (cached on disk after)
    source: str


# From docs/performance.md. CPU: SmolLM2-135M (30 x 9 heads) on the project's 2-core machine, 547 tokens/s at 512
# tokens and 165 at 8192. CUDA: Llama-3-8B's shape (32 x 32) in bf16 on an H200, 1,414 tokens/s at 512, 811 at 8192.
SPEED = {
    "cpu": SpeedBasis(1.55e-3, 0.551e-6, 134.5e6, 30 * 9, 16.0, "SmolLM2-135M on a 2-core CPU: 547 tokens/s at 512"),
    "cuda": SpeedBasis(0.672e-3, 0.0685e-6, 8.03e9, 32 * 32, 0.0, "Llama-3-8B in bf16 on an H200: 1,414 tokens/s at 512"),
}


def capture_seconds(cfg: DictConfig, plan: Plan, parameters: int | None) -> float:
    """The capture's time, estimated from the basis of cfg.hardware.device's kind (rough: within about 2x)."""
    basis = SPEED["cuda" if cfg.hardware.device.startswith("cuda") else "cpu"]
    tokens = cfg.data.context_length
    shape = plan.shape
    per_token = basis.per_token * (parameters or basis.parameters) / basis.parameters
    per_token += basis.per_context_token * tokens * shape["layers"] * shape["heads"] / basis.layer_heads
    return plan.n_samples * tokens * per_token


def duration(seconds: float) -> str:
    if seconds < 1:
        return "< 1 s"
    if seconds < 90:
        return f"{seconds:,.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:,.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:,.1f} h"
    return f"{seconds / 86400:,.1f} days"


def dry_run_report(cfg: DictConfig, plan: Plan) -> str:
    return dry_run_estimate(cfg, plan)[0]


def dry_run_estimate(cfg: DictConfig, plan: Plan) -> tuple[str, dict]:
    """(the report, its totals: samples, tokens, rows, bytes, seconds) -- a sweep's dry run adds the totals up."""
    shape, n_samples = plan.shape, plan.n_samples
    tokens = cfg.data.context_length
    batch = min(cfg.hardware.batch_size, n_samples)
    rows_per_sample = shape["layers"] * shape["heads"] * tokens
    rows = n_samples * rows_per_sample
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
            f"resume: {done} of {n_samples} samples done in {sum(map(len, plan.resume.kept.values()))} part(s), "
            f"{len(plan.resume.leftovers)} leftover file(s) to delete"
        )
    else:
        output = "new run"
    basis = SPEED["cuda" if cfg.hardware.device.startswith("cuda") else "cpu"]
    seconds = capture_seconds(cfg, plan, parameters) * (1 - done / max(n_samples, 1))
    first = f", plus ~{basis.first_run_seconds:.0f} s of Numba compilation on a machine's first run" if (
        basis.first_run_seconds) else ""  # fmt: skip
    totals = {"samples": n_samples, "tokens": n_samples * tokens, "rows": rows, "bytes": rows * bytes_per_row,
              "seconds": seconds}  # fmt: skip
    return "\n".join(
        [
            "Spectra dry run: checks passed; no weights loaded, no capture output written",
            f"  model      {cfg.model.name} ({shape['model_type']}): {shape['layers']} layers x {shape['heads']} "
            f"heads, {shape['kv_heads']} KV heads, head_dim {shape['head_dim']}, "
            f"max {shape['max_position_embeddings']} positions; {weights}",
            f"  samples    {n_samples:,} x {tokens} tokens = {n_samples * tokens:,} tokens "
            f"({cfg.data.name}), {-(-n_samples // batch):,} batches of {batch}",
            f"  rows       {rows:,} = samples x layers x heads x tokens ({rows_per_sample:,} per sample)",
            f"  disk       ~{_size(rows * bytes_per_row)} estimated ({bytes_per_row:.1f} B/row: {len(names)} metric "
            f"columns, {cfg.metrics.storage_dtype})",
            f"  memory     per layer and batch: attention scores B x H x T x T float32 would be {_size(scores)}; "
            f"computed {block} query rows at a time within hardware.attention_block_mb="
            f"{cfg.hardware.attention_block_mb}; metrics {_size(metrics_per_layer)}",
            f"  time       ~{duration(seconds)} of capture{first}; estimated from {basis.source} tokens, scaled "
            "by parameters and layers x heads (rough: another machine or model size can differ several-fold)",
            f"  output     {plan.out} ({output})",
            "  run it     the same command without run.dry_run=true",
        ]
    ), totals


def sweep_total(totals: list[dict]) -> str:
    """The last line of a sweep's dry run: what all its jobs add up to."""
    sums = {key: sum(t[key] for t in totals) for key in totals[0]}
    return (
        f"Spectra dry run, sweep total: {len(totals)} jobs, {sums['samples']:,} samples, {sums['tokens']:,} tokens, "
        f"{sums['rows']:,} rows, ~{_size(sums['bytes'])} on disk, ~{duration(sums['seconds'])} of capture "
        "(jobs one after another)"
    )
