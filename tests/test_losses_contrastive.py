"""fer_jax.losses.nt_xent against a float64 NumPy loop, SimCLR's TF formula and optax."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from fer_jax import losses


def _np_nt_xent(z_a, z_b, temperature, normalize=True):
    """FedAffect Eq. (1) / Algorithm 1 line 26, one anchor at a time, in float64."""
    z = np.concatenate([z_a, z_b]).astype(np.float64)
    if normalize:
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n2 = z.shape[0]
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        j = (i + n) % n2
        others = np.array([z[i] @ z[k] / temperature for k in range(n2) if k != i])
        top = others.max()
        log_denominator = top + np.log(np.sum(np.exp(others - top)))
        total += -(z[i] @ z[j] / temperature - log_denominator)
    return total / n2


def _np_simclr_tf(z_a, z_b, temperature):
    """google-research/simclr objective.add_contrastive_loss (loss_a + loss_b), float64."""
    def l2_normalize(x):
        return x / np.sqrt(np.maximum(np.sum(x * x, axis=-1, keepdims=True), 1e-12))

    def mean_softmax_xent(logits):  # labels one_hot(i) over the 2N columns
        top = logits.max(axis=1, keepdims=True)
        log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        return np.mean(log_z - logits[np.arange(len(logits)), np.arange(len(logits))])

    h1, h2 = l2_normalize(z_a.astype(np.float64)), l2_normalize(z_b.astype(np.float64))
    masks = np.eye(len(h1))
    logits_aa = h1 @ h1.T / temperature - masks * 1e9
    logits_bb = h2 @ h2.T / temperature - masks * 1e9
    logits_ab = h1 @ h2.T / temperature
    logits_ba = h2 @ h1.T / temperature
    return (mean_softmax_xent(np.concatenate([logits_ab, logits_aa], 1))
            + mean_softmax_xent(np.concatenate([logits_ba, logits_bb], 1)))


def _views(n, d, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(n, d)).astype(np.float32)


def test_hand_computed_orthogonal_views():
    # Views (1,0),(0,1),(1,0),(0,1), tau = 1: each anchor sees its positive at cos 1 and two
    # negatives at cos 0, so every l(i, j) = -log(e / (e + 2)) = log(e + 2) - 1.
    z = jnp.eye(2)
    got = losses.nt_xent(z, z, temperature=1.0)
    np.testing.assert_allclose(got, math.log(math.e + 2) - 1, rtol=1e-6)
    np.testing.assert_allclose(got, 0.5514447139, rtol=1e-6)


@pytest.mark.parametrize("n,d,temperature", [(1, 4, 0.1), (3, 5, 0.5), (8, 16, 0.1), (8, 16, 0.01)])
def test_matches_float64_reference(n, d, temperature):
    z_a, z_b = _views(n, d, seed=n)
    got = losses.nt_xent(z_a, z_b, temperature=temperature)
    np.testing.assert_allclose(got, _np_nt_xent(z_a, z_b, temperature), rtol=2e-5, atol=1e-6)


def test_unnormalized_uses_dot_product():
    z_a, z_b = _views(4, 3, seed=1)
    z_a, z_b = 0.3 * z_a, 0.3 * z_b
    got = losses.nt_xent(z_a, z_b, temperature=0.5, normalize=False)
    want = _np_nt_xent(z_a, z_b, 0.5, normalize=False)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Cosine similarity ignores positive per-row scales; the dot product does not.
    scales = np.array([[1.0], [2.0], [0.5], [3.0]], np.float32)
    np.testing.assert_allclose(losses.nt_xent(scales * z_a, z_b), losses.nt_xent(z_a, z_b),
                               rtol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 5, 32])
def test_identical_views_give_log_2n_minus_1(n):
    # Every candidate has the same similarity: the softmax is uniform over 2N - 1 views.
    z = jnp.ones((n, 6))
    np.testing.assert_allclose(losses.nt_xent(z, z, temperature=0.1), math.log(2 * n - 1),
                               atol=1e-5)


def test_single_pair_is_zero_with_finite_gradient():
    z_a, z_b = _views(1, 8, seed=3)
    value, grads = jax.value_and_grad(losses.nt_xent, argnums=(0, 1))(z_a, z_b,
                                                                       temperature=0.01)
    assert value == 0.0
    assert all(np.isfinite(g).all() for g in grads)


def test_stable_at_low_temperature():
    z_a, z_b = _views(16, 32, seed=4)
    value, (g_a, g_b) = jax.value_and_grad(losses.nt_xent, argnums=(0, 1))(
        z_a, z_b, temperature=0.01)
    assert np.isfinite(value) and np.isfinite(g_a).all() and np.isfinite(g_b).all()
    # Views equal to their positives up to a 1e-3 perturbation: loss near 0, no overflow.
    value = losses.nt_xent(z_a, z_a + 1e-3 * z_b, temperature=0.01)
    np.testing.assert_allclose(value, _np_nt_xent(z_a, z_a + 1e-3 * z_b, 0.01), atol=1e-5)


def test_simclr_tf_returns_twice_this_value():
    z_a, z_b = _views(6, 10, seed=5)
    ours = float(losses.nt_xent(z_a, z_b, temperature=0.2))
    np.testing.assert_allclose(_np_simclr_tf(z_a, z_b, 0.2), 2.0 * ours, rtol=2e-6)


def test_optax_ntxent_equals_this_value():
    # optax labels the 2N views by example id: both views of example i carry label i.
    z_a, z_b = _views(6, 10, seed=6)
    labels = jnp.concatenate([jnp.arange(6), jnp.arange(6)])
    theirs = optax.losses.ntxent(jnp.concatenate([z_a, z_b]), labels, temperature=0.1)
    np.testing.assert_allclose(losses.nt_xent(z_a, z_b, temperature=0.1), theirs, rtol=1e-5)


def test_gradients_match_finite_differences():
    z_a, z_b = _views(3, 4, seed=7)
    with jax.enable_x64(True):
        args = (jnp.asarray(z_a, jnp.float64), jnp.asarray(z_b, jnp.float64))
        f = jax.jit(lambda a, b: losses.nt_xent(a, b, temperature=0.2))
        check_grads(f, args, order=1, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)


def test_jit_and_vmap_match_eager():
    z_a, z_b = _views(4, 8, seed=8)
    eager = losses.nt_xent(z_a, z_b, temperature=0.1)
    jitted = jax.jit(losses.nt_xent, static_argnames="normalize")(z_a, z_b, temperature=0.1)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
    # A traced temperature (e.g. a schedule) is accepted.
    traced_t = jax.jit(lambda t: losses.nt_xent(z_a, z_b, temperature=t))(0.1)
    np.testing.assert_allclose(traced_t, eager, rtol=1e-6)
    stacked = jax.vmap(lambda a, b: losses.nt_xent(a, b))(jnp.stack([z_a, z_b]),
                                                           jnp.stack([z_b, z_a]))
    np.testing.assert_allclose(stacked, [eager, losses.nt_xent(z_b, z_a)], rtol=1e-6)


@pytest.mark.parametrize("z_a,z_b,kwargs,match", [
    (np.ones(4), np.ones(4), {}, "z_a must have shape \\(N, d\\)"),
    (np.ones((3, 4)), np.ones((2, 4)), {}, "z_b must have the shape of z_a"),
    (np.ones((0, 4)), np.ones((0, 4)), {}, "N >= 1"),
    (np.ones((2, 4)), np.ones((2, 4)), {"temperature": 0.0}, "temperature must be"),
])
def test_bad_input_raises(z_a, z_b, kwargs, match):
    with pytest.raises(ValueError, match=match):
        losses.nt_xent(z_a, z_b, **kwargs)


# -- mask= -----------------------------------------------------------------------------------

_MASK = np.array([1, 0, 1, 1, 0, 1], bool)


def test_mask_equals_loss_on_the_valid_rows():
    z_a, z_b = _views(6, 5, seed=20)
    got = losses.nt_xent(z_a, z_b, temperature=0.3, mask=_MASK)
    # Derived independently: the float64 loop on the sliced arrays.
    np.testing.assert_allclose(got, _np_nt_xent(z_a[_MASK], z_b[_MASK], 0.3), rtol=1e-5)
    np.testing.assert_allclose(got, losses.nt_xent(z_a[_MASK], z_b[_MASK], temperature=0.3),
                               rtol=1e-6)
    # A numeric 0/1 mask reads the same; an all-valid mask is the unmasked loss.
    np.testing.assert_allclose(losses.nt_xent(z_a, z_b, temperature=0.3,
                                              mask=_MASK.astype(np.float32)), got, rtol=1e-7)
    np.testing.assert_allclose(losses.nt_xent(z_a, z_b, mask=np.ones(6, bool)),
                               losses.nt_xent(z_a, z_b), rtol=1e-6)
    # Unnormalised (dot-product) similarity as well.
    np.testing.assert_allclose(
        losses.nt_xent(0.3 * z_a, 0.3 * z_b, normalize=False, mask=_MASK),
        _np_nt_xent(0.3 * z_a[_MASK], 0.3 * z_b[_MASK], 0.1, normalize=False), rtol=1e-5)


def test_masked_rows_get_zero_gradient_even_when_not_finite():
    z_a, z_b = _views(6, 5, seed=21)
    z_a[1], z_b[4] = np.nan, np.inf  # padding garbage in masked rows
    value, (g_a, g_b) = jax.value_and_grad(
        lambda a, b: losses.nt_xent(a, b, temperature=0.3, mask=_MASK), argnums=(0, 1))(z_a, z_b)
    np.testing.assert_allclose(value, _np_nt_xent(z_a[_MASK], z_b[_MASK], 0.3), rtol=1e-5)
    for g in (np.asarray(g_a), np.asarray(g_b)):
        assert np.all(g[~_MASK] == 0.0) and np.all(np.abs(g[_MASK]).sum(axis=1) > 0)
    # The valid rows' gradient is that of the sliced loss.
    ref = jax.grad(lambda a: losses.nt_xent(a, z_b[_MASK], temperature=0.3))(z_a[_MASK])
    np.testing.assert_allclose(np.asarray(g_a)[_MASK], ref, rtol=1e-4, atol=1e-7)


def test_all_masked_is_zero_with_finite_gradient():
    z_a, _ = _views(6, 5, seed=22)
    value, grad = jax.value_and_grad(
        lambda a: losses.nt_xent(a, a, temperature=0.3, mask=np.zeros(6, bool)))(z_a)
    assert float(value) == 0.0 and np.all(np.asarray(grad) == 0.0)


def test_mask_under_jit_and_vmap():
    z_a, z_b = _views(6, 5, seed=23)
    masks = np.stack([_MASK, ~_MASK])
    f = jax.jit(jax.vmap(lambda m: losses.nt_xent(z_a, z_b, temperature=0.2, mask=m)))
    np.testing.assert_allclose(
        f(masks), [losses.nt_xent(z_a[m], z_b[m], temperature=0.2) for m in masks], rtol=1e-5)


def test_bad_mask_raises():
    with pytest.raises(ValueError, match="mask must have shape \\(N,\\) = \\(3,\\)"):
        losses.nt_xent(np.ones((3, 2)), np.ones((3, 2)), mask=np.ones(4, bool))
