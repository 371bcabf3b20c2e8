"""fer_jax.losses.class_prototypes and relation_mse against hand-computed and NumPy values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from fer_jax import losses


def test_prototypes_sum_k_shots_any_trailing_shape():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(6, 2, 2, 3)).astype(np.float32)  # K=2 shots of 3 classes, maps
    labels = np.array([2, 0, 1, 0, 2, 1])
    got = losses.class_prototypes(feats, labels, 3)
    want = np.stack([feats[labels == c].astype(np.float64).sum(0) for c in range(3)])
    assert got.shape == (3, 2, 2, 3)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # The sum, not the mean: class 0 is exactly rows 1 + 3.
    np.testing.assert_allclose(got[0], feats[1] + feats[3], rtol=1e-6)


def test_prototypes_one_shot_is_a_permutation_and_empty_class_is_zero():
    feats = jnp.arange(12.0).reshape(3, 4)
    got = losses.class_prototypes(feats, jnp.array([1, 3, 0]), 4)
    np.testing.assert_array_equal(got, [[8, 9, 10, 11], [0, 1, 2, 3], [0, 0, 0, 0], [4, 5, 6, 7]])
    jitted = jax.jit(losses.class_prototypes, static_argnums=2)(feats, jnp.array([1, 3, 0]), 4)
    np.testing.assert_array_equal(jitted, got)


def test_relation_mse_hand_computed():
    scores = jnp.array([[0.9, 0.1, 0.2], [0.3, 0.6, 0.0]])
    # Targets [[1,0,0],[0,1,0]]: squared errors .01 .01 .04 .09 .16 0 -> 0.31 / 6.
    got = losses.relation_mse(scores, jnp.array([0, 1]), jnp.array([0, 1, 2]))
    np.testing.assert_allclose(got, 0.31 / 6, rtol=1e-6)


def test_relation_mse_matches_numpy_and_gradient():
    rng = np.random.default_rng(1)
    scores = rng.uniform(size=(5, 7)).astype(np.float32)
    query, support = rng.integers(0, 7, size=5), rng.permutation(7)
    want = np.mean((scores.astype(np.float64) - (query[:, None] == support[None, :])) ** 2)
    np.testing.assert_allclose(losses.relation_mse(scores, query, support), want, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(losses.relation_mse)(scores, query, support), want,
                               rtol=1e-6)
    # d/ds mean((s - t)^2) = 2 (s - t) / (Q C).
    grad = jax.grad(losses.relation_mse)(scores, query, support)
    target = query[:, None] == support[None, :]
    np.testing.assert_allclose(grad, 2 * (scores - target) / scores.size, rtol=1e-5, atol=1e-8)
    with jax.enable_x64(True):
        f = jax.jit(lambda s: losses.relation_mse(s, query, support))
        check_grads(f, (jnp.asarray(scores, jnp.float64),), order=2, modes=("rev",))


@pytest.mark.parametrize("args,match", [
    ((np.ones((4, 2)), np.array([0, 1, 0]), 2), "support_labels must have shape \\(S,\\)"),
    ((np.ones((2, 2)), np.array([0.0, 1.0]), 2), "support_labels must hold integer"),
    ((np.ones((2, 2)), np.array([0, 1]), 0), "num_classes must be >= 1"),
    ((np.ones((2, 2)), np.array([0, 1]), 2.5), "num_classes must be a Python int"),
    ((np.ones(()), np.array([0]), 2), "support_features must have shape \\(S, ...\\)"),
])
def test_prototypes_bad_input_raises(args, match):
    with pytest.raises(ValueError, match=match):
        losses.class_prototypes(*args)


@pytest.mark.parametrize("scores,query,support,match", [
    (np.ones(3), np.zeros(3, int), np.zeros(3, int), "scores must have shape \\(Q, C\\)"),
    (np.ones((2, 3)), np.zeros(3, int), np.zeros(3, int), "query_labels must have shape"),
    (np.ones((2, 3)), np.zeros(2, int), np.zeros(2, int), "support_labels must have shape"),
])
def test_relation_mse_bad_input_raises(scores, query, support, match):
    with pytest.raises(ValueError, match=match):
        losses.relation_mse(scores, query, support)


# -- mask= -----------------------------------------------------------------------------------

def _episode(seed=1):
    rng = np.random.default_rng(seed)
    scores = rng.random((4, 5)).astype(np.float32)
    query_labels = np.array([0, 2, 4, 1])
    query_valid = np.array([1, 1, 0, 1], bool)
    class_valid = np.array([1, 0, 1, 1, 1], bool)
    return scores, query_labels, query_valid, class_valid


def test_relation_mse_mask_equals_loss_on_valid_pairs():
    scores, ql, qv, cv = _episode()
    slots = np.arange(5)
    pairs = qv[:, None] & cv[None, :]
    got = losses.relation_mse(scores, ql, slots, mask=pairs)
    hand = np.mean([(scores[q, c] - (ql[q] == c)) ** 2 for q in range(4) for c in range(5)
                    if qv[q] and cv[c]])
    np.testing.assert_allclose(got, hand, rtol=1e-6)
    np.testing.assert_allclose(got, losses.relation_mse(scores[qv][:, cv], ql[qv], slots[cv]),
                               rtol=1e-6)
    # A (Q,) mask drops whole queries; a numeric mask reads the same as a bool one.
    np.testing.assert_allclose(losses.relation_mse(scores, ql, slots, mask=qv.astype(float)),
                               losses.relation_mse(scores[qv], ql[qv], slots), rtol=1e-6)
    np.testing.assert_allclose(losses.relation_mse(scores, ql, slots, mask=np.ones(4, bool)),
                               losses.relation_mse(scores, ql, slots), rtol=1e-7)


def test_relation_mse_masked_pairs_get_zero_gradient():
    scores, ql, qv, cv = _episode()
    pairs = qv[:, None] & cv[None, :]
    scores[~pairs] = np.nan  # padding garbage
    value, grad = jax.value_and_grad(
        lambda s: losses.relation_mse(s, ql, np.arange(5), mask=pairs))(scores)
    assert np.isfinite(float(value))
    grad = np.asarray(grad)
    assert np.all(grad[~pairs] == 0.0)
    target = (ql[:, None] == np.arange(5)[None, :])
    np.testing.assert_allclose(grad[pairs], 2 * (scores - target)[pairs] / pairs.sum(),
                               rtol=1e-6)
    none = jax.value_and_grad(lambda s: losses.relation_mse(
        s, ql, np.arange(5), mask=np.zeros((4, 5), bool)))(scores)
    assert float(none[0]) == 0.0 and np.all(np.asarray(none[1]) == 0.0)


def test_relation_mse_mask_under_jit_and_vmap():
    scores, ql, qv, _ = _episode()
    masks = np.stack([qv, ~qv])
    f = jax.jit(jax.vmap(lambda m: losses.relation_mse(scores, ql, jnp.arange(5), mask=m)))
    np.testing.assert_allclose(
        f(masks), [losses.relation_mse(scores[m], ql[m], np.arange(5)) for m in masks],
        rtol=1e-6)


def test_relation_mse_bad_mask_raises():
    with pytest.raises(ValueError, match="mask must have shape \\(Q,\\) = \\(2,\\) or"):
        losses.relation_mse(np.ones((2, 3)), np.zeros(2, int), np.arange(3), mask=np.ones(3))
