"""Entry point: `python -m fer_jax.main --config=configs/<file>.py[:args] --workdir=DIR`.

The only module that defines flags (flax examples/imagenet style). It parses the locked
ml_collections config, validates it before any work starts (nothing is created before that),
initialises multi-host JAX when asked, turns on the persistent compilation cache, takes the
workdir's lock on process 0 (one run per workdir) and dispatches to the experiment named by
`config.experiment`. Overrides: `--config.train.batch_size=32`. Config arguments:
`configs/supervised.py:runlocal`. Mistakes a person can fix (an unknown config key, a bad value,
a workdir in use or not writable) end in one line naming what to change, not a traceback.
"""

from __future__ import annotations

import difflib
import logging as pylogging
import os
import pathlib
import re
import sys

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
    "cpu_devices", None,
    "Split the host CPU into this many JAX devices (jax_num_cpu_devices) before the backend "
    "starts, so the 'clients' mesh axis runs one client per device. Unset (automatic): a "
    "federated run (config.mode='federated') of an experiment measured faster that way "
    "(supervised / fedavg, fedaffect) gets one device per core, at most its cohort size; every "
    "other run keeps JAX's one CPU device (fer_jax.experiments.host_cpu_devices, "
    "WORKSPACE.md#engine-knobs). 0 or 1: one CPU device. Leaves GPU/TPU devices alone (it only "
    "adds CPU devices).")
_RESTORE_STEP = flags.DEFINE_integer(
    "restore_step", None,
    "Resume from this checkpoint step instead of the latest intact one; newer checkpoints are "
    "moved to <workdir>/checkpoints.set_aside/. 0 sets them all aside and starts afresh. Sets "
    "env FER_JAX_RESTORE_STEP, which the experiments' Checkpointer reads.")
_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", None,
    "JAX persistent compilation cache (programs compiled in >= 0.5 s are stored and reused by "
    "later runs). Default: $FER_JAX_CACHE, else ~/.cache/fer_jax/jax_compilation_cache; '' "
    "disables it.")
flags.mark_flags_as_required(["config", "workdir"])


def _fail(message: str):
    """Ends the program with one line on stderr (exit status 1), no traceback."""
    raise SystemExit(f"fer_jax.main: error: {message}")


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing; an unknown `--config.a.b` override or a ValueError of the config
    file's get_config (a bad `:arg`) ends in one line instead of a chained traceback."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError):
        message = _unknown_config_key(argv)
        if message is None:
            raise
        _fail(message)
    except flags.Error as e:
        root = e
        while root.__cause__ or root.__context__:
            root = root.__cause__ or root.__context__
        if isinstance(root, ValueError) and root is not e.__context__:
            _fail(f"{_config_source(argv)}: {root}")
        sys.stderr.write(f"FATAL Flags parsing error: {e}\n"
                         "Pass --helpshort or --helpfull to see help on flags.\n")
        sys.exit(1)


def _unknown_config_key(argv: list[str]) -> str | None:
    """'unknown config key config.train.nope; did you mean ...' for the first bad override."""
    source = _config_source(argv)
    if source is None:
        return None
    config = flags.FLAGS["config"].parser.parse(source)
    for arg in argv:
        match = re.match(r"--config\.([\w.]+)(=|$)", arg)
        if not match:
            continue
        node, where = config, "config"
        for part in match.group(1).split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if part not in keys:
                close = difflib.get_close_matches(part, keys, n=3, cutoff=0.5)
                hint = (f"did you mean {', '.join(f'{where}.{k}' for k in close)}? "
                        if close else "")
                listing = (", ".join(sorted(keys)) if keys else
                           f"none ({where} is a value, not a group)")
                return (f"unknown config key {where}.{part} (in {arg}); {hint}"
                        f"valid keys of {where}: {listing}")
            node, where = node[part], f"{where}.{part}"
    return None


def _config_source(argv: list[str]) -> str | None:
    """The value of --config (configs/x.py[:args]) in argv."""
    source = None
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            source = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            source = argv[i + 1]
    return source


def _compilation_cache_dir() -> str:
    if _CACHE_DIR.value is not None:
        return _CACHE_DIR.value
    return os.environ.get("FER_JAX_CACHE") or str(
        pathlib.Path("~/.cache/fer_jax/jax_compilation_cache").expanduser())


def _enable_compilation_cache(jax) -> None:
    """Persistent compilation cache: a rerun (resume, sweep) skips most compiles."""
    directory = _compilation_cache_dir()
    if not directory:
        return
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)  # Default 1 s.


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
    # Every check of names and values happens here, before data, models, devices or the workdir
    # are touched.
    try:
        experiment = experiments.get(config.get("experiment", ""))
        experiment.validate_config(config)
    except ValueError as e:
        _fail(str(e))
    if _CPU_DEVICES.value is not None and _CPU_DEVICES.value < 0:
        _fail(f"--cpu_devices must be >= 0, got {_CPU_DEVICES.value}")
    if _RESTORE_STEP.value is not None:
        if _RESTORE_STEP.value < 0:
            _fail(f"--restore_step must be >= 0, got {_RESTORE_STEP.value}")
        from fer_jax.io import checkpoint

        os.environ[checkpoint.RESTORE_STEP_ENV] = str(_RESTORE_STEP.value)
    import jax

    cpu_devices, why = experiments.host_cpu_devices(
        config, requested=_CPU_DEVICES.value, distributed=_DISTRIBUTED.value)
    if cpu_devices > 1:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    if _DISTRIBUTED.value:
        from fer_jax.federated import mesh

        mesh.initialize_distributed()
    _enable_compilation_cache(jax)

    logging.info("JAX %s: process %d of %d, %d local / %d global devices (%s devices; host "
                 "CPU split: %s)", jax.__version__, jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count(), jax.default_backend(), why)
    workdir = pathlib.Path(_WORKDIR.value)
    if jax.process_index() != 0:  # Only process 0 writes to the workdir.
        experiment.run(config, str(workdir))
        return
    from fer_jax.io import lock

    created = not workdir.exists()
    holder = lock.WorkdirLock(workdir)
    try:
        holder.acquire()
    except lock.WorkdirLockedError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"--workdir={workdir}: cannot write there ({e.strerror or e}: {e.filename}); "
              "choose a writable directory")
    try:
        experiment.run(config, str(workdir))
    finally:
        holder.release()
        if created and workdir.is_dir() and not any(workdir.iterdir()):
            workdir.rmdir()  # The run failed before writing anything: leave no empty workdir.


def run() -> None:
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
