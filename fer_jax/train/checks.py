"""Config validation shared by the experiments: one checker, one check per shared block.

Every check runs in `fer_jax.main` before data, models or devices are touched and raises
ValueError("config.a.b=<value>: expected ...") for the first bad field.
"""

from __future__ import annotations

import functools
import pathlib
import re

from fer_jax import data as data_lib
from fer_jax import models
from fer_jax.data.augment import AugmentConfig
from fer_jax.federated import config as fed_config
from fer_jax.io import init as init_lib
from fer_jax.io import trained
from fer_jax.train import optim

MODES = ("centralized", "federated")


def checker(config):
    """check(ok, 'a.b', expected) raises ValueError("config.a.b=<value>: expected ...")."""

    def check(ok, field, expected):
        if not ok:
            value = functools.reduce(getattr, field.split("."), config)
            raise ValueError(f"config.{field}={value!r}: expected {expected}")

    return check


def data_model(config, check, *, model_names=None) -> None:
    """The data, model and augment blocks (model.name against `model_names` or the zoo)."""
    names = sorted(model_names if model_names is not None else models.MODELS)
    check(config.data.name in data_lib.DATASETS, "data.name", f"one of {sorted(data_lib.DATASETS)}")
    check(config.data.image_size >= 16, "data.image_size", "an image size >= 16")
    check(config.data.channels in (1, 3), "data.channels", "1 or 3")
    check(config.model.name in names, "model.name", f"one of {names}")
    if "augment" in config:
        AugmentConfig(**config.augment)  # Raises on bad ranges, naming the field.


def train_block(config, check) -> None:
    """The centralized `train` block: batch, length, optimizer, schedule."""
    train = config.train
    check(train.batch_size >= 1, "train.batch_size", "a positive batch size")
    check(train.num_epochs > 0 or train.num_steps > 0, "train.num_epochs",
          "> 0 (or train.num_steps > 0)")
    check(train.learning_rate > 0, "train.learning_rate", "a positive learning rate")
    check(train.optimizer in optim.OPTIMIZERS, "train.optimizer", f"one of {optim.OPTIMIZERS}")
    check(train.schedule in optim.SCHEDULES, "train.schedule", f"one of {optim.SCHEDULES}")
    check(config.checkpoint_every_steps >= 1, "checkpoint_every_steps", ">= 1")
    check(config.log_every_steps >= 1, "log_every_steps", ">= 1")


def mode(config, check, *, partitions: bool = True) -> None:
    """`config.mode` and the block it trains with: `train` (centralized) or `fed` (federated)."""
    check(config.mode in MODES, "mode", f"one of {MODES}")
    if config.mode == "centralized":
        train_block(config, check)
    else:
        fed_config.validate(config, check, partitions=partitions)
        check(config.checkpoint_every_rounds >= 1, "checkpoint_every_rounds", ">= 1")


def init_block(config, check) -> None:
    """The `init` block (fer_jax/io/init.py): the run or weights file it names exists and has
    the step asked for; src / dst pair up; skip is a regex. No `init` block: nothing to do."""
    if "init" not in config:
        return
    init = config.init
    check(init.step >= 0, "init.step", ">= 0 (0 = the latest checkpoint)")
    if not init.path:
        for field in ("src", "dst", "skip"):
            check(not init[field], f"init.{field}",
                  "'' without config.init.path (the run or weights file to start from)")
        check(init.step == 0, "init.step", "0 without config.init.path")
        return
    path = pathlib.Path(init.path).expanduser()
    suffixes = ", ".join(init_lib.WEIGHT_SUFFIXES)
    check(path.exists(), "init.path",
          f"an existing fer_jax run --workdir or weights file ({suffixes}); {path} does not exist")
    if path.is_dir():
        steps = trained.checkpoint_steps(path)
        check(bool(steps), "init.path", "the --workdir of a fer_jax run with a finished "
              f"checkpoint; {path / 'checkpoints'} has none")
        check(init.step == 0 or init.step in steps, "init.step",
              f"0 (the latest) or one of the checkpoint steps of {path}: {steps}")
    else:
        check(path.suffix.lower() in init_lib.WEIGHT_SUFFIXES, "init.path",
              f"a fer_jax run --workdir or a weights file ({suffixes})")
        check(init.step == 0, "init.step", "0 for a weights file (steps are a run's checkpoints)")
    try:
        init_lib.pairs(init.src, init.dst)
    except ValueError as e:
        raise ValueError(f"config.init.src / config.init.dst: {e}") from None
    try:
        init_lib.skip_patterns(init.skip)
    except re.error as e:
        raise ValueError(f"config.init.skip={init.skip!r}: expected a regular expression ({e})"
                         ) from None
