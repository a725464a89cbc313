"""Hydra instantiates launchers only from the `hydra_plugins` namespace; the code is in spectra/launch/.

    python -m spectra.run -m hydra/launcher=submitit_local model=tiny_llama data=synthetic data.context_length=16,32
    python -m spectra.run -m hydra/launcher=slurm hydra.launcher.partition=debug model=tiny_llama data=synthetic
"""

from spectra.launch.slurm import SlurmLauncher
from spectra.launch.submitit_local import LocalLauncher


class SpectraLocalLauncher(LocalLauncher):
    """hydra/launcher=submitit_local's _target_ (spectra/config/schema.py registers it under that name)."""


class SpectraSlurmLauncher(SlurmLauncher):
    """conf/hydra/launcher/slurm.yaml's _target_."""
