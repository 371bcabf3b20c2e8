"""Few-shot learning losses: class prototypes, the relation-score MSE, episode cross-entropy
and prototypical-network logits.

FedAffect (Shome & Kar), Section 3.2, following Sung et al. 2018, *Learning to Compare:
Relation Network for Few-Shot Learning*, Eq. (1)-(2):
  * K > 1 shots: the support feature of class c is the **element-wise sum** of the embeddings
    of its K support images (not the mean), x_c = sum_{k: y_k = c} f(x_k).
  * The relation module scores each (query q, class c) pair in [0, 1] and is trained by

        L_relation = 1/(Q C) sum_q sum_c (r_{q,c} - 1[y_q == y_c])^2.

    FedAffect's Eq. (2) as printed lost the square and the mean; we use the MSE of Sung et
    al. Eq. (2) (which sums; the mean only rescales the learning rate).
  * `episode_cross_entropy`: softmax cross-entropy of each query over the C class slots of its
    episode (the relation module's pre-sigmoid outputs, or a prototypical network's negative
    distances, as logits). Not in FedAffect: an option (`fewshot.loss='ce'`) because the
    per-pair MSE with one query per episode can settle on a constant score.
  * `prototypical_logits`: Snell et al. 2017, *Prototypical Networks*, Eq. (1)-(2): class
    prototype = mean support embedding (`class_means`), logit = -squared Euclidean distance.
"""

import operator

import jax
import jax.numpy as jnp

from fer_jax.losses import _checks


def class_prototypes(
    support_features: jax.Array,
    support_labels: jax.Array,
    num_classes: int,
) -> jax.Array:
    """Element-wise sum of the support embeddings of each class.

    Args:
      support_features: (S, ...) embeddings of S support images; any trailing shape (feature
        maps stay maps, so the relation module can concatenate them depth-wise).
      support_labels: (S,) integer class of each support image, in [0, num_classes).
        Labels outside that range contribute to no class.
      num_classes: C, a static Python int.

    Returns:
      (C, ...) per-class sums; a class with no support image gets zeros.
    """
    support_features = jnp.asarray(support_features)
    support_labels = jnp.asarray(support_labels)
    if support_features.ndim < 1:
        raise ValueError(
            f"support_features must have shape (S, ...), got shape {support_features.shape}."
        )
    _checks.check_ndim(support_labels, 1, name="support_labels", expected="(S,)")
    _checks.check_integer(support_labels, name="support_labels")
    if support_labels.shape[0] != support_features.shape[0]:
        raise ValueError(
            f"support_labels must have shape (S,) = ({support_features.shape[0]},) to match "
            f"support_features {support_features.shape}, got {support_labels.shape}."
        )
    try:
        num_classes = operator.index(num_classes)
    except TypeError:
        raise ValueError(f"num_classes must be a Python int, got {num_classes!r}.") from None
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
    # segment_sum is a scatter-add: K shots of a class land in one row, in any order.
    return jax.ops.segment_sum(support_features, support_labels, num_segments=num_classes)


def relation_mse(
    scores: jax.Array,
    query_labels: jax.Array,
    support_labels: jax.Array,
    *,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Mean squared error between relation scores and the match indicator.

    Args:
      scores: (Q, C) relation scores in [0, 1] (the relation module's sigmoid output) for
        every query q and support class slot c.
      query_labels: (Q,) integer class of each query.
      support_labels: (C,) integer class of each support slot (usually arange(C)).
      mask: optional validity (bool, or nonzero = valid) of the queries, (Q,), or of the
        (query, class slot) pairs, (Q, C): an episode padded to a fixed shape marks its
        missing queries, and `query_valid[:, None] & class_valid[None, :]` also drops the
        slots of classes it could not fill. The mean runs over the valid pairs only, so the
        value is the loss of the unpadded episode; masked pairs get exactly zero gradient.
        None: every pair is valid.

    Returns:
      Scalar mean over the Q * C (valid) pairs of (scores[q, c] - 1[query_labels[q] ==
      support_labels[c]])^2; 0 when no pair is valid.
    """
    scores, query_labels, support_labels = _episode_arrays(scores, query_labels, support_labels,
                                                     name="scores")
    q, c = scores.shape
    target = (query_labels[:, None] == support_labels[None, :]).astype(scores.dtype)
    if mask is None:
        return jnp.mean(jnp.square(scores - target))
    mask = jnp.asarray(mask)
    if mask.shape == (q,):
        mask = jnp.broadcast_to(mask[:, None], (q, c))
    if mask.shape != (q, c):
        raise ValueError(
            f"mask must have shape (Q,) = ({q},) or (Q, C) = ({q}, {c}), got {mask.shape}."
        )
    pair = mask if mask.dtype == bool else mask != 0
    # The inner where keeps a masked pair's NaN score out of the gradient, not only the value.
    return _checks.masked_mean(jnp.square(jnp.where(pair, scores, 0.0) - target), pair)


def class_means(
    support_features: jax.Array,
    support_labels: jax.Array,
    num_classes: int,
) -> jax.Array:
    """Mean support embedding of each class (Snell et al. 2017 Eq. (1)); zeros for a class with
    no support. Arguments as `class_prototypes`."""
    sums = class_prototypes(support_features, support_labels, num_classes)
    counts = jax.ops.segment_sum(jnp.ones(support_labels.shape[0], sums.dtype),
                                 jnp.asarray(support_labels), num_segments=num_classes)
    return sums / jnp.maximum(counts, 1.0).reshape((-1,) + (1,) * (sums.ndim - 1))


def prototypical_logits(prototypes: jax.Array, queries: jax.Array) -> jax.Array:
    """(C, ...) prototypes and (Q, ...) query embeddings -> (Q, C) logits -||q - p_c||^2.

    Trailing axes are flattened (feature maps count as vectors, as in Snell et al.). Computed
    as the explicit difference (not |q|^2 - 2 q.p + |p|^2), exact for large embeddings.
    """
    prototypes, queries = jnp.asarray(prototypes), jnp.asarray(queries)
    if prototypes.ndim < 1 or queries.ndim < 1 or prototypes.shape[1:] != queries.shape[1:]:
        raise ValueError(f"prototypes (C, ...) and queries (Q, ...) must share trailing axes, "
                         f"got {prototypes.shape} and {queries.shape}.")
    p = prototypes.reshape(prototypes.shape[0], -1)
    q = queries.reshape(queries.shape[0], -1)
    return -jnp.sum(jnp.square(q[:, None, :] - p[None, :, :]), axis=-1)


def episode_cross_entropy(
    logits: jax.Array,
    query_labels: jax.Array,
    support_labels: jax.Array,
    *,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Softmax cross-entropy of each query over the class slots of its episode.

    Args:
      logits: (Q, C) per (query, class slot) logits: relation-module outputs before the
        sigmoid, or `prototypical_logits`.
      query_labels: (Q,) integer class of each query.
      support_labels: (C,) integer class of each slot (usually arange(C)).
      mask: optional validity (bool or nonzero) of the queries, (Q,), or of the (query, slot)
        pairs, (Q, C). Masked slots leave the softmax of their query; a query counts when one
        of its valid slots is its class (a query whose class has no valid slot is dropped).
        Masked entries get exactly zero gradient, even if they hold NaN.

    Returns:
      Scalar mean over counted queries of logsumexp_{valid c} logits[q, c] - logits[q, y_q];
      0 when no query counts.
    """
    logits, query_labels, support_labels = _episode_arrays(logits, query_labels, support_labels,
                                                     name="logits")
    q, c = logits.shape
    if mask is None:
        pair = jnp.ones((q, c), bool)
    else:
        mask = jnp.asarray(mask)
        if mask.shape == (q,):
            mask = jnp.broadcast_to(mask[:, None], (q, c))
        if mask.shape != (q, c):
            raise ValueError(
                f"mask must have shape (Q,) = ({q},) or (Q, C) = ({q}, {c}), got {mask.shape}."
            )
        pair = mask if mask.dtype == bool else mask != 0
    target = pair & (query_labels[:, None] == support_labels[None, :])
    counted = target.any(axis=1)
    z = jnp.where(pair, logits, 0.0)  # Finite everywhere: no NaN reaches the gradient.
    shift = jax.lax.stop_gradient(jnp.max(jnp.where(pair, z, -jnp.inf), axis=1, keepdims=True))
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
    total = jnp.sum(jnp.where(pair, jnp.exp(z - shift), 0.0), axis=1)
    lse = jnp.log(jnp.where(counted, total, 1.0)) + shift[:, 0]
    picked = jnp.sum(jnp.where(target, z, 0.0), axis=1)
    return _checks.masked_mean(jnp.where(counted, lse - picked, 0.0), counted)


def _episode_arrays(values, query_labels, support_labels, *, name: str):
    """(values (Q, C), query_labels (Q,), support_labels (C,)) as arrays, shapes checked."""
    values = jnp.asarray(values)
    query_labels = jnp.asarray(query_labels)
    support_labels = jnp.asarray(support_labels)
    _checks.check_ndim(values, 2, name=name, expected="(Q, C)")
    q, c = values.shape
    _checks.check_ndim(query_labels, 1, name="query_labels", expected=f"(Q,) = ({q},)")
    _checks.check_ndim(support_labels, 1, name="support_labels", expected=f"(C,) = ({c},)")
    if query_labels.shape[0] != q:
        raise ValueError(f"query_labels must have shape (Q,) = ({q},), got {query_labels.shape}.")
    if support_labels.shape[0] != c:
        raise ValueError(
            f"support_labels must have shape (C,) = ({c},), got {support_labels.shape}."
        )
    return values, query_labels, support_labels
