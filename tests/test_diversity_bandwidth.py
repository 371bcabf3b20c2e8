"""The RBF bandwidth of the diversity term (median heuristic vs the paper's fixed gamma), the
saturation metrics, the saturation warning and the papers' SGD recipe; all fast (no network)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fer_jax import losses
from fer_jax.experiments.diversity import SaturationWatch, stage_schedule
from fer_jax.losses import diversity as div_losses
from fer_jax.steps import diversity as steps
from fer_jax.train import optim


def _np_pair_sq_dists(phi, mask=None):
    """(L, N, ...) -> squared distances ||phi_l(x_n) - phi_k(x_n)||^2 for l < k, valid n."""
    phi = np.asarray(phi, np.float64).reshape(phi.shape[0], phi.shape[1], -1)
    if mask is not None:
        phi = phi[:, np.asarray(mask, bool)]
    return np.array([((phi[l] - phi[k]) ** 2).sum(-1) for l in range(len(phi))
                     for k in range(l + 1, len(phi))])


def _np_det(phi, gamma):
    phi = np.asarray(phi, np.float64).reshape(phi.shape[0], phi.shape[1], -1)
    d2 = ((phi[:, None] - phi[None, :]) ** 2).sum(-1)
    return np.linalg.det(np.exp(-gamma * d2).mean(-1))


def _esr_maps(key, b=3, n=6, spread=1.0):
    """Sigmoid attention maps like ESR's last CBAM: spatial (b, n, 4, 4), channel (b, n, 32)."""
    k1, k2, k3 = jax.random.split(key, 3)
    return {"branch_logits": jax.random.normal(k1, (b, n, 8)),
            "attention": {
                "spatial": jax.nn.sigmoid(spread * jax.random.normal(k2, (b, n, 4, 4))),
                "channel": jax.nn.sigmoid(spread * jax.random.normal(k3, (b, n, 32)))}}


def test_median_heuristic_matches_numpy_with_and_without_mask():
    phi = np.random.default_rng(0).normal(size=(4, 7, 3, 2)).astype(np.float32)
    mask = np.array([1, 1, 0, 1, 0, 1, 1], bool)
    np.testing.assert_allclose(div_losses.median_heuristic_gamma(phi),
                               1.0 / np.median(_np_pair_sq_dists(phi)), rtol=1e-5)
    masked = phi.copy()
    masked[:, ~mask] = np.nan  # Masked samples may hold anything.
    np.testing.assert_allclose(div_losses.median_heuristic_gamma(masked, mask=mask),
                               1.0 / np.median(_np_pair_sq_dists(phi, mask)), rtol=1e-5)
    # No gradient flows through the bandwidth.
    g = jax.grad(lambda p: div_losses.median_heuristic_gamma(p))(jnp.asarray(phi))
    np.testing.assert_array_equal(g, 0.0)


def test_median_heuristic_is_finite_for_identical_learners():
    phi = np.full((3, 5, 4), 0.5, np.float32)  # mean ||phi||^2 = 1
    gamma = float(div_losses.median_heuristic_gamma(phi))
    assert gamma == pytest.approx(1.0 / (1e-4 * 1.0), rel=1e-5)
    d, grad = jax.jit(jax.value_and_grad(
        lambda p: losses.det_diversity(p, gamma=div_losses.median_heuristic_gamma(p))))(phi)
    assert float(d) == 0.0 and np.isfinite(np.asarray(grad)).all()
    assert np.isfinite(float(jax.jit(div_losses.median_heuristic_gamma)(np.zeros((2, 3, 4)))))


def test_saturation_of_constructed_similarity_matrices():
    lo, hi = div_losses.similarity_saturation(jnp.ones((4, 4)))
    assert (float(lo), float(hi)) == (0.0, 1.0)
    lo, hi = div_losses.similarity_saturation(jnp.eye(4))
    assert (float(lo), float(hi)) == (1.0, 0.0)
    s = jnp.array([[1.0, 0.005, 0.5], [0.005, 1.0, 0.995], [0.5, 0.995, 1.0]])
    lo, hi = div_losses.similarity_saturation(s)
    assert (float(lo), float(hi)) == pytest.approx((1 / 3, 1 / 3))
    assert [float(v) for v in div_losses.similarity_saturation(jnp.ones((1, 1)))] == [0.0, 0.0]


@pytest.mark.parametrize("rule", ["fixed", "median"])
def test_identical_features_give_all_ones_and_far_apart_give_identity(rule):
    n = 5
    same = jnp.broadcast_to(jax.random.uniform(jax.random.PRNGKey(0), (1, n, 16)), (3, n, 16))
    term = jax.jit(functools.partial(steps.diversity_term, mask=None, name="x", weight=1.0,
                                     gamma=10.0), static_argnames="rule")
    d, m, g2 = term(same, rule=rule)
    assert float(d) == 0.0 and (float(m["s_lo_x"]), float(m["s_hi_x"])) == (0.0, 1.0)
    assert float(g2) == 0.0
    # Learners 10 apart in every feature (squared distance >= 1600): S = I at gamma = 10.
    far = same + 10.0 * jnp.arange(3.0)[:, None, None]
    d, m, g2 = term(far, rule="fixed")
    assert float(d) == 1.0 and (float(m["s_lo_x"]), float(m["s_hi_x"])) == (1.0, 0.0)
    assert float(g2) == 0.0  # Dead: no gradient.
    # The median heuristic rescales the same learners into the kernel's live range.
    d, m, g2 = term(far, rule="median")
    assert 0.0 < float(d) < 1.0 and float(m["s_lo_x"]) < 1.0 and float(g2) > 0.0


def test_default_esr_loss_keeps_the_term_live_where_gamma_10_saturates(make_config):
    """ESR-like attention maps at initialisation: the paper's gamma = 10 gives S = I (d = 1, no
    gradient); the default (median) gives d in (0, 1), a non-zero gradient and no saturation."""
    out = _esr_maps(jax.random.PRNGKey(1), spread=2.0)
    labels = jnp.arange(6) % 8
    loss_fn = steps.make_loss("esr", make_config("esr", "runlocal").diversity)
    assert loss_fn.keywords["bandwidth"] == "median"
    _, live = jax.jit(loss_fn)(out, labels)
    _, dead = jax.jit(lambda o, y: steps.esr_loss(o, y, gamma=10.0, bandwidth="fixed"))(
        out, labels)
    assert float(dead["d_ch"]) == pytest.approx(1.0, abs=1e-6)
    assert float(dead["s_lo_ch"]) == 1.0
    assert float(dead["div_grad_norm"]) < 1e-3 * float(live["div_grad_norm"])
    for t in ("sp", "ch"):
        phi = np.asarray(out["attention"]["spatial" if t == "sp" else "channel"])
        gamma = 1.0 / np.median(_np_pair_sq_dists(phi))
        np.testing.assert_allclose(live[f"gamma_{t}"], gamma, rtol=1e-5)
        np.testing.assert_allclose(live[f"d_{t}"], _np_det(phi, gamma), atol=1e-5)
        assert 0.0 < float(live[f"d_{t}"]) < 1.0
        assert float(live[f"s_lo_{t}"]) < 1.0 and float(live[f"s_hi_{t}"]) < 1.0
    assert float(live["div_grad_norm"]) > 1e-3
    # div_grad_norm is the norm of d(D_sp + D_ch)/d(maps) at the batch's (constant) gammas.
    maps = (out["attention"]["spatial"], out["attention"]["channel"])
    grads = jax.jit(jax.grad(lambda sp, ch: losses.det_diversity(sp, gamma=live["gamma_sp"])
                             + losses.det_diversity(ch, gamma=live["gamma_ch"]),
                             argnums=(0, 1)))(*maps)
    np.testing.assert_allclose(live["div_grad_norm"], optax.global_norm(grads), rtol=1e-4)


def test_manet_default_reports_every_term_and_per_feature_is_gamma_over_d():
    k = jax.random.split(jax.random.PRNGKey(2), 5)
    out = {"local_logits": jax.random.normal(k[0], (6, 7)),
           "global_logits": jax.random.normal(k[1], (6, 7)),
           "patch_features": jax.nn.relu(jax.random.normal(k[2], (4, 6, 3, 3, 10))),
           "global_embedding": jax.random.normal(k[3], (6, 10)),
           "local_embedding": jax.random.normal(k[4], (6, 10))}
    labels = jnp.arange(6)
    _, p = jax.jit(steps.manet_loss)(out, labels)
    for t in ("b", "sp", "ch"):
        assert 0.0 < float(p[f"d_{t}"]) < 1.0 and float(p[f"s_lo_{t}"]) < 1.0
    assert float(p["div_grad_norm"]) > 0.0
    # per_feature: gamma / D with D = 9 pixels of a 3x3 patch map, 10 channels.
    patches = out["patch_features"]
    assert steps.rbf_gamma(losses.spatial_pool(patches), None, rule="per_feature",
                           gamma=2.0) == pytest.approx(2.0 / 9)
    assert steps.rbf_gamma(losses.channel_pool(patches), None, rule="per_feature",
                           gamma=2.0) == pytest.approx(2.0 / 10)
    with pytest.raises(ValueError, match="bandwidth must be one of"):
        steps.rbf_gamma(patches, None, rule="silverman", gamma=1.0)


class _Writer:
    def __init__(self):
        self.lines = []

    def write(self, step, metrics):
        self.lines.append((step, metrics))

    def write_json(self, name, value):
        self.lines.append((name, value))


def _line(lo, hi=0.0):
    return {"train/s_lo_sp": lo, "train/s_hi_sp": hi, "train/d_sp": 1.0,
            "train/div_grad_norm": 0.0, "train/loss": 1.0}


def test_saturation_watch_warns_once_per_sustained_streak():
    writer = _Writer()
    watch = SaturationWatch(writer, patience=30)
    # The streak counts from the log line before the first saturated one (step 10).
    for step, lo in ((10, 0.0), (20, 1.0), (30, 0.97)):
        watch.write(step, _line(lo))
    watch.write(35, {"eval/accuracy": 0.5})  # Eval lines neither break nor extend a streak.
    assert watch.warnings == []
    watch.write(40, _line(1.0))  # 40 - 10 = 30 steps saturated at S ~ I.
    assert len(watch.warnings) == 1 and "d_sp saturated for steps 10-40" in watch.warnings[0]
    assert "< 0.01" in watch.warnings[0]
    watch.write(50, _line(1.0))  # Still saturated: no second warning.
    watch.write(60, _line(0.5))  # Recovers...
    for step in (70, 80, 90):  # ...then collapses (S ~ all ones) for 30 steps.
        watch.write(step, _line(0.0, hi=1.0))
    assert len(watch.warnings) == 2 and "> 0.99" in watch.warnings[1]
    assert "steps 60-90" in watch.warnings[1]
    assert [line[0] for line in writer.lines] == [10, 20, 30, 35, 40, 50, 60, 70, 80, 90]
    watch.write_json("eval.json", {})  # Everything else goes to the wrapped writer.
    assert writer.lines[-1] == ("eval.json", {})


def test_step_schedule_and_stage_restarts():
    from ml_collections import ConfigDict

    train = ConfigDict(dict(learning_rate=0.1, warmup_epochs=0.0, schedule="step",
                            decay_every_epochs=10.0, decay_factor=0.75))
    lr = optim.schedule(train, total_steps=1000, steps_per_epoch=5)  # decays every 50 steps
    np.testing.assert_allclose([lr(s) for s in (0, 49, 50, 99, 100, 160)],
                               [0.1, 0.1, 0.075, 0.075, 0.05625, 0.1 * 0.75 ** 3], rtol=1e-6)
    # Restarted at the stages of active_branches: 3 stages of 10 steps start at 0, 4 and 7.
    short = ConfigDict(dict(train, decay_every_epochs=1.0))
    lr = stage_schedule(optim.schedule(short, 4, steps_per_epoch=2), total_steps=10,
                        num_stages=3)
    np.testing.assert_allclose([lr(jnp.asarray(s)) for s in range(10)],
                               [0.1, 0.1, 0.075, 0.075, 0.1, 0.1, 0.075, 0.1, 0.1, 0.075],
                               rtol=1e-6)
    with pytest.raises(ValueError, match="decay_every_epochs > 0"):
        optim.schedule(ConfigDict(dict(train, decay_every_epochs=0.0)), 10, 1)


def test_paper_recipe_is_plain_momentum_sgd(make_config):
    config = make_config("esr", "runlocal,recipe=paper")
    train = config.train
    assert (train.optimizer, train.momentum, train.nesterov, train.schedule) == (
        "sgd", 0.9, False, "step")
    assert (config.esr.base_lr_scale, config.esr.restart_schedule) == (0.2, False)  # runlocal
    tx = optim.make_optimizer(train, 100, 10)
    ref = optax.sgd(0.1, momentum=0.9)
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.array([1.0, -2.0, 0.5])}
    s, r = tx.init(params), ref.init(params)
    for _ in range(3):
        u, s = tx.update(grads, s, params)
        v, r = ref.update(grads, r, params)
        np.testing.assert_allclose(u["w"], v["w"], rtol=1e-6)
    manet = make_config("manet", "recipe=paper").train
    assert (manet.learning_rate, manet.weight_decay, manet.decay_every_epochs,
            manet.decay_factor, manet.batch_size) == (0.01, 1e-4, 15.0, 0.1, 128)
    assert make_config("esr", "recipe=paper").esr.restart_schedule
    with pytest.raises(ValueError, match="recipe='sgd'"):
        make_config("esr", "recipe=sgd")
