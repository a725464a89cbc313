"""W&B tracking, checked from the offline run file itself: `wandb leet inspect` reads it without network.

One real capture (tiny Llama, synthetic data) runs with the default logger, no credentials and no WANDB_MODE:
it must go offline on its own, write its W&B files into the run directory, and log what the Parquet holds.
"""

from __future__ import annotations

import json
import re

import numpy as np
import polars as pl
import pytest
from conftest import compose_config, run_module_inprocess, spectra_subprocess
from conftest import (
    wandb_env as offline_env,
)
from wandb_files import inspect_records, inspect_summary, run_file

from spectra.config.schema import checked_config
from spectra.errors import ConfigError, SpectraError
from spectra.tracking.tracker import WandbTracker, wandb_mode

OVERRIDES = ["model=tiny_llama", "data=synthetic", "data.context_length=16", "data.n_samples=4", "logger.tags=[test]"]
LAYERS, HEADS, TOKENS, SAMPLES = 3, 8, 16, 4
METRICS = ["query_norm", "entropy", "max_attn", "k_eff"]
QUANTILES = [0.05, 0.25, 0.5, 0.75, 0.95]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A finished capture with the default logger on a machine without W&B credentials."""
    tmp = tmp_path_factory.mktemp("tracked")
    env = offline_env(tmp)
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        env.pop(name, None)
    # A fresh machine: no `wandb login` (W&B reads NETRC, else ~/.netrc, when it starts; its settings file is in
    # test_env's WANDB_CONFIG_DIR).
    env["NETRC"] = str(tmp / "home" / ".netrc")
    run_dir = tmp / "run"
    result = spectra_subprocess("spectra.run", [*OVERRIDES, f"hydra.run.dir={run_dir}"], env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    path = run_file(run_dir)
    return {
        "tmp": tmp,
        "run_dir": run_dir,
        "run_json": json.loads((run_dir / "run.json").read_text()),
        "summary": inspect_summary(path),
        "records": inspect_records(path),
        "parquet": pl.read_parquet(run_dir / "metrics" / "*.parquet"),
        "files": path.parent / "files",
    }


def test_offline_without_credentials_and_files_inside_run_dir(tracked):
    assert tracked["summary"]["state"] == "finished" and tracked["summary"]["exit_code"] == 0
    assert tracked["summary"]["summary"]["status"] == "finished"
    # WANDB_DIR points elsewhere; the run's files still go to <run dir>/wandb only.
    assert not list(tracked["tmp"].glob("wandb/**/*.wandb"))
    assert tracked["summary"]["file"].startswith(str(tracked["run_dir"] / "wandb"))


def test_config_name_and_job_type(tracked):
    assert tracked["summary"]["config"] == tracked["run_json"]["config"]
    assert tracked["summary"]["config"]["data"]["context_length"] == TOKENS
    (run,) = [r["run"] for r in tracked["records"] if r["type"] == "run"]
    assert run["job_type"] == "capture"
    assert run["project"] == "spectra"
    assert run["display_name"] == "tiny_llama " + " ".join(OVERRIDES[1:4])  # logger.* overrides are left out
    assert run["tags"] == ["test"]
    assert not run.get("run_group")  # a single run belongs to no sweep


def test_throughput_history_one_point_per_batch(tracked):
    history = [r["history"]["item"] for r in tracked["records"] if r["type"] == "history"]
    progress = [h for h in history if "throughput/tokens_per_s" in h]
    assert [h["progress/samples"] for h in progress] == [1, 2, 3, 4]  # batch_size 1
    for point in progress:
        done, seconds = point["progress/samples"], point["time/elapsed_s"]
        assert point["throughput/tokens_per_s"] == pytest.approx(done * TOKENS / seconds)
        assert point["throughput/samples_per_s"] == pytest.approx(done / seconds)
        assert point["throughput/rows_per_s"] == pytest.approx(done * TOKENS * LAYERS * HEADS / seconds)
        assert point["time/eta_s"] == pytest.approx(seconds * (SAMPLES - done) / done)
        assert point["memory/rss_mib"] > 50  # torch alone is more than that
        assert "memory/cuda_allocated_mib" not in point  # CPU run
    assert [h["time/elapsed_s"] for h in progress] == sorted(h["time/elapsed_s"] for h in progress)


def test_summary_totals_match_parquet(tracked):
    summary, parquet = tracked["summary"]["summary"], tracked["parquet"]
    counts = tracked["run_json"]["counts"]
    assert summary["totals/rows"] == counts["rows"] == parquet.height == SAMPLES * LAYERS * HEADS * TOKENS
    assert summary["totals/part_files"] == SAMPLES
    assert summary["timing/capture_seconds"] == pytest.approx(tracked["run_json"]["timing"]["capture_seconds"])
    for name in METRICS:
        assert summary[f"mean/{name}"] == pytest.approx(parquet[name].to_numpy().astype(np.float64).mean(), rel=1e-6)
    for name in ("entropy", "max_attn", "k_eff"):
        image = summary[f"heatmap/mean_{name}"]
        assert image["_type"] == "image-file" and image["format"] == "png"
        png = tracked["files"] / image["path"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size == image["size"]


@pytest.mark.parametrize("key, keys", [("summary/per_head", ["layer", "head"]), ("summary/per_layer", ["layer"])])
def test_summary_tables_match_numpy(tracked, key, keys):
    logged = tracked["summary"]["summary"][key]
    groups = LAYERS * HEADS if len(keys) == 2 else LAYERS
    columns = len(keys) + 1 + 5 + len(QUANTILES)  # keys, metric, count/mean/std/min/max, quantiles
    assert (logged["nrows"], logged["ncols"]) == (groups * len(METRICS), columns)

    table = json.loads((tracked["files"] / logged["path"]).read_text())
    assert table["columns"] == [*keys, "metric", "count", "mean", "std", "min", "p5", "p25", "p50", "p75", "p95", "max"]
    parquet = tracked["parquet"]
    for row in table["data"]:
        record = dict(zip(table["columns"], row))
        where = np.ones(parquet.height, dtype=bool)
        for k in keys:
            where &= parquet[k].to_numpy() == record[k]
        values = parquet[record["metric"]].to_numpy()[where].astype(np.float64)
        assert record["count"] == len(values) == SAMPLES * TOKENS * (HEADS if len(keys) == 1 else 1)
        assert record["mean"] == pytest.approx(values.mean(), rel=1e-9)
        assert record["std"] == pytest.approx(values.std(ddof=1), rel=1e-9)
        assert record["min"] == values.min() and record["max"] == values.max()
        for q in QUANTILES:
            assert record[f"p{q * 100:g}"] == pytest.approx(np.quantile(values, q), rel=1e-9)


def test_parquet_recorded_as_dataset_artifact_by_reference(tracked):
    (artifact,) = [r["artifact"] for r in tracked["records"] if r["type"] == "artifact" and r["artifact"]["type"] == "dataset"]
    entries = {e["path"]: e for e in artifact["manifest"]["contents"]}
    run_dir = tracked["run_dir"].resolve()
    expected = {f"metrics/part-{i:06d}.parquet" for i in range(SAMPLES)} | {"samples.parquet", "run.json"}
    assert set(entries) == expected
    for path, entry in entries.items():
        assert entry["ref"] == (run_dir / path).as_uri()  # a reference, not an uploaded copy
        assert int(entry["size"]) == (run_dir / path).stat().st_size
    assert json.loads(artifact["metadata"])["rows"] == tracked["run_json"]["counts"]["rows"]


@pytest.mark.parametrize(
    "environment, configured, expected",
    [
        ({"WANDB_MODE": "offline"}, "auto", "offline"),
        ({"WANDB_MODE": "disabled", "WANDB_API_KEY": "x" * 40}, "auto", "disabled"),
        ({"WANDB_MODE": "dryrun"}, "auto", "offline"),
        ({}, "auto", "offline"),  # no credentials anywhere: offline, never a prompt
        ({"WANDB_API_KEY": "x" * 40}, "auto", "online"),
        ({"WANDB_API_KEY": "x" * 40, "WANDB_MODE": "offline"}, "auto", "offline"),
        ({"WANDB_MODE": "online"}, "offline", "offline"),  # an explicit logger.mode wins over the environment
        ({"NETRC_ENTRY": "api.wandb.ai"}, "auto", "online"),  # `wandb login` wrote ~/.netrc
        ({"NETRC_ENTRY": "other.example.com"}, "auto", "offline"),
    ],
)
def test_mode(monkeypatch, tmp_path, environment, configured, expected):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    netrc = tmp_path / ".netrc"
    if host := environment.pop("NETRC_ENTRY", None):
        netrc.write_text(f"machine {host}\n  login user\n  password {'k' * 40}\n")
        netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert wandb_mode(configured) == expected


def test_mode_errors_name_the_setting(monkeypatch, tmp_path):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"^logger.mode: online, but no W&B credentials"):
        wandb_mode("online")
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(ConfigError, match=r"^WANDB_MODE: online, but no W&B credentials"):
        wandb_mode("auto")
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ConfigError, match=r"^WANDB_MODE: must be online, offline or disabled, got 'sometimes'"):
        wandb_mode("auto")
    with pytest.raises(ConfigError, match=r"^logger.mode: must be one of auto, online, offline, disabled"):
        checked_config(compose_config("logger.mode=sometimes"))
    with pytest.raises(ConfigError, match=r"^logger.name: must be none or wandb"):
        checked_config(compose_config("logger.name=tensorboard"))


@pytest.mark.parametrize(
    "error, status, exit_code",
    [(KeyboardInterrupt(), "interrupted", 130), (SpectraError("data.n_samples: too many"), "failed", 1)],
)
def test_failed_or_interrupted_capture_still_finishes_its_run(monkeypatch, tmp_path, error, status, exit_code):
    for name, value in offline_env(tmp_path).items():
        if name.startswith("WANDB_"):
            monkeypatch.setenv(name, value)
    cfg = checked_config(compose_config("model=tiny_llama", "logger.run_name=doomed"))
    run_dir = tmp_path / "run"
    with pytest.raises(type(error)):
        with WandbTracker(cfg, run_dir, "offline"):
            raise error
    summary = inspect_summary(run_file(run_dir))
    assert (summary["state"], summary["exit_code"], summary["name"]) == ("failed", exit_code, "doomed")
    assert summary["summary"]["status"] == status
    assert summary["summary"]["error"] == f"{type(error).__name__}: {error}"


def test_one_quiet_wandb_run_per_run_directory_across_resumes(monkeypatch, tmp_path, tracked, capfd):
    """A resumed run logs into the W&B run it started (same id, resume='allow'); another run directory gets
    another id; resuming a finished run starts no W&B run at all. W&B itself prints nothing; Spectra prints
    where the run is and how to upload it, in one line."""
    for name, value in offline_env(tmp_path).items():
        if name.startswith("WANDB_"):
            monkeypatch.setenv(name, value)
    monkeypatch.delenv("WANDB_SILENT")
    cfg = checked_config(compose_config("model=tiny_llama"))
    for run_dir in (tmp_path / "a", tmp_path / "a", tmp_path / "b"):  # a started, a resumed, another run
        with WandbTracker(cfg, run_dir, "offline"):
            pass
    out, err = capfd.readouterr()
    assert "wandb:" not in (out + err).lower(), out + err
    lines = out.splitlines()
    assert len(lines) == 3 and all(re.fullmatch(r"W&B: run \w+ logged offline to (\S+); upload it with: wandb sync \1",
                                                line) for line in lines), lines  # fmt: skip
    # offline-run-<date>_<time>-<id>, and "-1" after it when two starts share a second
    ids = {name: {re.match(r"offline-run-\d+_\d+-(\w+)", p.name)[1] for p in (tmp_path / name / "wandb").glob("offline-run-*")}
           for name in ("a", "b")}  # fmt: skip
    assert len(list((tmp_path / "a" / "wandb").glob("offline-run-*"))) == 2 and len(ids["a"]) == 1, ids
    assert ids["a"] == {(tmp_path / "a" / "wandb" / "run-id").read_text().strip()} and ids["a"] != ids["b"]

    finished = tracked["run_dir"]
    before = sorted(finished.glob("wandb/offline-run-*"))
    result = run_module_inprocess("spectra.run", *OVERRIDES, f"hydra.run.dir={finished}", "run.resume=true",
                                  env=offline_env(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(finished.glob("wandb/offline-run-*")) == before and len(before) == 1
