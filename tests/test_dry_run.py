"""run.dry_run=true: validates, prints what the run would do, loads no weights and writes nothing.

    python -m pytest tests/test_dry_run.py -q
"""

from __future__ import annotations

import json
from unittest import mock

from conftest import run_spectra_inprocess

ARGS = ["model=tiny_llama", "data=synthetic", "data.context_length=16", "data.n_samples=5", "hardware.batch_size=2",
        "logger=none"]  # fmt: skip


def tiny_llama_parameters() -> int:
    """Counted by hand from conf/model/tiny_llama.yaml (tied embeddings), independently of transformers."""
    vocab, hidden, inner, layers, heads, kv_heads, head_dim = 128256, 64, 128, 3, 8, 2, 8
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o + k, v
    per_layer = attention + 3 * hidden * inner + 2 * hidden  # + gate/up/down + two RMSNorms
    return vocab * hidden + layers * per_layer + hidden


def test_dry_run_prints_the_plan_without_loading_weights(tmp_path):
    run_dir = tmp_path / "run"
    with mock.patch("spectra.run.load_weights", side_effect=AssertionError("a dry run loaded the weights")):
        code, stdout, stderr = run_spectra_inprocess(*ARGS, "run.dry_run=true", f"hydra.run.dir={run_dir}")
    assert code == 0, stderr
    lines = {line.split()[0]: line for line in stdout.splitlines()[1:]}
    assert "3 layers x 8 heads, 2 KV heads, head_dim 8, max 8192 positions" in lines["model"]
    assert f"{tiny_llama_parameters() / 1e6:,.1f}M parameters" in lines["model"]
    assert "5 x 16 tokens = 80 tokens (synthetic), 3 batches of 2" in lines["samples"]
    assert f"{5 * 3 * 8 * 16:,} = samples x layers x heads x tokens" in lines["rows"]
    scores = 2 * 8 * 16 * 16 * 4  # (B, H, T, T) float32
    assert f"would be {scores / 1024:.1f} KiB" in lines["memory"]
    assert "(new run)" in lines["output"]
    assert not (run_dir / "metrics").exists() and not (run_dir / "manifest.jsonl").exists()


def test_dry_run_of_a_killed_run_reports_the_resume_and_changes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    code, _, stderr = run_spectra_inprocess(*ARGS, f"hydra.run.dir={run_dir}")
    assert code == 0, stderr
    # Make it look killed after its first part: the manifest lists one part, two more parts are unlisted.
    manifest = run_dir / "manifest.jsonl"
    manifest.write_text("".join(manifest.read_text().splitlines(keepends=True)[:2]))
    before = sorted(p.name for p in run_dir.rglob("*"))

    code, stdout, stderr = run_spectra_inprocess(
        *ARGS, "run.dry_run=true", "run.resume=true", f"hydra.run.dir={run_dir}"
    )
    assert code == 0, stderr
    # Leftovers: the two unlisted parts (run.json stays until the resume's own replaces it).
    assert "(resume: 2 of 5 samples done in 1 part(s), 2 leftover file(s) to delete)" in stdout
    assert sorted(p.name for p in run_dir.rglob("*")) == before
    assert json.loads((run_dir / "run.json").read_text())["counts"]["part_files"] == 3
