"""Read what an offline W&B run logged, from its .wandb file, with `wandb leet inspect` (no network)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

WANDB = str(Path(sys.executable).parent / "wandb")


def run_file(run_dir: Path) -> Path:
    """The one offline W&B run file inside a run directory."""
    files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    return files[0]


def inspect_summary(path: Path) -> dict:
    """State, name, config and latest summary of the run."""
    out = subprocess.run([WANDB, "leet", "inspect", "--summary", "--json", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def inspect_records(path: Path) -> list[dict]:
    """Every record of the run's transaction log: run, history, summary, artifact, ..."""
    out = subprocess.run([WANDB, "leet", "inspect", "--json", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
