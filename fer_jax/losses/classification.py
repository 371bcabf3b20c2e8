"""Class-weighted, maskable softmax cross entropy (VFER's IFER classifier).

Salman & Busso, *Privacy preserving personalization for video FER using federated learning*
(ICMI 2022), Sec. 4.2: the image classifier is trained with weighted categorical cross
entropy to counter class imbalance; adaptation uses the unweighted loss (class_weights=None).

    L = sum_i m_i w_{y_i} CE_i / sum_i m_i,   CE_i = logsumexp(z_i) - z_{i, y_i}.

The denominator counts the real (unmasked) examples, as Keras' `class_weight` does (the
paper's framework; 'sum_over_batch_size'), so padding a batch never changes the value and all
weights 1 give the plain mean CE. PyTorch's `CrossEntropyLoss(weight=w)` divides by
sum_i m_i w_{y_i} instead; multiply by sum(m) / sum(m w) to convert.
"""

import jax
import jax.numpy as jnp

from fer_jax.losses import _checks


def weighted_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    class_weights: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Masked mean of class-weighted softmax cross entropy.

    Args:
      logits: (N, K) unnormalised class scores.
      labels: (N,) integer classes in [0, K). Rows with mask 0 may hold any value (padding).
      class_weights: optional (K,) weight of each class, e.g. N / (K * count_k).
      mask: optional (N,) 1 for real examples, 0 for padding (bool or float).

    Returns:
      Scalar sum_i m_i w_{y_i} CE_i / sum_i m_i; 0 when the mask is all zero.
    """
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    _checks.check_ndim(logits, 2, name="logits", expected="(N, K)")
    n, k = logits.shape
    _checks.check_ndim(labels, 1, name="labels", expected=f"(N,) = ({n},)")
    _checks.check_integer(labels, name="labels")
    if labels.shape[0] != n:
        raise ValueError(f"labels must have shape (N,) = ({n},), got {labels.shape}.")

    log_prob = jax.nn.log_softmax(logits, axis=-1)
    # Out-of-range labels (padding) gather NaN ("fill" mode); the mask below drops them.
    ce = -jnp.take_along_axis(log_prob, labels[:, None], axis=-1, mode="fill")[:, 0]
    if class_weights is not None:
        class_weights = jnp.asarray(class_weights)
        if class_weights.shape != (k,):
            raise ValueError(
                f"class_weights must have shape (K,) = ({k},), got {class_weights.shape}."
            )
        ce = ce * jnp.take(class_weights, labels, mode="fill", fill_value=jnp.nan)
    if mask is None:
        return jnp.mean(ce)
    mask = jnp.asarray(mask)
    if mask.shape != (n,):
        raise ValueError(f"mask must have shape (N,) = ({n},), got {mask.shape}.")
    keep = mask.astype(bool) if mask.dtype == bool else mask != 0
    weight = mask.astype(ce.dtype)
    # where, not multiply: a padded row's NaN times 0 would still be NaN.
    total = jnp.sum(jnp.where(keep, weight * ce, 0.0))
    count = jnp.sum(weight)
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)
