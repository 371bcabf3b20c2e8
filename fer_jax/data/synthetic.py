"""Procedural synthetic faces: the offline default dataset of every fer_jax config.

Each subject is a cartoon face whose identity traits (face shape, eye spacing, skin tone, hair,
background, lighting, idiosyncratic expression style) are drawn from `(seed, subject_id)` alone,
so any subject renders without the others - the federated engine creates clients lazily.

An expression is a vector of parameters loosely following FACS action units (Ekman & Friesen,
1978): mouth curvature (AU12 smile / AU15 corner depressor), mouth opening (AU25/26), mouth width
(AU20 stretch / AU23 tighten), one-sided corner raise (AU14, contempt), brow angle (AU1 inner raise
vs AU4 lowerer), brow height (AU1+2), eye opening (AU5 vs AU6/7) and nose wrinkle (AU9). An image
at intensity t renders `rest + t * apex + jitter`, so t = 0 is the subject's neutral face for every
class and `sequence` sweeps t from 0 to the apex (a CK+-style onset clip).

Shapes are implicit functions over the pixel grid, anti-aliased by a one-pixel coverage ramp of an
approximate signed distance, and a whole batch renders with vectorized NumPy (float32). Classes are
made to overlap on purpose (per-subject style, low intensities, pose, lighting, noise), so a small
CNN on held-out subjects is far above chance but not perfect; `benchmarks/synthetic_difficulty.py`
measures it.
"""

from __future__ import annotations

import numpy as np

from fer_jax.data import classes as classes_lib
from fer_jax.data import types

PARAMS = ("mouth_curve", "mouth_open", "mouth_width", "mouth_asym",
          "brow_angle", "brow_height", "eye_open", "nose_wrinkle")

# Apex expression parameters per canonical class (0 = the subject's resting face).
APEX = {
    "anger":     (-0.35, -0.4, -0.20, 0.0, -1.00, -0.70, 0.15, 0.30),
    "disgust":   (-0.60, 0.15, 0.00, 0.0, -0.50, -0.40, -0.45, 1.00),
    "fear":      (-0.30, 0.45, 0.35, 0.0, 0.80, 0.60, 0.80, 0.00),
    "happiness": (1.00, 0.35, 0.35, 0.0, 0.00, 0.10, -0.35, 0.20),
    "sadness":   (-0.90, -0.1, -0.10, 0.0, 0.90, 0.00, -0.40, 0.00),
    "surprise":  (0.00, 1.00, -0.35, 0.0, 0.20, 1.00, 0.90, 0.00),
    "neutral":   (0.00, 0.00, 0.00, 0.0, 0.00, 0.00, 0.00, 0.00),
    "contempt":  (0.10, 0.00, 0.00, 1.0, 0.00, 0.00, -0.15, 0.00),
}

SIZES = (48, 96, 112, 224)  # The sizes the tests cover; any size in [24, 512] renders.
_STREAM_TRAITS, _STREAM_IMAGES, _STREAM_INTENSITY, _STREAM_CLIP = 0, 1, 2, 3
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_SKIN = np.array([[245, 208, 180], [205, 160, 120], [150, 100, 70], [90, 58, 42]], np.float32)
_HAIR = np.array([[25, 20, 18], [80, 50, 30], [195, 160, 100], [140, 60, 35], [165, 160, 155]],
                 np.float32)
_CHUNK_PIXELS = 1 << 20  # Renders at most this many pixels at once to stay in cache-sized blocks.


def _cov(sd, inv_px):
    """Anti-aliased coverage of the region sd < 0, a one-pixel linear ramp across the edge."""
    a = sd * -inv_px
    a += 0.5
    return np.clip(a, 0.0, 1.0, out=a)


def _over(img, alpha, color):
    """Composites `color` (C, B, 1, 1) over `img` (C, B, H, W) in place with coverage `alpha`."""
    for c in range(img.shape[0]):
        img[c] += alpha * (color[c] - img[c])


class SyntheticFaces:
    """Deterministic renderer of synthetic expressive faces for any subject id.

    Attributes:
      class_names: the canonical classes rendered; labels index this tuple.
      image_shape: (H, W, C) of every image.
    """

    def __init__(self, *, seed: int = 0, image_size: int = 48, channels: int = 1,
                 classes=None, intensity_range=(0.4, 1.0), noise_std: float = 6.0,
                 occlusion_prob: float = 0.0):
        """Configures the generator.

        Args:
          seed: non-negative int; with the subject id it fixes every random draw.
          image_size: square side in pixels, in [24, 512] (48, 96, 112, 224 are tested).
          channels: 1 (gray) or 3 (RGB).
          classes: canonical class names to render (any spelling `classes.canonical_name`
            accepts), kept in canonical order; None means all 8.
          intensity_range: (low, high) in [0, 1]; `subject` draws expression intensity uniformly
            in it for the non-neutral classes. A lower `low` makes the task harder.
          noise_std: per-pixel Gaussian sensor noise in 0-255 units (jittered x0.5-1.5 per image).
          occlusion_prob: chance per image of 1-2 random occluding blobs (hands, objects).
        """
        if not isinstance(seed, int | np.integer) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if not isinstance(image_size, int | np.integer) or not 24 <= image_size <= 512:
            raise ValueError(f"image_size must be an int in [24, 512] (e.g. {SIZES}), "
                             f"got {image_size!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        lo, hi = intensity_range
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"intensity_range must be (low, high) with 0 <= low <= high <= 1, "
                             f"got {intensity_range!r}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
        if not 0.0 <= occlusion_prob <= 1.0:
            raise ValueError(f"occlusion_prob must be in [0, 1], got {occlusion_prob!r}")
        if classes is None:
            classes = classes_lib.CANONICAL
        if isinstance(classes, str) or not len(classes):
            raise ValueError(f"classes must be a non-empty sequence of class names, "
                             f"got {classes!r}")
        self.class_names = classes_lib.canonical_order(classes)
        self.seed, self.size, self.channels = int(seed), int(image_size), channels
        self.intensity_range = (float(lo), float(hi))
        self.noise_std, self.occlusion_prob = float(noise_std), float(occlusion_prob)
        self._apex = np.array([APEX[c] for c in self.class_names], np.float32)
        self._neutral = np.array([c == "neutral" for c in self.class_names])
        # Pixel-centre coordinates in [-1, 1]; u runs along columns, v down the rows.
        grid = (np.arange(self.size, dtype=np.float32) + 0.5) * (2.0 / self.size) - 1.0
        self._u, self._v = grid[None, None, :], grid[None, :, None]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.size, self.size, self.channels)

    def _rng(self, subject_id, *stream):
        return np.random.default_rng([self.seed, int(subject_id), *stream])

    @staticmethod
    def _check_id(name, value):
        if not isinstance(value, int | np.integer) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")

    def traits(self, subject_id: int) -> dict:
        """Identity traits of a subject, a pure function of (seed, subject_id)."""
        self._check_id("subject_id", subject_id)
        r = self._rng(subject_id, _STREAM_TRAITS)
        u = lambda lo, hi: float(r.uniform(lo, hi))
        skin_pos = u(0, len(_SKIN) - 1)
        i = min(int(skin_pos), len(_SKIN) - 2)
        skin = _SKIN[i] + (skin_pos - i) * (_SKIN[i + 1] - _SKIN[i])
        skin = skin * r.uniform(0.93, 1.07, 3).astype(np.float32)
        hair = _HAIR[r.integers(len(_HAIR))] * r.uniform(0.8, 1.2, 3).astype(np.float32)
        t = dict(
            face_a=u(0.50, 0.64), face_b=u(0.74, 0.86), face_y=u(0.02, 0.10),
            hair_a=u(1.06, 1.22), hair_b=u(0.88, 1.05), hair_y=u(-0.24, -0.12),
            hairline=u(-0.60, -0.42), hairline_curve=u(0.1, 0.5),
            eye_x=u(0.19, 0.29), eye_y=u(-0.16, -0.04), eye_w=u(0.085, 0.12),
            eye_h=u(0.035, 0.055), iris_r=u(0.032, 0.045),
            brow_dy=u(0.09, 0.14), brow_len=u(0.08, 0.12), brow_t=u(0.014, 0.026),
            brow_arch=u(0.0, 0.03),
            nose_y=u(0.12, 0.22), nose_w=u(0.04, 0.065),
            mouth_y=u(0.38, 0.50), mouth_w=u(0.13, 0.2), lip_t=u(0.018, 0.03),
            light=r.uniform(-0.35, 0.35, 2), shade=u(0.1, 0.3),
            skin=skin, hair=hair, lips=skin * np.float32([0.82, 0.55, 0.55]),
            iris=r.uniform(20, 140, 3).astype(np.float32),
            bg=r.uniform(30, 230, 3).astype(np.float32), bg_grad=r.uniform(-0.3, 0.3, 2),
            # Expression style: a resting face, a per-class gain and per-class offsets.
            rest=r.normal(0.0, 0.1, len(PARAMS)).astype(np.float32),
            gain=np.exp(r.normal(0.0, 0.2, len(classes_lib.CANONICAL))).astype(np.float32),
            offset=r.normal(0.0, 0.12, (len(classes_lib.CANONICAL), len(PARAMS))
                            ).astype(np.float32),
        )
        return t

    def _expression(self, traits, labels, intensities, noise):
        """Per-image parameter vectors: rest + t * (gain * apex + offset) + noise, (N, P)."""
        canon = np.array([classes_lib.CANONICAL.index(c) for c in self.class_names])[labels]
        apex = self._apex[labels] * traits["gain"][canon, None] + traits["offset"][canon]
        apex[self._neutral[labels]] = 0.0  # Neutral has no apex: its t is irrelevant.
        return traits["rest"] + intensities[:, None] * apex + noise

    def _jitter(self, rng, n):
        """Per-image nuisance draws; they never depend on the labels (so t = 0 is neutral)."""
        j = dict(
            rot=rng.normal(0, 0.08, n), scale=rng.uniform(1.0, 1.2, n),
            tx=rng.normal(0, 0.04, n), ty=rng.normal(0, 0.04, n),
            light=rng.normal(0, 0.12, (n, 2)), contrast=rng.uniform(0.8, 1.15, n),
            bright=rng.normal(0, 12, n), gaze=rng.normal(0, 0.25, (n, 2)),
            expr=rng.normal(0, 0.1, (n, len(PARAMS))), side=rng.choice([-1.0, 1.0], n),
            noise=self.noise_std * rng.uniform(0.5, 1.5, n),
            occ=rng.random((n, 2)) < self.occlusion_prob, occ_geo=rng.uniform(-1, 1, (n, 2, 4)),
            occ_col=rng.uniform(0, 255, (n, 2, 3)),
        )
        return {k: np.asarray(v, np.float32) if k != "occ" else v for k, v in j.items()}

    def _check(self, subject_id, labels, intensities):
        labels = np.asarray(labels)
        intensities = np.asarray(intensities, np.float32)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be a 1-D int array, got {labels.dtype} {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes}), got "
                             f"[{labels.min()}, {labels.max()}]")
        if intensities.shape != labels.shape:
            raise ValueError(f"intensities must have the shape of labels {labels.shape}, got "
                             f"{intensities.shape}")
        if intensities.size and (intensities.min() < 0 or intensities.max() > 1):
            raise ValueError("intensities must lie in [0, 1]")
        return self.traits(subject_id), labels, intensities

    def render(self, subject_id: int, labels, intensities, *, stream: int = 0) -> np.ndarray:
        """Renders images of one subject, (N, H, W, C) uint8.

        Args:
          subject_id: the subject (identity traits come from (seed, subject_id)).
          labels: (N,) ints indexing `class_names`.
          intensities: (N,) floats in [0, 1]; 0 is the neutral face whatever the label.
          stream: picks an independent set of pose / lighting / noise draws; the same stream and
            N give the same nuisances for any labels.
        """
        self._check_id("stream", stream)
        traits, labels, intensities = self._check(subject_id, labels, intensities)
        rng = self._rng(subject_id, _STREAM_IMAGES, stream)
        jitter = self._jitter(rng, len(labels))
        expr = self._expression(traits, labels, intensities, jitter["expr"])
        return self._render_chunks(traits, jitter, expr, rng)

    def subject(self, subject_id: int, *, images_per_class: int) -> types.Split:
        """All images of one subject: `images_per_class` per class, intensities drawn in range."""
        if not isinstance(images_per_class, int | np.integer) or images_per_class < 1:
            raise ValueError(f"images_per_class must be a positive int, got {images_per_class!r}")
        labels = np.repeat(np.arange(self.num_classes, dtype=np.int32), images_per_class)
        self._check_id("subject_id", subject_id)
        r = self._rng(subject_id, _STREAM_INTENSITY)
        intensities = r.uniform(*self.intensity_range, len(labels)).astype(np.float32)
        intensities[self._neutral[labels]] = 0.0
        images = self.render(subject_id, labels, intensities)
        return types.Split(images, labels, np.full(len(labels), subject_id, np.int32))

    def sequence(self, subject_id: int, label: int, *, num_frames: int, clip: int = 0
                 ) -> np.ndarray:
        """A neutral -> apex clip (T, H, W, C) uint8 with one pose and lighting per clip.

        Frame 0 is the subject's neutral face (identical for every label of the same clip index);
        intensity follows a smoothstep onset up to an apex intensity in [0.75, 1].
        """
        if not isinstance(num_frames, int | np.integer) or num_frames < 2:
            raise ValueError(f"num_frames must be an int >= 2, got {num_frames!r}")
        self._check_id("clip", clip)
        labels = np.full(num_frames, label)
        traits, labels, _ = self._check(subject_id, labels, np.zeros(num_frames))
        rng = self._rng(subject_id, _STREAM_CLIP, clip)
        apex = rng.uniform(0.75, 1.0)
        s = np.linspace(0.0, 1.0, num_frames, dtype=np.float32)
        intensities = apex * s * s * (3 - 2 * s)
        # One draw of nuisances for the clip, repeated over frames; only sensor noise varies.
        jitter = {k: np.repeat(v, num_frames, axis=0) for k, v in self._jitter(rng, 1).items()}
        expr = self._expression(traits, labels, intensities, jitter["expr"])
        return self._render_chunks(traits, jitter, expr, rng)

    def _render_chunks(self, traits, jitter, expr, rng):
        n = len(expr)
        out = np.empty((n, self.size, self.size, self.channels), np.uint8)
        step = max(1, _CHUNK_PIXELS // (self.size * self.size))
        for i in range(0, n, step):
            sl = slice(i, i + step)
            out[sl] = self._render(traits, {k: v[sl] for k, v in jitter.items()}, expr[sl], rng)
        return out

    def _render(self, tr, jitter, expr, rng):
        """Rasterizes one batch of one subject; every per-image quantity is shaped (B, 1, 1)."""
        b, size = len(expr), self.size
        col = lambda rgb: (np.asarray(rgb, np.float32) if self.channels == 3
                           else np.asarray(rgb, np.float32) @ _LUMA[:, None] if np.ndim(rgb) > 1
                           else np.float32([np.dot(rgb, _LUMA)]))
        pcol = lambda rgb: col(rgb).reshape(-1, self.channels).T[:, :, None, None]
        per = lambda a: np.asarray(a, np.float32).reshape(-1, 1, 1)
        e = {p: per(expr[:, i]) for i, p in enumerate(PARAMS)}

        # Face coordinates: the inverse of a rotation + scale + shift of the head in the frame.
        cos, sin, s = np.cos(jitter["rot"]), np.sin(jitter["rot"]), jitter["scale"]
        ca, cb = per(cos / s), per(sin / s)
        tx, ty = per(jitter["tx"]), per(jitter["ty"] + tr["face_y"])
        x = ca * self._u + (cb * self._v - ca * tx - cb * ty)
        y = -cb * self._u + (ca * self._v + cb * tx - ca * ty)
        inv_px = per(s * size / 2.0)  # Face units -> pixels, for the coverage ramps.
        xs = np.abs(x)  # Mirrored coordinate: symmetric parts are computed once.

        # Background with a colour gradient.
        bgx, bgy = tr["bg_grad"]
        grad = 1.0 + bgx * self._u + bgy * self._v
        img = (pcol(tr["bg"]) * grad).repeat(b, axis=1)

        # Hair behind the face, then the face below the hairline.
        ha, hb = tr["face_a"] * tr["hair_a"], tr["face_b"] * tr["hair_b"]
        r2 = (x * (1 / ha)) ** 2 + ((y - tr["hair_y"]) * (1 / hb)) ** 2
        _over(img, _cov((r2 - 1) * (0.5 * ha), inv_px), pcol(tr["hair"]))
        rf2 = (x * (1 / tr["face_a"])) ** 2 + (y * (1 / tr["face_b"])) ** 2
        face = _cov((rf2 - 1) * (0.5 * tr["face_a"]), inv_px)
        hairline = tr["hairline"] + tr["hairline_curve"] * x * x
        _over(img, face * _cov(hairline - y, inv_px), pcol(tr["skin"]))
        dark = pcol(tr["skin"] * 0.45)

        # Eyes: lash outline, white, iris and pupil; opening scales the vertical radius.
        eh = tr["eye_h"] * np.maximum(1.0 + 0.7 * e["eye_open"], 0.12)
        dx, dy = xs - tr["eye_x"], y - tr["eye_y"]
        r2 = (dx * (1 / tr["eye_w"])) ** 2 + (dy / eh) ** 2
        sd_eye = (r2 - 1) * (0.5 * eh)
        _over(img, _cov(sd_eye - 0.012, inv_px), pcol([30, 25, 25]))
        white = _cov(sd_eye, inv_px)
        _over(img, white, pcol([235, 235, 230]))
        gx, gy = per(jitter["gaze"][:, 0] * 0.02), per(jitter["gaze"][:, 1] * 0.01)
        ri = tr["iris_r"]
        d2 = (dx - gx * np.sign(x)) ** 2 + (dy - gy) ** 2
        _over(img, white * _cov((d2 - ri * ri) * (0.5 / ri), inv_px), pcol(tr["iris"]))
        _over(img, white * _cov((d2 - 0.16 * ri * ri) * (1.25 / ri), inv_px), pcol([10, 10, 10]))

        # Brows: thick arched segments; angle tilts the inner end, height lifts both.
        bl = tr["brow_len"]
        by = tr["eye_y"] - tr["brow_dy"] - 0.06 * e["brow_height"]
        rel = (xs - tr["eye_x"]) * (1 / bl)
        line = by + (0.4 * bl) * e["brow_angle"] * rel + tr["brow_arch"] * rel * rel
        sd = np.maximum(np.abs(y - line) - tr["brow_t"], (np.abs(rel) - 1) * bl)
        _over(img, _cov(sd, inv_px), pcol(tr["hair"] * 0.7))

        # Nose: nostrils, plus AU9 wrinkles on the bridge and nasolabial folds (AU9 / AU12).
        ny, nw = tr["nose_y"], tr["nose_w"]
        r2 = ((xs - 0.6 * nw) * (1 / (0.45 * nw))) ** 2 + ((y - ny) * (1 / 0.018)) ** 2
        _over(img, 0.7 * _cov((r2 - 1) * 0.009, inv_px), dark)
        wr = np.clip(e["nose_wrinkle"], 0, 1.5)
        yb = tr["eye_y"] + 0.03
        d = np.minimum(np.abs(y - yb), np.abs(y - yb - 0.045)) - 0.008
        _over(img, (0.6 * wr) * _cov(np.maximum(d, xs - 0.06), inv_px), dark)
        w = tr["mouth_w"] * np.maximum(1.0 + 0.3 * e["mouth_width"], 0.5)
        my = tr["mouth_y"]
        xl = 1.3 * nw + (y - ny) * ((w + 0.02 - 1.3 * nw) / (my - ny))
        sd = np.maximum(np.abs(xs - xl) - 0.008, np.abs(y - 0.5 * (ny + my)) - 0.5 * (my - ny))
        fold = np.clip(0.5 * wr + 0.5 * e["mouth_curve"], 0, 1) * 0.55
        _over(img, fold * _cov(sd, inv_px), dark)

        # Mouth: a centre line bent by curvature (and one corner by contempt), a lens-shaped
        # opening with teeth at the top, lips around it; pressed lips (open < 0) thin out.
        mx = x * (1 / w)
        win = 1.0 - mx * mx
        asym = np.maximum(mx * per(jitter["side"]), 0)
        yc = my - 0.09 * e["mouth_curve"] * mx * mx - 0.14 * e["mouth_asym"] * asym * asym
        d = np.abs(y - yc)
        hh = (0.1 * np.maximum(e["mouth_open"], 0)) * win
        lt = tr["lip_t"] * np.clip(1.0 + 0.8 * np.minimum(e["mouth_open"], 0), 0.3, 1)
        _over(img, _cov(d - hh - lt * np.minimum(3 * win, 1), inv_px), pcol(tr["lips"]))
        # Clipped to the mouth's width: a closed mouth keeps a thin parting line between lips.
        inside = _cov(np.maximum(d - hh, (mx * mx - 1) * (0.5 * w)), inv_px)
        _over(img, inside, pcol([60, 20, 25]))
        teeth = np.clip(3 * e["mouth_open"], 0, 1)  # Teeth show only once the mouth opens.
        _over(img, teeth * inside * _cov(y - (yc - hh) - 0.035 * teeth, inv_px),
              pcol([230, 225, 215]))

        # Optional occluders: random ellipses in random colours.
        occ = jitter["occ"]
        if occ.any():
            for k in range(occ.shape[1]):
                g = jitter["occ_geo"][:, k]
                ox, oy, ra, rb = per(0.6 * g[:, 0]), per(0.6 * g[:, 1]), per(
                    0.25 + 0.12 * g[:, 2]), per(0.2 + 0.1 * g[:, 3])
                r2 = ((x - ox) / ra) ** 2 + ((y - oy) / rb) ** 2
                alpha = per(occ[:, k]) * _cov((r2 - 1) * 0.5 * rb, inv_px)
                _over(img, alpha, col(jitter["occ_col"][:, k]).T[:, :, None, None])

        # Lighting: a directional gradient plus face-edge shading, then exposure and noise.
        light = tr["light"] + jitter["light"]
        lx, ly = per(light[:, 0]), per(light[:, 1])
        lit = 1.0 + lx * x + ly * y - (tr["shade"] * face) * np.minimum(rf2, 1.0)
        lit *= per(jitter["contrast"])
        img *= lit
        img += per(jitter["bright"])
        noise = rng.standard_normal(img.shape, dtype=np.float32)
        noise *= per(jitter["noise"])
        img += noise
        np.clip(img, 0, 255, out=img)
        return np.rint(img).astype(np.uint8).transpose(1, 2, 3, 0)


def _check_subjects(num_subjects, test_subjects):
    if not isinstance(num_subjects, int | np.integer) or num_subjects < 2:
        raise ValueError(f"num_subjects must be an int >= 2, got {num_subjects!r}")
    if isinstance(test_subjects, float) and 0.0 < test_subjects < 1.0:
        n_test = int(round(test_subjects * num_subjects))
        n_test = min(max(n_test, 1), num_subjects - 1)
    elif isinstance(test_subjects, int | np.integer) and 1 <= test_subjects < num_subjects:
        n_test = int(test_subjects)
    else:
        raise ValueError(f"test_subjects must be an int in [1, num_subjects={num_subjects}) or a "
                         f"fraction in (0, 1), got {test_subjects!r}")
    return n_test


def make_dataset(*, num_subjects: int, images_per_class: int, test_subjects=0.2,
                 image_size: int = 48, channels: int = 1, classes=None, seed: int = 0,
                 **options) -> types.Dataset:
    """A subject-disjoint synthetic dataset with splits 'train' and 'test'.

    Subjects 0 .. num_subjects - n_test - 1 train and the last n_test subjects test, where
    n_test is `test_subjects` (an int) or that fraction of `num_subjects` (at least 1).
    `options` go to `SyntheticFaces` (intensity_range, noise_std, occlusion_prob).
    """
    n_test = _check_subjects(num_subjects, test_subjects)
    gen = SyntheticFaces(seed=seed, image_size=image_size, channels=channels, classes=classes,
                         **options)
    parts = [gen.subject(i, images_per_class=images_per_class) for i in range(num_subjects)]
    join = lambda ps: types.Split(np.concatenate([p.images for p in ps]),
                                  np.concatenate([p.labels for p in ps]),
                                  np.concatenate([p.subjects for p in ps]))
    n_train = num_subjects - n_test
    return types.Dataset("synthetic", gen.class_names,
                         {"train": join(parts[:n_train]), "test": join(parts[n_train:])})


def make_sequences(*, num_subjects: int, clips_per_class: int, num_frames: int,
                   image_size: int = 48, channels: int = 1, classes=None, seed: int = 0,
                   **options) -> dict:
    """Neutral -> apex clips: videos (N, T, H, W, C) uint8, labels (N,), subjects (N,) int32.

    Every subject gets `clips_per_class` clips of each class, subject-major then class order.
    """
    if not isinstance(num_subjects, int | np.integer) or num_subjects < 1:
        raise ValueError(f"num_subjects must be a positive int, got {num_subjects!r}")
    if not isinstance(clips_per_class, int | np.integer) or clips_per_class < 1:
        raise ValueError(f"clips_per_class must be a positive int, got {clips_per_class!r}")
    gen = SyntheticFaces(seed=seed, image_size=image_size, channels=channels, classes=classes,
                         **options)
    videos, labels, subjects = [], [], []
    for sid in range(num_subjects):
        for label in range(gen.num_classes):
            for k in range(clips_per_class):
                # Clip index k * num_classes + label: distinct nuisances for every clip.
                videos.append(gen.sequence(sid, label, num_frames=num_frames,
                                           clip=k * gen.num_classes + label))
                labels.append(label)
                subjects.append(sid)
    return dict(videos=np.stack(videos), labels=np.asarray(labels, np.int32),
                subjects=np.asarray(subjects, np.int32), class_names=gen.class_names)
