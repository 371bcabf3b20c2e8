"""Optimizers and learning-rate schedules from a config's `train` block."""

from __future__ import annotations

import numpy as np
import optax

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "constant", "step")


def schedule(train, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
    """Linear warm-up over train.warmup_epochs, then cosine decay to 0, constant, or step decay.

    step: the learning rate is multiplied by train.decay_factor every train.decay_every_epochs
    epochs (PyTorch's StepLR, the ESR and MA-Net recipes), counted after the warm-up.
    """
    warmup = int(train.warmup_epochs * steps_per_epoch)
    if train.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, train.learning_rate, max(warmup, 1),
                                                  max(total_steps, warmup + 1))
    if train.schedule == "step":
        every, factor = train.get("decay_every_epochs", 0), train.get("decay_factor", 0.0)
        if not every > 0 or not 0 < factor <= 1:
            raise ValueError("train.schedule='step' needs train.decay_every_epochs > 0 and "
                             f"train.decay_factor in (0, 1], got {every} and {factor}")
        decay = optax.exponential_decay(
            train.learning_rate, transition_steps=max(int(round(every * steps_per_epoch)), 1),
            decay_rate=factor, staircase=True)
        if warmup == 0:
            return decay
        return optax.join_schedules(
            [optax.linear_schedule(0.0, train.learning_rate, warmup), decay], [warmup])
    return optax.linear_schedule(0.0, train.learning_rate, max(warmup, 1))


def make_optimizer(train, total_steps: int, steps_per_epoch: int,
                   learning_rate=None) -> optax.GradientTransformation:
    """adam | adamw (decoupled decay) | sgd (L2 decay added to the gradient, as PyTorch's SGD).

    sgd's momentum is train.momentum and Nesterov train.nesterov when the block has them
    (default 0.9, Nesterov); the ESR / MA-Net paper recipe is momentum 0.9 without Nesterov.
    """
    lr = schedule(train, total_steps, steps_per_epoch) if learning_rate is None else learning_rate
    if train.optimizer == "adam":
        return optax.adam(lr)
    if train.optimizer == "adamw":
        return optax.adamw(lr, weight_decay=train.weight_decay)
    return optax.chain(optax.add_decayed_weights(train.weight_decay),
                       optax.sgd(lr, momentum=train.get("momentum", 0.9),
                                 nesterov=train.get("nesterov", True)))


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """n / (K * n_k) per class (scikit-learn's 'balanced'); absent classes get weight 0."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.divide(len(labels), num_classes * counts, out=np.zeros(num_classes),
                        where=counts > 0)
    return weights.astype(np.float32)
