"""Tests of fer_jax.data.face: MTCNN (Zhang et al. 2016) nets, cascade and eye-level alignment.

The nets are checked layer by layer against an independent float64 NumPy implementation of the
same weights; the cascade on real faces of ../shared/data (CK+48 crops, CK+ video frames, the
unlabelled videos), on frames without a face and on composites with several faces.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from fer_jax.data.face import (
    Face,
    FaceDetector,
    align_face,
    alignment_matrix,
    detect_faces,
    load_mtcnn_params,
    to_rgb_uint8,
)
from fer_jax.data.face import mtcnn as M


@pytest.fixture(scope="module")
def params():
    return load_mtcnn_params()


@pytest.fixture(scope="module")
def detector(params):
    return FaceDetector(params)


# ---------------------------------------------------------------- float64 NumPy reference nets


def np_conv(x, p):
    k = np.asarray(p["kernel"], np.float64)
    win = sliding_window_view(x, k.shape[:2], axis=(1, 2))  # (N, H', W', C, kh, kw)
    return np.einsum("nhwcij,ijco->nhwo", win, k) + np.asarray(p["bias"], np.float64)


def np_prelu(x, p):
    return np.where(x >= 0, x, np.asarray(p["alpha"], np.float64) * x)


def np_pool(x, k, s, same):
    """Max pool with TF/Keras semantics ('same' pads -inf, more at the end)."""
    n, h, w, c = x.shape
    if same:
        oh, ow = -(-h // s), -(-w // s)
        ph, pw = max((oh - 1) * s + k - h, 0), max((ow - 1) * s + k - w, 0)
        x = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)),
                   constant_values=-np.inf)
    win = sliding_window_view(x, (k, k), axis=(1, 2))[:, ::s, ::s]
    return win.max(axis=(-1, -2))


def np_dense(x, p):
    return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def np_softmax1(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(-1, keepdims=True))[..., 1]


def np_flatten(x):
    return np.transpose(x, (0, 2, 1, 3)).reshape(len(x), -1)


def np_net(net, p, x):
    """Returns {layer name: output} for the float64 reference of P-, R- or O-Net."""
    out = {}

    def layer(name, fn, value, *args):
        out[name] = fn(value, p[name], *args)
        return out[name]

    if net == "pnet":
        x = np_pool(layer("prelu1", np_prelu, layer("conv1", np_conv, x)), 2, 2, True)
        x = layer("prelu2", np_prelu, layer("conv2", np_conv, x))
        x = layer("prelu3", np_prelu, layer("conv3", np_conv, x))
        layer("conv4_1", np_conv, x)
        out["prob"] = np_softmax1(layer("conv4_2", np_conv, x))
        return out
    convs = [("conv1", 3, 2, True), ("conv2", 3, 2, False)]
    convs += [("conv3", 2, 2, True)] if net == "onet" else []
    for i, (name, k, s, same) in enumerate(convs, start=1):
        x = np_pool(layer(f"prelu{i}", np_prelu, layer(name, np_conv, x)), k, s, same)
    i = len(convs) + 1
    x = layer(f"prelu{i}", np_prelu, layer(f"conv{i}", np_conv, x))
    fc = f"fc{i + 1}"
    x = layer(f"prelu{i + 1}", np_prelu, layer(fc, np_dense, np_flatten(x)))
    heads = [f"fc{i + 2}_{j}" for j in (1, 2, 3)][: 3 if net == "onet" else 2]
    for head in heads:
        layer(head, np_dense, x)
    out["prob"] = np_softmax1(out[heads[-1]])
    return out


@pytest.mark.parametrize("net,shape", [("pnet", (2, 25, 31, 3)), ("rnet", (3, 24, 24, 3)),
                                       ("onet", (3, 48, 48, 3))])
def test_nets_match_float64_numpy_layer_by_layer(params, net, shape):
    x = np.random.default_rng(0).uniform(-1, 1, shape)
    module = {"pnet": M.PNet, "rnet": M.RNet, "onet": M.ONet}[net]()
    apply = jax.jit(lambda p, x: module.apply({"params": p}, x, capture_intermediates=True,
                                              mutable=["intermediates"]))
    outputs, state = apply(params[net], x.astype(np.float32))
    ref = np_net(net, params[net], x)
    inter = state["intermediates"]
    checked = 0
    for name, want in ref.items():
        if name == "prob":
            continue
        got = np.asarray(inter[name]["__call__"][0])
        assert got.shape == want.shape, name
        scale = max(1.0, np.abs(want).max())
        np.testing.assert_allclose(got, want, atol=2e-5 * scale, rtol=0, err_msg=f"{net}/{name}")
        checked += 1
    assert checked == len(params[net])  # every conv / dense / PReLU layer was compared
    np.testing.assert_allclose(np.asarray(outputs[-1]), ref["prob"], atol=1e-5)


def test_weights_file_is_plain_arrays():
    with np.load(M.WEIGHTS_PATH, allow_pickle=False) as data:
        shapes = {k: data[k].shape for k in data.files}
        assert all(data[k].dtype == np.float32 for k in data.files)
    assert shapes["pnet/conv1/kernel"] == (3, 3, 3, 10)
    assert shapes["rnet/fc4/kernel"] == (576, 128)
    assert shapes["onet/fc6_2/kernel"] == (256, 10)
    assert sum(math.prod(s) for s in shapes.values()) == 495_850
    with pytest.raises(FileNotFoundError, match="convert_mtcnn_weights"):
        load_mtcnn_params("/nonexistent/mtcnn_weights.npz")


def test_padded_pnet_equals_unpadded_on_valid_windows(params):
    rng = np.random.default_rng(1)
    for h, w in [(27, 40)]:  # odd (25) and even (38) conv1 sizes: edges of the SAME pooling
        x = rng.uniform(-1, 1, (1, h, w, 3)).astype(np.float32)
        padded = np.pad(x, ((0, 0), (0, 48 - h), (0, 48 - w), (0, 0)), constant_values=0.7)
        reg, prob = M.PNet().apply({"params": params["pnet"]}, x)
        reg_p, prob_p = M.PNet().apply({"params": params["pnet"]}, padded, jnp.array([h, w]))
        oh, ow = prob.shape[1:]
        assert (oh, ow) == ((h - 1) // 2 - 4, (w - 1) // 2 - 4)
        np.testing.assert_allclose(prob_p[:, :oh, :ow], prob, atol=1e-6)
        np.testing.assert_allclose(reg_p[:, :oh, :ow], reg, atol=1e-5)


def test_area_resize_is_exact_box_average():
    rng = np.random.default_rng(2)
    img = rng.uniform(0, 1, (10, 7, 2))
    # Reference: output cell r averages [r * H / h, (r + 1) * H / h) with fractional overlaps.
    def weights(n_in, n_out):
        step = n_in / n_out
        lo = np.arange(n_out)[:, None] * step
        c = np.arange(n_in)[None, :]
        return np.clip(np.minimum(lo + step, c + 1) - np.maximum(lo, c), 0, None) / step

    want = np.einsum("rh,hwc,sw->rsc", weights(10, 4), img, weights(7, 3))
    got, block, unused = M.area_pyramid(img, [(4, 3), (5, 2), (0, 0)], [(6, 5), (5, 2), (3, 3)])
    assert got.dtype == np.float32 and got.shape == (6, 5, 2)
    np.testing.assert_allclose(got[:4, :3], want, atol=2e-6)
    assert not got[4:].any() and not got[:, 3:].any() and not unused.any()
    # 10 x 7 -> 5 x 2: rows pair up exactly, columns average 3.5 pixels.
    np.testing.assert_allclose(block, np.einsum("rh,hwc,sw->rsc", weights(10, 5), img,
                                                weights(7, 2)), atol=2e-6)
    np.testing.assert_allclose(block.mean(), img.mean(), atol=2e-6)


def test_nms_hand_computed():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 5, 5]], float)
    scores = np.array([0.9, 0.8, 0.7, 0.95])
    # IoU(0, 1) = 90 / 110 = 0.82; IoU(3, 0) = 25 / 100; min-overlap(3, 0) = 25 / 25 = 1.
    np.testing.assert_array_equal(M.nms(boxes, scores, 0.7), [3, 0, 2])
    np.testing.assert_array_equal(M.nms(boxes, scores, 0.7, "min"), [3, 2])
    np.testing.assert_array_equal(M.nms(boxes, scores, 0.85), [3, 0, 1, 2])
    with pytest.raises(ValueError, match="union"):
        M.nms(boxes, scores, 0.5, "max")


def test_pyramid_scales_standard_values():
    scales = M.pyramid_scales(100, 200, 20, 0.709)
    assert scales[0] == pytest.approx(0.6)
    assert len(scales) == 5  # 60, 42.5, 30.2, 21.4, 15.2 px >= 12; 10.8 px stops
    assert scales[-1] == pytest.approx(0.6 * 0.709**4)
    assert M.pyramid_scales(19, 400, 20, 0.709) == []


# ---------------------------------------------------------------------------- input conversion


def test_to_rgb_uint8_rules():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(to_rgb_uint8(gray), np.repeat(gray[:, :, None], 3, 2))
    np.testing.assert_array_equal(to_rgb_uint8(gray[:, :, None]), to_rgb_uint8(gray))
    rgba = np.random.default_rng(0).integers(0, 256, (3, 4, 4), dtype=np.uint8)
    np.testing.assert_array_equal(to_rgb_uint8(rgba), rgba[:, :, :3])
    deep = np.array([[0, 257, 128, 65535]], np.uint16)
    np.testing.assert_array_equal(to_rgb_uint8(deep)[0, :, 0], [0, 1, 0, 255])
    assert to_rgb_uint8(np.array([[32896]], np.uint16))[0, 0, 0] == 128  # 32896 * 255 / 65535


@pytest.mark.parametrize("bad,match", [
    (np.zeros((20, 20, 3), np.float32), "uint8 or uint16"),
    (np.zeros((20, 20, 2), np.uint8), r"\(H, W, 4\)"),
    (np.zeros((2, 20, 20, 3), np.uint8), "expected shape"),
    (np.zeros((0, 20), np.uint8), "empty"),
])
def test_bad_images_raise_clear_errors(bad, match):
    with pytest.raises(ValueError, match=f"image: .*{match}"):
        detect_faces(bad)


def test_bad_detector_arguments(params):
    with pytest.raises(ValueError, match="min_face_size"):
        FaceDetector(params, min_face_size=8)
    with pytest.raises(ValueError, match="thresholds"):
        FaceDetector(params, thresholds=(0.6, 0.7))
    with pytest.raises(ValueError, match="scale_factor"):
        FaceDetector(params, scale_factor=1.2)


# ------------------------------------------------------------------------------- real faces


def _ck48(shared_data, per_class, step=7):
    from PIL import Image

    files = []
    for folder in sorted((shared_data / "ckplus48" / "CK+48").iterdir()):
        files += sorted(folder.glob("*.png"))[::step][:per_class]
    return [(f.name, np.asarray(Image.open(f))) for f in files]


def _frames(path, step, fmt="rgb24"):
    import av

    with av.open(str(path)) as container:
        return [f.to_ndarray(format=fmt) for i, f in enumerate(container.decode(video=0))
                if i % step == 0]


def _plausible(face, shape):
    """Landmark geometry of an upright face: eyes left/right, above nose, above mouth."""
    (le, re, nose, ml, mr) = face.landmarks
    x1, y1, x2, y2 = face.box
    inside = (face.landmarks[:, 0] > x1 - 2).all() and (face.landmarks[:, 0] < x2 + 2).all()
    return inside and le[0] < re[0] and ml[0] < mr[0] and max(le[1], re[1]) < nose[1] < min(
        ml[1], mr[1]) and 0 <= x1 < x2 <= shape[1] + 2


def test_ck48_crops_one_face_each(shared_data, detector):
    images = _ck48(shared_data, per_class=6)
    for name, img in images:
        faces = detector(img)
        assert len(faces) == 1, (name, len(faces))
        assert _plausible(faces[0], img.shape), name


def test_ckplus_video_frames_one_face_each(shared_data, detector):
    for video in ["S055_004.mp4", "S130_007.mp4"]:
        path = shared_data / "ckplus_videos" / video
        if not path.exists():
            pytest.skip(f"{path} missing")
        for k, frame in enumerate(_frames(path, 8, "gray")):
            faces = detector(frame)
            assert len(faces) == 1, (video, 8 * k, len(faces))
            assert _plausible(faces[0], frame.shape) and faces[0].score > 0.9


def test_face_noface_video(shared_data, detector):
    # Frames 0-71 show one face; from frame 72 on a cartoon title (found by the scene cut).
    frames = _frames(shared_data / "videos_unlabelled" / "face_noface.mov", 8)
    counts = [len(detector(f)) for f in frames]
    for k, n in enumerate(counts):
        assert n == (1 if 8 * k <= 71 else 0), (8 * k, n)


def test_several_faces_and_no_face(shared_data, detector):
    images = _ck48(shared_data, per_class=1)
    row = np.concatenate([np.pad(img, 12, mode="edge") for _, img in images[:3]], axis=1)
    faces = detector(row)
    assert len(faces) == 3
    centres = sorted((f.box[0] + f.box[2]) / 2 for f in faces)
    np.testing.assert_allclose(centres, [36, 108, 180], atol=8)  # one per tile of width 72
    rng = np.random.default_rng(0)
    assert detector(np.full((80, 200), 128, np.uint8)) == []  # same bucket as `row`
    assert detector(rng.integers(0, 256, (80, 200, 3), dtype=np.uint8)) == []
    assert detector(np.zeros((8, 8), np.uint8)) == []  # smaller than one 12 px window
    assert detect_faces(np.zeros((8, 8), np.uint16)) == []


def test_gray_rgba_uint16_inputs_agree(shared_data, detector):
    _, img = _ck48(shared_data, per_class=1)[0]
    base = detector(img)[0]
    rgba = np.concatenate([np.repeat(img[:, :, None], 3, 2), np.full(img.shape + (1,), 7,
                                                                      np.uint8)], axis=2)
    for variant in (img[:, :, None], rgba, img.astype(np.uint16) * 257):
        faces = detector(variant)
        assert len(faces) == 1
        np.testing.assert_allclose(faces[0].box, base.box, atol=1e-3)


def test_pad_and_upscale_maps_back(shared_data, detector):
    _, img = _ck48(shared_data, per_class=1)[0]
    plain = detector(img)[0]
    up = detector(img, pad_fraction=0.25, min_side=96)
    assert len(up) == 1
    # Same face, returned in the 48x48 input's coordinates.
    np.testing.assert_allclose(up[0].landmarks, plain.landmarks, atol=3)
    with pytest.raises(ValueError, match="pad_fraction"):
        detector(img, pad_fraction=-0.1)


def test_bucketed_shapes_do_not_recompile(shared_data, params):
    det = FaceDetector(params, bucket=64)
    _, img = _ck48(shared_data, per_class=1)[0]
    big = np.pad(img, 8, mode="edge")  # 64 x 64
    det(big)
    assert det.trace_counts["pnet"] == 1
    for h, w in [(60, 62), (56, 64), (64, 57)]:  # all round up to the 64 x 64 bucket
        assert len(det(big[:h, :w])) == 1
    assert det.trace_counts["pnet"] == 1
    before = det.compile_count
    det(big[:60, :62])
    assert det.compile_count == before  # a repeated shape never traces again


# --------------------------------------------------------------------------------- alignment


def test_alignment_levels_synthetic_eyes():
    img = np.zeros((200, 240), np.uint8)
    centre, half, angle = np.array([120.0, 100.0]), 30.0, math.radians(25)
    d = half * np.array([math.cos(angle), math.sin(angle)])
    eyes = np.stack([centre - d, centre + d])
    for x, y in eyes:  # bright 5x5 dots, pixel (r, c) spans [c, c+1): centre at (x, y)
        img[int(y) - 2:int(y) + 3, int(x) - 2:int(x) + 3] = 255
    landmarks = np.concatenate([eyes + 0.5 - (eyes % 1), [[120, 130], [105, 150], [135, 150]]])
    box = (60.0, 40.0, 180.0, 160.0)  # centred on the eye midpoint
    out = align_face(img, landmarks, box=box, output_size=96)
    assert out.shape == (96, 96, 3) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    gray = out[:, :, 0]
    left, right = gray[:, :48], gray[:, 48:]
    ly, lx = np.unravel_index(np.argmax(left), left.shape)
    ry, rx = np.unravel_index(np.argmax(right), right.shape)
    assert abs(ly - ry) <= 1 and abs(ly - 47.5) <= 1.5
    # Eyes 60 px apart in a 120 px crop -> 48 px apart in 96 px.
    assert abs((rx + 48 - lx) - 48) <= 2
    # Matrix: output eye points are level and symmetric about the centre.
    m = alignment_matrix(landmarks, box, output_size=96)
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))
    out_eyes = (inv @ np.c_[landmarks[:2], np.ones(2)].T)[:2].T
    np.testing.assert_allclose(out_eyes[:, 1], 48, atol=1e-9)
    half_out = np.linalg.norm(landmarks[1] - landmarks[0]) / 2 * 96 / 120
    np.testing.assert_allclose(out_eyes[:, 0], [48 - half_out, 48 + half_out], atol=1e-9)


def test_alignment_options_and_68_points():
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    lm5 = np.array([[20, 24], [44, 24], [32, 34], [24, 44], [40, 44]], float)
    box = (8.0, 8.0, 56.0, 56.0)
    gray = align_face(img, lm5, box=box, output_size=48, channels=1)
    rgb = align_face(img, lm5, box=box, output_size=48)
    np.testing.assert_allclose(gray[:, :, 0], rgb @ np.array([0.299, 0.587, 0.114]), atol=1e-5)
    # Level eyes, box = image, output = input size: the warp is the identity.
    ident = align_face(img, lm5, box=(0, 0, 64, 64), output_size=64)
    np.testing.assert_allclose(ident, img / 255.0, atol=1e-5)
    # margin 0.5 doubles the crop side: scale of the matrix doubles.
    m0 = alignment_matrix(lm5, box, output_size=48)
    m1 = alignment_matrix(lm5, box, output_size=48, margin=0.5)
    np.testing.assert_allclose(m1[:, :2], 2 * m0[:, :2])
    # 68 points: eye centres are the means of points 36-41 and 42-47.
    lm68 = rng.uniform(10, 50, (68, 2))
    lm68[36:42] += [-20, 0]
    lm68[42:48] += [20, 0]
    m = alignment_matrix(lm68, box, output_size=48)
    theta = math.atan2(*(lm68[42:48].mean(0) - lm68[36:42].mean(0))[::-1])
    assert math.atan2(m[1, 0], m[0, 0]) == pytest.approx(theta)
    face = Face(box=box, score=1.0, landmarks=lm5)
    np.testing.assert_array_equal(align_face(img, face, output_size=48), rgb)


@pytest.mark.parametrize("kwargs,match", [
    ({"landmarks": np.zeros((4, 2))}, "landmarks: expected"),
    ({"landmarks": np.zeros((5, 2))}, "coincide"),
    ({"output_size": 0}, "output_size"),
    ({"channels": 2}, "channels"),
    ({"box": (10, 10, 5, 20)}, "box: expected"),
    ({"margin": -0.6}, "margin"),
])
def test_alignment_bad_arguments(kwargs, match):
    img = np.zeros((32, 32), np.uint8)
    args = {"landmarks": np.array([[8, 10], [20, 10], [14, 16], [10, 22], [18, 22]], float)}
    args.update(kwargs)
    landmarks = args.pop("landmarks")
    with pytest.raises(ValueError, match=match):
        align_face(img, landmarks, **args)


def test_real_face_aligned_has_level_eyes(shared_data, detector):
    from PIL import Image

    frame = _frames(shared_data / "ckplus_videos" / "S055_004.mp4", 100, "gray")[0]

    def eye_angle(face):
        (lx, ly), (rx, ry) = face.eye_centres
        return math.degrees(math.atan2(ry - ly, rx - lx))

    upright = eye_angle(detector(frame)[0])
    for tilt in (12, -12, 20):  # PIL turns counter-clockwise: the eye line turns by -tilt
        tilted = np.asarray(Image.fromarray(frame).rotate(tilt, resample=Image.BILINEAR))
        face = detector(tilted)[0]
        # MTCNN's eye points are a few pixels off: up to ~4 degrees on a 100 px eye distance.
        assert abs(eye_angle(face) - (upright - tilt)) < 5, tilt
        out = align_face(tilted, face, output_size=96, margin=0.1)
        again = detector((out * 255).round().astype(np.uint8), min_side=144)
        assert len(again) == 1
        assert abs(eye_angle(again[0])) < 4, tilt


@pytest.mark.slow
def test_all_real_images_detection_rates(shared_data, detector):
    """Every CK+48 crop, every 5th frame of all 40 CK+ videos and of single_face.mp4.

    Measured (benchmarks/face_detection.py): all 981 crops and 15 single_face frames give exactly
    one face; of 151 CK+ frames, one (S055_001 frame 0) has an extra 25 px detection (score 0.72)
    in the hair/background next to the real face. The bound below allows that 1%, no misses.
    """
    counts = [len(detector(img)) for _, img in _ck48(shared_data, 10_000, step=1)]
    assert counts.count(1) == len(counts) == 981
    video = []
    for path in sorted((shared_data / "ckplus_videos").glob("*.mp4")):
        video += [len(detector(frame)) for frame in _frames(path, 5, "gray")]
    assert len(video) == 151 and min(video) >= 1  # the face is never missed
    assert sum(n != 1 for n in video) <= 0.01 * len(video)
    for frame in _frames(shared_data / "videos_unlabelled" / "single_face.mp4", 5):
        assert len(detector(frame)) == 1
