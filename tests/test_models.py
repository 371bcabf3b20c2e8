"""Tests for fer_jax.models: the output contract, parameter counts, BN state, fast layers."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fer_jax import models
from fer_jax.models import count_params, get_model, layers

KEY = jax.random.key(0)

# (name, kwargs, input shape): small inputs keep compile time low.
CASES = {
    "small_cnn": ({}, (2, 48, 48, 1)),
    "resnet18": ({"stem": "small"}, (2, 16, 16, 1)),
    "resnet50": ({}, (2, 32, 32, 3)),
    "resnet50v2": ({}, (2, 32, 32, 3)),
    "mobilenetv2": ({}, (2, 32, 32, 3)),
}
# Spatial size and channels of 'feature_map' for the inputs above.
FEATURE_SHAPES = {
    "small_cnn": (6, 6, 128),
    "resnet18": (2, 2, 512),
    "resnet50": (1, 1, 2048),
    "resnet50v2": (1, 1, 2048),
    "mobilenetv2": (1, 1, 1280),
}


def _images(shape, seed=1):
    # Host-made data: a jax.random call compiles a threefry program (~2 s on this CPU).
    return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


def _normal(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _shapes(model, shape):
    """Variables as ShapeDtypeStructs: counts without allocating or compiling."""
    return jax.eval_shape(lambda: model.init(KEY, jnp.zeros(shape), train=False))


def _fill(shapes, seed=0):
    """Random variables of the given shapes, made on the host.

    Jitting ``model.init`` compiles one PRNG program per parameter (17-35 s for MobileNetV2
    on this CPU), so most tests skip it; init itself is tested on small models below.
    """
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        if path[-1].key == "var":
            return jnp.asarray(rng.uniform(0.5, 1.5, x.shape), jnp.float32)
        fan_in = math.prod(x.shape[:-1]) or 1
        return jnp.asarray(rng.normal(0.0, fan_in**-0.5, x.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


@functools.cache
def _built(name):
    """(model, variables, x, eval-mode outputs) with one jitted apply (one compile)."""
    kwargs, shape = CASES[name]
    model = get_model(name, num_classes=7, **kwargs)
    x = _images(shape)
    variables = _fill(_shapes(model, shape))
    out = jax.jit(functools.partial(model.apply, train=False))(variables, x)
    return model, variables, x, out


def _check_contract(name, out, variables):
    assert set(variables) == {"params", "batch_stats"}
    assert set(out) == {"feature_map", "embedding", "logits"}
    h, w, c = FEATURE_SHAPES[name]
    assert out["feature_map"].shape == (2, h, w, c)
    assert out["embedding"].shape == (2, c)
    assert out["logits"].shape == (2, 7)
    assert all(v.dtype == jnp.float32 for v in out.values())


@pytest.mark.parametrize("name", ["small_cnn", "resnet18", "mobilenetv2"])
def test_outputs_follow_the_contract(name):
    model, variables, x, out = _built(name)
    _check_contract(name, out, variables)
    np.testing.assert_allclose(out["embedding"], out["feature_map"].mean(axis=(1, 2)), rtol=1e-6)
    assert np.isfinite(np.asarray(out["logits"])).all()


@pytest.mark.parametrize("name", ["resnet50", "resnet50v2"])
def test_resnet50_output_shapes(name):
    kwargs, shape = CASES[name]
    model = get_model(name, num_classes=7, **kwargs)
    out, variables = jax.eval_shape(
        lambda: model.init_with_output(KEY, jnp.zeros(shape), train=False))
    _check_contract(name, out, variables)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "resnet50v2"])
def test_resnet50_outputs_are_finite(name):
    model, variables, x, out = _built(name)
    _check_contract(name, out, variables)
    np.testing.assert_allclose(out["embedding"], out["feature_map"].mean(axis=(1, 2)), rtol=1e-6)
    assert np.isfinite(np.asarray(out["logits"])).all()


@pytest.mark.parametrize("name", list(CASES))
def test_backbone_only_has_no_logits_or_head(name):
    kwargs, shape = CASES[name]
    model = get_model(name, num_classes=None, **kwargs)
    variables = _shapes(model, shape)
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros(shape), train=False), variables)
    assert set(out) == {"feature_map", "embedding"}
    assert "head" not in variables["params"]
    with_head = _shapes(get_model(name, num_classes=7, **kwargs), shape)
    assert "head" in with_head["params"]


def test_get_model_unknown_name_lists_the_names():
    with pytest.raises(ValueError, match="mobilenetv2.*small_cnn|resnet18"):
        get_model("vgg16", num_classes=7)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: models.SmallCNN(7, norm="layer"), "norm"),
        (lambda: models.SmallCNN(7, widths=()), "widths"),
        (lambda: models.SmallCNN(7, dropout=1.0), "dropout"),
        (lambda: models.SmallCNN(0), "num_classes"),
        (lambda: models.resnet18(7, stem="cifar"), "stem"),
        (lambda: models.ResNet(7, block="wide"), "block"),
        (lambda: models.MobileNetV2(7, depthwise="fft"), "depthwise"),
        (lambda: models.MobileNetV2(None, width=0.0), "width"),
    ],
)
def test_bad_options_raise_value_error(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_inputs_raise_value_error():
    model = models.SmallCNN(7)
    with pytest.raises(ValueError, match="x must be a \\(N, H, W, C\\)"):
        model.init(KEY, jnp.zeros((48, 48, 1)), train=False)
    with pytest.raises(ValueError, match="floating"):
        model.init(KEY, jnp.zeros((1, 48, 48, 1), jnp.uint8), train=False)
    with pytest.raises(ValueError, match="too small"):
        model.init(KEY, jnp.zeros((1, 4, 4, 1)), train=False)
    with pytest.raises(ValueError, match="variables"):
        count_params({"batch_stats": {}})


# ---------------------------------------------------------------- parameter counts


def test_mobilenetv2_matches_keras_counts_at_any_input_size():
    model = models.MobileNetV2(None)
    counts = count_params(_shapes(model, (1, 96, 96, 3)))
    # keras.applications.MobileNetV2(include_top=False, alpha=1.0).summary()
    assert counts == {"trainable": 2_223_872, "non_trainable": 34_112, "total": 2_257_984}
    assert count_params(_shapes(model, (1, 64, 64, 3))) == counts
    # Same parameters in both depthwise modes.
    shifted = models.MobileNetV2(None, depthwise="shifted")
    a, b = _shapes(model, (1, 96, 96, 3)), _shapes(shifted, (1, 96, 96, 3))
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert jax.tree.leaves(jax.tree.map(lambda u, v: u.shape == v.shape, a, b)) == [True] * len(
        jax.tree.leaves(a)
    )


def test_mobilenetv2_keras_layer_names():
    params = _shapes(models.MobileNetV2(None), (1, 96, 96, 3))["params"]
    keras_names = {"Conv1", "bn_Conv1", "expanded_conv", "block_1", "block_16", "Conv_1",
                   "Conv_1_bn"}
    assert keras_names <= set(params)
    assert "block_17" not in params
    assert set(params["expanded_conv"]) == {"depthwise", "depthwise_BN", "project", "project_BN"}
    assert params["block_1"]["depthwise"]["kernel"].shape == (3, 3, 1, 96)
    assert params["block_16"]["project"]["kernel"].shape == (1, 1, 960, 320)


@pytest.mark.parametrize(
    "name, trainable, non_trainable",
    [
        # torchvision resnet18 / resnet50: sum(p.numel() for p in m.parameters()).
        ("resnet18", 11_689_512, 9_600),
        # Keras ResNet50 reports 53,120 non-trainable (its convs carry biases, ours do not).
        ("resnet50", 25_557_032, 53_120),
        # timm resnetv2_50 (pre-activation, no weight standardization): 25,549,352.
        ("resnet50v2", 25_549_352, 45_440),
    ],
)
def test_resnet_counts_match_published(name, trainable, non_trainable):
    counts = count_params(_shapes(get_model(name, num_classes=1000), (1, 32, 32, 3)))
    assert counts["trainable"] == trainable
    # BN running mean + var: two per BN channel (R18: 4,800 channels; R50: 26,560).
    assert counts["non_trainable"] == non_trainable


def test_small_cnn_is_about_a_million_parameters():
    counts = count_params(_shapes(models.SmallCNN(7), (1, 48, 48, 1)))
    assert 0.7e6 < counts["total"] < 1.3e6
    no_bn = _shapes(models.SmallCNN(7, norm="none"), (1, 48, 48, 1))
    assert count_params(no_bn)["non_trainable"] == 0


# ---------------------------------------------------------------- BatchNorm state


@pytest.mark.parametrize("name", ["small_cnn", "mobilenetv2"])
@pytest.mark.slow  # > 20 s on 2 cores: CI's slow step
def test_train_updates_batch_stats_and_eval_does_not(name):
    model, variables, x, _ = _built(name)
    train = jax.jit(lambda v, x, k: model.apply(v, x, train=True, mutable=["batch_stats"],
                                                rngs={"dropout": k}))
    _, new_state = train(variables, x, KEY)
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), variables["batch_stats"],
                           new_state["batch_stats"])
    assert all(jax.tree.leaves(changed))
    evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["batch_stats"]))
    out, same_state = evaluate(variables, x)
    jax.tree.map(np.testing.assert_array_equal, variables["batch_stats"],
                 same_state["batch_stats"])
    # Eval uses running averages: one image gives the same logits alone or in a batch.
    alone, _ = evaluate(variables, x[:1])
    np.testing.assert_allclose(alone["logits"], out["logits"][:1], rtol=1e-5, atol=1e-4)


def test_models_without_bn_work_with_the_same_calling_code():
    model = models.SmallCNN(7, widths=(8, 16), dense=16, norm="none", dropout=0.0)
    x = _images((2, 16, 16, 1))
    variables = _fill(_shapes(model, x.shape))
    assert not variables.get("batch_stats")
    out, state = jax.jit(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    assert out["logits"].shape == (2, 7) and not state.get("batch_stats")
    # Trainers that always pass a 'batch_stats' collection may pass an empty one.
    generic = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    out2, _ = jax.jit(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(generic, x)
    np.testing.assert_allclose(out2["logits"], out["logits"], rtol=1e-6)


def test_jitted_train_step_with_dropout_rng():
    model, variables, x, _ = _built("small_cnn")
    labels = jnp.array([0, 3])

    @jax.jit
    def loss_and_grad(params, state, key):
        def loss_fn(p):
            out, new_state = model.apply({"params": p, **state}, x, train=True,
                                         mutable=["batch_stats"], rngs={"dropout": key})
            logp = jax.nn.log_softmax(out["logits"])
            return -jnp.take_along_axis(logp, labels[:, None], 1).mean(), new_state

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    state = {"batch_stats": variables["batch_stats"]}
    (l1, _), g = loss_and_grad(variables["params"], state, jax.random.key(1))
    (l2, _), _ = loss_and_grad(variables["params"], state, jax.random.key(2))
    assert np.isfinite(l1) and l1 != l2  # different dropout masks
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(g))
    assert float(jnp.abs(g["conv1_1"]["kernel"]).sum()) > 0


@pytest.mark.slow  # > 20 s on 2 cores: CI's slow step
def test_init_is_deterministic_for_a_key():
    model = models.SmallCNN(7, widths=(8, 16), dense=16)
    init = jax.jit(functools.partial(model.init, train=False))
    x = jnp.zeros((1, 16, 16, 1))
    a, b = init(KEY, x), init(KEY, x)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    c = init(jax.random.key(1), x)
    assert not np.array_equal(a["params"]["conv1_1"]["kernel"], c["params"]["conv1_1"]["kernel"])


# ---------------------------------------------------------------- ResNet stages


@pytest.mark.parametrize("block", ["basic", "preact_bottleneck"])
def test_resnet_split_after_first_stage_equals_full_run(block):
    # A one-block-per-stage ResNet runs the same code as ResNet-18/50 at a fraction of the cost.
    model = models.ResNet(7, stage_sizes=(1, 1, 1, 1), block=block, width=8, stem="small")
    x = _images((2, 16, 16, 1))
    variables = _fill(_shapes(model, x.shape))
    c = 4 if block == "preact_bottleneck" else 1

    @jax.jit
    def run(v, x):
        full = model.apply(v, x, train=False, return_stages=True)
        low = model.apply(v, x, train=False, stop_stage=1)
        up = model.apply(v, low["feature_map"], train=False, start_stage=1)
        return full, low, up

    full, low, up = run(variables, x)
    assert [s.shape for s in full["stages"]] == [
        (2, 16, 16, 8 * c), (2, 8, 8, 16 * c), (2, 4, 4, 32 * c), (2, 2, 2, 64 * c)
    ]
    assert set(low) == {"feature_map", "embedding"}
    np.testing.assert_allclose(low["feature_map"], full["stages"][0], rtol=1e-6)
    np.testing.assert_allclose(up["logits"], full["logits"], rtol=1e-5, atol=1e-6)

    class Occluded(nn.Module):
        """A parent that runs Res_low, scales the features, then Res_up (shared weights)."""

        @nn.compact
        def __call__(self, x, *, train):
            backbone = models.ResNet(7, stage_sizes=(1, 1, 1, 1), block=block, width=8,
                                     stem="small", name="backbone")
            h = backbone(x, train=train, stop_stage=1)["feature_map"]
            return backbone(h * 0.5, train=train, start_stage=1)

    parent_vars = jax.eval_shape(lambda: Occluded().init(KEY, x, train=False))
    assert jax.tree.structure(parent_vars["params"]["backbone"]) == jax.tree.structure(
        variables["params"]
    )
    with pytest.raises(ValueError, match="stop_stage"):
        jax.eval_shape(lambda: model.apply(variables, x, train=False, start_stage=1, stop_stage=1))


def test_resnet50v2_is_pre_activation():
    params = _shapes(models.resnet50v2(None), (1, 32, 32, 3))["params"]
    assert "post_bn" in params and "bn1" not in params  # stem has no BN, the top has one
    assert set(params["layer1_0"]) == {"bn1", "conv1", "bn2", "conv2", "bn3", "conv3",
                                       "downsample_conv"}
    assert "downsample_conv" not in params["layer1_1"]


# ---------------------------------------------------------------- layers


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 7, 9, 2)])
def test_max_pool_reshape_equals_nn_max_pool_value_and_gradient(shape):
    x = _normal(shape)
    ref = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
    np.testing.assert_array_equal(layers.max_pool_reshape(x), ref(x))
    w = _normal(ref(x).shape, seed=3)
    grad = lambda f: jax.grad(lambda x: (f(x) * w).sum())(x)
    np.testing.assert_array_equal(grad(layers.max_pool_reshape), grad(ref))
    np.testing.assert_allclose(layers.avg_pool_reshape(x),
                               nn.avg_pool(x, (2, 2), strides=(2, 2)), rtol=1e-6)


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 7, 10, 2)])
def test_max_pool_3x3_s2_equals_nn_max_pool_value_and_gradient(shape):
    x = _normal(shape)
    ref = lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    np.testing.assert_array_equal(layers.max_pool_3x3_s2(x), ref(x))
    w = _normal(ref(x).shape, seed=3)
    grad = lambda f: jax.grad(lambda x: (f(x) * w).sum())(x)
    np.testing.assert_array_equal(grad(layers.max_pool_3x3_s2), grad(ref))


@pytest.mark.parametrize("strides, shape", [(1, (2, 6, 6, 4)), (2, (2, 8, 8, 4)),
                                            (2, (1, 7, 9, 3))])
def test_depthwise_shifted_equals_grouped_conv(strides, shape):
    x = _normal(shape)
    conv = layers.DepthwiseConv3x3(strides=strides, mode="conv")
    shifted = layers.DepthwiseConv3x3(strides=strides, mode="shifted")
    variables = {"params": {"kernel": _normal((3, 3, 1, shape[-1]), seed=2)}}
    assert jax.eval_shape(conv.init, KEY, x)["params"]["kernel"].shape == (3, 3, 1, shape[-1])
    # Reference: nn.Conv with one group per channel ('SAME' = TF/Keras padding).
    ref = nn.Conv(shape[-1], (3, 3), strides=strides, padding="SAME",
                  feature_group_count=shape[-1], use_bias=False)
    y_ref = jax.jit(ref.apply)(variables, x)
    np.testing.assert_allclose(jax.jit(conv.apply)(variables, x), y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(shifted.apply)(variables, x), y_ref, rtol=1e-5, atol=1e-5)
    g = lambda m: jax.jit(jax.grad(lambda v, x: (m.apply(v, x) ** 2).sum(), argnums=(0, 1)))(
        variables, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
                 g(conv), g(shifted))


@pytest.mark.slow  # > 20 s on 2 cores: CI's slow step
def test_mobilenetv2_depthwise_modes_give_the_same_output():
    model, variables, x, _ = _built("mobilenetv2")
    shifted = models.MobileNetV2(7, depthwise="shifted")
    a = jax.jit(functools.partial(model.apply, train=False))(variables, x)
    b = jax.jit(functools.partial(shifted.apply, train=False))(variables, x)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5)


def test_small_cnn_convs_per_stage():
    model = models.get_model("small_cnn", num_classes=3, widths=(4, 8), convs_per_stage=(1, 2))
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                               jnp.zeros((1, 16, 16, 1)))
    convs = sorted(k for k in variables["params"] if k.startswith("conv"))
    assert convs == ["conv1_1", "conv2_1", "conv2_2"]
    with pytest.raises(ValueError, match="convs_per_stage"):
        models.get_model("small_cnn", num_classes=3, widths=(4, 8), convs_per_stage=(1, 0, 2))


def test_small_cnn_without_the_last_pool_keeps_the_last_stage_resolution():
    """pool_last=False: the same parameters, feature_map = the pooled model's map before its
    last 2x2 max (so pooling it by NumPy gives the pooled model's map)."""
    kw = dict(widths=(4, 8, 16, 8), convs_per_stage=(1, 2, 2, 1), norm="group")
    pooled = models.get_model("small_cnn", num_classes=None, **kw)
    unpooled = models.get_model("small_cnn", num_classes=None, pool_last=False, **kw)
    x = jax.random.uniform(jax.random.key(1), (2, 48, 48, 1))
    variables = pooled.init(jax.random.key(0), x, train=False)
    assert (jax.tree.map(jnp.shape, unpooled.init(jax.random.key(0), x, train=False))
            == jax.tree.map(jnp.shape, variables))
    big = np.asarray(unpooled.apply(variables, x, train=False)["feature_map"])
    small = np.asarray(pooled.apply(variables, x, train=False)["feature_map"])
    assert big.shape == (2, 6, 6, 8) and small.shape == (2, 3, 3, 8)
    np.testing.assert_allclose(big.reshape(2, 3, 2, 3, 2, 8).max(axis=(2, 4)), small,
                               rtol=1e-6, atol=1e-6)
    # Three pools on 8x8 are fine without the fourth; 4x4 is too small for three.
    unpooled.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
    with pytest.raises(ValueError, match="too small for 3 2x2 pools"):
        unpooled.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)), train=False)


def _group_norm_reference(x, groups, scale, bias, eps=1e-5):
    """NumPy GroupNorm (Wu & He 2018, Eq. 1-3): per example and group over (H, W, C / G)."""
    n, h, w, c = x.shape
    g = x.reshape(n, h, w, groups, c // groups).astype(np.float64)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    y = ((g - mean) / np.sqrt(var + eps)).reshape(n, h, w, c)
    return y * scale + bias


def test_group_norm_matches_numpy_and_is_per_example():
    x = np.asarray(_normal((3, 5, 4, 12)))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            norm = layers.make_norm("group", train=True, momentum=0.9, epsilon=1e-5, groups=8)
            return norm("gn")(x)

    net = Net()
    v = net.init(KEY, x)
    assert set(v) == {"params"}  # No batch statistics.
    rng = np.random.default_rng(4)
    v = {"params": {"gn": {"scale": jnp.asarray(rng.normal(size=12), jnp.float32),
                           "bias": jnp.asarray(rng.normal(size=12), jnp.float32)}}}
    out = np.asarray(net.apply(v, jnp.asarray(x)))
    # gcd(8, 12) = 4 groups of 3 channels.
    ref = _group_norm_reference(x, 4, np.asarray(v["params"]["gn"]["scale"]),
                                np.asarray(v["params"]["gn"]["bias"]))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    # Per example: zero padding rows (or any other rows) leave the real rows' outputs unchanged.
    padded = np.concatenate([x[:2], np.zeros_like(x[:1]), 100 * x[2:] + 7])
    out_p = np.asarray(net.apply(v, jnp.asarray(padded)))
    np.testing.assert_allclose(out_p[:2], out[:2], rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(out_p))


@pytest.mark.parametrize("name, kwargs, shape", [
    ("small_cnn", {"widths": (8, 16)}, (3, 16, 16, 1)),
    ("resnet18", {"stem": "small"}, (3, 16, 16, 1)),
])
@pytest.mark.slow  # > 20 s on 2 cores: CI's slow step
def test_group_norm_models_are_per_example(name, kwargs, shape):
    model = get_model(name, num_classes=None, norm="group", **kwargs)
    x = _images(shape)
    v = model.init(KEY, x, train=False)
    assert set(v) == {"params"}
    names = {"/".join(str(k.key) for k in path) for path, _ in
             jax.tree_util.tree_flatten_with_path(v)[0]}
    assert any("scale" in n for n in names)  # GroupNorm scales exist.
    out = np.asarray(model.apply(v, x, train=True)["embedding"])
    padded = jnp.concatenate([x, jnp.zeros_like(x[:2])])
    out_p = np.asarray(model.apply(v, padded, train=True)["embedding"])
    np.testing.assert_allclose(out_p[:3], out, rtol=1e-5, atol=1e-5)
    # Different images still give different embeddings (the net is not a constant).
    assert not np.allclose(out[0], out[1])
