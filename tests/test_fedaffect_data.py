"""SimCLR augmentation and few-shot episode samplers (fer_jax.data.simclr_augment / episodes)."""

import colorsys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fer_jax.data import episodes as ep
from fer_jax.data import simclr_augment as sa

OFF = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=0.0, jitter_prob=0.0,
           grayscale_prob=0.0, blur_prob=0.0)


def _images(n=4, size=16, c=3, seed=0):
    return jnp.asarray(np.random.default_rng(seed).random((n, size, size, c)), jnp.float32)


_views = jax.jit(sa.simclr_views, static_argnums=2)


def test_views_shape_range_determinism_and_per_example_keys():
    """One compile: range, replay by key, and view v of example i depends on (key, v, i) only
    (changing image 0 - as padding would - leaves every other example's views unchanged)."""
    x = _images(5, size=48, c=1)
    cfg = sa.SimCLRAugmentConfig()
    a, b = _views(jax.random.PRNGKey(0), x, cfg)
    a2, b2 = _views(jax.random.PRNGKey(0), x.at[0].set(0.0), cfg)
    a3, _ = _views(jax.random.PRNGKey(1), x, cfg)
    assert a.shape == b.shape == x.shape and a.dtype == jnp.float32
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    np.testing.assert_array_equal(a[1:], a2[1:])
    np.testing.assert_array_equal(b[1:], b2[1:])
    assert not np.allclose(a[0], a2[0])
    assert not np.allclose(a, b) and not np.allclose(a, a3)


def test_flip_and_grayscale_exact():
    """Crop off, flip p = 0.5, grayscale p = 1: every view is gray(x) or its exact mirror, and
    both cases occur (one compile)."""
    x = _images(16)
    cfg = sa.SimCLRAugmentConfig(**{**OFF, "flip": 0.5, "grayscale_prob": 1.0})
    a, b = _views(jax.random.PRNGKey(0), x, cfg)
    gray = np.repeat(np.asarray(x) @ np.array([0.299, 0.587, 0.114])[:, None], 3, -1)
    flipped = []
    for i in range(16):
        for view in (np.asarray(a[i]), np.asarray(b[i])):
            plain = np.allclose(view, gray[i], atol=1e-5)
            mirror = np.allclose(view, gray[i][:, ::-1], atol=1e-5)
            assert plain or mirror
            flipped.append(mirror)
    assert 0 < sum(flipped) < 32


def test_crop_is_a_zoom_into_the_image():
    """A crop with area fraction 1/4 and ratio 1 maps 16 px onto an 8 px window, resized x2."""
    cfg = sa.SimCLRAugmentConfig(**{**OFF, "crop_scale": (0.25, 0.25)})
    m = np.asarray(sa.crop_flip_matrix(jax.random.PRNGKey(5), 16, 16, cfg))
    np.testing.assert_allclose(np.abs(m[0, 0]), 0.5, atol=1e-6)
    np.testing.assert_allclose(np.abs(m[1, 1]), 0.5, atol=1e-6)
    # The sampled window stays inside the image: pixel centres map into [-0.5, 15.5].
    corners = m @ np.array([[0, 0, 15, 15], [0, 15, 0, 15], [1, 1, 1, 1]])
    assert corners.min() >= -0.5 and corners.max() <= 15.5
    ident = np.asarray(sa.crop_flip_matrix(jax.random.PRNGKey(5), 16, 16,
                                           sa.SimCLRAugmentConfig(**OFF)))
    np.testing.assert_allclose(ident, [[1, 0, 0], [0, 1, 0]], atol=1e-6)


def test_hsv_roundtrip_matches_colorsys():
    rgb = np.random.default_rng(1).random((50, 3))
    hsv = np.asarray(jax.jit(sa.rgb_to_hsv)(jnp.asarray(rgb, jnp.float32)))
    ref = np.array([colorsys.rgb_to_hsv(*p) for p in rgb])
    np.testing.assert_allclose(hsv, ref, atol=1e-5)
    np.testing.assert_allclose(jax.jit(sa.hsv_to_rgb)(jnp.asarray(hsv)), rgb, atol=1e-5)


def test_color_jitter_gray_and_brightness():
    """Gray images keep one channel; brightness alone multiplies by a factor in [0.6, 1.4]."""
    x = _images(1, c=1)[0] * 0.5
    cfg = sa.SimCLRAugmentConfig(brightness=0.4, contrast=0.0, saturation=0.0, hue=0.0)
    y = np.asarray(sa.color_jitter(jax.random.PRNGKey(2), x, cfg))
    assert y.shape == x.shape
    ratio = y / np.asarray(x)
    np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-5)
    assert 0.6 <= ratio.flat[0] <= 1.4


def test_gaussian_blur_matches_numpy_and_keeps_constants():
    x = np.random.default_rng(2).random((12, 12, 1)).astype(np.float32)
    sigma, size = 1.3, 5
    out = np.asarray(sa.gaussian_blur(jnp.asarray(x), jnp.float32(sigma), size))
    t = np.arange(-2, 3)
    w = np.exp(-0.5 * (t / sigma) ** 2)
    w /= w.sum()
    p = np.pad(x, ((2, 2), (0, 0), (0, 0)), mode="reflect")
    ref = sum(w[i] * p[i:i + 12] for i in range(5))
    p = np.pad(ref, ((0, 0), (2, 2), (0, 0)), mode="reflect")
    ref = sum(w[i] * p[:, i:i + 12] for i in range(5))
    np.testing.assert_allclose(out, ref, atol=1e-6)
    const = sa.gaussian_blur(jnp.full((8, 8, 3), 0.3), jnp.float32(2.0), 3)
    np.testing.assert_allclose(const, 0.3, atol=1e-6)
    assert sa.blur_kernel_size(48, 0.1) == 5 and sa.blur_kernel_size(224, 0.1) == 23


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="simclr_augment.flip"):
        sa.SimCLRAugmentConfig(flip=1.5)
    with pytest.raises(ValueError, match="crop_scale"):
        sa.SimCLRAugmentConfig(crop_scale=(0.0, 1.0))


# -- episodes ------------------------------------------------------------------------------------

def test_sample_episode_structure_and_vmap():
    labels = jnp.array([0, 0, 1, 1, 1, 2, 2, 3, 0, 2])
    mask = jnp.array([True] * 9 + [False])  # the last image is padding
    keys = jax.random.split(jax.random.PRNGKey(0), 200)
    eps = jax.vmap(lambda k: ep.sample_episode(k, labels, mask, num_classes=4, shots=1,
                                               queries=2))(keys)
    sup, qi, qv = np.asarray(eps.support_index), np.asarray(eps.query_index), \
        np.asarray(eps.query_valid)
    lab = np.asarray(labels)
    assert sup.shape == (200, 4, 1) and qi.shape == (200, 2)
    assert np.all(lab[sup[:, :, 0]] == np.arange(4)) and np.all(sup != 9)
    assert np.all(qv) and np.all(np.asarray(eps.ok))
    for e in range(200):
        assert not set(qi[e]) & set(sup[e].ravel()) and 9 not in qi[e]
        assert len(set(qi[e])) == 2
    # Supports are uniform among a class's images: class 1 has 3, each ~1/3 of the time.
    freq = np.bincount(sup[:, 1, 0], minlength=10)[[2, 3, 4]] / 200
    np.testing.assert_allclose(freq, 1 / 3, atol=0.12)


def test_sample_episode_short_class_and_too_few():
    labels = jnp.array([0, 0, 1, 1, 2, 0])
    mask = jnp.ones(6, bool)
    e = ep.sample_episode(jax.random.PRNGKey(1), labels, mask, num_classes=4, shots=2, queries=2)
    # Class 2 has 1 image (< K = 2) and class 3 none: both left out; queries from 0 or 1 only.
    np.testing.assert_array_equal(e.class_valid, [True, True, False, False])
    assert bool(e.ok) and int(e.query_valid.sum()) == 1  # 5 - 4 supports = one candidate (id 5)
    assert int(labels[e.query_index[np.asarray(e.query_valid)][0]]) == 0
    one_class = ep.sample_episode(jax.random.PRNGKey(1), jnp.array([1, 1, 1]), jnp.ones(3, bool),
                                  num_classes=3, shots=1, queries=1)
    assert not bool(one_class.ok)
    with pytest.raises(ValueError, match="pool of 3"):
        ep.sample_episode(jax.random.PRNGKey(1), jnp.array([1, 1, 1]), jnp.ones(3, bool),
                          num_classes=3, shots=4, queries=1)


def test_heldout_episodes():
    labels = np.array([0, 0, 0, 1, 1, 2, 3, 3])  # class 4 absent
    e = ep.heldout_episodes(labels, num_classes=5, shots=1, num_episodes=300, seed=(0, 1))
    assert e.support_index.shape == (300, 5, 1)
    np.testing.assert_array_equal(e.class_valid, [1, 1, 1, 1, 0])
    assert np.all(e.support_index[:, 4] == -1) and e.skipped_images == 0
    for k in range(300):
        s = e.support_index[k, :4, 0]
        np.testing.assert_array_equal(labels[s], np.arange(4))
        expected = np.ones(8, bool)
        expected[s] = False
        np.testing.assert_array_equal(e.query_mask[k], expected)
    counts = np.bincount(e.support_index[:, 0, 0], minlength=8)[:3] / 300
    np.testing.assert_allclose(counts, 1 / 3, atol=0.1)
    e2 = ep.heldout_episodes(labels, num_classes=5, shots=2, num_episodes=3, seed=0)
    # Classes 2 (one image) is too small for K = 2: left out, its image never a query.
    np.testing.assert_array_equal(e2.class_valid, [1, 1, 0, 1, 0])
    assert e2.skipped_images == 1 and not e2.query_mask[:, 5].any()
    with pytest.raises(ValueError, match="fewer than 2 classes"):
        ep.heldout_episodes(np.array([1, 1, 1]), num_classes=3, num_episodes=2, seed=0)


def test_heldout_episodes_with_support_pool():
    """Cross-client episodes: supports from the pool (client A), queries = the rest (client B)."""
    labels = np.array([0, 1, 2, 0, 1, 1, 3, 2])
    pool = np.array([1, 1, 1, 0, 0, 0, 0, 0], bool)  # A holds classes 0-2; B holds 0, 1, 1, 3, 2
    e = ep.heldout_episodes(labels, num_classes=4, num_episodes=20, seed=3, support_pool=pool)
    np.testing.assert_array_equal(e.class_valid, [1, 1, 1, 0])
    np.testing.assert_array_equal(e.support_index[:, :3, 0], np.tile([0, 1, 2], (20, 1)))
    # Every image of B whose class A can support is a query, in every episode; B's class-3
    # image cannot be answered and is skipped (counted); A's images are never queries.
    np.testing.assert_array_equal(e.query_mask, np.tile([0, 0, 0, 1, 1, 1, 0, 1], (20, 1)))
    assert e.skipped_images == 1
    with pytest.raises(ValueError, match="support_pool"):
        ep.heldout_episodes(labels, num_classes=4, num_episodes=2, seed=0, support_pool=pool[:3])
    with pytest.raises(ValueError, match="fewer than 2 classes"):
        ep.heldout_episodes(labels, num_classes=4, num_episodes=2, seed=0,
                            support_pool=labels == 3)


def test_fewshot_eligibility_is_more_than_c():
    np.testing.assert_array_equal(ep.fewshot_eligible([7, 8, 0, 20], 7), [0, 1, 0, 1])
