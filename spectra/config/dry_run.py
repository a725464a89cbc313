"""The dry run's report: what a run would do (model shape, samples, rows, disk, memory, output), from the plan alone.

    python -m spectra.run model=tiny_llama data=synthetic run.dry_run=true
    python -m spectra.run model=smollm2_135m data.context_length=1024 data.n_samples=64 run.dry_run=true
"""

from __future__ import annotations

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
