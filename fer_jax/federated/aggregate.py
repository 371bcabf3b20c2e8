"""Aggregation of client updates and server optimizers (FedAvg family).

FedAvg (McMahan et al., 2017, Alg. 1) averages client models weighted by example count. Reddi et
al., "Adaptive Federated Optimization" (ICLR 2021, Alg. 2) rewrite the server step as an optimizer
on the pseudo-gradient `g = -mean_c(delta_c)` (delta_c = client model - server model): plain
FedAvg is SGD with learning rate 1, FedAvgM adds server momentum, FedAdam / FedYogi use the
adaptive moments of Adam / Yogi. All of them are optax transformations here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi")


def _is_concrete(x) -> bool:
    """True when `x` holds values now (NumPy or a committed array), not a tracer under jit."""
    return not isinstance(x, jax.core.Tracer)


def weighted_mean(stacked_tree, weights):
    """sum_c w_c * x_c / sum_c w_c over the leading client axis of every leaf.

    stacked_tree: a pytree whose leaves are [C, ...] (one row per client).
    weights: [C] non-negative weights (example counts for FedAvg, 1 for uniform averaging).
    Floating leaves keep their dtype; integer and bool leaves are averaged in float32 (the mean
    of counts is not an integer: rows [3, 5], [4, 9] with weights 1, 2 give [3.667, 7.667]).
    A client with weight 0 contributes nothing, even when its row holds NaN or inf (it is
    selected out, not multiplied by zero). With concrete inputs, all-zero, negative or
    mismatched weights raise ValueError; under jit the caller must check (the round does, on the
    host before dispatch and again inside the server update).
    """
    concrete = _is_concrete(weights)
    host_weights = np.asarray(weights, dtype=np.float64) if concrete else None
    weights = jnp.asarray(weights)
    leaves = jax.tree.leaves(stacked_tree)
    if weights.ndim != 1:
        raise ValueError(f"weighted_mean: weights must be 1-D [clients], got shape {weights.shape}")
    if not leaves:
        raise ValueError("weighted_mean: stacked_tree has no leaves")
    for leaf in leaves:
        if leaf.ndim < 1 or leaf.shape[0] != weights.shape[0]:
            raise ValueError(
                f"weighted_mean: every leaf needs a leading client axis of {weights.shape[0]}, "
                f"got a leaf of shape {leaf.shape}")
    if concrete:
        w = host_weights
        if np.any(w < 0) or not np.all(np.isfinite(w)):
            raise ValueError(f"weighted_mean: weights must be finite and >= 0, got {w}")
        if w.sum() == 0:
            raise ValueError("weighted_mean: all client weights are zero (no client has examples)")
    total_tree, total = weighted_sum(stacked_tree, weights)
    # Guard the division so a traced all-zero cohort yields zeros, never NaN, in the server state.
    safe_total = jnp.where(total > 0, total, 1.0)
    return jax.tree.map(lambda s, x: (s / safe_total).astype(_mean_dtype(x.dtype)), total_tree,
                        stacked_tree)


def _mean_dtype(dtype):
    """The dtype of a weighted mean of `dtype` values: floats keep theirs, others float32."""
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32


def weighted_sum(stacked_tree, weights):
    """(sum_c w_c * x_c, sum_c w_c) over the leading client axis; rows with w_c = 0 (or less)
    are selected out, so NaN/inf in them never leaks. The round accumulates these sums chunk by
    chunk and divides once in the server update (that is `weighted_mean` split in two)."""
    weights = jnp.asarray(weights).astype(jnp.float32)

    def total(x):
        w = weights.reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.where(w > 0, w * x.astype(jnp.float32), 0.0).sum(axis=0)

    return jax.tree.map(total, stacked_tree), jnp.where(weights > 0, weights, 0.0).sum()


def server_optimizer(name: str = "fedavg", *, learning_rate: float | None = None,
                     momentum: float = 0.9, b1: float = 0.9, b2: float = 0.99,
                     eps: float = 1e-3) -> optax.GradientTransformation:
    """The server optimizer applied to the pseudo-gradient -mean(delta).

    fedavg: SGD, learning rate 1 by default (the server model becomes the clients' mean).
    fedavgm: SGD with `momentum` (Hsu et al., 2019), learning rate 1 by default.
    fedadam / fedyogi: Adam / Yogi with `b1`, `b2` and the adaptivity `eps` (Reddi et al., 2021,
    who use eps ~1e-3); learning rate 1e-2 by default.
    """
    if name not in SERVER_OPTIMIZERS:
        raise ValueError(f"unknown server optimizer {name!r}; choose one of {SERVER_OPTIMIZERS}")
    if name == "fedavg":
        return optax.sgd(1.0 if learning_rate is None else learning_rate)
    if name == "fedavgm":
        return optax.sgd(1.0 if learning_rate is None else learning_rate, momentum=momentum)
    lr = 1e-2 if learning_rate is None else learning_rate
    if name == "fedadam":
        return optax.adam(lr, b1=b1, b2=b2, eps=eps)
    return optax.yogi(lr, b1=b1, b2=b2, eps=eps)
