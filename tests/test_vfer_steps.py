"""VFER steps against float64 NumPy references: Eq. 1, pseudo-label selection, the losses, and
one personalization round through the engine against a hand-written Adam fine-tune."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fer_jax import federated as fl
from fer_jax.models import vfer as models
from fer_jax.steps import vfer as steps


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def test_video_probabilities_is_masked_frame_mean():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 3))
    mask = np.array([[0, 0, 1, 1, 1], [0, 0, 0, 0, 1]], bool)
    got = steps.video_probabilities(jnp.asarray(logits, jnp.float32), mask)
    p = _softmax(logits.astype(np.float64))
    ref = np.stack([p[0, 2:].mean(0), p[1, 4]])
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def _select_ref(probs, valid, P, th):
    labels, conf = probs.argmax(1), probs.max(1)
    selected = np.zeros(len(probs), bool)
    for k in range(probs.shape[1]):
        idx = [i for i in range(len(probs)) if valid[i] and labels[i] == k]
        idx.sort(key=lambda i: (-conf[i], i))  # most confident first, then lower index
        for i in idx[:P]:
            selected[i] = conf[i] > th
    return labels, selected


@pytest.mark.parametrize("P,th", [(1, 0.5), (2, 0.5), (3, 0.3), (10, 0.0)])
def test_select_pseudo_labels_matches_reference(P, th):
    rng = np.random.default_rng(P)
    probs = _softmax(rng.normal(scale=2.0, size=(12, 4)))
    probs[3] = probs[5]  # a tie
    valid = rng.uniform(size=12) > 0.2
    labels, sel, conf = steps.select_pseudo_labels(jnp.asarray(probs, jnp.float32), valid,
                                                   max_per_class=P, threshold=th)
    ref_labels, ref_sel = _select_ref(probs.astype(np.float32).astype(np.float64), valid, P, th)
    np.testing.assert_array_equal(labels[valid], ref_labels[valid])
    np.testing.assert_array_equal(sel, ref_sel)
    assert np.all(np.asarray(conf)[np.asarray(sel)] > th)


def test_select_hand_example():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.45, 0.55], [0.5, 0.5]], np.float32)
    labels, sel, _ = steps.select_pseudo_labels(probs, np.ones(5, bool), max_per_class=2,
                                                threshold=0.5)
    # class 0: 0.9, 0.7 kept (P=2), 0.6 dropped by P; 0.5 is not > 0.5; class 1: 0.55 kept.
    assert labels.tolist() == [0, 0, 0, 1, 0]
    assert sel.tolist() == [True, False, True, True, False]


def test_ifer_loss_is_class_weighted_ce_float64():
    head = models.IFERHead(3, hidden=(4,))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 5)).astype(np.float32)
    variables = head.init(jax.random.PRNGKey(0), x, train=False)
    labels = np.array([0, 1, 2, 2, 1, 0])
    mask = np.array([1, 1, 1, 1, 0, 0], bool)
    w = np.array([0.5, 2.0, 1.0], np.float32)
    loss, (_, logits) = steps.ifer_loss(variables["params"], variables["batch_stats"], x, labels,
                                        mask, head=head, class_weights=w, train=False)
    z = np.asarray(logits, np.float64)
    ce = -np.log(_softmax(z)[np.arange(6), labels])
    ref = (ce * w[labels] * mask).sum() / mask.sum()
    np.testing.assert_allclose(loss, ref, rtol=1e-5)


@pytest.mark.slow
def test_personalization_round_matches_manual_adam():
    """One client, one batch per epoch: the engine's round = 2 hand-written Adam steps on v."""
    k, t, d = 3, 4, 6
    head = models.VFERHead(k, dense=(5, 4), lstm=3)
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(5, t, d)).astype(np.float32)
    fmask = np.ones((5, t), bool)
    fmask[:, :2] = rng.uniform(size=(5, 2)) > 0.5
    labels = np.array([0, 1, 2, 1, 0], np.int32)
    v = head.init(jax.random.PRNGKey(0), feats, fmask, train=False)
    variables = {"params": {"v": v["params"], "personal": v["params"]},
                 "batch_stats": {"v": v["batch_stats"]}}
    opt = optax.adam(1e-3)
    mesh = fl.clients_mesh(jax.devices()[:1])
    engine = fl.FederatedEngine(
        steps.PersonalizeClient(head, opt), server_optimizer=fl.server_optimizer("fedavg"),
        param_filter=fl.regex_filter(steps.PARAM_RULES, fl.FROZEN),
        packing=fl.PackingConfig(batch_size=8, local_epochs=2, clients_per_call=1,
                                 shuffle=False), mesh=mesh)
    pop = fl.ArrayPopulation.from_clients([{"features": feats, "frame_mask": fmask,
                                            "label": labels}])
    store = fl.LocalStore({"params": {"personal": v["params"]}}, 1)
    state = engine.init(variables)
    state, result = engine.run_round(state, pop, engine.plan(pop, [0]), jax.random.PRNGKey(0),
                                     local_store=store)
    # Manual: two full-batch Adam steps with BN in inference mode, unweighted CE.
    params, opt_state = v["params"], opt.init(v["params"])
    for _ in range(2):
        def loss_fn(p):
            logits = head.apply({"params": p, "batch_stats": v["batch_stats"]}, feats, fmask,
                                train=False)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        grads = jax.grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    central = fl.mesh.to_host(state.variables)["params"]["v"]
    personal = jax.tree.map(lambda x: x[0], store.values["params"]["personal"])
    for got in (central, personal):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     got, params)
    # Only v's trainable parameters are sent: the paper's 208K claim, here for this tiny head.
    labels_tree = fl.partial.label_tree(state.variables, engine.spec.param_filter)
    sent = fl.partial.select(fl.mesh.to_host(state.variables), labels_tree, fl.FEDERATED)
    assert steps.payload_bytes(sent) == 4 * sum(x.size for x in jax.tree.leaves(v["params"]))
    assert result.totals["count"] == 10  # 5 videos x 2 epochs


def test_plateau_halves_the_scale():
    plateau = steps.plateau_transform(patience=1)
    state = plateau.init({})
    scales = []
    for loss in (1.0, 0.9, 0.95, 0.95, 0.95):
        state, s = steps.plateau_update(plateau, state, loss)
        scales.append(s)
    assert scales[:2] == [1.0, 1.0] and scales[-1] < 1.0
    # Only halvings: every factor is a power of 0.5.
    np.testing.assert_allclose(np.log2(scales), np.round(np.log2(scales)), atol=1e-6)


class _LogitsHead:
    """A 'g' whose logits are its input features (hashable: a static jit argument)."""

    def apply(self, variables, x, train=False):
        del variables, train
        return x


def test_pseudo_label_curve_matches_reference(make_config):
    from fer_jax.experiments import vfer

    rng = np.random.default_rng(3)
    k, t = 4, 3
    feats = rng.normal(scale=2.0, size=(11, t, k)).astype(np.float32)
    fmask = np.ones((11, t), bool)
    fmask[2, 0] = fmask[7, :2] = False
    labels = rng.integers(0, k, 11)
    groups = [np.arange(0, 6), np.arange(6, 11)]
    config = make_config("vfer", None, **{"personalize.max_per_class": 1,
                                          "personalize.threshold": 0.45})
    curve = vfer.pseudo_label_curve(config, _LogitsHead(), {}, feats, fmask, groups, labels)
    assert [c["threshold"] for c in curve] == sorted({*vfer.CURVE_THRESHOLDS, 0.45})
    p = _softmax(feats.astype(np.float64))
    probs = np.stack([p[i][fmask[i]].mean(0) for i in range(11)])
    for c in curve:
        sel = np.concatenate([_select_ref(probs[g], np.ones(len(g), bool), 1, c["threshold"])[1]
                              for g in groups])
        assert c["videos_selected"] == sel.sum() and c["videos"] == 11
        assert c["coverage"] == pytest.approx(sel.sum() / 11)
        assert c["subjects_with_a_video"] == sum(sel[g].any() for g in groups)
        if sel.any():
            assert c["accuracy"] == pytest.approx((probs.argmax(1)[sel] == labels[sel]).mean())
        else:
            assert c["accuracy"] is None
    # top-1 per class per subject: at threshold 0, one video per predicted class per subject.
    zero = curve[0]
    assert zero["videos_selected"] == sum(len(np.unique(probs[g].argmax(1))) for g in groups)
