"""FedAffect models and client steps against hand / NumPy references (fer_jax.steps.fedaffect)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fer_jax import losses, models
from fer_jax.data import episodes as ep
from fer_jax.data.simclr_augment import SimCLRAugmentConfig, simclr_views
from fer_jax.models import relation
from fer_jax.steps import fedaffect as st
from fer_jax.steps.supervised import preprocess


def _nt_xent_np(za, zb, tau):
    """FedAffect Eq. (1) / Alg. 1 line 26 in float64, one anchor at a time."""
    z = np.concatenate([za, zb]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        sims = z @ z[i] / tau
        denom = sum(np.exp(sims[k]) for k in range(n2) if k != i)
        total += -np.log(np.exp(sims[j]) / denom)
    return total / n2


def _encoder():
    return models.get_model("small_cnn", num_classes=None, widths=(8, 8), norm="none")


def test_relation_module_shapes_range_and_pair_order():
    rel = relation.RelationModule(features=8, hidden=4)
    pairs = jnp.asarray(np.random.default_rng(0).normal(size=(10, 6, 6, 12)), jnp.float32)
    v = rel.init(jax.random.PRNGKey(0), pairs)
    out = rel.apply(v, pairs * 50.0)
    assert out.shape == (10,) and np.all((np.asarray(out) >= 0) & (np.asarray(out) <= 1))
    assert jax.tree.map(jnp.shape, v)["params"]["conv1"]["kernel"] == (3, 3, 12, 8)
    # 1x1 maps: pools are skipped, still a score per pair.
    assert rel.apply(rel.init(jax.random.PRNGKey(0), pairs[:, :1, :1]), pairs[:, :1, :1]).shape \
        == (10,)
    protos = np.random.default_rng(1).normal(size=(3, 2, 2, 4)).astype(np.float32)
    query = np.random.default_rng(2).normal(size=(5, 2, 2, 4)).astype(np.float32)
    pm = np.asarray(relation.pair_maps(jnp.asarray(protos), jnp.asarray(query)))
    assert pm.shape == (15, 2, 2, 8)
    for q in range(5):
        for c in range(3):
            np.testing.assert_array_equal(pm[q * 3 + c], np.concatenate([protos[c], query[q]], -1))


def test_fewshot_learner_sums_k_shots():
    enc = _encoder()
    _, few = relation.build_learners(enc, num_classes=3, relation_features=8)
    x = jnp.asarray(np.random.default_rng(0).random((6, 16, 16, 1)), jnp.float32)
    sl = jnp.array([0, 1, 2, 0, 1, 2])  # K = 2
    v = few.init(jax.random.PRNGKey(0), x, sl, x[:2], train=False)
    scores = few.apply(v, x, sl, x[:2], train=False)
    maps = np.asarray(few.apply(v, x, train=False, method="features"))
    protos = np.stack([maps[sl == c].sum(0) for c in range(3)])
    ref = few.apply(v, jnp.asarray(protos), jnp.asarray(maps[:2]), method="scores")
    assert scores.shape == (2, 3)
    np.testing.assert_allclose(scores, ref, rtol=1e-5, atol=1e-6)
    # The factored first conv equals the relation module on explicit depth-wise pairs.
    pairs = relation.pair_maps(jnp.asarray(protos), jnp.asarray(maps[:2]))
    explicit = relation.RelationModule(8, 8).apply({"params": v["params"]["relation"]}, pairs)
    np.testing.assert_allclose(scores, np.asarray(explicit).reshape(2, 3), rtol=1e-5, atol=1e-6)


def test_relation_group_norm_factored_exact_and_per_pair():
    enc = _encoder()
    _, few = relation.build_learners(enc, num_classes=3, relation_features=8,
                                     relation_norm="group")
    x = jnp.asarray(np.random.default_rng(0).random((5, 16, 16, 1)), jnp.float32)
    sl = jnp.array([0, 1, 2])
    v = few.init(jax.random.PRNGKey(0), x[:3], sl, x[3:], train=False)
    assert "norm1" in v["params"]["relation"] and "norm2" in v["params"]["relation"]
    # GroupNorm cancels a conv bias (zero gradient, Adam would step on float noise): none.
    assert all("bias" not in v["params"]["relation"][c] for c in ("conv1", "conv2"))
    scores = np.asarray(few.apply(v, x[:3], sl, x[3:], train=False))
    maps = np.asarray(few.apply(v, x, train=False, method="features"))
    pairs = relation.pair_maps(jnp.asarray(maps[:3]), jnp.asarray(maps[3:]))
    rel = relation.RelationModule(8, 8, norm="group")
    explicit = np.asarray(rel.apply({"params": v["params"]["relation"]}, pairs))
    np.testing.assert_allclose(scores, explicit.reshape(2, 3), rtol=1e-5, atol=1e-6)
    # Per pair: adding a zero (padding) pair changes no other pair's score.
    padded = jnp.concatenate([pairs, jnp.zeros_like(pairs[:1])])
    np.testing.assert_allclose(
        np.asarray(rel.apply({"params": v["params"]["relation"]}, padded))[:6], explicit,
        rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="norm"):
        relation.RelationModule(8, 8, norm="batch").init(jax.random.PRNGKey(0), pairs)


def _setup_simclr(lr=0.1):
    enc = _encoder()
    rep, _ = relation.build_learners(enc, num_classes=3, projector_hidden=16, projector_out=8)
    v = rep.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)), train=False)
    # Crop + flip only: the step's arithmetic does not depend on which transforms run, and the
    # full pipeline's compile time is paid in test_fedaffect_data.py already.
    cfg = SimCLRAugmentConfig(crop_scale=(0.5, 1.0), jitter_prob=0.0, blur_prob=0.0)
    method = st.SimCLRClient(rep, optax.sgd(lr), cfg, 0.5, image_size=16, channels=1)
    return rep, v, cfg, method


def test_simclr_client_step_matches_reference_sgd_step():
    rep, v, cfg, method = _setup_simclr(lr=0.1)
    images = np.random.default_rng(0).integers(0, 255, (6, 16, 16, 1), dtype=np.uint8)
    mask = np.array([1, 1, 1, 1, 0, 0], bool)  # a partial last batch: 2 padded rows
    key = jax.random.PRNGKey(7)
    state = method.init(v, (), None)
    new, metrics = jax.jit(method.step)(state, {"image": images}, jnp.asarray(mask), key)
    # Reference: the same views, plain losses.nt_xent on the 4 valid images, one SGD step.
    x = preprocess(jnp.asarray(images), image_size=16, channels=1)
    va, vb = jax.jit(simclr_views, static_argnums=2)(key, x, cfg)

    def ref_loss(params):
        za = rep.apply({"params": params}, va[:4], train=True)["z"]
        zb = rep.apply({"params": params}, vb[:4], train=True)["z"]
        return losses.nt_xent(za, zb, temperature=0.5)

    loss, grads = jax.jit(jax.value_and_grad(ref_loss))(v["params"])
    project = jax.jit(lambda views: rep.apply(v, views, train=True)["z"])
    za, zb = np.asarray(project(va[:4])), np.asarray(project(vb[:4]))
    np.testing.assert_allclose(loss, _nt_xent_np(za, zb, 0.5), rtol=1e-4)
    np.testing.assert_allclose(metrics["loss_sum"], 4 * loss, rtol=1e-4)
    assert float(metrics["count"]) == 4
    expected = jax.tree.map(lambda p, g: p - 0.1 * g, v["params"], grads)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _setup_fewshot(lr=0.1, num_classes=3, queries=2, trainable=()):
    enc = _encoder()
    _, few = relation.build_learners(enc, num_classes=num_classes, relation_features=8)
    z = jnp.zeros((num_classes, 16, 16, 1))
    v = few.init(jax.random.PRNGKey(1), z, jnp.arange(num_classes), z[:1], train=False)
    method = st.FewShotClient(few, optax.sgd(lr), num_classes, 1, queries, image_size=16,
                              channels=1)
    return few, v, method, method.init(v, trainable, None)


def test_fewshot_client_step_matches_numpy_reference():
    few, v, method, state = _setup_fewshot()
    rng = np.random.default_rng(3)
    images = rng.integers(0, 255, (8, 16, 16, 1), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1], np.int32)
    mask = np.array([1, 1, 1, 1, 1, 1, 0, 0], bool)
    key = jax.random.PRNGKey(11)
    new, m = jax.jit(method.step)(state, {"image": images, "label": labels}, jnp.asarray(mask),
                                  key)
    e = ep.sample_episode(key, jnp.asarray(labels), jnp.asarray(mask), num_classes=3, shots=1,
                          queries=2)
    sidx, qidx = np.asarray(e.support_index)[:, 0], np.asarray(e.query_index)
    assert np.all(mask[sidx]) and np.all(mask[qidx]) and bool(e.ok)
    # NumPy forward: maps -> prototypes -> depth-wise pairs -> relation -> MSE.
    x = np.asarray(images, np.float32) / 255.0
    maps = np.asarray(few.apply(v, jnp.asarray(x), train=False, method="features"))
    pairs = np.stack([np.concatenate([maps[sidx[c]], maps[q]], -1) for q in qidx for c in range(3)])
    scores = np.asarray(relation.RelationModule(8, 8).apply(
        {"params": v["params"]["relation"]}, jnp.asarray(pairs))).reshape(2, 3)
    target = labels[qidx][:, None] == np.arange(3)[None]
    np.testing.assert_allclose(m["loss_sum"], np.mean((scores - target) ** 2), rtol=1e-4)
    pred = scores.argmax(1)
    assert float(m["correct"]) == float((pred == labels[qidx]).sum())
    assert float(m["queries"]) == 2 and float(m["episodes"]) == 1 and float(m["short_classes"]) == 0

    def ref_loss(params):
        s = few.apply({"params": params}, jnp.asarray(x[sidx]), jnp.arange(3),
                      jnp.asarray(x[qidx]), train=True)
        return losses.relation_mse(s, jnp.asarray(labels[qidx]), jnp.arange(3))

    grads = jax.jit(jax.grad(ref_loss))(v["params"])
    expected = jax.tree.map(lambda p, g: p - 0.1 * g, v["params"], grads)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_fewshot_step_bad_episodes_are_skipped_and_counted():
    few, v, method, state = _setup_fewshot(num_classes=4, queries=1)
    images = np.random.default_rng(4).integers(0, 255, (6, 16, 16, 1), dtype=np.uint8)
    mask = jnp.ones(6, bool)
    step = jax.jit(method.step)
    # Class 3 absent: counted as a short class, the episode still trains on classes 0-2.
    labels = np.array([0, 1, 2, 0, 1, 2], np.int32)
    new, m = step(state, {"image": images, "label": labels}, mask, jax.random.PRNGKey(0))
    assert float(m["short_classes"]) == 1 and float(m["episodes"]) == 1
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(new.params),
                                                     jax.tree.leaves(state.params), strict=True))
    # One class only: no episode possible; skipped, counted, parameters untouched.
    labels = np.full(6, 2, np.int32)
    new, m = step(state, {"image": images, "label": labels}, mask, jax.random.PRNGKey(0))
    assert float(m["skipped_episodes"]) == 1 and float(m["episodes"]) == 0
    assert float(m["loss_sum"]) == 0
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_frozen_encoder_stays_fixed_in_the_fewshot_step():
    _, v, method, _ = _setup_fewshot()
    flat = jax.tree_util.tree_flatten_with_path(v)[0]
    trainable = tuple("encoder" not in jax.tree_util.keystr(p) for p, _ in flat)
    state = method.init(v, trainable, None)
    images = np.random.default_rng(5).integers(0, 255, (6, 16, 16, 1), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2], np.int32)
    new, _ = jax.jit(method.step)(state, {"image": images, "label": labels}, jnp.ones(6, bool),
                                  jax.random.PRNGKey(2))
    for a, b in zip(jax.tree.leaves(new.params["encoder"]), jax.tree.leaves(v["params"]["encoder"]),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(new.params["relation"]["fc2"]["kernel"],
                           v["params"]["relation"]["fc2"]["kernel"])


def test_learner_rejects_batch_stats():
    _, v, method, _ = _setup_fewshot()
    with pytest.raises(ValueError, match="norm='none'"):
        method.init({**v, "batch_stats": {}}, (), None)
