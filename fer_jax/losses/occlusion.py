"""Losses of occlusion-robust FER by adversarial learning (ICME submission).

With F the feature extractor, phi the occlusion-attention module and D the feature
discriminator that predicts the occlusion label y_occ in {0, 1} from F(x):

    Eq. (2)  L_noisy = -1/(w h) sum_ij [ y log p + (1 - y) log(1 - p) ]   (mask BCE, per image)
    Eq. (6)  L_D     = -sum_i 1[i = y_occ] log P(y_occ = i | F(x))      (D step, F fixed)
    Eq. (5)  L_F     = -sum_i P_E(y_occ = i) log P(y_occ = i | F(x))    (F step, D fixed)
    Eq. (8)  L       = L_emp + lambda_1 L_noisy + lambda_2 L_F

All three are batch means. D has one output logit s, P(y_occ = 1 | F(x)) = sigmoid(s); the
losses take logits (not probabilities) and use log-sigmoid forms that stay finite for any s.
L_F is minimised at sigmoid(s) = P_E(1), where it equals the prior's entropy H(P_E) (Eq. (3):
the KL term vanishes), i.e. when D's output carries no information about occlusion.

`mask=` (N,) (bool, or nonzero = valid) restricts each mean to the valid examples of a padded
batch: the value of the unpadded batch, exactly zero gradient for masked examples, 0 when
none is valid.
"""

import jax
import jax.numpy as jnp

from fer_jax.losses import _checks


def occlusion_mask_bce(
    mask_logits: jax.Array, mask_target: jax.Array, *, mask: jax.Array | None = None
) -> jax.Array:
    """Eq. (2) averaged over the batch: mean pixel-wise BCE between predicted and true masks.

    Args:
      mask_logits: (N, h, w) or (N, h, w, 1) logits of phi's occlusion mask (any shape works;
        the mean runs over every element).
      mask_target: occlusion mask of the same shape in [0, 1], already resized by the caller
        to phi's resolution; all zeros for clean images.
      mask: optional (N,) validity of each image: the mean of the per-image means over the
        valid images. (The name `mask` is the padding mask, not the occlusion mask.)

    Returns:
      Scalar mean over images and pixels (every image has w * h pixels, so the mean of the
      per-image means equals the mean over all elements).
    """
    mask_logits, mask_target = jnp.asarray(mask_logits), jnp.asarray(mask_target)
    if mask_logits.ndim < 1:
        raise ValueError(f"mask_logits must have shape (N, h, w), got {mask_logits.shape}.")
    if mask_target.shape != mask_logits.shape:
        raise ValueError(
            f"mask_target must have the shape of mask_logits {mask_logits.shape}, got "
            f"{mask_target.shape}; resize the synthesized mask to phi's resolution first."
        )
    mask_target = mask_target.astype(mask_logits.dtype)
    if mask is None:
        return jnp.mean(_checks.sigmoid_bce(mask_logits, mask_target))
    n = mask_logits.shape[0]
    valid = _checks.check_mask(mask, n, expected="(N,)")
    keep = valid.reshape((n,) + (1,) * (mask_logits.ndim - 1))
    per_image = jnp.mean(_checks.sigmoid_bce(jnp.where(keep, mask_logits, 0.0),
                                             jnp.where(keep, mask_target, 0.0)),
                         axis=tuple(range(1, mask_logits.ndim)))
    return _checks.masked_mean(per_image, valid)


def discriminator_bce(
    disc_logits: jax.Array, occluded: jax.Array, *, mask: jax.Array | None = None
) -> jax.Array:
    """Eq. (6): L_D, binary cross entropy of D's occlusion logit, batch mean.

    Args:
      disc_logits: (N,) D's logit of P(y_occ = 1 | F(x)).
      occluded: (N,) 1 for an occluded image, 0 for a clean one (bool, int or float).
      mask: optional (N,) validity of each example; the mean runs over the valid ones.

    Returns:
      Scalar mean_n softplus(s_n) - y_n s_n.
    """
    disc_logits, occluded = jnp.asarray(disc_logits), jnp.asarray(occluded)
    _checks.check_ndim(disc_logits, 1, name="disc_logits", expected="(N,)")
    if occluded.shape != disc_logits.shape:
        raise ValueError(
            f"occluded must have shape (N,) = {disc_logits.shape}, got {occluded.shape}."
        )
    occluded = occluded.astype(disc_logits.dtype)
    if mask is None:
        return jnp.mean(_checks.sigmoid_bce(disc_logits, occluded))
    valid = _checks.check_mask(mask, disc_logits.shape[0], expected="(N,)")
    per_example = _checks.sigmoid_bce(jnp.where(valid, disc_logits, 0.0),
                                      jnp.where(valid, occluded, 0.0))
    return _checks.masked_mean(per_example, valid)


def prior_cross_entropy(disc_logits: jax.Array, prior, *, mask: jax.Array | None = None
                        ) -> jax.Array:
    """Eq. (5): L_F = -sum_i P_E(y_occ = i) log P(y_occ = i | F(x)), batch mean.

    Args:
      disc_logits: (N,) D's logit of P(y_occ = 1 | F(x)).
      prior: P_E(y_occ = 1), the training set's occlusion rate (0.5 with 1:1 mixing), as a
        scalar; or the pair (P_E(0), P_E(1)) of shape (2,).
      mask: optional (N,) validity of each example; the mean runs over the valid ones.

    Returns:
      Scalar mean_n -[P_E(1) log sigmoid(s_n) + P_E(0) log sigmoid(-s_n)].
    """
    disc_logits, prior = jnp.asarray(disc_logits), jnp.asarray(prior)
    _checks.check_ndim(disc_logits, 1, name="disc_logits", expected="(N,)")
    if prior.shape == ():
        p0, p1 = 1.0 - prior, prior
    elif prior.shape == (2,):
        p0, p1 = prior[0], prior[1]
    else:
        raise ValueError(
            f"prior must be a scalar P_E(y_occ=1) or have shape (2,), got shape {prior.shape}."
        )
    valid = None
    if mask is not None:
        valid = _checks.check_mask(mask, disc_logits.shape[0], expected="(N,)")
        disc_logits = jnp.where(valid, disc_logits, 0.0)
    # Both log-sigmoids are kept: with a soft target this is BCE(s, P_E(1)) when p0 + p1 = 1.
    per_example = -(p1 * jax.nn.log_sigmoid(disc_logits) + p0 * jax.nn.log_sigmoid(-disc_logits))
    return _checks.masked_mean(per_example, valid)
