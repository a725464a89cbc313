"""Where the YAML configs are: `conf/` at the repository's top level is their one source; building a wheel maps
it into the package as `spectra/conf/` (pyproject.toml), so an installed Spectra finds them there and a checkout
(editable install, or PYTHONPATH) finds them next to the package.

    python -m spectra.run --cfg job          # composes from whichever of the two this Spectra has
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import hydra
from omegaconf import DictConfig

from spectra.errors import SpectraError

PACKAGE = Path(__file__).resolve().parents[1]  # spectra/


def config_dir() -> str:
    """The folder holding config.yaml: spectra/conf/ when installed from a wheel, else the checkout's conf/."""
    installed, checkout = PACKAGE / "conf", PACKAGE.parent / "conf"
    for candidate in (installed, checkout):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise SpectraError(
        f"Spectra's config folder is missing: neither {installed} (installed) nor {checkout} (checkout) holds "
        "config.yaml; reinstall Spectra from its repository (pip install <checkout or git URL>)"
    )


def hydra_entrypoint(task: Callable[[DictConfig], object], config_name: str, program: str) -> None:
    """Runs `task` under hydra.main with the config folder found now, not at import: a missing folder ends in
    one line `<program>: error: ...` instead of Hydra's traceback or a baffling "no option '?'"."""
    try:
        directory = config_dir()
    except SpectraError as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        sys.exit(2)
    hydra.main(version_base="1.3", config_path=directory, config_name=config_name)(task)()
