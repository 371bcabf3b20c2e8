"""fer_jax.losses diversity terms against float64 NumPy loops and the determinant's invariants."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from fer_jax import losses


def _np_similarity(phi, gamma):
    """Heidari & Iosifidis Eq. (1) with explicit loops over learners and samples, float64."""
    phi = np.asarray(phi, np.float64)
    num_learners, n = phi.shape[:2]
    flat = phi.reshape(num_learners, n, -1)
    s = np.zeros((num_learners, num_learners))
    for l in range(num_learners):
        for k in range(num_learners):
            s[l, k] = np.mean([np.exp(-gamma * np.sum((flat[l, i] - flat[k, i]) ** 2))
                               for i in range(n)])
    return s


def _phi(shape, seed, scale=1.0):
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


det_value_and_grad = jax.jit(jax.value_and_grad(losses.det_diversity), static_argnames="eps")


def test_hand_computed_two_scalar_learners():
    # Samples 0, 1: distances 1 and 4 -> S_01 = (e^-0.5 + e^-2) / 2 at gamma = 0.5.
    phi = jnp.array([[0.0, 0.0], [1.0, 2.0]])
    s01 = (math.exp(-0.5) + math.exp(-2.0)) / 2
    np.testing.assert_allclose(losses.rbf_similarity(phi, gamma=0.5), [[1, s01], [s01, 1]],
                               rtol=1e-6)
    np.testing.assert_allclose(losses.det_diversity(phi, gamma=0.5), 1 - s01**2, rtol=1e-6)


@pytest.mark.parametrize("shape,gamma", [((3, 4, 5, 5), 0.05), ((4, 6, 16), 0.1), ((2, 3), 1.0)])
def test_similarity_matches_loops_symmetric_unit_diagonal(shape, gamma):
    phi = _phi(shape, seed=len(shape))
    s = losses.rbf_similarity(phi, gamma=gamma)
    np.testing.assert_allclose(s, _np_similarity(phi, gamma), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(s, s.T)
    np.testing.assert_array_equal(np.diag(s), np.ones(shape[0]))
    np.testing.assert_allclose(jax.jit(losses.rbf_similarity, static_argnames="gamma")(
        phi, gamma=gamma), s, rtol=1e-6)


@pytest.mark.parametrize("num_learners,gamma", [(2, 0.1), (3, 0.1), (5, 0.05), (9, 0.02),
                                                (15, 0.02)])
def test_det_matches_float64_and_hadamard_bound(num_learners, gamma):
    phi = _phi((num_learners, 8, 12), seed=num_learners)
    want = np.linalg.det(_np_similarity(phi, gamma))
    value, grad = det_value_and_grad(phi, gamma=gamma)
    np.testing.assert_allclose(value, want, rtol=1e-5, atol=2e-7)
    assert 0.0 <= want <= 1.0 and np.isfinite(grad).all()


def test_gradient_matches_finite_differences():
    with jax.enable_x64(True):
        for num_learners, scale in [(3, 1.0), (4, 0.05)]:  # diverse, then nearly collapsed
            phi = jnp.asarray(_phi((num_learners, 5, 3), seed=10, scale=scale), jnp.float64)
            f = jax.jit(lambda p: losses.det_diversity(p, gamma=0.5))
            check_grads(f, (phi,), order=1, modes=("fwd", "rev"), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("num_learners", [2, 3, 15])
def test_identical_learners_give_zero_with_finite_gradient(num_learners):
    phi = np.broadcast_to(_phi((1, 6, 48), seed=2), (num_learners, 6, 48))
    value, grad = det_value_and_grad(jnp.asarray(phi), gamma=10.0)
    assert value == 0.0
    assert np.isfinite(grad).all()
    # The released code's zero diagonal would give (-1)^(L-1) (L-1) here instead.
    zero_diag = np.linalg.det(np.ones((num_learners,) * 2) - np.eye(num_learners))
    np.testing.assert_allclose(zero_diag, (-1) ** (num_learners - 1) * (num_learners - 1))


@pytest.mark.parametrize("num_learners,noise", [(2, 1e-3), (3, 1e-2), (15, 1e-2), (15, 1e-5)])
def test_near_identical_learners_stay_finite_and_accurate(num_learners, noise):
    base = _phi((1, 8, 16), seed=3)
    phi = base + noise * _phi((num_learners, 8, 16), seed=4)
    value, grad = det_value_and_grad(phi, gamma=1.0)
    assert np.isfinite(grad).all()
    np.testing.assert_allclose(value, np.linalg.det(_np_similarity(phi, 1.0)), atol=3e-7)
    # d det / dS = adj(S)^T, whose entries a PSD unit-diagonal S bounds by 1.
    s = losses.rbf_similarity(phi, gamma=1.0)
    assert np.abs(jax.grad(jnp.linalg.det)(s)).max() <= 1.0 + 1e-5


def test_eps_jitter_bias_is_bounded():
    phi = np.broadcast_to(_phi((1, 4, 8), seed=5), (2, 4, 8))
    # Two identical learners: det([[1 + eps, 1], [1, 1 + eps]]) = (2 + eps) eps.
    np.testing.assert_allclose(losses.det_diversity(phi, gamma=1.0, eps=1e-3), 2.001e-3,
                               rtol=1e-4)
    phi = _phi((5, 4, 8), seed=6)
    plain = float(losses.det_diversity(phi, gamma=0.1))
    jittered = float(losses.det_diversity(phi, gamma=0.1, eps=1e-4))
    assert 0.0 < jittered - plain <= (1 + 1e-4) ** 5 - 1 + 1e-7


def test_pools_match_numpy():
    x = _phi((3, 2, 4, 5, 6), seed=7)
    np.testing.assert_allclose(losses.spatial_pool(x), x.mean(axis=-1), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(losses.channel_pool(x), x.mean(axis=(2, 3)), rtol=1e-6,
                               atol=1e-7)
    assert losses.spatial_pool(x).shape == (3, 2, 4, 5)
    assert losses.channel_pool(x).shape == (3, 2, 6)


def test_vmap_over_layers_matches_loop():
    phi = _phi((2, 4, 3, 6), seed=8)  # two layers of 4 learners
    f = jax.vmap(lambda p: losses.det_diversity(p, gamma=0.2))
    np.testing.assert_allclose(f(phi), [losses.det_diversity(p, gamma=0.2) for p in phi],
                               rtol=1e-5)


@pytest.mark.parametrize("fn,args,kwargs,match", [
    (losses.rbf_similarity, (np.ones(3),), {"gamma": 1.0}, "phi must have shape \\(L, N, ...\\)"),
    (losses.rbf_similarity, (np.ones((2, 3)),), {"gamma": -1.0}, "gamma must be"),
    (losses.det_diversity, (np.ones((2, 3)),), {"gamma": 1.0, "eps": -1e-6}, "eps must be"),
    (losses.spatial_pool, (np.ones((2, 3, 4, 5)),), {}, "x must have shape \\(L, N, H, W, C\\)"),
    (losses.channel_pool, (np.ones((2, 3, 4)),), {}, "x must have shape \\(L, N, H, W, C\\)"),
])
def test_bad_input_raises(fn, args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(*args, **kwargs)


def test_similarity_gradient_matches_plain_autodiff():
    # The custom JVP (inner-product tangent) against autodiff of the broadcast difference.
    phi = _phi((5, 6, 4, 4), seed=9, scale=0.3)
    weights = _phi((5, 5), seed=10)

    def plain(p):
        flat = p.reshape(5, 6, -1)
        sq = jnp.sum(jnp.square(flat[:, None] - flat[None, :]), axis=-1)
        return jnp.sum(weights * jnp.mean(jnp.exp(-0.5 * sq), axis=-1))

    ours = jax.grad(lambda p: jnp.sum(weights * losses.rbf_similarity(p, gamma=0.5)))(phi)
    np.testing.assert_allclose(ours, jax.grad(plain)(phi), rtol=1e-4, atol=1e-6)


# -- mask= -----------------------------------------------------------------------------------

_MASK = np.array([1, 1, 0, 1, 0, 1, 1], bool)


def test_mask_equals_the_unpadded_batch():
    phi = _phi((3, 7, 5), seed=20)
    s = losses.rbf_similarity(phi, gamma=0.3, mask=_MASK)
    np.testing.assert_allclose(s, _np_similarity(phi[:, _MASK], 0.3), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.diag(s), 1.0)
    got = losses.det_diversity(phi, gamma=0.3, mask=_MASK)
    np.testing.assert_allclose(got, np.linalg.det(_np_similarity(phi[:, _MASK], 0.3)),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got, losses.det_diversity(phi[:, _MASK], gamma=0.3), rtol=1e-6)
    # Feature maps (L, N, H, W), a numeric mask and jitter: still the sliced value.
    maps = _phi((2, 7, 3, 3), seed=21)
    np.testing.assert_allclose(
        losses.det_diversity(maps, gamma=0.1, eps=1e-3, mask=_MASK.astype(np.int32)),
        losses.det_diversity(maps[:, _MASK], gamma=0.1, eps=1e-3), rtol=1e-6)
    np.testing.assert_allclose(losses.det_diversity(phi, gamma=0.3, mask=np.ones(7, bool)),
                               losses.det_diversity(phi, gamma=0.3), rtol=1e-6)


def test_masked_samples_get_zero_gradient_even_when_not_finite():
    phi = _phi((3, 7, 5), seed=22)
    phi[:, 2] = np.nan
    phi[0, 4] = np.inf
    value, grad = jax.value_and_grad(
        lambda p: losses.det_diversity(p, gamma=0.3, mask=_MASK))(phi)
    np.testing.assert_allclose(value, losses.det_diversity(phi[:, _MASK], gamma=0.3), rtol=1e-6)
    grad = np.asarray(grad)
    assert np.all(grad[:, ~_MASK] == 0.0) and np.all(np.isfinite(grad))
    ref = jax.grad(lambda p: losses.det_diversity(p, gamma=0.3))(phi[:, _MASK])
    np.testing.assert_allclose(grad[:, _MASK], ref, rtol=1e-4, atol=1e-7)


def test_all_masked_is_zero():
    phi = _phi((3, 7, 5), seed=23)
    value, grad = jax.value_and_grad(
        lambda p: losses.det_diversity(p, gamma=0.3, mask=np.zeros(7, bool)))(phi)
    assert float(value) == 0.0 and np.all(np.asarray(grad) == 0.0)


def test_mask_under_jit_and_vmap():
    phi = _phi((3, 7, 5), seed=24)
    masks = np.stack([_MASK, ~_MASK])
    f = jax.jit(jax.vmap(lambda m: losses.det_diversity(phi, gamma=0.3, mask=m)))
    np.testing.assert_allclose(
        f(masks), [losses.det_diversity(phi[:, m], gamma=0.3) for m in masks], rtol=1e-5)


def test_bad_mask_raises():
    with pytest.raises(ValueError, match="mask must have shape \\(N,\\)"):
        losses.det_diversity(np.ones((2, 3, 4)), gamma=1.0, mask=np.ones(4, bool))
