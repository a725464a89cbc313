"""Ranks and launchers: torchrun, submitit (conf/hydra/launcher)."""
