"""Feature diversity of L learners: RBF similarity matrix and its determinant.

Heidari & Iosifidis, *Learning diversified feature representations for FER in the wild*:

    Eq. (1)  S_lk = 1/N sum_i exp(-gamma ||phi_l(x_i) - phi_k(x_i)||^2)
    Eq. (2)  D = det(S)
    Eq. (3)  Loss = L_CE - (D_ch + D_sp)      (Eq. (4) ESR, Eq. (5) MA-Net add branch terms)

phi_l are pooled feature maps: 1 x H x W for spatial diversity (`spatial_pool`), C x 1 x 1 for
channel diversity (`channel_pool`). No feature normalisation; gamma is a hyperparameter (the
authors' code hard-codes 10). At a fixed gamma, det(S) saturates when the learners' distances
are far from 1 / gamma: S -> I (det 1) or S -> all ones (det 0), and the gradient vanishes.
`median_heuristic_gamma` sets gamma from the batch instead, 1 / the median squared distance
between learners, so the median off-diagonal kernel value is exp(-1) whatever the features'
scale (docs/papers.md#diversity-gamma); `similarity_saturation` measures how many off-diagonal
entries of S sit at either end.

**Decision** (docs/papers.md#diversity-diagonal): S_ll = 1 (Eq. (1)). The released code
leaves the diagonal at 0, which gives det = (-1)^(L-1) (L-1) for identical learners and, for
odd L, a loss that pulls branches together. Not copied.

Each per-sample matrix exp(-gamma ||a_l - a_k||^2) is a Gaussian-kernel Gram matrix, so S is
positive semi-definite with unit diagonal and 0 <= det(S) <= 1 (Hadamard); det(S) = 0 exactly
when two learners are identical on every sample.
"""

import jax
import jax.numpy as jnp
import numpy as np

from fer_jax.losses import _checks


def spatial_pool(x: jax.Array) -> jax.Array:
    """(L, N, H, W, C) feature maps -> (L, N, H, W) spatial maps, the mean over channels."""
    x = jnp.asarray(x)
    _checks.check_ndim(x, 5, name="x", expected="(L, N, H, W, C)")
    return jnp.mean(x, axis=-1)


def channel_pool(x: jax.Array) -> jax.Array:
    """(L, N, H, W, C) feature maps -> (L, N, C) channel vectors, the mean over space."""
    x = jnp.asarray(x)
    _checks.check_ndim(x, 5, name="x", expected="(L, N, H, W, C)")
    return jnp.mean(x, axis=(2, 3))


def rbf_similarity(phi: jax.Array, *, gamma: float, mask: jax.Array | None = None) -> jax.Array:
    """Eq. (1): S_lk = mean_n exp(-gamma ||phi_l(x_n) - phi_k(x_n)||^2), ones on the diagonal.

    Args:
      phi: (L, N, ...) pooled features of L learners for the same N samples; the trailing
        axes (H, W) or (C,) are flattened into one feature vector per (learner, sample).
      gamma: RBF width, >= 0.
      mask: optional (N,) validity of each sample (bool, or nonzero = valid). The mean runs
        over the valid samples only, so S is that of `phi[:, mask]`; masked samples get
        exactly zero gradient, even if they hold inf or NaN. None: every sample is valid.

    Returns:
      (L, L) symmetric matrix with S_ll = 1 exactly (all zeros when no sample is valid).
    """
    phi = jnp.asarray(phi)
    if phi.ndim < 2:
        raise ValueError(f"phi must have shape (L, N, ...), got shape {phi.shape}.")
    _checks.check_positive(gamma, name="gamma", allow_zero=True)
    if mask is None:
        sq_dist = _pairwise_sq_dist(phi.reshape(phi.shape[0], phi.shape[1], -1))
        return jnp.mean(jnp.exp(-gamma * sq_dist), axis=-1)
    valid = _checks.check_mask(mask, phi.shape[1], expected="(N,) with N = phi.shape[1]")
    flat = phi.reshape(phi.shape[0], phi.shape[1], -1)
    flat = jnp.where(valid[None, :, None], flat, 0.0)
    kernel = jnp.where(valid, jnp.exp(-gamma * _pairwise_sq_dist(flat)), 0.0)
    return jnp.sum(kernel, axis=-1) / jnp.maximum(jnp.sum(valid), 1).astype(kernel.dtype)


@jax.custom_jvp
def _pairwise_sq_dist(flat: jax.Array) -> jax.Array:
    """(L, N, D) -> (L, L, N) squared distances ||a_l - a_k||^2 for every sample n.

    The value uses differences, not ||a||^2 + ||b||^2 - 2 a.b: the expanded form cancels
    catastrophically for near-identical learners (the regime the loss acts in) and misses the
    exact zeros of identical ones. XLA fuses the broadcast difference into the reduction.
    """
    return jnp.sum(jnp.square(flat[:, None] - flat[None, :]), axis=-1)


@_pairwise_sq_dist.defjvp
def _pairwise_sq_dist_jvp(primals, tangents):
    (a,), (da,) = primals, tangents
    # d||a_l - a_k||^2 = 2 (a_l.da_l + a_k.da_k - a_l.da_k - a_k.da_l), written with inner
    # products so that its transpose (the backward pass) is a batched matmul: autodiff of the
    # broadcast difference materialises (L, L, N, D), 127 MiB and 0.5 s at L=15, N=64, 48x48.
    self_dot = jnp.einsum("lnd,lnd->ln", a, da)
    cross = jnp.einsum("lnd,knd->lkn", a, da)
    tangent = 2.0 * (self_dot[:, None] + self_dot[None, :] - cross - jnp.swapaxes(cross, 0, 1))
    return _pairwise_sq_dist(a), tangent


def det_diversity(
    phi: jax.Array, *, gamma: float, eps: float = 0.0, mask: jax.Array | None = None
) -> jax.Array:
    """Eq. (2): D = det(S) with S from `rbf_similarity`; the loss subtracts it (loss = CE - D).

    Numerics (docs/papers.md#diversity-det-numerics: LU with the adjugate gradient, not Cholesky):
    `jnp.linalg.det` takes the value from an LU factorisation (sign * exp(log|det|), closed
    forms for L <= 3) and its gradient from a cofactor solve, d det / dS = adj(S)^T, computed
    without forming det(S) * inv(S). That stays finite when S is singular (identical learners:
    rank 1) or nearly so, and gives det = 0 exactly for identical learners. A Cholesky with
    jitter eps would be finite too but returns det(S + eps I) > det(S) (2e-6 for two identical
    learners at eps = 1e-6) and fails if eps is below the rounding of S (~L * 6e-8 in float32).

    Args:
      phi: (L, N, ...) pooled features of L learners for N samples (see `rbf_similarity`).
      gamma: RBF width, >= 0.
      eps: diagonal jitter, det(S + eps I). Default 0: the adjugate gradient needs none. A
        positive eps raises the value by at most (1 + eps)^L - 1 (about L * eps; every
        principal minor of S lies in [0, 1]) and keeps the value >= eps^L.
      mask: optional (N,) validity of each sample (bool, or nonzero = valid), e.g. a padded
        batch. S averages over the valid samples only, so the value is
        `det_diversity(phi[:, mask])`; masked samples get exactly zero gradient. With no valid
        sample S = 0 and the value is 0 (eps^L with jitter). None: every sample is valid.

    Returns:
      Scalar det(S) in [0, 1] up to rounding (float32: within ~1e-7 of the float64 value; a
      nearly singular S can round to a value of order -1e-7).
    """
    _checks.check_positive(eps, name="eps", allow_zero=True)
    s = rbf_similarity(phi, gamma=gamma, mask=mask)
    if not (isinstance(eps, (int, float)) and eps == 0):
        s = s + eps * jnp.eye(s.shape[0], dtype=s.dtype)
    return jnp.linalg.det(s)


def median_heuristic_gamma(phi: jax.Array, *, mask: jax.Array | None = None,
                           min_ratio: float = 1e-4) -> jax.Array:
    """gamma = 1 / median of ||phi_l(x_n) - phi_k(x_n)||^2 over learner pairs l < k and samples.

    The median heuristic for an RBF bandwidth, taken over the same distances Eq. (1) compares
    (learners on the same sample), so exp(-gamma d) = exp(-1) at the median and S's
    off-diagonal entries spread around 0.37 at any feature scale: det(S) stays away from 1
    (S = I) and from 0 (S = all ones). It is a constant of the step: the value carries no
    gradient (stop_gradient), so the loss pushes distances apart at a fixed kernel width.

    Args:
      phi: (L, N, ...) pooled features of L >= 2 learners (see `rbf_similarity`).
      mask: optional (N,) validity of each sample; the median runs over valid samples only.
      min_ratio: the median is floored at min_ratio * the mean squared feature norm
        mean_{l,n} ||phi_l(x_n)||^2 (and at the smallest normal float), which caps gamma when
        learners nearly coincide (e.g. a branch just copied from another): learners closer
        than 1% of the features' norm count as identical instead of giving gamma -> inf.

    Returns:
      Scalar gamma > 0, finite. With no valid sample, 1 / the floor.
    """
    phi = jnp.asarray(phi)
    if phi.ndim < 2 or phi.shape[0] < 2:
        raise ValueError(f"phi must have shape (L, N, ...) with L >= 2, got shape {phi.shape}.")
    _checks.check_positive(min_ratio, name="min_ratio", allow_zero=True)
    phi = jax.lax.stop_gradient(phi)
    flat = phi.reshape(phi.shape[0], phi.shape[1], -1)
    valid = (jnp.ones(phi.shape[1], bool) if mask is None else
             _checks.check_mask(mask, phi.shape[1], expected="(N,) with N = phi.shape[1]"))
    flat = jnp.where(valid[None, :, None], flat, 0.0)
    upper = np.triu_indices(phi.shape[0], k=1)
    pair_dist = _pairwise_sq_dist(flat)[upper]  # (L (L - 1) / 2, N)
    median = jnp.nanmedian(jnp.where(valid[None, :], pair_dist, jnp.nan))
    sq_norm = jnp.sum(jnp.square(flat), axis=-1)  # (L, N), zero on masked samples
    mean_sq_norm = jnp.sum(sq_norm) / (phi.shape[0] * jnp.maximum(jnp.sum(valid), 1))
    floor = jnp.maximum(min_ratio * mean_sq_norm, jnp.finfo(flat.dtype).tiny)
    median = jnp.where(jnp.isnan(median), floor, jnp.maximum(median, floor))
    return 1.0 / median


def similarity_saturation(s: jax.Array, *, low: float = 0.01,
                          high: float = 0.99) -> tuple[jax.Array, jax.Array]:
    """Fractions of S's off-diagonal entries below `low` and above `high`.

    Both ends kill the diversity term. Entries ~0: the learners are far apart on the kernel's
    scale, S ~ I, det(S) ~ 1 and its gradient ~0 (the paper's gamma = 10 on ESR's attention
    maps). Entries ~1: the learners coincide on that scale, det(S) ~ 0; for L >= 3 the
    adjugate, and so the gradient, vanishes too. A live term has most entries in between.

    Args:
      s: (L, L) similarity matrix from `rbf_similarity`.

    Returns:
      (fraction below low, fraction above high) over the L (L - 1) / 2 entries above the
      diagonal (S is symmetric); (0, 0) for L = 1.
    """
    s = jnp.asarray(s)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"s must be a square (L, L) matrix, got shape {s.shape}.")
    upper = s[np.triu_indices(s.shape[0], k=1)]
    if upper.size == 0:
        zero = jnp.zeros((), s.dtype)
        return zero, zero
    return jnp.mean(upper < low).astype(s.dtype), jnp.mean(upper > high).astype(s.dtype)
