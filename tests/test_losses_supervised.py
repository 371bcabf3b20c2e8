"""Weighted CE, occlusion losses and the ensemble vote against hand values, NumPy and optax."""

import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from fer_jax import losses

LN2 = math.log(2.0)


def _np_sigmoid_bce(x, y):
    p = 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


# -- weighted_cross_entropy ----------------------------------------------------------------

def test_weighted_ce_hand_computed():
    # Row 0: uniform over 2 -> CE ln 2. Row 1: p(y=1) = 1/(3+1) -> CE ln 4 = 2 ln 2.
    logits = jnp.array([[0.0, 0.0], [math.log(3.0), 0.0]])
    labels = jnp.array([0, 1])
    np.testing.assert_allclose(losses.weighted_cross_entropy(logits, labels), 1.5 * LN2,
                               rtol=1e-6)
    # Weights (1, 3): (1 ln2 + 3 * 2 ln2) / 2 examples = 3.5 ln 2 (Keras normalisation).
    got = losses.weighted_cross_entropy(logits, labels, class_weights=jnp.array([1.0, 3.0]))
    np.testing.assert_allclose(got, 3.5 * LN2, rtol=1e-6)
    got = losses.weighted_cross_entropy(logits, labels, mask=jnp.array([1, 0]))
    np.testing.assert_allclose(got, LN2, rtol=1e-6)


def test_weighted_ce_matches_optax_and_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(16, 7)).astype(np.float32)
    labels = rng.integers(0, 7, size=16)
    plain = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    np.testing.assert_allclose(losses.weighted_cross_entropy(logits, labels), plain.mean(),
                               rtol=1e-6)
    weights = rng.uniform(0.5, 2.0, size=7).astype(np.float32)
    mask = rng.integers(0, 2, size=16)
    want = np.sum(mask * weights[labels] * np.asarray(plain, np.float64)) / mask.sum()
    f = jax.jit(losses.weighted_cross_entropy)
    np.testing.assert_allclose(f(logits, labels, class_weights=weights, mask=mask), want,
                               rtol=1e-5)


def test_weighted_ce_padding_changes_nothing():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(5, 4)).astype(np.float32)
    labels = rng.integers(0, 4, size=5)
    weights = jnp.array([1.0, 2.0, 0.5, 1.5])
    real = losses.weighted_cross_entropy(logits, labels, class_weights=weights)
    # Padded rows carry garbage labels (-1, 99) and huge logits; the mask removes them.
    pad_logits = np.concatenate([logits, np.full((3, 4), 1e4, np.float32)])
    pad_labels = np.concatenate([labels, [-1, 99, 0]])
    mask = np.array([1] * 5 + [0] * 3)
    loss_fn = lambda z: losses.weighted_cross_entropy(z, pad_labels, class_weights=weights,
                                                      mask=mask)
    value, grad = jax.value_and_grad(loss_fn)(pad_logits)
    np.testing.assert_allclose(value, real, rtol=1e-6)
    assert np.isfinite(grad).all() and np.all(grad[5:] == 0)
    assert losses.weighted_cross_entropy(logits, labels, mask=np.zeros(5)) == 0.0


def test_weighted_ce_gradient():
    rng = np.random.default_rng(2)
    with jax.enable_x64(True):
        logits = jnp.asarray(rng.normal(size=(6, 3)))
        labels = jnp.array([0, 1, 2, 2, 1, 0])
        weights, mask = jnp.array([1.0, 2.0, 3.0]), jnp.array([1, 1, 1, 1, 0, 1])
        f = jax.jit(lambda z: losses.weighted_cross_entropy(
            z, labels, class_weights=weights, mask=mask))
        check_grads(f, (logits,), order=2, modes=("rev",))


@pytest.mark.parametrize("logits,labels,kwargs,match", [
    (np.ones(3), np.zeros(3, int), {}, "logits must have shape \\(N, K\\)"),
    (np.ones((3, 2)), np.zeros(2, int), {}, "labels must have shape \\(N,\\)"),
    (np.ones((3, 2)), np.zeros(3), {}, "labels must hold integer"),
    (np.ones((3, 2)), np.zeros(3, int), {"class_weights": np.ones(3)}, "class_weights must"),
    (np.ones((3, 2)), np.zeros(3, int), {"mask": np.ones(2)}, "mask must have shape"),
])
def test_weighted_ce_bad_input_raises(logits, labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        losses.weighted_cross_entropy(logits, labels, **kwargs)


# -- occlusion losses ----------------------------------------------------------------------

def test_mask_bce_matches_eq2_per_image_then_batch():
    rng = np.random.default_rng(3)
    logits = rng.normal(scale=3.0, size=(4, 7, 7)).astype(np.float32)
    target = (rng.uniform(size=(4, 7, 7)) < 0.3).astype(np.float32)
    target[0] = 0.0  # a clean image: all-zero mask
    per_image = _np_sigmoid_bce(logits, target).mean(axis=(1, 2))
    np.testing.assert_allclose(losses.occlusion_mask_bce(logits, target), per_image.mean(),
                               rtol=1e-5)
    np.testing.assert_allclose(jax.jit(losses.occlusion_mask_bce)(logits, target),
                               per_image.mean(), rtol=1e-5)


def test_mask_bce_finite_at_extreme_logits():
    logits = jnp.array([[100.0, -100.0], [100.0, -100.0]])
    target = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    # Right with confidence: ~0; wrong with confidence: ~100 per pixel -> mean 50.
    value, grad = jax.value_and_grad(losses.occlusion_mask_bce)(logits, target)
    np.testing.assert_allclose(value, 50.0, rtol=1e-6)
    np.testing.assert_allclose(grad, (jax.nn.sigmoid(logits) - target) / 4, atol=1e-7)


def test_discriminator_bce_hand_computed():
    # s = 0, occluded: ln 2. s = ln 3 (p = 3/4), clean: -ln(1/4) = 2 ln 2. Mean 1.5 ln 2.
    got = losses.discriminator_bce(jnp.array([0.0, math.log(3.0)]), jnp.array([True, False]))
    np.testing.assert_allclose(got, 1.5 * LN2, rtol=1e-6)


def test_prior_cross_entropy_minimum_is_prior_entropy():
    p = 0.3
    entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    s = jnp.full((5,), math.log(p / (1 - p)))  # sigmoid(s) = P_E(1): KL term of Eq. (3) is 0
    value, grad = jax.value_and_grad(losses.prior_cross_entropy)(s, p)
    np.testing.assert_allclose(value, entropy, rtol=1e-6)
    np.testing.assert_allclose(grad, 0.0, atol=1e-7)
    np.testing.assert_allclose(losses.prior_cross_entropy(jnp.zeros(3), 0.5), LN2, rtol=1e-6)


def test_prior_cross_entropy_matches_numpy_and_optax():
    rng = np.random.default_rng(4)
    s = rng.normal(scale=2.0, size=32).astype(np.float32)
    want = _np_sigmoid_bce(s, 0.5).mean()
    np.testing.assert_allclose(losses.prior_cross_entropy(s, 0.5), want, rtol=1e-6)
    np.testing.assert_allclose(losses.prior_cross_entropy(s, jnp.array([0.5, 0.5])), want,
                               rtol=1e-6)
    soft = optax.sigmoid_binary_cross_entropy(s, jnp.full_like(s, 0.2)).mean()
    np.testing.assert_allclose(jax.jit(losses.prior_cross_entropy)(s, 0.2), soft, rtol=1e-5)
    with jax.enable_x64(True):
        f = jax.jit(lambda x: losses.prior_cross_entropy(x, 0.2)
                    + losses.discriminator_bce(x, (x > 0).astype(x.dtype)))
        check_grads(f, (jnp.asarray(s[:8], jnp.float64),), order=2, modes=("rev",))


@pytest.mark.parametrize("fn,args,match", [
    (losses.occlusion_mask_bce, (np.ones((2, 4, 4)), np.ones((2, 8, 8))), "resize"),
    (losses.discriminator_bce, (np.ones((4, 1)), np.ones((4, 1))), "disc_logits must have"),
    (losses.discriminator_bce, (np.ones(4), np.ones(3)), "occluded must have shape"),
    (losses.prior_cross_entropy, (np.ones(4), np.ones(3)), "prior must be a scalar"),
    (losses.prior_cross_entropy, (np.ones((4, 2)), 0.5), "disc_logits must have"),
])
def test_occlusion_bad_input_raises(fn, args, match):
    with pytest.raises(ValueError, match=match):
        fn(*args)


# -- ensemble_vote -------------------------------------------------------------------------

def test_vote_hand_computed_with_ties():
    logits = jnp.array([
        [[5, 1, 0], [0, 2, 2], [0, 0, 9]],   # branch 0 votes 0, 1 (tie -> lowest), 2
        [[0, 4, 0], [0, 0, 3], [1, 0, 0]],   # branch 1 votes 1, 2, 0
        [[0, 4, 0], [3, 0, 0], [0, 1, 0]],   # branch 2 votes 1, 0, 1
    ], dtype=jnp.float32)
    # Example 0: votes {0, 1, 1} -> 1. Example 1: {1, 2, 0} three-way tie -> 0.
    # Example 2: {2, 0, 1} tie -> 0.
    got = losses.ensemble_vote(logits)
    np.testing.assert_array_equal(got, [1, 0, 0])
    assert got.dtype == jnp.int32


def test_vote_matches_numpy_bincount():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(9, 50, 8)).astype(np.float32)
    votes = logits.argmax(-1)
    want = [np.bincount(votes[:, i], minlength=8).argmax() for i in range(50)]
    np.testing.assert_array_equal(jax.jit(losses.ensemble_vote)(logits), want)


def test_vote_bad_input_raises():
    with pytest.raises(ValueError, match="logits must have shape \\(B, N, K\\)"):
        losses.ensemble_vote(np.ones((4, 3)))


# -- package -------------------------------------------------------------------------------

def test_package_imports_jax_only():
    code = ("import sys, fer_jax.losses as l; bad = sorted({m.split('.')[0] for m in sys.modules}"
            " & {'flax', 'optax', 'tensorflow', 'ml_collections', 'grain'}); print(bad);"
            " assert not bad and len(l.__all__) == 15")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


# -- mask= on the occlusion losses -------------------------------------------------------------

_VALID = np.array([1, 0, 1, 1, 0], bool)


def _occlusion_batch(seed=5):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(5, 3, 3)).astype(np.float32)
    target = (rng.uniform(size=(5, 3, 3)) < 0.4).astype(np.float32)
    s = rng.normal(scale=2.0, size=5).astype(np.float32)
    return logits, target, s, (s > 0.3)


def _occlusion_losses(logits, target, s, occluded, mask):
    return jnp.stack([losses.occlusion_mask_bce(logits, target, mask=mask),
                      losses.discriminator_bce(s, occluded, mask=mask),
                      losses.prior_cross_entropy(s, 0.3, mask=mask)])


def test_occlusion_mask_equals_loss_on_valid_rows():
    logits, target, s, occ = _occlusion_batch()
    v = _VALID
    got = _occlusion_losses(logits, target, s, occ, v)
    want = [_np_sigmoid_bce(logits[v], target[v]).mean(axis=(1, 2)).mean(),
            _np_sigmoid_bce(s[v], occ[v]).mean(), _np_sigmoid_bce(s[v], 0.3).mean()]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(_occlusion_losses(logits, target, s, occ, v.astype(np.float32)),
                               got, rtol=1e-7)
    np.testing.assert_allclose(_occlusion_losses(logits, target, s, occ, np.ones(5, bool)),
                               _occlusion_losses(logits, target, s, occ, None), rtol=1e-6)
    batched = jax.jit(jax.vmap(lambda m: _occlusion_losses(logits, target, s, occ, m)))(
        np.stack([v, ~v]))
    np.testing.assert_allclose(batched[1], _occlusion_losses(logits[~v], target[~v], s[~v],
                                                             occ[~v], None), rtol=1e-5)


def test_occlusion_masked_rows_get_zero_gradient():
    logits, target, s, occ = _occlusion_batch()
    logits[1], s[4] = np.nan, np.inf
    value, (g_logits, g_s) = jax.value_and_grad(
        lambda x, y: _occlusion_losses(x, target, y, occ, _VALID).sum(), argnums=(0, 1))(
        logits, s)
    assert np.isfinite(float(value))
    assert np.all(np.asarray(g_logits)[~_VALID] == 0.0) and np.all(np.asarray(g_s)[~_VALID] == 0)
    assert np.all(np.asarray(g_s)[_VALID] != 0.0)
    none = _occlusion_losses(logits, target, s, occ, np.zeros(5, bool))
    np.testing.assert_array_equal(none, 0.0)


@pytest.mark.parametrize("fn,args", [
    (losses.occlusion_mask_bce, (np.ones((2, 4, 4)), np.ones((2, 4, 4)))),
    (losses.discriminator_bce, (np.ones(2), np.ones(2))),
    (losses.prior_cross_entropy, (np.ones(2), 0.5)),
])
def test_occlusion_bad_mask_raises(fn, args):
    with pytest.raises(ValueError, match="mask must have shape \\(N,\\) = \\(2,\\)"):
        fn(*args, mask=np.ones(3, bool))
