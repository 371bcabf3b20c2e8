"""The supervised step and its host-side helpers, checked by hand."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fer_jax import federated as fl
from fer_jax import models
from fer_jax.steps import supervised as steps
from fer_jax.train import loops, optim


def test_preprocess_scales_resizes_and_converts_channels():
    images = np.full((2, 8, 8, 1), 255, np.uint8)
    images[1] = 51
    out = steps.preprocess(jnp.asarray(images), image_size=16, channels=3)
    assert out.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(out[0], 1.0, atol=1e-6)
    np.testing.assert_allclose(out[1], 0.2, atol=1e-6)
    rgb = np.zeros((1, 4, 4, 3), np.uint8)
    rgb[..., 0] = 255
    np.testing.assert_allclose(steps.preprocess(rgb, image_size=4, channels=1), 1 / 3, atol=1e-6)


def test_balanced_class_weights_by_hand():
    # n = 6, K = 3: counts (3, 2, 1) -> weights 6/(3*3), 6/(3*2), 6/(3*1); an absent class -> 0.
    w = optim.balanced_class_weights(np.array([0, 0, 0, 1, 1, 2]), 4)
    np.testing.assert_allclose(w, [6 / 12, 6 / 8, 6 / 4, 0.0], rtol=1e-6)


def test_pooled_order_visits_every_example_once_per_epoch():
    order = loops.PooledOrder(10, 3, seed=0)
    assert order.steps_per_epoch == 3
    epoch0 = np.concatenate([order.indices(s) for s in range(3)])
    assert len(set(epoch0.tolist())) == 9  # Drop-remainder: 9 of 10 examples.
    again = loops.PooledOrder(10, 3, seed=0)
    np.testing.assert_array_equal(again.indices(4), order.indices(4))  # Resume gives the same.
    assert not np.array_equal(np.sort(order.indices(0)), np.sort(order.indices(3)))  # Reshuffled.
    with pytest.raises(ValueError, match="fewer than the batch size 3"):
        loops.PooledOrder(2, 3, seed=0)


@pytest.mark.slow  # > 20 s on 2 cores: CI's slow step
def test_supervised_client_fits_a_fixed_batch():
    """The supervised method (SupervisedClient over classifier_loss) on pooled data overfits
    one batch: the loss falls and the batch is classified exactly."""
    model = models.get_model("small_cnn", num_classes=3, widths=(8, 16), dropout=0.0)
    variables = jax.jit(functools.partial(model.init, train=False))(
        jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)))
    apply = steps.image_apply(model, image_size=16, channels=1, augment=None)
    method = fl.SupervisedClient(fl.classifier_loss(apply), optax.adam(3e-3))
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 255, (12, 16, 16, 1), dtype=np.uint8),
             "label": np.arange(12, dtype=np.int32) % 3}
    learner = loops.PooledLearner(method, variables, batch, 12, seed=0)
    losses = []
    for step in range(40):
        m = learner.step(step)
        losses.append(float(m["loss_sum"] / m["count"]))
    assert losses[-1] < 0.3 * losses[0], losses[::10]
    trained = learner.variables()
    logits = steps.predict(trained["params"], trained["batch_stats"], batch["image"],
                           model=model, image_size=16, channels=1)
    assert float(jnp.mean(jnp.argmax(logits, -1) == batch["label"])) == 1.0


@pytest.mark.slow  # > 20 s on 2 cores: CI's slow step
def test_flip_tta_is_the_log_mean_softmax_of_the_image_and_its_mirror():
    model = models.get_model("small_cnn", num_classes=3, widths=(4, 8), convs_per_stage=(1, 1),
                             dense=8)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)), train=False)
    images = np.asarray(jax.random.randint(jax.random.key(1), (2, 16, 16, 1), 0, 256), np.uint8)
    kw = dict(model=model, image_size=16, channels=1)
    plain = steps.predict(variables["params"], variables.get("batch_stats", {}), images, **kw)
    mirror = steps.predict(variables["params"], variables.get("batch_stats", {}),
                           images[:, :, ::-1], **kw)
    tta = steps.predict(variables["params"], variables.get("batch_stats", {}), images,
                        flip_tta=True, **kw)
    p = [np.exp(np.float64(v) - np.max(v, -1, keepdims=True)) for v in (plain, mirror)]
    want = np.log((p[0] / p[0].sum(-1, keepdims=True) + p[1] / p[1].sum(-1, keepdims=True)) / 2)
    np.testing.assert_allclose(tta, want, atol=1e-5)
    assert not np.allclose(plain, mirror)  # The test would not see a missing mirror otherwise.
