"""Optimizers and learning-rate schedules from a config's `train` block."""

from __future__ import annotations

import numpy as np
import optax

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "constant")


def schedule(train, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
    """Linear warm-up over train.warmup_epochs, then cosine decay to 0 or constant."""
    warmup = int(train.warmup_epochs * steps_per_epoch)
    if train.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, train.learning_rate, max(warmup, 1),
                                                  max(total_steps, warmup + 1))
    return optax.linear_schedule(0.0, train.learning_rate, max(warmup, 1))


def make_optimizer(train, total_steps: int, steps_per_epoch: int,
                   learning_rate=None) -> optax.GradientTransformation:
    """adam | adamw (decoupled decay) | sgd (momentum 0.9, nesterov, L2 decay)."""
    lr = schedule(train, total_steps, steps_per_epoch) if learning_rate is None else learning_rate
    if train.optimizer == "adam":
        return optax.adam(lr)
    if train.optimizer == "adamw":
        return optax.adamw(lr, weight_decay=train.weight_decay)
    return optax.chain(optax.add_decayed_weights(train.weight_decay),
                       optax.sgd(lr, momentum=0.9, nesterov=True))


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """n / (K * n_k) per class (scikit-learn's 'balanced'); absent classes get weight 0."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.divide(len(labels), num_classes * counts, out=np.zeros(num_classes),
                        where=counts > 0)
    return weights.astype(np.float32)
