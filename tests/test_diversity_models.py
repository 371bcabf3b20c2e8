"""CBAM, ESR-B and the MA-Net style network: shapes, ranges, exact parameter counts, bad inputs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fer_jax.models import count_params
from fer_jax.models.cbam import CBAM
from fer_jax.models.esr import ESR
from fer_jax.models.manet import MANet, merge_patches, split_patches


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _cbam_reference(x, p):
    """CBAM by hand in NumPy from the module's parameters (norm='none': the conv has a bias)."""
    ch = p["channel"]

    def mlp(v):
        h = np.maximum(v @ ch["fc1"]["kernel"] + ch["fc1"]["bias"], 0)
        return h @ ch["fc2"]["kernel"] + ch["fc2"]["bias"]

    m_c = _sigmoid(mlp(x.mean(axis=(1, 2))) + mlp(x.max(axis=(1, 2))))
    f1 = x * m_c[:, None, None, :]
    pooled = np.stack([f1.max(-1), f1.mean(-1)], -1)  # (N, H, W, 2): [max, mean]
    k = p["spatial"]["conv"]["kernel"]  # (7, 7, 2, 1)
    padded = np.pad(pooled, ((0, 0), (3, 3), (3, 3), (0, 0)))
    n, h, w, _ = pooled.shape
    z = np.zeros((n, h, w))
    for i in range(h):
        for j in range(w):
            z[:, i, j] = np.einsum("nabc,abc->n", padded[:, i:i + 7, j:j + 7], k[..., 0])
    m_s = _sigmoid(z + p["spatial"]["conv"]["bias"][0])
    return f1 * m_s[..., None], m_c, m_s


def test_cbam_matches_a_numpy_reference_and_maps_are_in_unit_interval():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 5, 32))
    module = CBAM(reduction=16, norm="none")
    variables = module.init(jax.random.PRNGKey(1), x, train=False)
    y, maps = module.apply(variables, x, train=False)
    assert y.shape == x.shape
    assert maps["channel"].shape == (2, 32) and maps["spatial"].shape == (2, 6, 5)
    # Hidden width C / r = 2.
    assert variables["params"]["channel"]["fc1"]["kernel"].shape == (32, 2)
    for m in maps.values():
        assert float(m.min()) > 0.0 and float(m.max()) < 1.0
    p = jax.tree.map(np.asarray, variables["params"])
    ref_y, ref_c, ref_s = _cbam_reference(np.asarray(x, np.float64), p)
    np.testing.assert_allclose(maps["channel"], ref_c, atol=1e-5)
    np.testing.assert_allclose(maps["spatial"], ref_s, atol=1e-5)
    np.testing.assert_allclose(y, ref_y, atol=1e-5)


def test_cbam_with_batchnorm_and_channel_only():
    x = jax.random.uniform(jax.random.PRNGKey(0), (3, 4, 4, 8))
    module = CBAM(reduction=16)  # 8 // 16 = 0 -> one hidden unit
    v = module.init(jax.random.PRNGKey(1), x, train=False)
    assert v["params"]["channel"]["fc1"]["kernel"].shape == (8, 1)
    (y, maps), upd = module.apply(v, x, train=True, mutable=["batch_stats"])
    assert "spatial" in upd["batch_stats"]
    assert bool(jnp.all((maps["spatial"] > 0) & (maps["spatial"] < 1)))
    only = CBAM(spatial=False)
    v2 = only.init(jax.random.PRNGKey(1), x, train=False)
    y2, maps2 = only.apply(v2, x, train=False)
    np.testing.assert_array_equal(maps2["spatial"], np.ones((3, 4, 4)))
    np.testing.assert_allclose(y2, x * maps2["channel"][:, None, None, :], rtol=1e-6)
    with pytest.raises(ValueError, match="CBAM input must be"):
        only.apply(v2, x[0], train=False)


def _shapes(model, x_shape, **kw):
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x_shape),
                                             train=False, **kw))


def test_esr_parameter_counts_of_the_original_layers():
    """Siqueira et al.'s ESR-9 sizes, 96x96x3, no CBAM: base 374,784, branch 2,219,418."""
    v = _shapes(ESR(8, num_branches=3, cbam=False, dimensional=True), (1, 96, 96, 3))
    params = v["params"]
    assert count_params({"params": params["base"]})["trainable"] == 374_784
    for i in range(3):
        assert count_params({"params": params[f"branch_{i}"]})["trainable"] == 2_219_418
    assert count_params(v)["trainable"] == 374_784 + 3 * 2_219_418
    # Without the arousal/valence layer FC 8 -> 2 (18 parameters) a branch has 2,219,400.
    v = _shapes(ESR(8, num_branches=1, cbam=False), (1, 96, 96, 3))
    assert count_params({"params": v["params"]["branch_0"]})["trainable"] == 2_219_400
    # 'same' padding changes no parameter count; CBAM adds its MLPs and 7x7 convs.
    v = _shapes(ESR(8, num_branches=1, cbam=False, padding="same"), (1, 48, 48, 3))
    assert count_params({"params": v["params"]["base"]})["trainable"] == 374_784


def test_esr_outputs_shapes_at_96_valid_and_48_same():
    m = ESR(8, num_branches=2)
    v = _shapes(m, (1, 96, 96, 3))
    out = jax.eval_shape(lambda v: m.apply(v, jnp.zeros((5, 96, 96, 3)), train=False), v)
    assert out["feature_map"].shape == (5, 20, 20, 128)  # The paper's 128 x 20 x 20.
    assert out["branch_logits"].shape == (2, 5, 8) and out["logits"].shape == (5, 8)
    assert out["attention"]["channel"].shape == (2, 5, 512)
    assert out["attention"]["spatial"].shape == (2, 5, 6, 6)
    m = ESR(7, num_branches=4, padding="same", width=0.25)
    v = _shapes(m, (1, 48, 48, 1))
    out = jax.eval_shape(lambda v: m.apply(v, jnp.zeros((3, 48, 48, 1)), train=False,
                                           num_active=2), v)
    assert out["branch_logits"].shape == (2, 3, 7)
    assert out["attention"]["channel"].shape == (2, 3, 128)
    assert out["attention"]["spatial"].shape == (2, 3, 6, 6)


@pytest.mark.slow  # 30-55 s: three ESR-3 compiles.
def test_esr_prefix_of_branches_equals_the_full_run_and_batch_of_one_trains():
    # 24x24 'same' keeps the test small: base 24 -> 6, branch 6 -> 3.
    m = ESR(8, num_branches=3, padding="same", width=0.125)
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 24, 24, 1))
    v = jax.jit(functools.partial(m.init, train=False))(jax.random.PRNGKey(1), x)
    full = jax.jit(functools.partial(m.apply, train=False))(v, x)
    part = jax.jit(functools.partial(m.apply, train=False, num_active=2))(v, x)
    np.testing.assert_allclose(part["branch_logits"], full["branch_logits"][:2], atol=1e-6)
    np.testing.assert_allclose(full["logits"], full["branch_logits"].mean(0), atol=1e-6)
    # Branches have their own weights: different logits.
    assert not np.allclose(full["branch_logits"][0], full["branch_logits"][1])
    # A batch of one in train mode (BatchNorm over one image's pixels) stays finite.
    out, upd = jax.jit(functools.partial(m.apply, train=True, mutable=["batch_stats"]))(
        v, x[:1])
    assert np.isfinite(np.asarray(out["branch_logits"])).all()
    assert set(upd["batch_stats"]) == {"base", "branch_0", "branch_1", "branch_2"}


def test_esr_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="padding='same'"):
        _shapes(ESR(8, num_branches=1), (1, 48, 48, 1))
    with pytest.raises(ValueError, match="num_branches must be a positive int"):
        ESR(8, num_branches=0)
    with pytest.raises(ValueError, match="padding must be one of"):
        ESR(8, padding="full")
    with pytest.raises(ValueError, match="needs num_classes"):
        ESR(None)
    m = ESR(8, num_branches=2, padding="same", width=0.125)
    v = _shapes(m, (1, 48, 48, 1))
    with pytest.raises(ValueError, match=r"num_active must be None or an int in \[1, 2\]"):
        jax.eval_shape(lambda v: m.apply(v, jnp.zeros((1, 48, 48, 1)), train=False,
                                         num_active=3), v)


def test_patch_split_and_merge():
    x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    p = split_patches(x)
    assert p.shape == (4, 2, 2, 3, 3)
    np.testing.assert_array_equal(p[0], x[:, :2, :3])  # top-left
    np.testing.assert_array_equal(p[1], x[:, :2, 3:])  # top-right
    np.testing.assert_array_equal(p[2], x[:, 2:, :3])  # bottom-left
    np.testing.assert_array_equal(p[3], x[:, 2:, 3:])  # bottom-right
    np.testing.assert_array_equal(merge_patches(p), x)
    with pytest.raises(ValueError, match="must be even"):
        split_patches(x[:, :3])


def test_manet_outputs_and_parameter_count():
    m = MANet(8)
    v = _shapes(m, (1, 48, 48, 1))
    assert count_params(v)["trainable"] == 31_679_332
    out = jax.eval_shape(lambda v: m.apply(v, jnp.zeros((2, 48, 48, 1)), train=False), v)
    assert out["patch_features"].shape == (4, 2, 3, 3, 512)
    assert out["global_embedding"].shape == out["local_embedding"].shape == (2, 512)
    for k in ("global_logits", "local_logits", "logits"):
        assert out[k].shape == (2, 8)
    # The four local networks have their own weights.
    assert {f"local_{i}" for i in range(4)} <= set(v["params"])


@pytest.mark.slow
def test_manet_forward_is_finite_and_fuses_logits():
    m = MANet(7, width=4)
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 1))
    v = jax.jit(functools.partial(m.init, train=False))(jax.random.PRNGKey(1), x)
    out = jax.jit(functools.partial(m.apply, train=False))(v, x)
    np.testing.assert_allclose(out["logits"], (out["global_logits"] + out["local_logits"]) / 2,
                               atol=1e-6)
    np.testing.assert_allclose(out["local_embedding"],
                               out["patch_features"].mean(axis=(0, 2, 3)), atol=1e-6)
