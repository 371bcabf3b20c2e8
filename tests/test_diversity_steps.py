"""ESR / MA-Net losses against NumPy derivations, vote ties, the jitted step, progressive parts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fer_jax import federated as fl
from fer_jax import losses
from fer_jax.experiments.diversity import active_branches, report
from fer_jax.models.esr import ESR
from fer_jax.steps import diversity as steps


def _np_det_diversity(phi, gamma):
    """Eq. (1)-(2) in float64 NumPy: S_lk = mean_n exp(-gamma ||phi_l - phi_k||^2), det(S)."""
    phi = np.asarray(phi, np.float64).reshape(phi.shape[0], phi.shape[1], -1)
    d2 = ((phi[:, None] - phi[None, :]) ** 2).sum(-1)
    return np.linalg.det(np.exp(-gamma * d2).mean(-1))


def _np_ce(logits, labels):
    logits = np.asarray(logits, np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return float(np.mean(lse - logits[np.arange(len(labels)), labels]))


def _esr_out(key, b=3, n=5, c=16, hw=4, k=8):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"branch_logits": jax.random.normal(k1, (b, n, k)),
            "attention": {"channel": jax.nn.sigmoid(jax.random.normal(k2, (b, n, c))),
                          "spatial": jax.nn.sigmoid(jax.random.normal(k3, (b, n, hw, hw)))}}


def test_esr_loss_is_sum_of_branch_ce_minus_the_diversities():
    out = _esr_out(jax.random.PRNGKey(0))
    labels = jnp.array([0, 3, 7, 1, 1])
    loss, parts = jax.jit(functools.partial(steps.esr_loss, gamma=0.5, bandwidth="fixed",
                                            spatial_weight=1.0, channel_weight=0.5))(out, labels)
    ce = sum(_np_ce(out["branch_logits"][b], np.asarray(labels)) for b in range(3))
    d_sp = _np_det_diversity(out["attention"]["spatial"], 0.5)
    d_ch = _np_det_diversity(out["attention"]["channel"], 0.5)
    np.testing.assert_allclose(parts["ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(parts["d_sp"], d_sp, atol=1e-6)
    np.testing.assert_allclose(parts["d_ch"], d_ch, atol=1e-6)
    np.testing.assert_allclose(loss, ce - (d_sp + 0.5 * d_ch), rtol=1e-5, atol=1e-6)
    assert 0.0 < d_sp < 1.0 and 0.0 < d_ch < 1.0


def test_diversity_is_zero_for_identical_branches_and_rises_as_maps_separate():
    key = jax.random.PRNGKey(1)
    base = jax.nn.sigmoid(jax.random.normal(key, (1, 8, 6, 6)))
    offsets = jax.random.normal(jax.random.PRNGKey(2), (4, 8, 6, 6))
    labels = jnp.zeros((8,), jnp.int32)

    def loss_at(t):
        spatial = base + t * offsets  # t = 0: four identical branches
        out = {"branch_logits": jnp.zeros((4, 8, 8)),
               "attention": {"spatial": spatial, "channel": jnp.ones((4, 8, 3))}}
        return steps.esr_loss(out, labels, gamma=1.0, bandwidth="fixed", channel_weight=0.0)

    loss_at = jax.jit(loss_at)
    values = [float(loss_at(t)[1]["d_sp"]) for t in (0.0, 0.02, 0.05, 0.1, 0.2)]
    assert values[0] == 0.0
    assert all(b > a for a, b in zip(values, values[1:], strict=False)), values
    np.testing.assert_allclose(values[2], _np_det_diversity(base + 0.05 * offsets, 1.0),
                               rtol=1e-3)
    # Gradients w.r.t. the maps are finite at identical and at separated branches, and the
    # loss decreases as the branches separate (it subtracts D).
    for t in (0.0, 0.05):
        g = jax.jit(jax.grad(lambda s, t=t: steps.esr_loss(
            {"branch_logits": jnp.zeros((4, 8, 8)),
             "attention": {"spatial": s, "channel": jnp.ones((4, 8, 3))}},
            labels, gamma=1.0, bandwidth="fixed", channel_weight=0.0)[0]))(base + t * offsets)
        assert np.isfinite(np.asarray(g)).all()
    assert float(loss_at(0.2)[0]) < float(loss_at(0.0)[0])


def test_one_branch_has_no_diversity_term():
    out = _esr_out(jax.random.PRNGKey(3), b=1)
    labels = jnp.array([0, 1, 2, 3, 4])
    loss, parts = steps.esr_loss(out, labels, gamma=10.0)
    assert float(parts["d_sp"]) == 0.0 and float(parts["d_ch"]) == 0.0
    np.testing.assert_allclose(loss, _np_ce(out["branch_logits"][0], np.asarray(labels)),
                               rtol=1e-6)


def test_manet_loss_matches_eq5():
    k = jax.random.split(jax.random.PRNGKey(5), 5)
    patches = jax.random.normal(k[0], (4, 6, 3, 3, 10))
    out = {"local_logits": jax.random.normal(k[1], (6, 7)),
           "global_logits": jax.random.normal(k[2], (6, 7)),
           "patch_features": patches,
           "global_embedding": jax.random.normal(k[3], (6, 10)),
           "local_embedding": jax.random.normal(k[4], (6, 10))}
    labels = jnp.array([0, 1, 2, 3, 4, 5])
    loss, parts = jax.jit(functools.partial(steps.manet_loss, gamma=0.1, bandwidth="fixed"))(
        out, labels)
    lab = np.asarray(labels)
    ce = 0.6 * _np_ce(out["local_logits"], lab) + 0.4 * _np_ce(out["global_logits"], lab)
    p = np.asarray(patches, np.float64)
    d_sp = _np_det_diversity(p.mean(-1), 0.1)  # spatial map = mean over channels
    d_ch = _np_det_diversity(p.mean((2, 3)), 0.1)  # channel vector = mean over space
    d_b = _np_det_diversity(np.stack([out["global_embedding"], out["local_embedding"]]), 0.1)
    np.testing.assert_allclose([parts["d_sp"], parts["d_ch"], parts["d_b"]], [d_sp, d_ch, d_b],
                               atol=1e-6)
    np.testing.assert_allclose(loss, ce - (d_b + d_sp + d_ch), rtol=1e-5, atol=1e-6)


def test_vote_ties_and_early_exit_report():
    # Votes per branch for 3 examples (K = 3): ties go to the lowest class index.
    votes = np.array([[0, 2, 1], [1, 2, 1], [1, 0, 2], [0, 0, 2]])  # (B=4, N=3)
    logits = np.eye(3, dtype=np.float32)[votes] * 5.0
    # Every example is a 2-2 tie: the lowest tied class wins.
    np.testing.assert_array_equal(losses.ensemble_vote(logits), [0, 0, 1])
    np.testing.assert_array_equal(losses.ensemble_vote(logits[:3]), [1, 2, 1])
    labels = np.array([1, 2, 1])
    _, rep = report({"branch_logits": logits}, labels, ["a", "b", "c"])
    # Prefix votes: b=1 -> [0,2,1]; b=2 -> ties [0,2,1]; b=3 -> [1,2,1]; b=4 -> [0,0,1].
    np.testing.assert_allclose(rep["early_exit_accuracy"], [2 / 3, 2 / 3, 1.0, 1 / 3])
    np.testing.assert_allclose(rep["branch_accuracy"], [2 / 3, 1.0, 1 / 3, 0.0])
    assert rep["accuracy"] == pytest.approx(1 / 3)


def test_progressive_schedule_scales_and_branch_copy():
    assert [active_branches(s, 12, 3, True) for s in range(12)] == [1] * 4 + [2] * 4 + [3] * 4
    assert active_branches(5, 12, 3, False) == 3
    assert steps.group_scales(3, 2, base=0.5, old_branches=0.2) == {
        "base": 0.5, "branch_0": 0.2, "branch_1": 1.0, "branch_2": 0.0}
    state = fl.SupervisedState(params={"base": 1.0, "branch_0": 2.0, "branch_1": 3.0},
                               model_state={"batch_stats": {"branch_0": 4.0, "branch_1": 5.0}},
                               opt_state=(), initial={})
    new = steps.copy_branch(state, 1)
    assert new.params["branch_1"] == 2.0 and new.model_state["batch_stats"]["branch_1"] == 4.0
    with pytest.raises(ValueError, match="index >= 1"):
        steps.copy_branch(state, 0)


S = 24  # Image size of the step tests: 'same' padding, base 24 -> 6, branch 6 -> 3.


@pytest.fixture(scope="module")
def tiny_esr():
    """ESR-2 + CBAM, width 1/8, GroupNorm (as federated clients): one init compile."""
    model = ESR(8, num_branches=2, padding="same", width=0.125, norm="group")
    tx = optax.adamw(1e-3, weight_decay=1e-2)
    # Jitted: an eager init of a CBAM network dispatches hundreds of small ops.
    variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, S, S, 1)),
                                           train=False))()
    return model, tx, variables


def _batch(n, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (n, S, S, 1), dtype=np.uint8),
            "label": rng.integers(0, 8, (n,)).astype(np.int32)}


@pytest.mark.slow  # 30-55 s: compiles an ESR-2 train step.
def test_jitted_step_with_progressive_stage_freezes_inactive_branches(tiny_esr):
    model, tx, variables = tiny_esr
    loss_fn = functools.partial(steps.esr_loss, gamma=10.0, bandwidth="fixed")
    method = steps.client(model, tx, loss_fn, image_size=S, channels=1, augment=None,
                          num_active=1, scales=steps.group_scales(2, 1))
    trainable = (True,) * len(jax.tree.leaves(variables))
    state = method.init(variables, trainable, None)
    state, m = jax.jit(method.step)(state, _batch(4), np.ones(4, bool), jax.random.PRNGKey(1))
    before = jax.tree.map(np.asarray, variables["params"])
    after = jax.tree.map(np.asarray, state.params)
    # Branch 1 is inactive: untouched even by AdamW's weight decay; the others moved.
    jax.tree.map(np.testing.assert_array_equal, after["branch_1"], before["branch_1"])
    assert not np.allclose(after["branch_0"]["fc"]["kernel"], before["branch_0"]["fc"]["kernel"])
    assert not np.allclose(after["base"]["layer1"]["conv"]["kernel"],
                           before["base"]["layer1"]["conv"]["kernel"])
    assert float(m["d_sp_sum"]) == 0.0  # one active branch
    assert float(m["count"]) == 4 and np.isfinite(float(m["loss_sum"]))


@pytest.mark.slow  # 30-55 s: compiles the Jacobian of an ESR-2.
def test_diversity_gradient_is_finite_and_reaches_the_convs_with_a_batch_of_one(tiny_esr):
    """d(D_sp + D_ch)/d params for a batch of ONE image: finite, nonzero on the convs and CBAM,
    exactly zero on the classifiers (they are not on the attention maps' path)."""
    model, _, variables = tiny_esr
    batch = _batch(1, seed=1)

    def parts(params):
        x = steps.preprocess(batch["image"], image_size=S, channels=1)
        out = model.apply({"params": params}, x, train=True)
        _, p = steps.esr_loss(out, batch["label"], gamma=1.0, bandwidth="per_feature")
        return jnp.stack([p["ce"], p["d_sp"] + p["d_ch"]])

    # One compile: the values and the Jacobian rows of [CE, D_sp + D_ch].
    values, jac = jax.jit(lambda p: (parts(p), jax.jacrev(parts)(p)))(variables["params"])
    g_ce, g_div = jax.tree.map(lambda g: g[0], jac), jax.tree.map(lambda g: g[1], jac)
    assert 0.0 < float(values[1]) <= 2.0 and np.isfinite(float(values[0]))
    for g in (g_ce, g_div):
        assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(g))
    assert float(optax.global_norm(g_div["base"])) > 0
    for b in ("branch_0", "branch_1"):
        assert float(optax.global_norm(g_div[b]["layer4"]["cbam"])) > 0
        np.testing.assert_array_equal(g_div[b]["fc"]["kernel"], 0.0)
        assert float(optax.global_norm(g_ce[b]["fc"])) > 0


@pytest.mark.slow  # ~50 s: the tiny_esr fixture's init compile, then the loss's.
def test_federated_loss_masks_padding(tiny_esr):
    model, _, variables = tiny_esr  # GroupNorm: per example, as federated clients use.
    loss_fn = steps.federated_loss(
        lambda v, images, **kw: model.apply(
            v, steps.preprocess(images, image_size=S, channels=1), **kw),
        functools.partial(steps.esr_loss, gamma=1.0, bandwidth="fixed"))
    batch = _batch(4, seed=2)
    mask = jnp.array([True, True, True, False])
    # A different padded row (image and label) must change neither the CE nor the diversity.
    other = dict(batch, image=batch["image"].copy(), label=batch["label"].copy())
    other["label"][3] = (other["label"][3] + 1) % 8
    other["image"][3] = 255 - other["image"][3]
    loss_fn = jax.jit(loss_fn)
    a = loss_fn(variables["params"], {}, batch, mask, jax.random.PRNGKey(0))
    b = loss_fn(variables["params"], {}, other, mask, jax.random.PRNGKey(0))
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5)
    np.testing.assert_allclose(a[1][1]["d_sp_sum"], b[1][1]["d_sp_sum"], rtol=1e-5)
    assert float(a[1][1]["d_sp_sum"]) > 0
    assert float(a[1][1]["count"]) == 3.0
    np.testing.assert_allclose(a[1][1]["loss_sum"], 3 * a[0], rtol=1e-6)
