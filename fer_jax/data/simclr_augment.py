"""SimCLR's stochastic augmentation in JAX: per-example keys, jit/vmap compatible, on device.

FedAffect (Shome & Kar), Section 3.1 / Algorithm 1 lines 22-24: every local image x_k gives two
views t(x_k), t'(x_k) drawn from a stochastic pipeline; the pipeline is SimCLR's (Chen et al.
2020, *A Simple Framework for Contrastive Learning of Visual Representations*, Appendix A):

  1. random resized crop (area fraction in `crop_scale`, aspect ratio log-uniform in
     `crop_ratio`), resized back to the input size, and a horizontal flip with prob. `flip`;
     both are one bilinear affine warp (`augment.affine_warp`, edge pixels repeated);
  2. colour jitter with prob. `jitter_prob`: brightness (multiplicative), contrast (blend with
     the image's mean luminance) and, for RGB only, saturation (blend with the gray image) and
     hue (rotation of the HSV hue). SimCLR applies the four in a random order; we use this
     fixed order (as torchvision's ColorJitter did before v0.8) - a documented simplification;
  3. random grayscale with prob. `grayscale_prob` (RGB only; a gray image is unchanged);
  4. Gaussian blur with prob. `blur_prob`, sigma uniform in `blur_sigma` pixels, kernel side
     `blur_kernel_frac` of the image side (odd, >= 3), as SimCLR (10% of the side).

Images are float32 (H, W, C) in [0, 1], C in {1, 3}. `simclr_views(key, images, cfg)` splits one
key per example and view, so view v of example i depends only on (key, v, i): the same key
replays the same views (resume), and padding examples never change the others' views.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from fer_jax.data.augment import affine_warp

# ITU-R 601 luma weights (torchvision's rgb_to_grayscale).
_LUMA = (0.299, 0.587, 0.114)


@dataclasses.dataclass(frozen=True)
class SimCLRAugmentConfig:
    """Ranges of SimCLR's augmentations (defaults: Chen et al. 2020, strength s = 1 halved for
    hue as torchvision's SimCLR recipes do). A probability of 0 switches a transform off."""

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_frac: float = 0.1

    def __post_init__(self):
        for name in ("flip", "jitter_prob", "grayscale_prob", "blur_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"simclr_augment.{name} is a probability in [0, 1], got "
                                 f"{getattr(self, name)}")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"simclr_augment.crop_scale needs 0 < lo <= hi <= 1, got "
                             f"{self.crop_scale}")
        lo, hi = self.crop_ratio
        if not 0.0 < lo <= hi:
            raise ValueError(f"simclr_augment.crop_ratio needs 0 < lo <= hi, got {self.crop_ratio}")
        for name in ("brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"simclr_augment.{name} must be in [0, 1], got "
                                 f"{getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"simclr_augment.hue must be in [0, 0.5], got {self.hue}")
        lo, hi = self.blur_sigma
        if not 0.0 < lo <= hi:
            raise ValueError(f"simclr_augment.blur_sigma needs 0 < lo <= hi, got {self.blur_sigma}")
        if not 0.0 < self.blur_kernel_frac <= 1.0:
            raise ValueError(f"simclr_augment.blur_kernel_frac must be in (0, 1], got "
                             f"{self.blur_kernel_frac}")


def crop_flip_matrix(key: jax.Array, height: int, width: int, cfg: SimCLRAugmentConfig):
    """(2, 3) output->input pixel map of a random resized crop followed by a random flip."""
    k_area, k_ratio, k_top, k_left, k_flip = jax.random.split(key, 5)
    area = jax.random.uniform(k_area, (), minval=cfg.crop_scale[0], maxval=cfg.crop_scale[1])
    log_ratio = jax.random.uniform(k_ratio, (), minval=math.log(cfg.crop_ratio[0]),
                                   maxval=math.log(cfg.crop_ratio[1]))
    ratio = jnp.exp(log_ratio)
    # torchvision retries crops that do not fit; clipping the box to the image is the one-shot
    # (branch-free) equivalent and keeps the sampled area whenever the box fits.
    crop_w = jnp.clip(jnp.sqrt(area * height * width * ratio), 1.0, width)
    crop_h = jnp.clip(jnp.sqrt(area * height * width / ratio), 1.0, height)
    top = jax.random.uniform(k_top, ()) * (height - crop_h)
    left = jax.random.uniform(k_left, ()) * (width - crop_w)
    sy, sx = crop_h / height, crop_w / width
    flip = jax.random.bernoulli(k_flip, cfg.flip)
    # Pixel centres: output (r + 0.5) / H of the crop -> input top + that * crop_h - 0.5.
    row = jnp.stack([sy, 0.0, top + 0.5 * sy - 0.5])
    col_plain = jnp.stack([0.0, sx, left + 0.5 * sx - 0.5])
    col_flip = jnp.stack([0.0, -sx, left + (width - 0.5) * sx - 0.5])
    return jnp.stack([row, jnp.where(flip, col_flip, col_plain)])


def grayscale(image: jax.Array) -> jax.Array:
    """Luminance (H, W, 1) of an RGB image; a 1-channel image is returned as is."""
    if image.shape[-1] == 1:
        return image
    return jnp.tensordot(image, jnp.asarray(_LUMA, image.dtype), axes=([-1], [0]))[..., None]


def _blend(image, other, factor):
    return jnp.clip(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def rgb_to_hsv(rgb: jax.Array) -> jax.Array:
    """(..., 3) RGB in [0, 1] -> HSV with hue in [0, 1) (colorsys convention)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    maxc, minc = rgb.max(-1), rgb.min(-1)
    v, delta = maxc, maxc - minc
    s = jnp.where(maxc > 0, delta / jnp.where(maxc > 0, maxc, 1.0), 0.0)
    d = jnp.where(delta > 0, delta, 1.0)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = jnp.where(maxc == r, bc - gc, jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = jnp.where(delta > 0, (h / 6.0) % 1.0, 0.0)
    return jnp.stack([h, s, v], -1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
    """Inverse of `rgb_to_hsv` (colorsys.hsv_to_rgb, vectorized)."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    i = jnp.floor(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.astype(jnp.int32) % 6
    # The six sectors of the hue circle, selected without branches.
    r = jnp.choose(i, [v, q, p, p, t, v], mode="clip")
    g = jnp.choose(i, [t, v, v, q, p, p], mode="clip")
    b = jnp.choose(i, [p, p, t, v, v, q], mode="clip")
    return jnp.stack([r, g, b], -1)


def color_jitter(key: jax.Array, image: jax.Array, cfg: SimCLRAugmentConfig) -> jax.Array:
    """Brightness, contrast (and saturation, hue for RGB) with factors drawn from `cfg`."""
    kb, kc, ks, kh = jax.random.split(key, 4)
    factor = lambda k, s: jax.random.uniform(k, (), minval=1.0 - s, maxval=1.0 + s)
    image = jnp.clip(image * factor(kb, cfg.brightness), 0.0, 1.0)
    image = _blend(image, grayscale(image).mean(), factor(kc, cfg.contrast))
    if image.shape[-1] == 3:
        image = _blend(image, grayscale(image), factor(ks, cfg.saturation))
        hsv = rgb_to_hsv(image)
        shift = jax.random.uniform(kh, (), minval=-cfg.hue, maxval=cfg.hue)
        image = hsv_to_rgb(hsv.at[..., 0].set((hsv[..., 0] + shift) % 1.0))
    return image


def blur_kernel_size(height: int, frac: float) -> int:
    """Odd kernel side, `frac` of the image side, at least 3."""
    k = max(3, int(round(frac * height)))
    return k if k % 2 else k + 1


def gaussian_blur(image: jax.Array, sigma: jax.Array, size: int) -> jax.Array:
    """Separable Gaussian blur with a traced sigma and a static odd kernel side (reflect pad)."""
    r = size // 2
    taps = jnp.arange(-r, r + 1, dtype=jnp.float32)
    w = jnp.exp(-0.5 * (taps / sigma) ** 2)
    w = w / w.sum()
    h, wd, _ = image.shape
    # Shifted multiply-adds instead of a conv: a per-example traced kernel stays vmap friendly.
    x = jnp.pad(image, ((r, r), (0, 0), (0, 0)), mode="reflect")
    image = sum(w[i] * x[i:i + h] for i in range(size))
    x = jnp.pad(image, ((0, 0), (r, r), (0, 0)), mode="reflect")
    return sum(w[i] * x[:, i:i + wd] for i in range(size))


def simclr_view(key: jax.Array, image: jax.Array, cfg: SimCLRAugmentConfig) -> jax.Array:
    """One augmented view of a float image (H, W, C) in [0, 1] (the pipeline of the docstring)."""
    k_geo, k_jit, k_pj, k_gray, k_blur, k_sigma = jax.random.split(key, 6)
    h, w, c = image.shape
    image = affine_warp(image, crop_flip_matrix(k_geo, h, w, cfg))
    if cfg.jitter_prob > 0:
        image = jnp.where(jax.random.bernoulli(k_pj, cfg.jitter_prob),
                          color_jitter(k_jit, image, cfg), image)
    if c == 3 and cfg.grayscale_prob > 0:
        gray = jnp.repeat(grayscale(image), 3, axis=-1)
        image = jnp.where(jax.random.bernoulli(k_gray, cfg.grayscale_prob), gray, image)
    if cfg.blur_prob > 0:
        sigma = jax.random.uniform(k_sigma, (), minval=cfg.blur_sigma[0], maxval=cfg.blur_sigma[1])
        blurred = gaussian_blur(image, sigma, blur_kernel_size(h, cfg.blur_kernel_frac))
        image = jnp.where(jax.random.bernoulli(k_blur, cfg.blur_prob), blurred, image)
    return jnp.clip(image, 0.0, 1.0)


def simclr_views(key: jax.Array, images: jax.Array, cfg: SimCLRAugmentConfig):
    """Two views (view_a, view_b), each (N, H, W, C), of a float batch; one key per example and
    view: keys = split(key, (2, N)), so view v of example i uses keys[v, i]."""
    keys = jax.random.split(key, (2, images.shape[0]))
    one = jax.vmap(simclr_view, in_axes=(0, 0, None))
    return one(keys[0], images, cfg), one(keys[1], images, cfg)
