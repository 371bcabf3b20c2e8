"""Entry point: `python -m fer_jax.main --config=configs/<file>.py[:args] --workdir=DIR`.

The only module that defines flags (flax examples/imagenet style). It parses the locked
ml_collections config, validates it before any work starts, writes `config.json`, initialises
multi-host JAX when asked, and dispatches to the experiment named by `config.experiment`.
Overrides: `--config.train.batch_size=32`. Config arguments: `configs/supervised.py:runlocal`.
"""

from __future__ import annotations

import logging as pylogging
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/supervised.py:runlocal", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reports.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Call jax.distributed.initialize() (TPU pods, multi-process GPU/CPU clusters); on Cloud TPU "
    "the coordinator is discovered automatically, elsewhere set JAX_COORDINATOR_ADDRESS, "
    "JAX_NUM_PROCESSES and JAX_PROCESS_ID.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", 0,
    "> 0: split the host CPU into this many JAX devices (jax_num_cpu_devices) before the backend "
    "starts, so the 'clients' mesh axis runs one client per device. On a CPU-only machine, one "
    "device per core beat one device with intra-op threads by 1.28-1.36x per small-CNN round "
    "on 2 cores (WORKSPACE.md, section 9). Leaves GPU/TPU devices alone (it only adds CPU "
    "devices).")
flags.mark_flags_as_required(["config", "workdir"])


def _initialize_distributed() -> None:
    import jax

    kwargs = {}
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                      num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                      process_id=int(os.environ["JAX_PROCESS_ID"]))
    jax.distributed.initialize(**kwargs)


def _quiet_library_info_logs() -> None:
    """Drops INFO lines of orbax (a dozen per checkpoint) so the run's own log stays readable."""
    def keep(record) -> bool:
        return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname

    logging.get_absl_handler().addFilter(keep)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _quiet_library_info_logs()
    from fer_jax import experiments

    config = _CONFIG.value
    experiment = experiments.get(config.get("experiment", ""))
    # Every check of names and values happens here, before data, models or devices are touched.
    experiment.validate_config(config)
    import jax

    if _CPU_DEVICES.value < 0:
        raise app.UsageError(f"--cpu_devices must be >= 0, got {_CPU_DEVICES.value}")
    if _CPU_DEVICES.value:
        jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
    if _DISTRIBUTED.value:
        _initialize_distributed()

    logging.info("JAX %s: process %d of %d, %d local / %d global devices", jax.__version__,
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())
    experiment.run(config, _WORKDIR.value)


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
