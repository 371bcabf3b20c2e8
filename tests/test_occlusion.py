"""The occlusion model (Eq. 1) and the jitted min-max steps (Eqs. 5, 6, 8)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fer_jax import losses
from fer_jax.models import resnet18
from fer_jax.models.occlusion import FeatureDiscriminator, OcclusionNet, occlusion_net
from fer_jax.steps import occlusion as st

SIZE, N, K = 16, 8, 7
KW = dict(stem="small", width=4)


def _batch(seed=0, n=N):
    rs = np.random.RandomState(seed)
    return {"image": rs.randint(0, 256, (n, SIZE, SIZE, 1)).astype(np.uint8),
            "label": (np.arange(n) % K).astype(np.int32)}


def _tree_equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.fixture(scope="module")
def setup():
    net = occlusion_net("resnet18", K, attention_hidden=4, **KW)
    disc = FeatureDiscriminator(8)
    tx, d_tx = optax.adam(1e-2), optax.adam(1e-2)
    settings = st.OcclusionSettings(image_size=SIZE, channels=1)
    # Jitted init: op-by-op (eager) initialisation of a ResNet compiles every op separately.
    state = jax.jit(lambda: st.init_state(net, disc, tx, d_tx, seed=0,
                                          input_shape=(SIZE, SIZE, 1), adversarial=True))()
    kw = dict(net=net, disc=disc, settings=settings)
    fns = {"d": jax.jit(functools.partial(st.d_step, d_tx=d_tx, **kw)),
           "f": jax.jit(functools.partial(st.f_step, tx=tx, **kw)),
           "both": jax.jit(functools.partial(st.train_step, tx=tx, d_tx=d_tx, **kw))}
    return dict(net=net, disc=disc, tx=tx, d_tx=d_tx, settings=settings, state=state, fns=fns)


@pytest.mark.slow
def test_model_is_eq1_around_a_plain_resnet(setup):
    net = setup["net"]
    variables = {"params": setup["state"].params, "batch_stats": setup["state"].batch_stats}
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, SIZE, SIZE, 1))
    out = net.apply(variables, x, train=False)
    # Independent composition: Res_low, phi, Eq. (1), Res_up with the same weights.
    backbone = resnet18(K, **KW)
    bvars = {"params": variables["params"]["backbone"],
             "batch_stats": variables["batch_stats"]["backbone"]}
    low = backbone.apply(bvars, x, train=False, stop_stage=1)["feature_map"]
    np.testing.assert_allclose(out["low"], low, atol=1e-6)
    logits_mask = out["mask_logits"]
    assert logits_mask.shape == (2, SIZE, SIZE)  # small stem: stage 1 keeps 16x16
    kept = low * (1 - jax.nn.sigmoid(logits_mask))[..., None]
    up = backbone.apply(bvars, kept, train=False, start_stage=1)
    np.testing.assert_allclose(out["logits"], up["logits"], atol=1e-5)
    # Without phi the model is exactly the ResNet (M_Res / M_ResAdv).
    plain = OcclusionNet(resnet18(K, **KW), attention=False)
    pvars = plain.init(jax.random.PRNGKey(1), x, train=False)
    np.testing.assert_allclose(
        plain.apply(pvars, x, train=False)["logits"],
        backbone.apply({"params": pvars["params"]["backbone"],
                        "batch_stats": pvars["batch_stats"]["backbone"]}, x,
                       train=False)["logits"], atol=1e-6)
    assert "phi" not in pvars["params"]
    with pytest.raises(ValueError, match="num_classes"):
        OcclusionNet(resnet18(None, **KW))


@pytest.mark.slow  # > 20 s on 2 cores: CI's slow step
def test_d_step_keeps_f_and_f_step_keeps_d(setup):
    fns, state, batch = setup["fns"], setup["state"], _batch()
    after_d, m = fns["d"](state, batch)
    assert _tree_equal(after_d.params, state.params)
    assert _tree_equal(after_d.batch_stats, state.batch_stats)
    assert _tree_equal(after_d.opt_state, state.opt_state)
    assert int(after_d.step) == int(state.step)  # the F+R step will see the same batch
    assert not _tree_equal(after_d.d_params, state.d_params)
    assert np.isfinite(float(m["d_loss"]))
    after_f, m = fns["f"](after_d, batch)
    assert _tree_equal(after_f.d_params, after_d.d_params)
    assert _tree_equal(after_f.d_opt_state, after_d.d_opt_state)
    assert not _tree_equal(after_f.params, after_d.params)
    assert int(after_f.step) == int(state.step) + 1
    assert set(m) >= {"loss", "l_emp", "l_noisy", "l_f", "kl", "accuracy"}
    np.testing.assert_allclose(float(m["loss"]), float(m["l_emp"] + 0.1 * m["l_noisy"]
                                                       + 0.1 * m["l_f"]), rtol=1e-5)
    assert float(m["occluded_fraction"]) == 0.5


@pytest.mark.slow
def test_train_step_is_the_alternation(setup):
    """The fused step (one forward of F) equals the D step followed by the F+R step."""
    fns, state, batch = setup["fns"], setup["state"], _batch()
    after_f, m = fns["f"](fns["d"](state, batch)[0], batch)
    fused, fm = fns["both"](state, batch)
    for a, b in zip(jax.tree.leaves((fused.params, fused.d_params)),
                    jax.tree.leaves((after_f.params, after_f.d_params)), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(float(fm["loss"]), float(m["loss"]), rtol=1e-6)


def _constant_disc(d_params, logit):
    """D with zero weights and output bias `logit`: P(y_occ=1 | F(x)) = sigmoid(logit)."""
    zero = jax.tree.map(jnp.zeros_like, d_params)
    return {**zero, "out": {**zero["out"], "bias": jnp.full_like(zero["out"]["bias"], logit)}}


@pytest.mark.parametrize("prior", [0.5, 0.25])
@pytest.mark.slow  # > 20 s on 2 cores: CI's slow step
def test_l_f_is_minimal_when_d_outputs_the_prior(setup, prior):
    net, disc, state = setup["net"], setup["disc"], setup["state"]
    settings = st.OcclusionSettings(image_size=SIZE, channels=1, rate=prior, prior=prior)
    images, masks, _ = st.prepare_batch(jax.random.PRNGKey(0), _batch(), settings)
    labels, w = jnp.asarray(_batch()["label"]), jnp.ones(N)

    def l_f(logit):
        _, (_, terms) = st.fr_loss(state.params, state.batch_stats,
                                   _constant_disc(state.d_params, logit), images, labels, masks,
                                   w, net=net, disc=disc, settings=settings)
        return terms["l_f"]

    at_prior = math.log(prior / (1 - prior))
    entropy = -(prior * math.log(prior) + (1 - prior) * math.log(1 - prior))
    # Eq. (3): at D = P_E the cross entropy equals H(P_E) (the KL term is 0) ...
    np.testing.assert_allclose(float(l_f(at_prior)), entropy, rtol=1e-6)
    np.testing.assert_allclose(st.binary_entropy(prior), entropy, rtol=1e-12)
    # ... which is the minimum: any other output costs more, and the slope there is 0.
    for delta in (-1.0, -0.1, 0.1, 1.0):
        assert float(l_f(at_prior + delta)) > entropy
    assert abs(float(jax.grad(l_f)(at_prior))) < 1e-6


def test_no_occluded_images_p_e_zero(setup):
    net, disc, tx, d_tx = setup["net"], setup["disc"], setup["tx"], setup["d_tx"]
    settings = st.OcclusionSettings(image_size=SIZE, channels=1, rate=0.0,
                                    prior=st.empirical_prior(0.0, N))
    assert settings.prior == 0.0 and st.binary_entropy(0.0) == 0.0
    images, masks, flags = st.prepare_batch(jax.random.PRNGKey(0), _batch(), settings)
    assert not np.asarray(flags).any() and not np.asarray(masks).any()
    step = jax.jit(functools.partial(st.train_step, net=net, disc=disc, tx=tx, d_tx=d_tx,
                                     settings=settings))
    state, m = step(setup["state"], _batch())
    for value in m.values():
        assert np.isfinite(float(value))
    assert float(m["occluded_fraction"]) == 0.0
    # H(P_E) = 0, so the reported KL is L_F itself; D was still trained (on all-clean data).
    np.testing.assert_allclose(float(m["kl"]), float(m["l_f"]), rtol=1e-6)
    assert not _tree_equal(state.d_params, setup["state"].d_params)
    # With P_E = 0, L_F = mean softplus(s): finite for any D, 0 only as D says "clean".
    s = jnp.array([-30.0, 0.0, 30.0])
    np.testing.assert_allclose(losses.prior_cross_entropy(s, 0.0),
                               np.mean(np.log1p(np.exp([-30.0, 0.0, 30.0]))), rtol=1e-5)


def test_training_set_without_masks(setup):
    net, disc, tx, state = setup["net"], setup["disc"], setup["tx"], setup["state"]
    batch = {**_batch(), "occluded": np.arange(N) % 2 == 0}
    settings = setup["settings"]
    with pytest.raises(ValueError, match="no pixel 'mask'"):
        st.f_step(state, batch, net=net, disc=disc, tx=tx, settings=settings)
    # Without attention supervision the same data is accepted (L_noisy is off) as it is ...
    no_sup = st.OcclusionSettings(image_size=SIZE, channels=1, lambda_noisy=0.0)
    images, masks, flags = st.prepare_batch(jax.random.PRNGKey(0), batch, no_sup)
    np.testing.assert_array_equal(np.asarray(flags), batch["occluded"])
    np.testing.assert_allclose(np.asarray(images)[..., 0], batch["image"][..., 0] / 255.0,
                               atol=1e-6)
    assert not np.asarray(masks).any()
    # ... and with masks of the wrong size the error names the expected shape.
    bad = {**batch, "mask": np.zeros((N, 8, 8), np.float32)}
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        st.f_step(state, bad, net=net, disc=disc, tx=tx, settings=settings)


def test_mask_targets_follow_phis_resolution():
    masks = jnp.zeros((1, 48, 48)).at[0, 12:36, 0:24].set(1.0)
    small = st.resize_masks(masks, (12, 12))
    # Area averaging: whole cells are 1 or 0, the box's mass is kept.
    np.testing.assert_allclose(float(small.sum()) * 16, float(masks.sum()), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(small[0, 4:8, 1:5]), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(small[0, :2]), 0.0, atol=1e-6)


@pytest.mark.slow
def test_federated_client_step_matches_the_centralized_steps(setup):
    net, disc, tx, d_tx, settings, state = (setup[k] for k in
                                            ("net", "disc", "tx", "d_tx", "settings", "state"))
    client = st.OcclusionClient(net, disc, tx, d_tx, settings)
    variables = {"params": {"net": state.params, "disc": state.d_params},
                 "batch_stats": state.batch_stats}
    cstate = client.init(variables, (), jax.random.PRNGKey(0))
    key = jax.random.fold_in(state.rng, state.step)
    batch = _batch()
    new, metrics = client.step(cstate, batch, jnp.ones(N, bool), key)
    ref, _ = setup["fns"]["both"](state, batch)
    out = client.final(new)
    for a, b in ((out["params"]["net"], ref.params), (out["params"]["disc"], ref.d_params)):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_allclose(x, y, atol=2e-5)
    assert float(metrics["count"]) == N
    # Padding examples weigh nothing: a half-padded batch gives the loss of its live half.
    mask = jnp.arange(N) < 4
    _, m_half = client.step(cstate, batch, mask, key)
    assert float(m_half["count"]) == 4.0
    assert np.isfinite(float(m_half["loss_sum"]))
