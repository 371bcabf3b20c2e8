"""Host-side experiment drivers, one module per method. Each exposes:

  validate_config(config) -> None   raises ValueError naming the bad field, before any work
  run(config, workdir) -> dict      trains / evaluates, writes everything into workdir

and may set SPLIT_HOST_WHEN_FEDERATED = True: `fer_jax.main` then runs its federated mode on one
CPU device per core (measured faster for that experiment; the others keep one CPU device).

`get(name)` imports only the requested module, so a run never pays for the others' imports.
"""

from __future__ import annotations

import importlib

EXPERIMENTS = ("supervised", "prepare", "evaluate", "fedaffect", "diversity", "occlusion",
               "vfer")


def get(name: str):
    """The experiment module for `config.experiment`."""
    if name not in EXPERIMENTS:
        raise ValueError(f"config.experiment={name!r} is not an experiment; expected one of "
                         f"{list(EXPERIMENTS)}")
    return importlib.import_module(f"fer_jax.experiments.{name}")
