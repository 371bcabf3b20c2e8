"""JAX augmentation: exact identities, determinism per key, ranges, jit == eager."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fer_jax.data import augment as aug

NONE = dict(flip=0.0, rotate_deg=0.0, scale=0.0, translate=0.0, brightness=0.0, contrast=0.0)


def _image(seed=0, shape=(12, 10, 2)):
    return jax.random.uniform(jax.random.key(seed), shape)


def test_identity_and_flip_are_exact():
    x = _image()
    ident = aug.random_affine_matrix(jax.random.key(1), 12, 10, aug.AugmentConfig(**NONE))
    np.testing.assert_allclose(aug.affine_warp(x, ident), x, atol=1e-6)
    flip = aug.random_affine_matrix(jax.random.key(1), 12, 10,
                                    aug.AugmentConfig(**dict(NONE, flip=1.0)))
    np.testing.assert_allclose(aug.affine_warp(x, flip), x[:, ::-1], atol=1e-6)


def test_rotation_by_90_degrees_of_a_square_image():
    x = _image(shape=(9, 9, 1))
    theta = np.pi / 2
    c, s = np.cos(theta), np.sin(theta)
    centre = np.array([4.0, 4.0])
    lin = np.array([[c, -s], [s, c]])
    matrix = np.concatenate([lin, (centre - lin @ centre)[:, None]], 1)
    out = aug.affine_warp(x, jnp.asarray(matrix, jnp.float32))
    # out[r, c] = x[src]: with this map, src row = 8 - c, src col = r, i.e. a 90-degree turn.
    np.testing.assert_allclose(out, np.rot90(np.asarray(x), k=-1), atol=1e-5)


def test_batch_is_deterministic_per_key_and_in_range():
    cfg = aug.AugmentConfig()
    x = jax.random.uniform(jax.random.key(0), (4, 16, 16, 1))
    a = aug.augment_batch(jax.random.key(3), x, cfg)
    b = jax.jit(aug.augment_batch, static_argnums=2)(jax.random.key(3), x, cfg)
    c = aug.augment_batch(jax.random.key(4), x, cfg)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert not np.allclose(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    # Different examples of one batch get different transforms.
    same = jnp.stack([x[0]] * 4)
    out = aug.augment_batch(jax.random.key(5), same, cfg)
    assert not np.allclose(out[0], out[1])


def test_brightness_only_shifts_by_at_most_the_range():
    x = jnp.full((1, 8, 8, 1), 0.5)
    out = aug.augment_batch(jax.random.key(0), x, aug.AugmentConfig(**dict(NONE, brightness=0.1)))
    delta = float(out[0, 0, 0, 0] - 0.5)
    assert 0 < abs(delta) <= 0.1
    np.testing.assert_allclose(out, 0.5 + delta, atol=1e-6)


@pytest.mark.parametrize("field,value", [("flip", 1.5), ("rotate_deg", -1.0), ("scale", 1.0)])
def test_bad_config(field, value):
    with pytest.raises(ValueError, match=field):
        aug.AugmentConfig(**{field: value})
