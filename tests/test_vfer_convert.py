"""Weight converters: torchvision layout vs an independent float64 NumPy forward of
torchvision's mobilenet_v2 (symmetric padding, BN eps 1e-5); Keras vs a real Keras model."""

import os

import jax
import numpy as np
import pytest

from fer_jax.models import MobileNetV2, convert
from fer_jax.models.mobilenet_v2 import INVERTED_RESIDUAL_SETTING, make_divisible

WIDTH = 0.35


def _torch_state_dict(rng):
    """Random weights under torchvision's exact key names and OIHW layouts."""
    sd = {}

    def bn(prefix, c):
        sd[prefix + ".weight"] = rng.uniform(0.5, 1.5, c)
        sd[prefix + ".bias"] = rng.normal(0, 0.1, c)
        sd[prefix + ".running_mean"] = rng.normal(0, 0.1, c)
        sd[prefix + ".running_var"] = rng.uniform(0.5, 2.0, c)
        sd[prefix + ".num_batches_tracked"] = np.array(0)

    def conv(key, o, i, k):
        sd[key] = rng.normal(0, np.sqrt(2.0 / (i * k * k)), (o, i, k, k))

    c_in = make_divisible(32 * WIDTH)
    conv("features.0.0.weight", c_in, 3, 3)
    bn("features.0.1", c_in)
    idx = 1
    for t, c, n, _ in INVERTED_RESIDUAL_SETTING:
        for _ in range(n):
            out, hid, p = make_divisible(c * WIDTH), c_in * t, f"features.{idx}.conv"
            j = 0
            if t != 1:
                conv(f"{p}.0.0.weight", hid, c_in, 1)
                bn(f"{p}.0.1", hid)
                j = 1
            conv(f"{p}.{j}.0.weight", hid, 1, 3)
            bn(f"{p}.{j}.1", hid)
            conv(f"{p}.{j + 1}.weight", out, hid, 1)
            bn(f"{p}.{j + 2}", out)
            c_in, idx = out, idx + 1
    conv(f"features.{idx}.0.weight", 1280, c_in, 1)
    bn(f"features.{idx}.1", 1280)
    return {k: np.asarray(v, np.float32) for k, v in sd.items()}


def _conv(x, w, stride, groups=1):
    """float64 NHWC conv with torch semantics (padding k // 2 on every side), w OIHW."""
    k = w.shape[-1]
    p = k // 2
    x = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    n, h, wd, c = x.shape
    oh, ow = (h - k) // stride + 1, (wd - k) // stride + 1
    out = np.zeros((n, oh, ow, w.shape[0]))
    for i in range(k):
        for j in range(k):
            patch = x[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
            if groups == 1:
                out += patch @ w[:, :, i, j].T
            else:
                out += patch * w[:, 0, i, j]
    return out


def _torch_forward(sd, x):
    sd = {k: v.astype(np.float64) for k, v in sd.items()}

    def bn(prefix, y):
        return ((y - sd[prefix + ".running_mean"]) / np.sqrt(sd[prefix + ".running_var"] + 1e-5)
                * sd[prefix + ".weight"] + sd[prefix + ".bias"])

    relu6 = lambda y: np.clip(y, 0, 6)
    y = relu6(bn("features.0.1", _conv(x, sd["features.0.0.weight"], 2)))
    idx = 1
    for t, _, n, s in INVERTED_RESIDUAL_SETTING:
        for r in range(n):
            p, inp, j = f"features.{idx}.conv", y, 0
            if t != 1:
                y = relu6(bn(f"{p}.0.1", _conv(y, sd[f"{p}.0.0.weight"], 1)))
                j = 1
            w = sd[f"{p}.{j}.0.weight"]
            y = relu6(bn(f"{p}.{j}.1", _conv(y, w, s if r == 0 else 1, groups=w.shape[0])))
            y = bn(f"{p}.{j + 2}", _conv(y, sd[f"{p}.{j + 1}.weight"], 1))
            if (s if r == 0 else 1) == 1 and inp.shape == y.shape:
                y = y + inp
            idx += 1
    return relu6(bn(f"features.{idx}.1", _conv(y, sd[f"features.{idx}.0.weight"], 1)))


@pytest.mark.parametrize("size", [32, pytest.param(33, marks=pytest.mark.slow)])
@pytest.mark.slow  # > 20 s on 2 cores: CI's slow step
def test_torchvision_state_dict_matches_numpy_reference(size, tmp_path):
    rng = np.random.default_rng(0)
    sd = _torch_state_dict(rng)
    x = rng.uniform(0, 1, (2, size, size, 3)).astype(np.float32)
    ref = _torch_forward(sd, x.astype(np.float64) * 2 - 1)
    np.savez(tmp_path / "sd.npz", **sd)
    flat = convert.read_torch_state_dict(tmp_path / "sd.npz")
    model = MobileNetV2(None, width=WIDTH, **convert.TORCH_MODEL_KWARGS)
    variables = convert.load_flax_variables(
        flat, model.init(jax.random.PRNGKey(0), x, train=False))
    out = np.asarray(model.apply(variables, x, train=False)["feature_map"])
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_torch_weights_need_symmetric_padding():
    """On even sizes TF 'same' padding with torchvision weights gives other outputs."""
    rng = np.random.default_rng(0)
    sd = _torch_state_dict(rng)
    x = rng.uniform(0, 1, (1, 32, 32, 3)).astype(np.float32)
    ref = _torch_forward(sd, x.astype(np.float64) * 2 - 1)
    model = MobileNetV2(None, width=WIDTH, bn_epsilon=1e-5)
    variables = convert.load_flax_variables(convert.from_torch_state_dict(sd), model.init(
        jax.random.PRNGKey(0), x, train=False))
    other = np.asarray(model.apply(variables, x, train=False)["feature_map"])
    assert np.abs(other - ref).max() > 1e-3


@pytest.mark.slow  # > 20 s on 2 cores: CI's slow step
def test_load_flax_variables_names_mismatches():
    model = MobileNetV2(None, width=WIDTH)
    like = model.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32), train=False)
    with pytest.raises(ValueError, match="missing"):
        convert.load_flax_variables({}, like)


@pytest.mark.slow
def test_keras_mobilenet_v2_conversion(tmp_path):
    os.environ.setdefault("KERAS_BACKEND", "jax")
    keras = pytest.importorskip("keras")
    m = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=WIDTH, weights=None,
                                       include_top=False)
    rng = np.random.default_rng(0)
    for layer in m.layers:
        for w in layer.weights:
            if "moving_variance" in w.path:
                w.assign(rng.uniform(0.5, 2, w.shape).astype("float32"))
            elif "moving_mean" in w.path or "beta" in w.path:
                w.assign(rng.normal(0, 0.2, w.shape).astype("float32"))
    x = rng.uniform(0, 1, (2, 32, 32, 3)).astype("float32")
    ref = np.asarray(m(x * 2 - 1, training=False))
    model = MobileNetV2(None, width=WIDTH)
    like = model.init(jax.random.PRNGKey(0), x, train=False)
    for flat in (convert.from_keras_model(m), None):
        if flat is None:
            m.save(tmp_path / "m.h5")
            flat = convert.read_keras_h5(tmp_path / "m.h5")
        out = model.apply(convert.load_flax_variables(flat, like), x, train=False)
        np.testing.assert_allclose(np.asarray(out["feature_map"]), ref, atol=1e-4, rtol=1e-4)
