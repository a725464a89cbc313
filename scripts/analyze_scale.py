"""How spectra.analyze scales: writes a synthetic run of the capture's layout, analyses it, prints time and peak memory.

    python scripts/analyze_scale.py                                   # 32 layers x 32 heads x 512 tokens x 8 samples
    python scripts/analyze_scale.py --samples 64 --dir /tmp/big       # 33.5M rows, Llama-3-8B's shape at 512 tokens

The metric values are random (shaped like real ones: entropy <= ln(t+1), k_eff <= t+1); only sizes matter here.
Peak memory is the analysis process's maximum resident set, to compare with the rows' in-memory size.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from spectra.store.writer import metric_schema, metric_table, write_parquet_atomic  # noqa: E402


def write_run(folder: Path, layers: int, heads: int, tokens: int, samples: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    schema = metric_schema(["query_norm", "entropy", "max_attn", "k_eff"])
    t = np.arange(tokens)
    rows = 0
    for sample in range(samples):
        shape = (layers, 1, heads, tokens)  # (L, B, H, T), as the capture hands batches to the writer
        entropy = rng.random(shape) * np.log(t + 1)
        metrics = {
            "query_norm": rng.lognormal(0, 0.5, shape).astype(np.float32),
            "entropy": entropy.astype(np.float32),
            "max_attn": np.exp(-entropy).astype(np.float32),
            "k_eff": np.minimum(np.ceil(np.exp(entropy)), t + 1).astype(np.int32),
        }
        table = metric_table(np.array([sample]), metrics, schema)
        write_parquet_atomic(table, folder / "metrics" / f"part-{sample:06d}.parquet")
        rows += table.num_rows
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--dir", type=Path, default=Path("outputs/analyze_scale"))
    args = parser.parse_args()

    (args.dir / "metrics").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = write_run(args.dir, args.layers, args.heads, args.tokens, args.samples)
    on_disk = sum(p.stat().st_size for p in (args.dir / "metrics").glob("part-*.parquet"))
    print(f"wrote {rows:,} rows, {on_disk / 2**20:.1f} MiB in {args.samples} parts ({time.perf_counter() - started:.1f} s)")

    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "spectra.analyze", f"run_dir={args.dir}", "top_heads=2"], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
    in_memory = rows * (4 + 2 + 2 + 4 + 3 * 4 + 4)  # the rows as stored types, uncompressed
    print(f"analysed in {seconds:.1f} s ({rows / seconds:,.0f} rows/s); peak RSS {peak / 2**20:.0f} MiB "
          f"vs {in_memory / 2**20:.0f} MiB for the rows in memory")  # fmt: skip


if __name__ == "__main__":
    main()
