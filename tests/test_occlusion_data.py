"""Synthetic occluders and evaluation modes (fer_jax.data.occluders)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fer_jax.data import occluders as occ


def _distinct_images(n, h, w, c=1):
    # Values outside [0, 1] that differ per image: no texture (in [0, 1]) and no 'patch' from
    # another image can equal an original pixel, so "changed" == "covered by the occluder".
    return jnp.broadcast_to((2.0 + jnp.arange(n, dtype=jnp.float32))[:, None, None, None],
                            (n, h, w, c))


# Tests reuse these shapes and the default config: each new one costs an XLA compile.
N_IMAGES = 64


@pytest.mark.parametrize("shape", [(48, 48), (40, 60)])
def test_occluder_sizes_stay_in_range_and_inside_the_image(shape):
    h, w = shape
    n = N_IMAGES
    _, masks, boxes = occ.occlude_batch(jax.random.PRNGKey(0), _distinct_images(n, h, w),
                                        jnp.ones(n, bool))
    boxes, masks = np.asarray(boxes), np.asarray(masks)
    top, left, bh, bw = boxes.T
    # 1/3.75 to 1/2 of the side, in whole pixels (48: 12.8 -> 13 .. 24).
    assert bh.min() >= math.ceil(h / 3.75) and bh.max() <= h // 2
    assert bw.min() >= math.ceil(w / 3.75) and bw.max() <= w // 2
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + bh <= h).all() and (left + bw <= w).all()
    # Sizes really vary over the range (not a constant).
    assert len(set(bh.tolist())) > (h // 2 - math.ceil(h / 3.75)) // 2
    for i in range(n):
        ys, xs = np.nonzero(masks[i])
        assert len(ys) > 0
        assert ys.min() >= top[i] and ys.max() < top[i] + bh[i]
        assert xs.min() >= left[i] and xs.max() < left[i] + bw[i]


def test_masks_align_with_the_occluders():
    n, h, w = N_IMAGES, 48, 48
    images = _distinct_images(n, h, w)
    flags = jnp.arange(n) % 2 == 0
    out, masks, boxes = occ.occlude_batch(jax.random.PRNGKey(3), images, flags)
    changed = np.asarray(jnp.any(out != images, axis=-1))
    np.testing.assert_array_equal(changed, np.asarray(masks) > 0)
    # Clean images are untouched, with zero masks and zero boxes.
    assert not changed[1::2].any() and not np.asarray(boxes)[1::2].any()
    assert np.asarray(masks)[0::2].sum(axis=(1, 2)).min() > 0


def test_occluders_are_deterministic_per_key():
    x = _distinct_images(N_IMAGES, 48, 48)
    flags = jnp.ones(N_IMAGES, bool)
    a = occ.occlude_batch(jax.random.PRNGKey(7), x, flags)
    b = occ.occlude_batch(jax.random.PRNGKey(7), x, flags)
    c = occ.occlude_batch(jax.random.PRNGKey(8), x, flags)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    assert not np.array_equal(np.asarray(a[1]), np.asarray(c[1]))
    # Example i's occluder depends on its key only, not on the batch size.
    d = occ.occlude_batch(jax.random.PRNGKey(7), x[:8], flags[:8])
    np.testing.assert_array_equal(np.asarray(d[2]), np.asarray(a[2])[:8])


def test_every_shape_and_texture():
    m = 200
    keys = jax.random.split(jax.random.PRNGKey(0), m)
    boxes = jax.vmap(lambda k: occ.random_box(k, 48, 48, occ.OccluderConfig()))(keys)
    area = np.asarray(boxes[:, 2] * boxes[:, 3])
    shape_fn = jax.jit(jax.vmap(lambda k, i, b: occ.shape_mask(k, i, b, 48, 48)))
    fill_ratio = {}
    for index, shape in enumerate(occ.SHAPES):
        masks = np.asarray(shape_fn(keys, jnp.full((m,), index), boxes))
        fill_ratio[shape] = float(np.mean(masks.sum(axis=(1, 2)) / area))
        for mask, (top, left, bh, bw) in zip(masks, np.asarray(boxes), strict=True):
            assert not mask[:top].any() and not mask[top + bh:].any()
            assert not mask[:, :left].any() and not mask[:, left + bw:].any()
    # A block fills its box; an ellipse pi/4 of it; hands and blobs are sparser objects.
    assert fill_ratio["block"] == 1.0
    assert abs(fill_ratio["ellipse"] - math.pi / 4) < 0.03
    assert 0.3 < fill_ratio["hand"] < 0.75 and 0.2 < fill_ratio["blob"] < 0.8
    # Textures: solid fills have one value, noise and stripes vary; 'patch' is another image.
    src = jax.random.uniform(jax.random.PRNGKey(2), (48, 48, 1))
    tex_fn = jax.jit(jax.vmap(lambda k, i: occ.texture(k, i, src)))
    for index, texture in enumerate(occ.TEXTURES):
        fills = np.asarray(tex_fn(keys[:20], jnp.full((20,), index)))
        stds = fills[:, 12:36, 12:36].std(axis=(1, 2, 3))
        if texture == "solid":
            assert stds.max() < 1e-6
        else:
            assert np.median(stds) > 0.05, texture
        if texture == "patch":  # a shifted copy: the same multiset of pixel values
            for f in fills:
                np.testing.assert_array_equal(np.sort(f.ravel()), np.sort(np.asarray(src).ravel()))


def test_mix_flags_give_the_exact_rate():
    for n, rate, count in ((16, 0.5, 8), (15, 0.5, 8), (10, 0.0, 0), (10, 1.0, 10)):
        flags = np.asarray(occ.mix_flags(jax.random.PRNGKey(n), n, rate))
        assert flags.sum() == count
    a = occ.mix_flags(jax.random.PRNGKey(0), 64, 0.5)
    b = occ.mix_flags(jax.random.PRNGKey(1), 64, 0.5)
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="rate"):
        occ.mix_flags(jax.random.PRNGKey(0), 4, 1.5)


@pytest.mark.parametrize("mode,side", [("R8", 8), ("R16", 16), ("R24", 24)])
def test_square_modes(mode, side):
    x = jax.random.uniform(jax.random.PRNGKey(0), (32, 48, 48, 1)) + 0.5
    out, masks = occ.eval_occlusion(mode, jax.random.PRNGKey(1), x)
    masks = np.asarray(masks)
    np.testing.assert_array_equal(masks.sum(axis=(1, 2)), side * side)
    for m in masks:  # a full square: its bounding box has the same area
        ys, xs = np.nonzero(m)
        assert (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) == (side, side)
    np.testing.assert_array_equal(np.asarray(out)[masks > 0], 0.0)
    # Positions are random per image; sizes scale with the image (R24 on 96 px = 48 px).
    assert len({tuple(np.argwhere(m)[0]) for m in masks}) > 10
    _, big = occ.eval_occlusion(mode, jax.random.PRNGKey(1), jnp.ones((2, 96, 96, 1)))
    np.testing.assert_array_equal(np.asarray(big).sum(axis=(1, 2)), (2 * side) ** 2)


def test_eye_and_mouth_modes_canonical_and_from_landmarks():
    x = jnp.ones((3, 48, 48, 1))
    _, eyes = occ.eval_occlusion("eyes", jax.random.PRNGKey(0), x)
    _, mouth = occ.eval_occlusion("mouth", jax.random.PRNGKey(0), x)
    for masks, (fy, fx) in ((eyes, occ.CANONICAL_CENTRES["eyes"]),
                            (mouth, occ.CANONICAL_CENTRES["mouth"])):
        ys, xs = np.nonzero(np.asarray(masks)[0])
        assert len(ys) == 24 * 24
        # Centred on the canonical point, shifted only as far as needed to stay inside.
        cy = min(max(round(fy * 48 - 12), 0), 24) + 11.5
        assert ys.mean() == cy and xs.mean() == fx * 48 - 0.5
    # MTCNN order: left eye, right eye, nose, left mouth, right mouth, as (x, y).
    landmarks = np.array([[[10, 14], [30, 18], [20, 25], [12, 36], [26, 40]]] * 3, np.float32)
    centres = occ.landmark_centres("eyes", landmarks)
    np.testing.assert_allclose(np.asarray(centres)[0], [16.0, 20.0])  # (row, col)
    _, masks = occ.region_occlusion(x, centres, 24)
    ys, xs = np.nonzero(np.asarray(masks)[0])
    assert (ys.min(), xs.min(), ys.max(), xs.max()) == (4, 8, 27, 31)
    mouth_c = occ.landmark_centres("mouth", landmarks)
    np.testing.assert_allclose(np.asarray(mouth_c)[0], [38.0, 19.0])
    _, masks = occ.region_occlusion(x, mouth_c, 24)
    ys, _ = np.nonzero(np.asarray(masks)[0])
    assert ys.max() == 47  # pushed up to stay inside the image (38 + 12 > 48)


def test_bad_inputs_give_clear_errors():
    small = jnp.ones((2, 16, 16, 1))
    with pytest.raises(ValueError, match="smaller than the occluder"):
        occ.square_occlusion(jax.random.PRNGKey(0), small, 24)
    with pytest.raises(ValueError, match="smaller than the occluder"):
        occ.region_occlusion(small, jnp.zeros((2, 2)), 20)
    with pytest.raises(ValueError, match="smaller than the smallest occluder"):
        occ.occlude_batch(jax.random.PRNGKey(0), jnp.ones((2, 1, 1, 1)), jnp.ones(2, bool))
    with pytest.raises(ValueError, match="occlusion mode"):
        occ.eval_occlusion("R32x", jax.random.PRNGKey(0), small)
    with pytest.raises(ValueError, match="min_frac"):
        occ.OccluderConfig(min_frac=0.6, max_frac=0.5)
    with pytest.raises(ValueError, match="shapes"):
        occ.OccluderConfig(shapes=("cup",))
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        occ.occlude_batch(jax.random.PRNGKey(0), jnp.ones((16, 16, 1)), jnp.ones(16, bool))
    with pytest.raises(ValueError, match="landmarks"):
        occ.landmark_centres("eyes", np.zeros((2, 4, 2)))
