"""Weights & Biases view of a capture: the config, throughput while it runs, summaries and heatmaps at the end.

    python -m spectra.run                                  # logger=wandb: online with credentials, else offline
    WANDB_MODE=offline python -m spectra.run               # never online; upload later with
    wandb sync <run dir>/wandb/offline-run-*               #   (offline runs need no account until then)
    python -m spectra.run logger=none                      # no W&B
    wandb leet inspect --summary <run dir>/wandb/latest-run  # what an offline run logged, without network

The Parquet files are the record; W&B is a view of them. At the end the per-layer and per-(layer, head)
summaries are computed from the written Parquet (so they describe exactly what is on disk), and the run
directory is recorded as a dataset artifact by reference, never uploaded. A run that fails or is interrupted
still finishes its W&B run, marked with the error. Under torchrun only rank 0 logs: its throughput history is
its own share's, while the end-of-run totals and summaries cover every rank's parts.
"""

from __future__ import annotations

import netrc
import os
import secrets
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import polars as pl
import psutil
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from spectra.errors import ConfigError, SpectraError
from spectra.launch.distributed import World
from spectra.store.manifest import verified_parts

HEATMAP_METRICS = ("entropy", "max_attn", "k_eff")
ONLINE_START_SECONDS = 20  # how long an online W&B start may take before the run goes on offline
ARTIFACT_PATHS = ("metrics", "samples.parquet", "run.json")  # what a run directory holds (see writer.py)
RUN_ID_FILE = Path("wandb") / "run-id"  # the W&B run of a run directory, kept inside it: a resume continues it


class Tracker:
    """No tracking (logger=none, mode disabled, or a rank other than 0): every call does nothing."""

    def log_progress(self, *, samples: int, samples_total: int, tokens: int, rows: int, seconds: float) -> None:
        pass

    def log_results(self, record: dict) -> None:
        pass

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        pass



def metric_parts(run_dir: Path) -> list[Path]:
    """The run's part files as a list, each verified against its manifest line (the rule every reader of parts
    follows); a list, not a glob: a folder Hydra names after a list-valued key holds `[` `]`, which a glob pattern
    would read as a character class."""
    return verified_parts(run_dir)

def start_tracker(cfg: DictConfig, run_dir: Path, world: World) -> Tracker:
    """The tracker the config asks for; only rank 0 of a torchrun group tracks."""
    if cfg.logger.name == "none" or not world.is_main:
        return Tracker()
    mode = wandb_mode(cfg.logger.mode)
    if mode == "disabled":
        return Tracker()
    return WandbTracker(cfg, run_dir, mode)


def has_credentials() -> bool:
    """Whether W&B would log in without asking: an API key in the environment or in ~/.netrc (`wandb login`)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.path.expanduser(os.environ.get("NETRC", "~/.netrc"))).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(configured: str) -> str:
    """online | offline | disabled. auto: WANDB_MODE when set, else online exactly when credentials exist."""
    key = "logger.mode"
    if configured == "auto" and os.environ.get("WANDB_MODE"):
        key, configured = "WANDB_MODE", os.environ["WANDB_MODE"]
    elif configured == "auto":
        configured = "online" if has_credentials() else "offline"
    mode = {"dryrun": "offline", "run": "online"}.get(configured, configured)  # W&B's older spellings
    if mode not in ("online", "offline", "disabled"):
        raise ConfigError(key, f"must be online, offline or disabled, got {configured!r}")
    if mode == "online" and not has_credentials():
        # wandb.init would prompt for a key (or fail on a non-terminal); say what to do instead.
        raise ConfigError(key, "online, but no W&B credentials: run `wandb login`, set WANDB_API_KEY, or use offline")
    return mode


def hydra_job() -> DictConfig | None:
    return HydraConfig.get() if HydraConfig.initialized() else None


def run_name(cfg: DictConfig) -> str:
    """logger.run_name, or the model name followed by the overrides that made this run (W&B allows 128 chars)."""
    if cfg.logger.run_name:
        return cfg.logger.run_name
    job = hydra_job()
    overrides = [o for o in (job.overrides.task if job else []) if not o.startswith(("hydra", "logger", "model="))]
    return " ".join([cfg.model.name, *overrides])[:128]


def run_group(cfg: DictConfig) -> str | None:
    """logger.group, or the sweep directory, which every job of one multirun shares (launched in any process)."""
    if cfg.logger.group:
        return cfg.logger.group
    job = hydra_job()
    if job is None or job.mode != RunMode.MULTIRUN:
        return None
    return str(job.sweep.dir)[-128:]


def summary_frame(parts: list[Path], keys: list[str], names: list[str], quantiles: list[float]) -> pl.DataFrame:
    """One row per `keys` value and metric, from the run's Parquet parts: count, mean, std, min, quantiles, max."""
    rows = pl.scan_parquet(parts, glob=False)
    frames = []
    for name in names:
        value = pl.col(name).cast(pl.Float64)
        frames.append(
            rows.group_by(keys).agg(
                pl.lit(name).alias("metric"),
                value.count().alias("count"),
                value.mean().alias("mean"),
                value.std().alias("std"),
                value.min().alias("min"),
                *[value.quantile(q, interpolation="linear").alias(f"p{q * 100:g}") for q in quantiles],
                value.max().alias("max"),
            )
        )
    return pl.concat(pl.collect_all(frames)).sort([*keys, "metric"])


def heatmap(per_head: pl.DataFrame, metric: str, layers: int, heads: int) -> np.ndarray:
    """A layer x head picture of one metric's mean, rendered with a colour bar: (height, width, 4) RGBA bytes."""
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters; W&B only needs the rendered image
    import matplotlib.pyplot as plt

    rows = per_head.filter(pl.col("metric") == metric)
    grid = np.full((layers, heads), np.nan)
    grid[rows["layer"].to_numpy(), rows["head"].to_numpy()] = rows["mean"].to_numpy()  # (L, H)
    figure, axes = plt.subplots(figsize=(2 + 0.25 * heads, 1.5 + 0.25 * layers))
    image = axes.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
    axes.set(xlabel="head", ylabel="layer", title=f"mean {metric}")
    figure.colorbar(image, ax=axes).ax.ticklabel_format(useOffset=False)  # plain values, not "+1.916" offsets
    figure.tight_layout()
    figure.canvas.draw()
    pixels = np.array(figure.canvas.buffer_rgba())  # (height, width, 4)
    plt.close(figure)
    return pixels


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of this run directory: made on its first start, read back on every resume. Random rather
    than derived from the path, so that two machines' `outputs/demo` never share a W&B run."""
    path = run_dir / RUN_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    run_id = secrets.token_hex(4)  # W&B's own ids are 8 characters of [a-z0-9]
    path.write_text(run_id + "\n")
    return run_id


class WandbTracker(Tracker):
    """One W&B run per capture, its files inside the run directory (<run dir>/wandb)."""

    def __init__(self, cfg: DictConfig, run_dir: Path, mode: str):
        import wandb

        self.wandb = wandb
        self.cfg = cfg
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        options = dict(
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            group=run_group(cfg),
            job_type=cfg.logger.job_type,
            name=run_name(cfg),
            tags=list(cfg.logger.tags),
            config=OmegaConf.to_container(cfg, resolve=True),
            dir=str(run_dir),
            reinit="finish_previous",  # a multirun runs many jobs in one process
            id=wandb_run_id(run_dir),
            resume="allow",  # one W&B run per run directory, however often it is resumed
            # W&B's ~30 lines of banners and history would bury Spectra's summary: __exit__ prints one line
            settings=wandb.Settings(silent=True),
        )
        # A key without a network would wait wandb's default 90 s (and retry) before the offline fallback below.
        online = dict(settings=wandb.Settings(silent=True, init_timeout=ONLINE_START_SECONDS))
        try:
            self.run = wandb.init(mode=mode, **(options | online if mode == "online" else options))
        except Exception as error:  # the server unreachable, a bad entity: the capture matters more than the view
            if mode != "online":
                raise SpectraError(f"logger: wandb.init failed: {str(error).splitlines()[0]}") from None
            print(f"spectra: W&B online start failed ({str(error).splitlines()[0]}); logging offline instead")
            self.run = wandb.init(mode="offline", **options)

    def log_progress(self, *, samples: int, samples_total: int, tokens: int, rows: int, seconds: float) -> None:
        seconds = max(seconds, 1e-9)
        stats = {
            "progress/samples": samples,
            "progress/fraction": samples / samples_total,
            "throughput/tokens_per_s": tokens / seconds,
            "throughput/samples_per_s": samples / seconds,
            "throughput/rows_per_s": rows / seconds,
            "time/elapsed_s": seconds,
            "time/eta_s": seconds * (samples_total - samples) / max(samples, 1),
            "memory/rss_mib": psutil.Process().memory_info().rss / 2**20,
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            stats["memory/cuda_allocated_mib"] = torch.cuda.memory_allocated() / 2**20
            stats["memory/cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        self.run.log(stats)

    def log_results(self, record: dict) -> None:
        try:
            self._log_results(record)
        except Exception as error:  # the capture is complete on disk; a failed view must not fail the run
            print(f"spectra: W&B end-of-run summaries failed ({type(error).__name__}: {error}); the Parquet is complete")
            self.run.summary["summaries_error"] = f"{type(error).__name__}: {error}"[:1000]

    def _log_results(self, record: dict) -> None:
        run_dir = self.run_dir
        names = list(self.cfg.metrics.names)
        quantiles = list(self.cfg.logger.quantiles)
        parts = metric_parts(run_dir)  # verified once, read three times
        per_layer = summary_frame(parts, ["layer"], names, quantiles)
        per_head = summary_frame(parts, ["layer", "head"], names, quantiles)
        layers, heads = record["model"]["layers"], record["model"]["heads"]
        images = {
            f"heatmap/mean_{metric}": self.wandb.Image(heatmap(per_head, metric, layers, heads))
            for metric in HEATMAP_METRICS
            if metric in names
        }
        self.run.log(
            {
                "summary/per_layer": self.wandb.Table(columns=per_layer.columns, data=per_layer.rows()),
                "summary/per_head": self.wandb.Table(columns=per_head.columns, data=per_head.rows()),
                **images,
            }
        )
        means = pl.scan_parquet(parts, glob=False).select(pl.col(names).mean()).collect()
        self.run.summary.update(
            {
                **{f"totals/{key}": value for key, value in record["counts"].items()},
                **{f"timing/{key}": value for key, value in record["timing"].items()},
                **{f"mean/{name}": means[name][0] for name in names},
                "run_dir": record["output_dir"],
            }
        )
        artifact = self.wandb.Artifact(
            f"capture-{self.run.id}", type="dataset", metadata={"model": record["model"], **record["counts"]}
        )
        for name in ARTIFACT_PATHS:  # references only: W&B records paths, sizes and digests, copies nothing
            artifact.add_reference((run_dir.resolve() / name).as_uri(), name=name, checksum=False)
        self.run.log_artifact(artifact)

    def __exit__(self, kind, error, traceback) -> None:
        status = "finished" if error is None else "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        self.run.summary["status"] = status
        if error is not None:
            self.run.summary["error"] = f"{type(error).__name__}: {error}"[:1000]
        if self.run.offline:
            files = Path(self.run.dir).parent  # <run dir>/wandb/offline-run-<time>-<id>
            where = f"W&B: run {self.run.id} logged offline to {files}; upload it with: wandb sync {files}"
        else:
            where = f"W&B: {self.run.url}"
        try:
            self.run.finish(exit_code={"finished": 0, "interrupted": 130, "failed": 1}[status])
        except Exception as finish_error:  # never hide the capture's own error behind W&B's
            print(f"spectra: W&B finish failed: {finish_error}")
            return
        print(where)
