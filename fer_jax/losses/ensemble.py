"""Plurality vote of an ensemble's branches (ESR: Siqueira et al. 2020; Heidari & Iosifidis Sec. 2).

ESR classifies "by fusing the predictions of all the ensemble branches and applying majority
voting": each branch votes its argmax and the class with the most votes wins. Ties go to
the lowest class index (deterministic, the convention of `jnp.argmax` on the vote counts), both
within a branch's logits and between classes with equal vote counts.
"""

import jax
import jax.numpy as jnp

from fer_jax.losses import _checks


def ensemble_vote(logits: jax.Array) -> jax.Array:
    """(B, N, K) logits of B branches for N examples -> (N,) int32 plurality-vote classes."""
    logits = jnp.asarray(logits)
    _checks.check_ndim(logits, 3, name="logits", expected="(B, N, K)")
    if logits.shape[0] < 1 or logits.shape[2] < 1:
        raise ValueError(f"logits must have B >= 1 and K >= 1 in (B, N, K), got {logits.shape}.")
    num_classes = logits.shape[-1]
    votes = jnp.argmax(logits, axis=-1)
    counts = jnp.sum(jax.nn.one_hot(votes, num_classes, dtype=jnp.int32), axis=0)
    return jnp.argmax(counts, axis=-1).astype(jnp.int32)
