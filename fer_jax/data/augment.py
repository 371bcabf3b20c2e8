"""Image augmentation in JAX: per-example keys, jit/vmap compatible, run on device in the step.

One random affine warp (horizontal flip, rotation, scale, translation) with bilinear sampling,
followed by brightness and contrast jitter. Images are float32 (H, W, C) in [0, 1]; a batch is
augmented with `augment_batch(key, images, ...)`, which splits one key per example, so the same
key always gives the same batch (a resumed run replays the same augmentations).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random transforms; zeros switch a transform off.

    flip: probability of a horizontal flip. rotate_deg: rotation uniform in [-r, r] degrees.
    scale: zoom factor uniform in [1 - s, 1 + s]. translate: shift uniform in [-t, t] of the size.
    brightness: additive delta uniform in [-b, b]. contrast: factor uniform in [1 - c, 1 + c]
    around the per-image mean.
    """

    flip: float = 0.5
    rotate_deg: float = 10.0
    scale: float = 0.1
    translate: float = 0.1
    brightness: float = 0.2
    contrast: float = 0.2

    def __post_init__(self):
        if not 0.0 <= self.flip <= 1.0:
            raise ValueError(f"augment.flip is a probability in [0, 1], got {self.flip}")
        for name in ("rotate_deg", "scale", "translate", "brightness", "contrast"):
            if getattr(self, name) < 0:
                raise ValueError(f"augment.{name} must be >= 0, got {getattr(self, name)}")
        if self.scale >= 1 or self.contrast > 1:
            raise ValueError("augment.scale must be < 1 and augment.contrast <= 1")


def affine_warp(image: jax.Array, matrix: jax.Array) -> jax.Array:
    """Samples `image` (H, W, C) at `matrix @ [y, x, 1]` for every output pixel (bilinear).

    `matrix` (2, 3) maps output pixel coordinates (row, col) to input coordinates; pixels that
    fall outside the input take the nearest edge value (no black borders to learn from).
    """
    h, w, _ = image.shape
    rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                              indexing="ij")
    coords = jnp.stack([rows.ravel(), cols.ravel(), jnp.ones(h * w, jnp.float32)])
    src = matrix @ coords
    sample = lambda channel: jax.scipy.ndimage.map_coordinates(
        channel, [src[0], src[1]], order=1, mode="nearest").reshape(h, w)
    return jax.vmap(sample, in_axes=2, out_axes=2)(image)


def random_affine_matrix(key: jax.Array, height: int, width: int, cfg: AugmentConfig) -> jax.Array:
    """(2, 3) output->input map: flip, rotation, scale and translation about the image centre."""
    k_flip, k_rot, k_scale, k_shift = jax.random.split(key, 4)
    angle = jnp.deg2rad(jax.random.uniform(k_rot, (), minval=-cfg.rotate_deg,
                                           maxval=cfg.rotate_deg))
    zoom = jax.random.uniform(k_scale, (), minval=1 - cfg.scale, maxval=1 + cfg.scale)
    shift = jax.random.uniform(k_shift, (2,), minval=-cfg.translate, maxval=cfg.translate)
    shift = shift * jnp.array([height, width], jnp.float32)
    flip = jnp.where(jax.random.bernoulli(k_flip, float(cfg.flip)), -1.0, 1.0)
    # Inverse map: output pixel -> centred -> un-rotate, un-zoom -> un-flip -> input pixel.
    cos, sin = jnp.cos(angle) / zoom, jnp.sin(angle) / zoom
    linear = jnp.array([[cos, -sin], [sin, cos]]) * jnp.array([1.0, flip])[None, :]
    centre = jnp.array([(height - 1) / 2, (width - 1) / 2], jnp.float32)
    offset = centre - linear @ (centre + shift)
    return jnp.concatenate([linear, offset[:, None]], axis=1)


def augment_image(key: jax.Array, image: jax.Array, cfg: AugmentConfig) -> jax.Array:
    """One augmented copy of a float image (H, W, C) in [0, 1]."""
    k_geo, k_bright, k_contrast = jax.random.split(key, 3)
    h, w, _ = image.shape
    if cfg.flip or cfg.rotate_deg or cfg.scale or cfg.translate:
        image = affine_warp(image, random_affine_matrix(k_geo, h, w, cfg))
    if cfg.contrast:
        factor = jax.random.uniform(k_contrast, (), minval=1 - cfg.contrast,
                                    maxval=1 + cfg.contrast)
        mean = image.mean()
        image = (image - mean) * factor + mean
    if cfg.brightness:
        image = image + jax.random.uniform(k_bright, (), minval=-cfg.brightness,
                                           maxval=cfg.brightness)
    return jnp.clip(image, 0.0, 1.0)


def augment_batch(key: jax.Array, images: jax.Array, cfg: AugmentConfig) -> jax.Array:
    """Augments a batch (N, H, W, C) with one key per example (split from `key`)."""
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(augment_image, in_axes=(0, 0, None))(keys, images, cfg)
