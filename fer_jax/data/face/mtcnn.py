"""MTCNN face detector (P-Net, R-Net, O-Net cascade) in JAX/Flax.

Implements Zhang, Zhang, Li, Qiao, "Joint Face Detection and Alignment using Multi-task Cascaded
Convolutional Networks", IEEE Signal Processing Letters 23(10), 2016 (MTCNN): an image pyramid is
scanned by the fully convolutional P-Net (12x12 windows, stride 2; paper Sec. II-A stage 1), the
candidates are merged by non-maximum suppression (NMS) and refined by bounding-box regression,
re-scored by R-Net on 24x24 crops (stage 2) and by O-Net on 48x48 crops, which also regresses the
five landmarks (stage 3). Face probability is the softmax of the two-way classifier (Eq. 1), box
and landmark outputs are offsets relative to the window (Eq. 2, 3).

Weights. `mtcnn_weights.npz` holds the original MTCNN weights as shipped in the PyPI wheel
`mtcnn==1.0.0` (MIT licence, Copyright (c) 2019-2024 Ivan de Paz Centeno; see WEIGHTS_LICENSE.txt
beside this file), converted once by `tools/convert_mtcnn_weights.py`. They are read with
`np.load(allow_pickle=False)`: no pickle, mtcnn, joblib or TensorFlow is loaded at run time.

Pipeline decisions (where the reference implementations differ):
* order of operations and thresholds follow the authors' MATLAB code / FaceNet's port: thresholds
  (0.6, 0.7, 0.7), NMS 0.5 per pyramid level and 0.7 across levels (IoU over union), 0.7 after
  R-Net, 0.7 IoU-over-minimum after O-Net; min face 20 px; pyramid factor 0.709;
* pyramid levels are area-averaged resizes (as FaceNet's cv2 INTER_AREA and mtcnn 1.0.0's TF AREA)
  computed exactly (float64, host) from separable integral images; level size = ceil(side * scale);
* R-Net / O-Net crops are bilinear samples of the (square) box, black outside the image (as the
  MATLAB code's zero padding);
* coordinates are continuous with pixel (r, c) covering [c, c+1) x [r, r+1): a box (x1, y1, x2, y2)
  has width x2 - x1; boxes are not clipped to the image.

Shapes are bucketed so that video frames do not recompile: the image is zero-padded to a multiple
of `bucket` pixels, every pyramid level to the level size of the padded image (P-Net masks what lies
beyond the true level, so results equal an unpadded run), and crop batches to a power of two.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

WEIGHTS_PATH = pathlib.Path(__file__).with_name("mtcnn_weights.npz")
NETS = ("pnet", "rnet", "onet")
# Pixel value 0 (black) after MTCNN's input normalisation (x - 127.5) / 128.
_BLACK = -127.5 / 128.0


# ----------------------------------------------------------------------------------------------
# Networks (Zhang et al. 2016, Fig. 2)
# ----------------------------------------------------------------------------------------------


class PReLU(nn.Module):
    """Parametric ReLU with one slope per channel (He et al. 2015), as used throughout MTCNN."""

    features: int

    @nn.compact
    def __call__(self, x):
        alpha = self.param("alpha", nn.initializers.constant(0.25), (self.features,))
        return jnp.where(x >= 0, x, alpha * x)


def _conv(features, size, name):
    return nn.Conv(features, (size, size), padding="VALID", name=name)


class PNet(nn.Module):
    """Proposal network: 12x12 receptive field, stride 2; returns (box offsets, face probability).

    `valid_hw` (2,) int: true height/width of a zero-padded input. Activations beyond it are
    excluded from max pooling exactly as TF/Caffe's edge padding would, so every output whose
    12x12 window lies inside the true input equals the unpadded result.
    """

    @nn.compact
    def __call__(self, x, valid_hw=None):
        x = PReLU(10, name="prelu1")(_conv(10, 3, "conv1")(x))
        if valid_hw is not None:
            # conv1 output row r is valid iff r < h - 2; pooling must not see the padding.
            x = _mask(x, valid_hw - 2, -1e4)
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        if valid_hw is not None:
            # Pooled cells built from padding only: zero them so no large value travels on.
            x = _mask(x, (valid_hw - 1) // 2, 0.0)
        x = PReLU(16, name="prelu2")(_conv(16, 3, "conv2")(x))
        x = PReLU(32, name="prelu3")(_conv(32, 3, "conv3")(x))
        reg = nn.Conv(4, (1, 1), name="conv4_1")(x)
        logits = nn.Conv(2, (1, 1), name="conv4_2")(x)
        return reg, jax.nn.softmax(logits, axis=-1)[..., 1]


def _mask(x, valid_hw, fill):
    rows = jnp.arange(x.shape[1]) < valid_hw[0]
    cols = jnp.arange(x.shape[2]) < valid_hw[1]
    return jnp.where((rows[:, None] & cols[None, :])[None, :, :, None], x, fill)


def _flatten_caffe(x):
    # The weights come from Caffe (channel-major, width before height): the wheel's Keras models
    # permute (H, W) before flattening, and so do we.
    return jnp.transpose(x, (0, 2, 1, 3)).reshape(x.shape[0], -1)


class RNet(nn.Module):
    """Refinement network on 24x24 crops; returns (box offsets (N, 4), face probability (N,))."""

    @nn.compact
    def __call__(self, x):
        x = PReLU(28, name="prelu1")(_conv(28, 3, "conv1")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        x = PReLU(48, name="prelu2")(_conv(48, 3, "conv2")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
        x = PReLU(64, name="prelu3")(_conv(64, 2, "conv3")(x))
        x = PReLU(128, name="prelu4")(nn.Dense(128, name="fc4")(_flatten_caffe(x)))
        reg = nn.Dense(4, name="fc5_1")(x)
        prob = jax.nn.softmax(nn.Dense(2, name="fc5_2")(x), axis=-1)[:, 1]
        return reg, prob


class ONet(nn.Module):
    """Output network on 48x48 crops; returns (box offsets, landmarks (N, 10), face probability).

    Landmarks are (x1..x5, y1..y5) as fractions of the crop, in the order left eye, right eye,
    nose, left mouth corner, right mouth corner (left/right as seen in the image).
    """

    @nn.compact
    def __call__(self, x):
        x = PReLU(32, name="prelu1")(_conv(32, 3, "conv1")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        x = PReLU(64, name="prelu2")(_conv(64, 3, "conv2")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
        x = PReLU(64, name="prelu3")(_conv(64, 3, "conv3")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        x = PReLU(128, name="prelu4")(_conv(128, 2, "conv4")(x))
        x = PReLU(256, name="prelu5")(nn.Dense(256, name="fc5")(_flatten_caffe(x)))
        reg = nn.Dense(4, name="fc6_1")(x)
        landmarks = nn.Dense(10, name="fc6_2")(x)
        prob = jax.nn.softmax(nn.Dense(2, name="fc6_3")(x), axis=-1)[:, 1]
        return reg, landmarks, prob


def load_mtcnn_params(path: str | pathlib.Path = WEIGHTS_PATH) -> dict[str, dict]:
    """Read the converted weights: {'pnet'|'rnet'|'onet': flax params tree} of float32 arrays."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"MTCNN weights {path} not found; regenerate with tools/convert_mtcnn_weights.py"
        )
    params: dict[str, dict] = {net: {} for net in NETS}
    with np.load(path, allow_pickle=False) as data:
        for key in data.files:
            net, layer, name = key.split("/")
            params[net].setdefault(layer, {})[name] = jnp.asarray(data[key], jnp.float32)
    missing = [net for net in NETS if not params[net]]
    if missing:
        raise ValueError(f"{path}: no weights for {missing}; expected keys like 'pnet/conv1/bias'")
    return params


# ----------------------------------------------------------------------------------------------
# Input conversion
# ----------------------------------------------------------------------------------------------


def to_rgb_uint8(image: np.ndarray, *, name: str = "image") -> np.ndarray:
    """Convert an image to (H, W, 3) uint8 RGB with a fixed rule.

    * gray (H, W) or (H, W, 1): replicated to three channels;
    * RGBA (H, W, 4): the alpha channel is dropped (PIL's ``convert('RGB')`` rule);
    * uint16: mapped linearly from [0, 65535] to [0, 255] with rounding (no contrast stretch);
    * uint8 (H, W, 3) is taken as RGB unchanged. Any other dtype or layout raises ValueError.
    """
    image = np.asarray(image)
    if image.dtype not in (np.uint8, np.uint16):
        raise ValueError(
            f"{name}: expected uint8 or uint16 pixels, got dtype {image.dtype}; convert floats in "
            "[0, 1] with (x * 255).round().astype(np.uint8)"
        )
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"{name}: expected shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {image.shape}"
        )
    if min(image.shape[:2]) < 1:
        raise ValueError(f"{name}: empty image of shape {image.shape}")
    if image.dtype == np.uint16:
        image = ((image.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


# ----------------------------------------------------------------------------------------------
# Resampling (pure, jittable)
# ----------------------------------------------------------------------------------------------


def _integral_at(cum, bounds, axis):
    """Linear interpolation of a cumulative sum along `axis` at fractional `bounds`: exact for
    piecewise-constant pixels, so differences are exact area sums."""
    lo = np.clip(np.floor(bounds).astype(np.int64), 0, cum.shape[axis] - 2)
    frac = (bounds - lo).astype(cum.dtype)
    frac = np.expand_dims(frac, tuple(i for i in range(cum.ndim) if i != axis))
    return np.take(cum, lo, axis=axis) * (1 - frac) + np.take(cum, lo + 1, axis=axis) * frac


def area_pyramid(image: np.ndarray, level_hw, level_shapes) -> list[np.ndarray]:
    """Area-average resizes of `image` (H, W, C) to each (h, w) of `level_hw`, zero-padded to
    `level_shapes`; float32.

    Each output pixel is the mean over its footprint [r * H / h, (r + 1) * H / h) (TF's AREA /
    cv2's INTER_AREA rule for shrinking), computed from separable integral images that are shared
    by all levels. Runs on the host: XLA took longer to compile these gathers than the P-Net
    itself (5.6 s of 10 s for a 960x540 pyramid). float32 suffices for MTCNN's normalised input
    in [-1, 1]: running sums stay below the width, so the error is ~1e-4 at most.
    """
    image = np.asarray(image, np.float32)
    in_h, in_w = image.shape[:2]
    cum_x = np.concatenate([np.zeros_like(image[:, :1]), np.cumsum(image, axis=1)], axis=1)
    levels = []
    for (h, w), shape in zip(level_hw, level_shapes, strict=True):
        out = np.zeros(tuple(shape) + image.shape[2:], np.float32)
        if h > 0 and w > 0:
            x_bounds = (np.arange(w + 1) * (in_w / w)).astype(np.float32)
            col = np.diff(_integral_at(cum_x, x_bounds, 1), axis=1)
            cum_y = np.concatenate([np.zeros_like(col[:1]), np.cumsum(col, axis=0)], axis=0)
            y_bounds = (np.arange(h + 1) * (in_h / h)).astype(np.float32)
            sums = np.diff(_integral_at(cum_y, y_bounds, 0), axis=0)
            out[:h, :w] = sums / ((in_h / h) * (in_w / w))
        levels.append(out)
    return levels


def bilinear_sample(image, image_hw, ys, xs, fill):
    """Bilinear samples of `image` (H, W, C) at pixel-index coordinates (ys, xs) (any equal shape);
    neighbours outside the true `image_hw` region count as `fill`."""
    y0, x0 = jnp.floor(ys), jnp.floor(xs)
    wy, wx = ys - y0, xs - x0
    y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)
    out = 0.0
    for dy, wy_ in ((0, 1 - wy), (1, wy)):
        for dx, wx_ in ((0, 1 - wx), (1, wx)):
            yy, xx = y0 + dy, x0 + dx
            inside = (yy >= 0) & (yy < image_hw[0]) & (xx >= 0) & (xx < image_hw[1])
            pix = image[jnp.clip(yy, 0, image.shape[0] - 1), jnp.clip(xx, 0, image.shape[1] - 1)]
            pix = jnp.where(inside[..., None], pix, fill)
            out = out + (wy_ * wx_)[..., None] * pix
    return out


def crop_boxes(image, image_hw, boxes, size):
    """(N, size, size, C) bilinear crops of boxes (N, 4) = (x1, y1, x2, y2), pixel centres at
    x1 + (j + 0.5) * (x2 - x1) / size; outside the image is black (normalised `_BLACK`)."""
    t = (jnp.arange(size, dtype=jnp.float32) + 0.5) / size
    xs = boxes[:, 0:1] + t[None] * (boxes[:, 2:3] - boxes[:, 0:1]) - 0.5
    ys = boxes[:, 1:2] + t[None] * (boxes[:, 3:4] - boxes[:, 1:2]) - 0.5
    return bilinear_sample(image, image_hw, ys[:, :, None], xs[:, None, :], _BLACK)


# ----------------------------------------------------------------------------------------------
# Jitted stages (pure; static parts via keywords)
# ----------------------------------------------------------------------------------------------


def pnet_pyramid(params, levels, level_hw):
    """P-Net on every pyramid level. levels: tuple of zero-padded (h, w, 3) normalised images,
    level_hw (L, 2) their true sizes (0 for an unused level). Returns per level (box offsets
    (h', w', 4), face probability (h', w') with 0 where the 12x12 window leaves the true level)."""
    outputs = []
    for k, level in enumerate(levels):
        reg, prob = PNet().apply({"params": params}, level[None], level_hw[k])
        out_h = (level_hw[k] - 2 + 1) // 2 - 4
        rows = jnp.arange(prob.shape[1]) < out_h[0]
        cols = jnp.arange(prob.shape[2]) < out_h[1]
        outputs.append((reg[0], jnp.where(rows[:, None] & cols[None, :], prob[0], 0.0)))
    return outputs


def rnet_stage(params, norm, image_hw, boxes):
    """R-Net on 24x24 crops of `boxes` (N, 4) of the normalised image; (offsets, probability)."""
    return RNet().apply({"params": params}, crop_boxes(norm, image_hw, boxes, 24))


def onet_stage(params, norm, image_hw, boxes):
    """O-Net on 48x48 crops of `boxes` (N, 4); (offsets, landmarks, probability)."""
    return ONet().apply({"params": params}, crop_boxes(norm, image_hw, boxes, 48))


# ----------------------------------------------------------------------------------------------
# Host-side box logic (data-dependent sizes)
# ----------------------------------------------------------------------------------------------


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, method: str = "union"):
    """Greedy NMS: indices kept, by decreasing score; overlap = IoU ('union') or
    intersection / smaller area ('min'), suppress when overlap > threshold."""
    if method not in ("union", "min"):
        raise ValueError(f"nms method must be 'union' or 'min', got {method!r}")
    order = np.argsort(-scores, kind="stable")
    area = np.maximum(boxes[:, 2] - boxes[:, 0], 0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0)
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        iw = np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0])
        ih = np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1])
        inter = np.maximum(iw, 0) * np.maximum(ih, 0)
        if method == "union":
            denom = area[i] + area[rest] - inter
        else:
            denom = np.minimum(area[i], area[rest])
        overlap = inter / np.maximum(denom, 1e-12)
        order = rest[overlap <= threshold]
    return np.asarray(keep, dtype=np.int64)


def regress(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Apply box regression (Eq. 2 targets): each side moves by its offset times the box size."""
    size = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, axis=1)
    return boxes + offsets * size


def square(boxes: np.ndarray) -> np.ndarray:
    """Grow each box to a square of side max(w, h) about its centre (input of R-Net / O-Net)."""
    side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    return np.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], axis=1)


def pyramid_scales(height: int, width: int, min_face_size: float, factor: float) -> list[float]:
    """Scales m * factor^k, m = 12 / min_face_size, while the shorter side stays >= 12 px."""
    scales, m = [], 12.0 / min_face_size
    side = min(height, width) * m
    while side >= 12:
        scales.append(m * factor ** len(scales))
        side *= factor
    return scales


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _count_bucket(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


@dataclasses.dataclass(frozen=True, eq=False)  # eq would compare the landmark arrays
class Face:
    """One detection. box (x1, y1, x2, y2) and landmarks (5, 2) as (x, y) in input pixels, in the
    order left eye, right eye, nose, left mouth corner, right mouth corner; score = O-Net's face
    probability."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray

    @property
    def eye_centres(self) -> np.ndarray:
        """(2, 2) left and right eye centres (MTCNN gives one point per eye)."""
        return self.landmarks[:2]


class FaceDetector:
    """MTCNN cascade with jitted nets cached per bucketed shape (Zhang et al. 2016).

    `compile_count` counts traces (one per new compiled shape); frames of one video, or images
    whose sides round up to the same multiple of `bucket`, reuse the compiled pyramid.
    """

    def __init__(self, params: dict | None = None, *, min_face_size: float = 20,
                 thresholds: Sequence[float] = (0.6, 0.7, 0.7), scale_factor: float = 0.709,
                 bucket: int = 32, max_batch: int = 256):
        if not min_face_size >= 12:
            raise ValueError(f"min_face_size must be >= 12 px (P-Net window), got {min_face_size}")
        thresholds = tuple(float(t) for t in thresholds)
        if len(thresholds) != 3 or not all(0 <= t <= 1 for t in thresholds):
            raise ValueError(f"thresholds must be three probabilities, got {thresholds}")
        if not 0 < scale_factor < 1:
            raise ValueError(f"scale_factor must be in (0, 1), got {scale_factor}")
        if bucket < 1 or max_batch < 16:
            raise ValueError(f"bucket must be >= 1 and max_batch >= 16, got {bucket}, {max_batch}")
        self.params = params if params is not None else load_mtcnn_params()
        self.min_face_size, self.thresholds = float(min_face_size), thresholds
        self.scale_factor, self.bucket, self.max_batch = float(scale_factor), bucket, max_batch
        self.trace_counts = {"pnet": 0, "rnet": 0, "onet": 0}
        self._pyramid = jax.jit(self._counting("pnet", pnet_pyramid))
        self._rnet = jax.jit(self._counting("rnet", rnet_stage))
        self._onet = jax.jit(self._counting("onet", onet_stage))

    def _counting(self, name, fn):
        @functools.wraps(fn)
        def traced(*args, **kwargs):
            self.trace_counts[name] += 1  # runs only while tracing, i.e. once per compilation
            return fn(*args, **kwargs)

        return traced

    @property
    def compile_count(self) -> int:
        return sum(self.trace_counts.values())

    def __call__(self, image: np.ndarray, *, pad_fraction: float = 0.0,
                 min_side: int = 0) -> list[Face]:
        """Detect faces in an image (see `to_rgb_uint8` for accepted inputs).

        Optional help for small, tightly cropped faces (P-Net needs >= 12 px after the pyramid's
        first 12 / min_face_size scaling, and crop borders cut context): `pad_fraction` > 0
        pads every side by that fraction of the side (edge pixels replicated), then
        `min_side` > 0 upscales (bilinear) so the shorter side is at least `min_side`. Results
        are mapped back to the input's coordinates. Defaults: no change (48x48 CK+48 crops were
        all detected with and without it; see benchmarks/face_detection.py).
        """
        rgb = to_rgb_uint8(image)
        if pad_fraction < 0 or min_side < 0:
            raise ValueError(f"pad_fraction and min_side must be >= 0, got {pad_fraction}, "
                             f"{min_side}")
        rgb, scale, offset = _pad_and_upscale(rgb, pad_fraction, min_side)
        faces = self._detect(rgb)
        if (scale == 1).all() and not offset.any():
            return faces
        return [Face(box=tuple(float(v) for v in np.asarray(f.box) / np.tile(scale, 2)
                               - np.tile(offset, 2)),
                     score=f.score, landmarks=f.landmarks / scale - offset) for f in faces]

    def _detect(self, rgb: np.ndarray) -> list[Face]:
        h, w, _ = rgb.shape
        hb, wb = _round_up(h, self.bucket), _round_up(w, self.bucket)
        scales_b = pyramid_scales(hb, wb, self.min_face_size, self.scale_factor)
        scales = pyramid_scales(h, w, self.min_face_size, self.scale_factor)
        if not scales:
            return []
        level_shapes = tuple((math.ceil(hb * s), math.ceil(wb * s)) for s in scales_b)
        level_hw = np.zeros((len(scales_b), 2), np.int32)
        level_hw[: len(scales)] = [(math.ceil(h * s), math.ceil(w * s)) for s in scales]
        # MTCNN input normalisation, then zero padding up to the bucket.
        norm = np.zeros((hb, wb, 3), np.float32)
        norm[:h, :w] = (rgb.astype(np.float32) - 127.5) * (1.0 / 128.0)
        hw = np.array([h, w], np.int32)
        levels = tuple(area_pyramid(norm[:h, :w], level_hw, level_shapes))
        maps = self._pyramid(self.params["pnet"], levels, level_hw)
        # Stage 1: windows above threshold -> per-level NMS -> cross-level NMS -> regression.
        cands = []
        for scale, (reg, prob) in zip(scales, maps, strict=False):
            prob, reg = np.asarray(prob), np.asarray(reg)
            iy, ix = np.nonzero(prob > self.thresholds[0])
            if iy.size == 0:
                continue
            win = np.stack([ix * 2, iy * 2, ix * 2 + 12, iy * 2 + 12], axis=1) / scale
            rows = np.concatenate([win, prob[iy, ix, None], reg[iy, ix]], axis=1)
            cands.append(rows[nms(rows[:, :4], rows[:, 4], 0.5)])
        if not cands:
            return []
        cands = np.concatenate(cands)
        cands = cands[nms(cands[:, :4], cands[:, 4], 0.7)]
        boxes = square(regress(cands[:, :4], cands[:, 5:9]))
        # Stage 2: R-Net re-scores square crops; NMS on the unregressed boxes (MATLAB order).
        offsets, prob = self._batched(self._rnet, "rnet", norm, hw, boxes)
        keep = prob > self.thresholds[1]
        boxes, offsets, prob = boxes[keep], offsets[keep], prob[keep]
        pick = nms(boxes, prob, 0.7)
        boxes = square(regress(boxes[pick], offsets[pick]))
        if len(boxes) == 0:
            return []
        # Stage 3: O-Net scores, regresses and places the five landmarks relative to its crop.
        offsets, marks, prob = self._batched(self._onet, "onet", norm, hw, boxes)
        keep = prob > self.thresholds[2]
        boxes, offsets, marks, prob = boxes[keep], offsets[keep], marks[keep], prob[keep]
        size = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1)
        points = boxes[:, None, :2] + np.stack([marks[:, :5], marks[:, 5:]], -1) * size[:, None]
        boxes = regress(boxes, offsets)
        pick = nms(boxes, prob, 0.7, method="min")
        return [Face(box=tuple(float(v) for v in boxes[i]), score=float(prob[i]),
                     landmarks=points[i].astype(np.float64)) for i in pick]

    def _batched(self, fn, net, norm, hw, boxes):
        """Run a crop stage over `boxes` in power-of-two padded chunks (bounded compilations)."""
        outs = []
        for start in range(0, len(boxes), self.max_batch):
            chunk = boxes[start:start + self.max_batch]
            padded = np.zeros((_count_bucket(len(chunk)), 4), np.float32)
            padded[: len(chunk)] = chunk
            padded[len(chunk):] = (0, 0, 1, 1)  # dummy boxes, discarded below
            res = fn(self.params[net], norm, hw, padded)
            outs.append([np.asarray(r)[: len(chunk)].astype(np.float64) for r in res])
        return [np.concatenate(parts) for parts in zip(*outs, strict=True)]


def _pad_and_upscale(rgb, pad_fraction, min_side):
    """Edge-replicate padding and bilinear upscaling for small crops; returns (image, scale (2,),
    offset (2,)) with input point (x, y) -> ((x, y) + offset) * scale."""
    h, w, _ = rgb.shape
    py, px = round(h * pad_fraction), round(w * pad_fraction)
    if py or px:
        rgb = np.pad(rgb, ((py, py), (px, px), (0, 0)), mode="edge")
    scale = np.ones(2)
    short = min(rgb.shape[:2])
    if min_side and short < min_side:
        size = (round(rgb.shape[1] * min_side / short), round(rgb.shape[0] * min_side / short))
        # Realised per-axis scale (rounding makes x and y differ slightly), exact for mapping back.
        scale = np.array([size[0] / rgb.shape[1], size[1] / rgb.shape[0]])
        rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))
    return rgb, scale, np.array([px, py], np.float64)


@functools.lru_cache(maxsize=4)
def _default_detector(min_face_size, thresholds, scale_factor) -> FaceDetector:
    return FaceDetector(min_face_size=min_face_size, thresholds=thresholds,
                        scale_factor=scale_factor)


def detect_faces(image: np.ndarray, *, min_face_size: float = 20,
                 thresholds: Sequence[float] = (0.6, 0.7, 0.7), scale_factor: float = 0.709,
                 pad_fraction: float = 0.0, min_side: int = 0) -> list[Face]:
    """Detect faces with MTCNN (Zhang et al. 2016); a cached `FaceDetector` per setting.

    image: (H, W), (H, W, 1|3|4) uint8 or uint16 (see `to_rgb_uint8`). Returns faces sorted by
    decreasing score. See `FaceDetector.__call__` for `pad_fraction` / `min_side`.
    """
    det = _default_detector(float(min_face_size), tuple(float(t) for t in thresholds),
                            float(scale_factor))
    return det(image, pad_fraction=pad_fraction, min_side=min_side)
