"""Synthetic occluders and the occlusion evaluation modes (docs/papers.md#occlusion).

Training occluders (paper Sec. 4.1): one object per occluded image at a random position, its
bounding box 1/3.75 to 1/2 of the image in both height and width, returned with its pixel mask
(the target of the attention loss, Eq. 2). The paper pastes photo templates of hands, food and
drinks; none can be downloaded here, so they are procedural (docs/papers.md#occlusion-occluders):

  shapes    'block' (the full box), 'ellipse' (cups, plates, fruit), 'hand' (palm + four
            fingers + thumb, rotated by a multiple of 90 degrees and mirrored), 'blob' (an
            irregular object: a thresholded sum of random Gaussian bumps)
  textures  'solid' (random colour), 'noise' (smooth random colour field), 'stripes' (a random
            grating), 'patch' (the pixels of another image of the batch at a random shift:
            real face/skin/hair texture, as a hand or another face would bring)

Everything is jax.numpy with static shapes: the sampler runs inside the jitted train step and
is deterministic per key (the same key gives the same occluder, and a batch uses one key per
example). Images are float (H, W, C) in [0, 1]; masks are float32 (H, W) in {0, 1}.

Evaluation modes (paper Sec. 4.4, Table 3, defined on 48x48 CK+ crops and scaled with the
image): 'clean', 'synthetic' (the training occluder on every image), 'R8'/'R16'/'R24' (a
black square of that side at a random position), 'eyes'/'mouth' (a 24x24 black square centred
on the eyes or the mouth: MTCNN landmarks when given, else the canonical positions below).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

SHAPES = ("block", "ellipse", "hand", "blob")
TEXTURES = ("solid", "noise", "stripes", "patch")
EVAL_MODES = ("clean", "synthetic", "R8", "R16", "R24", "eyes", "mouth")
SQUARE_MODES = {"R8": 8, "R16": 16, "R24": 24}
REGION_SIZE = 24  # Table 3: "both the occlusion size of eye occluded and mouth occluded are 24x24".
REFERENCE_SIZE = 48  # The CK+ crops the pixel sizes above refer to.
# (row, col) of the region centres as fractions of an aligned face crop: the mean MTCNN
# landmarks over the 981 CK+48 crops (eyes: midpoint of the two eye points, mouth: midpoint of
# the mouth corners), rounded; see benchmarks/occlusion_step.py --landmarks.
CANONICAL_CENTRES = {"eyes": (0.40, 0.50), "mouth": (0.79, 0.50)}


@dataclasses.dataclass(frozen=True)
class OccluderConfig:
    """What the training occluder sampler draws from.

    min_frac, max_frac: box height and width, each uniform over the integer pixel sizes in
      [ceil(min_frac * side), floor(max_frac * side)] (paper: 1/3.75 to 1/2).
    shapes, textures: subsets of SHAPES and TEXTURES, drawn uniformly per occluder.
    """

    min_frac: float = 1 / 3.75
    max_frac: float = 0.5
    shapes: tuple[str, ...] = SHAPES
    textures: tuple[str, ...] = TEXTURES

    def __post_init__(self):
        if not 0 < self.min_frac <= self.max_frac <= 1:
            raise ValueError(f"occluder fractions need 0 < min_frac <= max_frac <= 1, got "
                             f"min_frac={self.min_frac}, max_frac={self.max_frac}")
        for name, given, allowed in (("shapes", self.shapes, SHAPES),
                                     ("textures", self.textures, TEXTURES)):
            bad = [s for s in given if s not in allowed]
            if not given or bad:
                raise ValueError(f"occluder {name} must be a non-empty subset of {allowed}, got "
                                 f"{tuple(given)!r}")

    def size_range(self, side: int) -> tuple[int, int]:
        """(smallest, largest) occluder side in pixels for an image side; errors if none fits."""
        lo, hi = max(1, math.ceil(self.min_frac * side - 1e-9)), math.floor(self.max_frac * side)
        if hi < lo:
            raise ValueError(f"an image side of {side} px is smaller than the smallest occluder "
                             f"({self.min_frac:.3g} to {self.max_frac:.3g} of the side must be "
                             f">= 1 px): use images of at least {math.ceil(1 / self.max_frac)} px")
        return lo, hi


def _uniform_int(u, lo, hi):
    """An int uniform over [lo, hi] (inclusive; hi may be traced) from u uniform in [0, 1)."""
    return jnp.minimum(lo + jnp.floor(u * (hi - lo + 1)).astype(jnp.int32), hi)


def _grid(height: int, width: int):
    return jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                        jnp.arange(width, dtype=jnp.float32), indexing="ij")


def random_box(key: jax.Array, height: int, width: int, cfg: OccluderConfig) -> jax.Array:
    """int32 (top, left, h, w): a box of random size (cfg's range) fully inside the image."""
    (hlo, hhi), (wlo, whi) = cfg.size_range(height), cfg.size_range(width)
    # One draw of 4 uniforms (few threefry calls keep XLA:CPU compile times short).
    u = jax.random.uniform(key, (4,))
    h, w = _uniform_int(u[0], hlo, hhi), _uniform_int(u[1], wlo, whi)
    # top + h <= height keeps the whole object inside the image.
    top, left = _uniform_int(u[2], 0, height - h), _uniform_int(u[3], 0, width - w)
    return jnp.stack([top, left, h, w]).astype(jnp.int32)


def box_mask(box: jax.Array, height: int, width: int) -> jax.Array:
    """float32 (H, W): 1 inside box = (top, left, h, w), 0 outside."""
    rows, cols = _grid(height, width)
    top, left, h, w = (box[i].astype(jnp.float32) for i in range(4))
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    return inside.astype(jnp.float32)


def _segment_dist2(u, v, a, b):
    """Squared distance of the points (u, v) from the segment a-b (each a (u, v) pair)."""
    du, dv = b[0] - a[0], b[1] - a[1]
    t = jnp.clip(((u - a[0]) * du + (v - a[1]) * dv) / (du * du + dv * dv), 0.0, 1.0)
    return (u - a[0] - t * du) ** 2 + (v - a[1] - t * dv) ** 2


def _hand(key, u, v):
    """Palm + four fingers + thumb in box coordinates [-1, 1]^2 (fingers point to -u)."""
    r = jax.random.uniform(key, (6,))
    # A rotation by k * 90 degrees and a mirror map the box square onto itself.
    k = _uniform_int(r[0], 0, 3)
    u, v = (jnp.select([k == 0, k == 1, k == 2], [u, v, -u], -v),
            jnp.select([k == 0, k == 1, k == 2], [v, -u, -v], u))
    v = jnp.where(r[1] < 0.5, -v, v)
    palm = ((u - 0.4) / 0.58) ** 2 + ((v - 0.1) / 0.62) ** 2 <= 1.0
    tips = jnp.array([-0.7, -0.92, -0.86, -0.62]) + 0.12 * r[2:6]
    fingers = jnp.zeros(u.shape, bool)
    for i, vc in enumerate((-0.38, -0.06, 0.26, 0.56)):
        fingers |= _segment_dist2(u, v, (tips[i] + 0.13, vc), (0.3, vc)) <= 0.13**2
    thumb = _segment_dist2(u, v, (0.45, -0.4), (0.05, -0.86)) <= 0.14**2
    return palm | fingers | thumb


def _blob(key, u, v):
    """An irregular object: sum of 4 Gaussian bumps thresholded at 0.6 (centre values >= 1)."""
    r = jax.random.uniform(key, (12,))
    centres = -0.45 + 0.9 * r[:8].reshape(4, 2)
    sigmas = 0.25 + 0.25 * r[8:]
    field = sum(jnp.exp(-((u - centres[i, 0]) ** 2 + (v - centres[i, 1]) ** 2)
                        / (2 * sigmas[i] ** 2)) for i in range(4))
    return field >= 0.6


def shape_mask(key: jax.Array, shape_index: jax.Array, box: jax.Array, height: int, width: int,
               shapes: tuple[str, ...] = SHAPES) -> jax.Array:
    """float32 (H, W) mask of shapes[shape_index] drawn inside `box` (never outside it)."""
    rows, cols = _grid(height, width)
    top, left, h, w = (box[i].astype(jnp.float32) for i in range(4))
    # Pixel centres of the box map into (-1, 1): the same unit square for every box size.
    u = (rows + 0.5 - top - h / 2) / (h / 2)
    v = (cols + 0.5 - left - w / 2) / (w / 2)
    inside = box_mask(box, height, width) > 0
    makers = {"block": lambda k: inside, "ellipse": lambda k: u**2 + v**2 <= 1.0,
              "hand": lambda k: _hand(k, u, v), "blob": lambda k: _blob(k, u, v)}
    keys = jax.random.split(key, len(shapes))
    masks = jnp.stack([makers[s](keys[i]) for i, s in enumerate(shapes)])
    return (masks[shape_index] & inside).astype(jnp.float32)


def texture(key: jax.Array, texture_index: jax.Array, source: jax.Array,
            textures: tuple[str, ...] = TEXTURES) -> jax.Array:
    """(H, W, C) fill of textures[texture_index]; 'patch' shifts `source` (another image)."""
    h, w, c = source.shape
    k_u, k_noise = jax.random.split(key)
    r = jax.random.uniform(k_u, (5 + 2 * c,))
    colour = r[5:5 + c]
    # The second stripe colour is half the range away: stripes always have contrast.
    colour2 = jnp.mod(colour + 0.4 + 0.2 * r[5 + c:], 1.0)
    rows, cols = _grid(h, w)

    def noise():
        coarse = jax.random.uniform(k_noise, (max(h // 6, 2), max(w // 6, 2), c))
        return jax.image.resize(coarse, (h, w, c), method="linear")

    def stripes():
        angle = jnp.pi * r[0]
        freq = (2.0 + 6.0 * r[1]) / max(h, w)
        wave = jnp.sin(2 * jnp.pi * freq * (rows * jnp.cos(angle) + cols * jnp.sin(angle))
                       + 2 * jnp.pi * r[2])
        t = (0.5 + 0.5 * wave)[..., None]
        return t * colour + (1 - t) * colour2

    def patch():
        return jnp.roll(source, (_uniform_int(r[3], 0, h - 1), _uniform_int(r[4], 0, w - 1)),
                        axis=(0, 1))

    makers = {"solid": lambda: jnp.broadcast_to(colour, (h, w, c)), "noise": noise,
              "stripes": stripes, "patch": patch}
    fills = jnp.stack([makers[t]().astype(source.dtype) for t in textures])
    return fills[texture_index]


@functools.partial(jax.jit, static_argnames=("cfg",))
def random_occluder(key: jax.Array, image: jax.Array, source: jax.Array | None = None,
                    cfg: OccluderConfig = OccluderConfig()):
    """Pastes one random occluder on `image` (H, W, C).

    Args:
      key: the occluder's key (same key, same occluder).
      image: float (H, W, C) in [0, 1].
      source: (H, W, C) image whose shifted pixels the 'patch' texture uses (default: image).
      cfg: sizes, shapes and textures to draw from.

    Returns:
      (occluded image, mask float32 (H, W), box int32 (top, left, h, w)); the mask is 1
      exactly where the image was replaced and lies inside the box.
    """
    h, w, _ = image.shape
    source = image if source is None else source
    k_box, k_index, k_shape, k_tex = jax.random.split(key, 4)
    box = random_box(k_box, h, w, cfg)
    pick = jax.random.uniform(k_index, (2,))
    mask = shape_mask(k_shape, _uniform_int(pick[0], 0, len(cfg.shapes) - 1), box, h, w,
                      cfg.shapes)
    fill = texture(k_tex, _uniform_int(pick[1], 0, len(cfg.textures) - 1), source, cfg.textures)
    occluded = jnp.where(mask[..., None] > 0, fill, image)
    return occluded, mask, box


@functools.partial(jax.jit, static_argnames=("cfg",))
def occlude_batch(key: jax.Array, images: jax.Array, occluded: jax.Array,
                  cfg: OccluderConfig = OccluderConfig()):
    """Occludes the images whose flag is set; clean ones keep their pixels and a zero mask.

    Args:
      key: split into one key per example.
      images: float (N, H, W, C) in [0, 1].
      occluded: (N,) bool flags.

    Returns:
      (images, masks float32 (N, H, W), boxes int32 (N, 4)); a clean image's box is zeros.
    """
    _check_batch(images)
    n = images.shape[0]
    occluded = jnp.asarray(occluded, bool)
    if occluded.shape != (n,):
        raise ValueError(f"occluded must have shape ({n},), got {occluded.shape}")
    keys = jax.random.split(key, n)
    # 'patch' textures come from the next image of the batch (a different face).
    sources = jnp.roll(images, 1, axis=0)
    occ, masks, boxes = jax.vmap(lambda k, x, s: random_occluder(k, x, s, cfg))(keys, images,
                                                                               sources)
    flag = occluded[:, None, None]
    return (jnp.where(flag[..., None], occ, images), jnp.where(flag, masks, 0.0),
            jnp.where(occluded[:, None], boxes, 0))


@functools.partial(jax.jit, static_argnames=("n", "rate"))
def mix_flags(key: jax.Array, n: int, rate: float) -> jax.Array:
    """(n,) bool with exactly round(rate * n) True at random places (1:1 mixing: rate 0.5)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"occlusion rate must be in [0, 1], got {rate}")
    count = round(rate * n)
    return jax.random.permutation(key, n) < count


@functools.partial(jax.jit, static_argnames=("size", "fill"))
def square_occlusion(key: jax.Array, images: jax.Array, size: int, *, fill: float = 0.0):
    """R<size> mode: a size x size square of `fill` at a random position per image.

    Returns (images, masks float32 (N, H, W)); errors if the square does not fit the image.
    """
    _check_batch(images)
    n, h, w, _ = images.shape
    _check_fits(size, h, w)
    k_t, k_l = jax.random.split(key)
    top = jax.random.randint(k_t, (n,), 0, h - size + 1)
    left = jax.random.randint(k_l, (n,), 0, w - size + 1)
    boxes = jnp.stack([top, left, jnp.full((n,), size), jnp.full((n,), size)], axis=1)
    return _paste_boxes(images, boxes, fill)


@functools.partial(jax.jit, static_argnames=("size", "fill"))
def region_occlusion(images: jax.Array, centres: jax.Array, size: int, *, fill: float = 0.0):
    """A size x size square of `fill` centred on `centres` (N, 2) = (row, col) pixels.

    The square is shifted (not cropped) to stay inside the image, so every image loses the
    same number of pixels. Returns (images, masks float32 (N, H, W)).
    """
    _check_batch(images)
    n, h, w, _ = images.shape
    _check_fits(size, h, w)
    centres = jnp.asarray(centres, jnp.float32)
    if centres.shape != (n, 2):
        raise ValueError(f"centres must be (N, 2) = ({n}, 2) (row, col), got {centres.shape}")
    top = jnp.clip(jnp.round(centres[:, 0] - size / 2), 0, h - size).astype(jnp.int32)
    left = jnp.clip(jnp.round(centres[:, 1] - size / 2), 0, w - size).astype(jnp.int32)
    boxes = jnp.stack([top, left, jnp.full((n,), size), jnp.full((n,), size)], axis=1)
    return _paste_boxes(images, boxes, fill)


def canonical_centres(region: str, n: int, height: int, width: int) -> jax.Array:
    """(n, 2) (row, col) of the eyes or mouth of an aligned face crop of this size."""
    if region not in CANONICAL_CENTRES:
        raise ValueError(f"region must be one of {tuple(CANONICAL_CENTRES)}, got {region!r}")
    fy, fx = CANONICAL_CENTRES[region]
    return jnp.tile(jnp.array([[fy * height, fx * width]], jnp.float32), (n, 1))


def landmark_centres(region: str, landmarks) -> jax.Array:
    """(N, 2) (row, col) from MTCNN landmarks (N, 5, 2) given as (x, y) (fer_jax.data.face).

    eyes: midpoint of the two eye points; mouth: midpoint of the two mouth corners.
    """
    landmarks = jnp.asarray(landmarks, jnp.float32)
    if landmarks.ndim != 3 or landmarks.shape[1:] != (5, 2):
        raise ValueError(f"landmarks must be (N, 5, 2) (x, y) MTCNN points, got {landmarks.shape}")
    picks = {"eyes": (0, 1), "mouth": (3, 4)}
    if region not in picks:
        raise ValueError(f"region must be one of {tuple(picks)}, got {region!r}")
    xy = landmarks[:, picks[region], :].mean(axis=1)
    return xy[:, ::-1]


def scaled_size(size: int, height: int, reference: int = REFERENCE_SIZE) -> int:
    """A side defined on `reference`-pixel crops, scaled to an image of `height` pixels."""
    return max(1, round(size * height / reference))


@functools.partial(jax.jit, static_argnames=("mode", "cfg", "reference"))
def eval_occlusion(mode: str, key: jax.Array, images: jax.Array, *,
                   cfg: OccluderConfig = OccluderConfig(), centres: jax.Array | None = None,
                   reference: int = REFERENCE_SIZE):
    """Applies one evaluation mode of EVAL_MODES to float images (N, H, W, C).

    Square sides (8/16/24) are defined on `reference`-pixel crops and scaled to H. 'eyes' and
    'mouth' use `centres` (N, 2) (row, col) when given (e.g. `landmark_centres`), else the
    canonical positions. Returns (images, masks float32 (N, H, W)).
    """
    _check_batch(images)
    n, h, w, _ = images.shape
    if mode == "clean":
        return images, jnp.zeros((n, h, w), jnp.float32)
    if mode == "synthetic":
        occ, masks, _ = occlude_batch(key, images, jnp.ones((n,), bool), cfg)
        return occ, masks
    if mode in SQUARE_MODES:
        return square_occlusion(key, images, scaled_size(SQUARE_MODES[mode], h, reference))
    if mode in CANONICAL_CENTRES:
        if centres is None:
            centres = canonical_centres(mode, n, h, w)
        return region_occlusion(images, centres, scaled_size(REGION_SIZE, h, reference))
    raise ValueError(f"occlusion mode must be one of {EVAL_MODES}, got {mode!r}")


def _paste_boxes(images, boxes, fill):
    h, w = images.shape[1:3]
    masks = jax.vmap(lambda b: box_mask(b, h, w))(boxes)
    return jnp.where(masks[..., None] > 0, jnp.asarray(fill, images.dtype), images), masks


def _check_batch(images) -> None:
    if getattr(images, "ndim", None) != 4:
        raise ValueError(f"images must be a float (N, H, W, C) batch, got shape "
                         f"{getattr(images, 'shape', None)}")


def _check_fits(size: int, height: int, width: int) -> None:
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"occluder size must be a positive int, got {size!r}")
    if size > min(height, width):
        raise ValueError(f"a {size}x{size} occluder does not fit a {height}x{width} image: the "
                         f"image is smaller than the occluder")
