"""The README's commands run as written: each ```bash block line by line (each line a simple command; the
`.venv/bin/python -m spectra.*` ones forked from a prestarted interpreter, tests/prestarted.py) and each ```python
block, in README order, in an empty folder standing in for a fresh clone (its .venv is this checkout's, already set up
as scripts/setup.sh leaves it). ```sh blocks need the hub, a GPU, a cluster or minutes and are not run."""

from __future__ import annotations

import re
import shlex
import subprocess

from conftest import REPO, spectra_subprocess
from conftest import test_env as subprocess_env  # as: pytest would collect a test_* name

README = REPO / "README.md"
BLOCK = re.compile(r"^```(bash|python|sh)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(kinds: tuple[str, ...]) -> list[tuple[str, str]]:
    return [(kind, code) for kind, code in BLOCK.findall(README.read_text()) if kind in kinds]


def commands(kind: str, code: str) -> list[list[str]]:
    """A python block as one command; a bash block line by line (each a simple command: no pipes, no
    continuation lines, checked here), so that `.venv/bin/python -m spectra.*` lines can be forked."""
    if kind == "python":
        return [[".venv/bin/python", "-c", code]]
    lines = [line for line in code.splitlines() if line.split("#")[0].strip()]
    assert not any(line.rstrip().endswith("\\") or re.search(r"[|;&<>`$]", line.split("#")[0]) for line in lines), code
    return [shlex.split(line, comments=True) for line in lines]


def test_every_command_uses_the_venv():
    """No bare `python`/`torchrun`/`wandb`: they fail outside an activated venv (issue 14)."""
    for kind, code in blocks(("bash", "sh")):
        for line in code.splitlines():
            command = line.split("#")[0].strip()
            assert not re.match(r"(python3?|torchrun|wandb|pytest) ", command), f"bare command in README: {line}"


def test_readme_blocks_run_as_written(tmp_path):
    runnable = blocks(("bash", "python"))
    assert sum(kind == "bash" for kind, _ in runnable) >= 4 and sum(kind == "python" for kind, _ in runnable) >= 2
    (tmp_path / ".venv").symlink_to(REPO / ".venv")
    (tmp_path / "scripts").symlink_to(REPO / "scripts")
    outputs = []
    for kind, code in runnable:
        for command in commands(kind, code):
            if command[:2] == [".venv/bin/python", "-m"] and command[2].startswith("spectra."):
                # The entrypoint as written, forked from an interpreter that has imported Spectra (prestarted.py).
                result = spectra_subprocess(command[2], command[3:], subprocess_env(tmp_path), cwd=tmp_path)
            else:
                result = subprocess.run(command, cwd=tmp_path, env=subprocess_env(tmp_path), capture_output=True,
                                        text=True, timeout=600)  # fmt: skip
            # W&B is disabled (test_env): test_tracking.py proves what runs log there.
            assert result.returncode == 0, f"README {kind} block failed:\n{command}\n{result.stderr[-3000:]}"
            outputs.append(result.stdout)
    assert (tmp_path / "outputs" / "demo" / "analysis" / "report.md").is_file()
    sweep = tmp_path / "outputs" / "sweep" / "analysis"
    assert (sweep / "comparison.parquet").is_file()  # its values: test_analyze.py's two-job sweep
    assert "figures/sweep_entropy.png" in (sweep / "report.md").read_text()
    assert (sweep / "figures" / "sweep_entropy.png").is_file()
    # The window snippet's claim: on tiny_gemma2's sliding layer, n = min(t + 1, 16), so k_eff / n ~ 15/16 at t = 63.
    assert re.search(r"│ 0\s+┆ 0\.9[3-4]\d*", "".join(outputs)), outputs
