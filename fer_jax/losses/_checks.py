"""Shape and argument checks shared by the loss modules.

Shapes are static under `jax.jit`, so these checks run once at trace time and cost nothing
per step. Values (labels in range, scores in [0, 1]) are not checked: they are traced, and a
data-dependent check would need a host sync.

The jitted losses therefore assume integer labels in [0, C) for every unmasked row: an
out-of-range label gathers NaN (`mode="fill"`), so the loss and its gradient become NaN, unless
its row is masked out (padding may hold any label). Labels are validated once, on the host, at
the data boundary: every `fer_jax.data.types.Dataset` checks its splits' labels against its
class names when it is built (`types.check_labels`), with an error naming the dataset, the split
and the bad value.
"""

import math

import jax
import jax.numpy as jnp


def check_ndim(x: jax.Array, ndim: int, *, name: str, expected: str) -> None:
    """Raises ValueError unless `x` has rank `ndim`; `expected` spells the shape."""
    if x.ndim != ndim:
        raise ValueError(f"{name} must have shape {expected}, got shape {x.shape}.")


def check_integer(x: jax.Array, *, name: str) -> None:
    """Raises ValueError unless `x` holds integers (class indices)."""
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must hold integer class indices, got dtype {x.dtype}.")


def check_mask(mask, n: int, *, name: str = "mask", expected: str = "(N,)") -> jax.Array:
    """A validity mask as bool (1/True = a real example); raises unless its shape is (n,).

    Bool or numeric masks are accepted; a numeric mask keeps the rows where it is nonzero.
    """
    mask = jnp.asarray(mask)
    if mask.shape != (n,):
        raise ValueError(f"{name} must have shape {expected} = ({n},), got {mask.shape}.")
    return mask if mask.dtype == bool else mask != 0


def check_positive(value, *, name: str, allow_zero: bool = False) -> None:
    """Raises ValueError for a Python number that is not finite and positive.

    Arrays pass unchecked: inside `jax.jit` even a constant becomes a tracer once jnp touches
    it, and a traced hyperparameter (a scheduled temperature) cannot be inspected anyway.
    """
    if not isinstance(value, (int, float)):
        return
    ok = value >= 0 if allow_zero else value > 0
    if not (math.isfinite(value) and ok):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value}.")


def sigmoid_bce(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Element-wise -[t log sigmoid(x) + (1 - t) log sigmoid(-x)] = softplus(x) - t x.

    The softplus form never evaluates log(0), so it stays finite for |x| in the hundreds,
    where log(sigmoid(x)) computed from probabilities would give -inf.
    """
    return jax.nn.softplus(logits) - targets * logits


def masked_mean(values: jax.Array, valid: jax.Array | None) -> jax.Array:
    """Mean of the elements of `values` where `valid` (bool, same shape); 0 if none is valid.

    `values` must already be finite where masked (zero the inputs first): the `where` keeps a
    masked element out of the value, but a NaN there would still reach the gradient.
    """
    if valid is None:
        return jnp.mean(values)
    total = jnp.sum(jnp.where(valid, values, 0.0))
    return total / jnp.maximum(jnp.sum(valid), 1).astype(values.dtype)
