"""Hydra instantiates launchers only from the `hydra_plugins` namespace; the code is in spectra/launch/slurm.py.

    python -m spectra.run -m hydra/launcher=slurm hydra.launcher.partition=debug model=tiny_llama data=synthetic
"""

from spectra.launch.slurm import SlurmLauncher


class SpectraSlurmLauncher(SlurmLauncher):
    """conf/hydra/launcher/slurm.yaml's _target_."""
