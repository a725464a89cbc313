"""Read what an offline W&B run logged, from its .wandb file, with `wandb leet inspect` (no network).

The command that `wandb leet inspect` itself runs, wandb-core's, is called directly: the same reader and the same
JSON, without a Python interpreter importing wandb first (1.2 s against 0.06 s here)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

WANDB_CORE = str(Path(importlib.util.find_spec("wandb").origin).parent / "bin" / "wandb-core")


def inspect(path: Path, *flags: str) -> str:
    """stdout of wandb/cli/leet.py's launch_inspect for an offline run file: its arguments, as it builds them."""
    run_file = Path(path).resolve()
    command = [WANDB_CORE, "leet", "inspect", "--no-observability", *flags, "--json", "--run-file", str(run_file),
               str(run_file.parent.parent)]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def run_file(run_dir: Path) -> Path:
    """The one offline W&B run file inside a run directory."""
    files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    return files[0]


def inspect_summary(path: Path) -> dict:
    """State, name, config and latest summary of the run."""
    return json.loads(inspect(path, "--summary"))


def inspect_records(path: Path) -> list[dict]:
    """Every record of the run's transaction log: run, history, summary, artifact, ..."""
    return [json.loads(line) for line in inspect(path).splitlines() if line.strip()]
