"""Host-side experiment drivers, one module per method. Each exposes:

  validate_config(config) -> None   raises ValueError naming the bad field, before any work
  run(config, workdir) -> dict      trains / evaluates, writes everything into workdir

and may set SPLIT_HOST_WHEN_FEDERATED = True: `fer_jax.main` then runs its federated mode on one
CPU device per core (measured faster for that experiment; the others keep one CPU device), at
most `max_cohort(config)` devices if it defines one, else config.fed.cohort_size.

`get(name)` imports only the requested module, so a run never pays for the others' imports.
"""

from __future__ import annotations

import importlib
import os

EXPERIMENTS = ("supervised", "prepare", "evaluate", "fedaffect", "diversity", "occlusion",
               "vfer")


def get(name: str):
    """The experiment module for `config.experiment`."""
    if name not in EXPERIMENTS:
        raise ValueError(f"config.experiment={name!r} is not an experiment; expected one of "
                         f"{list(EXPERIMENTS)}")
    return importlib.import_module(f"fer_jax.experiments.{name}")


def host_cores() -> int:
    """The CPU cores this process may use (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def host_cpu_devices(config, *, requested: int | None = None, distributed: bool = False,
                     cores: int | None = None) -> tuple[int, str]:
    """How many JAX devices `fer_jax.main` splits the host CPU into, and why (for the log).

    `requested` (--cpu_devices) when given; else, for a single-process federated run of an
    experiment that sets SPLIT_HOST_WHEN_FEDERATED, one per core (`cores`: the cores this
    process may use) capped at the cohort (a device beyond it would only run padding); else 1.
    Measured on 2 cores: FedAvg (MLP, 100 clients) 1.51x the plain loop on 2 devices vs 1.05x on
    one, FedAffect's default 1.30x faster; VFER's default (mostly centralized training, a
    head-only FedAvg of a few subjects) 0.9x, so it keeps one device, as do centralized runs.
    """
    if requested is not None:
        return requested, f"--cpu_devices={requested}"
    name = config.get("experiment", "")
    if config.get("mode") != "federated" or distributed:
        return 1, "none (automatic: not a single-process federated run)"
    module = get(name)
    if not getattr(module, "SPLIT_HOST_WHEN_FEDERATED", False):
        return 1, f"none (automatic: {name!r} does not set SPLIT_HOST_WHEN_FEDERATED)"
    if cores is None:
        cores = host_cores()
    # The largest cohort of the run: the experiment's max_cohort(config) if it has several
    # engines (FedAffect), else config.fed.cohort_size.
    cohort = (module.max_cohort(config) if hasattr(module, "max_cohort")
              else config.get("fed", {}).get("cohort_size"))
    n = max(1, min(cores, cohort or cores))
    return n, f"{n} (automatic: federated run, {cores} cores, cohort {cohort or 'unknown'})"
