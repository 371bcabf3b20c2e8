"""Eye-level face alignment and cropping for FER data preparation.

Khodadadi's data preparation (docs/papers.md#prepare-align) detects faces with MTCNN (Zhang, Zhang,
Li, Qiao, "Joint Face Detection and Alignment using Multi-task Cascaded Convolutional Networks",
IEEE SPL 2016), rotates each face so the two eye centres are level (eye centre = mean of that eye's
landmarks: one point per eye for MTCNN's five landmarks, six for the 68-point scheme), crops it
without margin, resizes to 96x96x3 and scales pixels to [0, 1]. `align_face` does this in one
affine warp:

* angle theta = atan2(y_right - y_left, x_right - x_left) of the line between the eye centres;
* crop = a square of side max(box w, h) * (1 + 2 * margin) centred on the box centre and turned by
  theta (eyes level); square so the face is not stretched (docs/papers.md#prepare-align);
* without a box (landmarks only), the square covers the landmarks' extent in the rotated frame;
* each output pixel averages k x k bilinear samples, k = ceil(crop side / output side) capped at 4
  (anti-aliasing when shrinking); samples outside the image take the nearest edge pixel.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fer_jax.data.face.mtcnn import Face, bilinear_sample, to_rgb_uint8

# ITU-R BT.601 luma, PIL's convert('L') weights, for channels=1.
_LUMA = (0.299, 0.587, 0.114)
_BUCKET = 32


def _eye_centres(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # MTCNN: points 0 and 1; 68-point (iBUG/dlib): 36-41 image-left eye, 42-47 image-right eye.
    if landmarks.shape == (5, 2):
        return landmarks[0], landmarks[1]
    return landmarks[36:42].mean(axis=0), landmarks[42:48].mean(axis=0)


def alignment_matrix(landmarks, box=None, *, output_size: int = 96,
                     margin: float = 0.0) -> np.ndarray:
    """(2, 3) affine map from output (x, y) to input (x, y), continuous pixel coordinates
    (pixel (r, c) covers [c, c+1) x [r, r+1)). See the module docstring for the rule."""
    landmarks = np.asarray(landmarks, np.float64)
    if landmarks.shape not in ((5, 2), (68, 2)) or not np.isfinite(landmarks).all():
        raise ValueError(f"landmarks: expected finite (5, 2) or (68, 2) (x, y) points, "
                         f"got shape {landmarks.shape}")
    if margin <= -0.5:
        raise ValueError(f"margin: expected > -0.5 (fraction of the box per side), got {margin}")
    left, right = _eye_centres(landmarks)
    if np.allclose(left, right):
        raise ValueError(f"landmarks: the two eye centres coincide at {left}; cannot level them")
    theta = math.atan2(right[1] - left[1], right[0] - left[0])
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    if box is not None:
        x1, y1, x2, y2 = (float(v) for v in box)
        if not (x2 > x1 and y2 > y1):
            raise ValueError(f"box: expected (x1, y1, x2, y2) with x2 > x1, y2 > y1, got {box}")
        centre, side = np.array([(x1 + x2) / 2, (y1 + y2) / 2]), max(x2 - x1, y2 - y1)
    else:
        # Landmark extent measured in the rotated (eye-level) frame, mapped back for the centre.
        upright = landmarks @ rot  # row-vector form of rot.T @ p
        lo, hi = upright.min(axis=0), upright.max(axis=0)
        centre, side = rot @ ((lo + hi) / 2), float(max(hi - lo))
    side *= 1 + 2 * margin
    linear = rot * (side / output_size)
    offset = centre - linear @ np.array([output_size / 2, output_size / 2])
    return np.concatenate([linear, offset[:, None]], axis=1)


def warp_crop(image, image_hw, matrix, *, output_size, supersample):
    """Pure, jittable: (S, S, C) float32 samples of `image` (H, W, C) under `matrix` (output ->
    input), averaging supersample^2 bilinear samples per pixel, edge pixels beyond `image_hw`."""
    k, s = supersample, output_size
    sub = (jnp.arange(s * k, dtype=jnp.float32) + 0.5) / k
    u, v = sub[None, :], sub[:, None]
    xs = matrix[0, 0] * u + matrix[0, 1] * v + matrix[0, 2] - 0.5
    ys = matrix[1, 0] * u + matrix[1, 1] * v + matrix[1, 2] - 0.5
    # Clamping the sample position replicates the border (no black frame to learn from).
    xs = jnp.clip(xs, 0.0, image_hw[1].astype(jnp.float32) - 1)
    ys = jnp.clip(ys, 0.0, image_hw[0].astype(jnp.float32) - 1)
    out = bilinear_sample(image, image_hw, ys, xs, 0.0)
    return out.reshape(s, k, s, k, -1).mean(axis=(1, 3))


_warp_crop = jax.jit(warp_crop, static_argnames=("output_size", "supersample"))


def align_face(image: np.ndarray, face_or_landmarks, *, output_size: int = 96,
               margin: float = 0.0, channels: int = 3, box=None) -> np.ndarray:
    """Rotate so the eye centres are level, crop, resize; float32 (S, S, channels) in [0, 1].

    image: any layout `to_rgb_uint8` accepts. face_or_landmarks: a `Face` (its box and landmarks)
    or landmarks (5, 2) / (68, 2) in (x, y) pixels, optionally with `box` (x1, y1, x2, y2).
    margin: fraction of the box side added on each side (paper: 0). channels: 3 (RGB) or 1 (luma).
    """
    if not isinstance(output_size, int | np.integer) or output_size < 1:
        raise ValueError(f"output_size: expected a positive int, got {output_size!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels: expected 1 or 3, got {channels!r}")
    rgb = to_rgb_uint8(image)
    if isinstance(face_or_landmarks, Face):
        landmarks = face_or_landmarks.landmarks
        box = face_or_landmarks.box if box is None else box
    else:
        landmarks = face_or_landmarks
    matrix = alignment_matrix(landmarks, box, output_size=output_size, margin=margin)
    crop_side = float(np.hypot(*matrix[:, 0])) * output_size
    k = int(min(4, max(1, math.ceil(crop_side / output_size - 1e-6))))
    # Pad to a bucket so that images of similar size share one compiled warp.
    h, w, _ = rgb.shape
    hb, wb = -(-h // _BUCKET) * _BUCKET, -(-w // _BUCKET) * _BUCKET
    padded = np.zeros((hb, wb, 3), np.float32)
    padded[:h, :w] = rgb
    out = _warp_crop(padded, np.array([h, w], np.int32), matrix.astype(np.float32),
                     output_size=int(output_size), supersample=k)
    out = np.asarray(out) / np.float32(255.0)
    if channels == 1:
        out = (out @ np.asarray(_LUMA, np.float32))[:, :, None]
    return np.clip(out, 0.0, 1.0).astype(np.float32)
