"""NT-Xent, the SimCLR contrastive loss, as FedAffect's local representation learner uses it.

FedAffect (Shome & Kar), Eq. (1) and Algorithm 1 lines 22-26: each of M images gives two
views with projections z_{2k-1}, z_{2k}; for an anchor i with positive j (its other view)

    l(i, j) = -log( exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau) ),
    L = 1/(2M) sum_k [ l(2k-1, 2k) + l(2k, 2k-1) ],

with sim the cosine similarity: L is the **mean over all 2M anchors** (Chen et al. 2020,
*A Simple Framework for Contrastive Learning of Visual Representations*, Eq. (1)).
(Eq. (1) of FedAffect prints sim(x_i, x_j) in the denominator as well; the sum over k and
Algorithm 1 make the intended sim(x_i, x_k) clear.)

Relation to the two reference implementations (checked in tests/test_losses_contrastive.py):
  * `optax.losses.ntxent(jnp.concatenate([z_a, z_b]), jnp.concatenate([r, r]), temperature)`
    with r = arange(N) equals `nt_xent(z_a, z_b, temperature=temperature)`: optax also averages
    over every positive pair (2N anchors). Its default temperature is 0.07, ours 0.1, and it
    clamps each norm at float eps instead of the squared norm at 1e-12, which only matters for
    near-zero vectors.
  * SimCLR's TF code (`objective.add_contrastive_loss`, loss_a + loss_b, each a mean over N
    anchors) returns **twice** this value: sum over 2N anchors / N. Multiply by 2 to compare
    with curves logged by that code; gradients scale by the same factor.
"""

import jax
import jax.numpy as jnp

from fer_jax.losses import _checks

# tf.math.l2_normalize's floor on the squared norm: a zero projection stays finite.
_NORM_EPS = 1e-12
# The logit of a dropped candidate when a mask is given (see `nt_xent`).
_MASKED = -1e9


def nt_xent(
    z_a: jax.Array,
    z_b: jax.Array,
    *,
    temperature: float = 0.1,
    normalize: bool = True,
    mask: jax.Array | None = None,
) -> jax.Array:
    """NT-Xent over the 2N views of N examples, averaged over the 2N anchors.

    Args:
      z_a: (N, d) projections of the first view; `z_a[i]` and `z_b[i]` are views of example i.
      z_b: (N, d) projections of the second view.
      temperature: tau > 0; logits are sim / tau. Stable down to tau = 0.01 (log-softmax).
      normalize: if True, sim is the cosine similarity (rows are L2-normalised); if False,
        sim is the plain dot product (the caller has normalised already).
      mask: optional (N,) validity of each example (bool, or nonzero = valid), e.g. the
        padding of a client's last minibatch. Both views of a masked example are neither
        anchors nor negatives, and the mean runs over the 2 N_valid valid anchors: the value
        is `nt_xent(z_a[mask], z_b[mask])` at a fixed shape. Masked rows get exactly zero
        gradient, even if they hold inf or NaN. None: every example is valid.

    Returns:
      Scalar loss. With every view identical it equals log(2N - 1); for N = 1 it is 0 (the
      positive is the only candidate); 0 when the mask has no valid row. SimCLR's TF code
      reports 2x this value.
    """
    z_a, z_b = jnp.asarray(z_a), jnp.asarray(z_b)
    _checks.check_ndim(z_a, 2, name="z_a", expected="(N, d)")
    if z_b.shape != z_a.shape:
        raise ValueError(f"z_b must have the shape of z_a {z_a.shape} (N, d), got {z_b.shape}.")
    if z_a.shape[0] < 1:
        raise ValueError(f"z_a must hold at least one example (N >= 1), got shape {z_a.shape}.")
    _checks.check_positive(temperature, name="temperature")

    n = z_a.shape[0]
    valid = None if mask is None else _checks.check_mask(mask, n, expected="(N,)")
    z = jnp.concatenate([z_a, z_b], axis=0)
    if valid is not None:
        valid = jnp.concatenate([valid, valid])
        # Zeroed before any arithmetic: a masked row's inf/NaN reaches neither value nor grad.
        z = jnp.where(valid[:, None], z, 0.0)
    if normalize:
        z = z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, axis=-1, keepdims=True), _NORM_EPS))
    logits = z @ z.T / temperature
    # View i's positive is i + N (first half) or i - N (second half).
    positive = (jnp.arange(2 * n) + n) % (2 * n)
    if valid is None:
        # An anchor is never its own candidate: -inf drops it from the softmax and its gradient.
        logits = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, logits)
        log_prob = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(log_prob, positive[:, None], axis=-1))
    # A finite stand-in for -inf: a masked anchor's row (every candidate dropped) stays finite,
    # and exp(_MASKED - max) is exactly 0 in float32 for every row with a valid candidate.
    drop = jnp.eye(2 * n, dtype=bool) | ~valid[None, :]
    log_prob = jax.nn.log_softmax(jnp.where(drop, _MASKED, logits), axis=-1)
    per_anchor = -jnp.take_along_axis(log_prob, positive[:, None], axis=-1)[:, 0]
    return _checks.masked_mean(per_anchor, valid)
