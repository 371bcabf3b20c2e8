"""Federated rounds against a sequential NumPy FedAvg written here (issue 4, "what it must show").

Uneven client sizes (a partial last batch, a client in a larger bucket, a zero-size client),
padding clients in the last chunk, weighted and uniform averaging, FedAvg and FedAvgM over two
rounds, and a FedProx client: the engine must match the reference to 1e-5.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fer_jax import federated as fl

SIZES = [5, 0, 17, 33, 3, 12, 9]
BATCH, CLASSES, DIM, HIDDEN, LR = 4, 3, 5, 6, 0.3


class TinyMLP(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
        del train
        h = jnp.tanh(nn.Dense(HIDDEN, name="hidden")(x))
        return {"logits": nn.Dense(CLASSES, name="head")(h)}


def make_population(seed=0):
    rng = np.random.default_rng(seed)
    clients = [{"image": rng.normal(size=(n, DIM)).astype(np.float32),
                "label": rng.integers(0, CLASSES, size=n).astype(np.int32)} for n in SIZES]
    return clients, fl.ArrayPopulation.from_clients(clients)


def np_grads(p, x, y):
    """Gradients of the mean softmax cross-entropy of the tiny MLP, by hand."""
    w1, b1, w2, b2 = (p[k] for k in ("w1", "b1", "w2", "b2"))
    h = np.tanh(x @ w1 + b1)
    z = h @ w2 + b2
    z = z - z.max(1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    dz = (prob - np.eye(CLASSES)[y]) / len(x)
    dh = dz @ w2.T * (1 - h ** 2)
    return {"w1": x.T @ dh, "b1": dh.sum(0), "w2": h.T @ dz, "b2": dz.sum(0)}


def np_round(server, clients, ids, *, weighting, prox_mu=0.0, drop_remainder=False,
             local_steps=0):
    """Sequential FedAvg: every client runs SGD over its batches in order; weighted mean delta.

    drop_remainder: only full batches train. local_steps > 0: exactly that many steps, cycling
    through the client's batches (epochs in order). weighting: 'num_examples' (examples trained),
    'client_size' (all of the client's examples, trained or not), 'uniform', or a function of n.
    """
    deltas, weights = [], []
    for c in ids:
        x, y = clients[c]["image"].astype(np.float64), clients[c]["label"]
        trained = len(x) // BATCH * BATCH if drop_remainder else len(x)
        p = {k: v.copy() for k, v in server.items()}
        starts = list(range(0, trained, BATCH))
        if local_steps and starts:
            starts = [starts[t % len(starts)] for t in range(local_steps)]
        for start in starts:
            g = np_grads(p, x[start:start + BATCH], y[start:start + BATCH])
            for k in p:
                p[k] -= LR * (g[k] + prox_mu * (p[k] - server[k]))
        deltas.append({k: p[k] - server[k] for k in p})
        weights.append(float(trained) if weighting == "num_examples" else
                       float(len(x)) if weighting == "client_size" else
                       float(len(x) > 0) if weighting == "uniform" else
                       float(weighting(len(x))) * (len(x) > 0))
    w = np.asarray(weights)
    return {k: sum(wi * d[k] for wi, d in zip(w, deltas, strict=True)) / w.sum() for k in server}


def to_np(variables):
    p = variables["params"]
    return {"w1": np.asarray(p["hidden"]["kernel"], np.float64),
            "b1": np.asarray(p["hidden"]["bias"], np.float64),
            "w2": np.asarray(p["head"]["kernel"], np.float64),
            "b2": np.asarray(p["head"]["bias"], np.float64)}


MODEL = TinyMLP()
# One method object per configuration: equal engine specs then share compiled chunks.
METHODS = {mu: fl.SupervisedClient(fl.classifier_loss(MODEL.apply), optax.sgd(LR), prox_mu=mu)
           for mu in (0.0, 0.7)}


def build_engine(*, weighting="num_examples", server="fedavg", prox_mu=0.0, clients_per_call=2,
                 backend=None, mesh=None, drop_remainder=False, step_buckets=(3, 9),
                 local_steps=0, **kw):
    model, method = MODEL, METHODS[prox_mu]
    packing = fl.PackingConfig(batch_size=BATCH, step_buckets=step_buckets,
                               clients_per_call=clients_per_call, shuffle=False,
                               drop_remainder=drop_remainder, local_steps=local_steps)
    engine = fl.FederatedEngine(
        method, server_optimizer=fl.server_optimizer(server, learning_rate=1.0, momentum=0.5),
        packing=packing, backend=backend or fl.RoundBackend(), weighting=weighting,
        mesh=mesh or fl.clients_mesh(jax.devices()[:1]), **kw)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, DIM)), train=False)
    return engine, variables


@pytest.mark.parametrize("weighting", ["num_examples", "uniform"])
@pytest.mark.parametrize("server", ["fedavg", "fedavgm", "fedadam"])
def test_round_matches_numpy_fedavg(weighting, server):
    clients, population = make_population()
    engine, variables = build_engine(weighting=weighting, server=server)
    ref = to_np(variables)
    momentum = {k: np.zeros_like(v) for k, v in ref.items()}
    second = {k: np.zeros_like(v) for k, v in ref.items()}
    state = engine.init(variables)
    key = jax.random.PRNGKey(1)
    for t, cohort in enumerate(([0, 1, 2, 3, 4], [6, 3, 5, 1]), start=1):
        plan = engine.plan(population, cohort)
        state, result = engine.run_round(state, population, plan, key)
        mean_delta = np_round(ref, clients, cohort, weighting=weighting)
        for k in ref:
            g = -mean_delta[k]  # the pseudo-gradient
            if server == "fedadam":  # Adam(lr 1, b1 0.9, b2 0.99, eps 1e-3), bias-corrected
                momentum[k] = 0.9 * momentum[k] + 0.1 * g
                second[k] = 0.99 * second[k] + 0.01 * g * g
                m_hat, v_hat = momentum[k] / (1 - 0.9 ** t), second[k] / (1 - 0.99 ** t)
                ref[k] = ref[k] - m_hat / (np.sqrt(v_hat) + 1e-3)
                continue
            # Server SGD with lr 1 (and momentum 0.5 for FedAvgM).
            momentum[k] = (0.5 * momentum[k] if server == "fedavgm" else 0) + g
            ref[k] = ref[k] - momentum[k]
        got = to_np(state.variables)
        for k in ref:
            np.testing.assert_allclose(got[k], ref[k], atol=1e-5, rtol=1e-5, err_msg=k)
        # Padding contributes nothing to metrics: counts equal real example counts.
        sizes = np.asarray(SIZES)[cohort]
        assert result.totals["count"] == sizes.sum()
        assert result.useful_examples == sizes.sum()
        assert result.client_updates == (sizes > 0).sum()
        computed = sum(2 * c.steps * BATCH for c in plan.chunks)
        assert result.padding_efficiency == pytest.approx(sizes.sum() / computed)
        assert 0 < result.padding_efficiency < 1
    assert int(state.round) == 2


def test_fedprox_matches_numpy():
    clients, population = make_population(1)
    engine, variables = build_engine(prox_mu=0.7)
    ref = to_np(variables)
    state = engine.init(variables)
    cohort = [2, 3, 6]
    state, _ = engine.run_round(state, population, engine.plan(population, cohort),
                                jax.random.PRNGKey(0))
    mean_delta = np_round(ref, clients, cohort, weighting="num_examples", prox_mu=0.7)
    got = to_np(state.variables)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k] + mean_delta[k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", [fl.RoundBackend(vmap_width=2),
                                     fl.RoundBackend(step_unroll=3, group_unroll=True)])
def test_backends_agree(backend):
    """vmap groups, unrolled scans and 4 clients per call give the default backend's result."""
    _, population = make_population()
    results = []
    for b, k in ((fl.RoundBackend(), 2), (backend, 4)):
        engine, variables = build_engine(backend=b, clients_per_call=k)
        state = engine.init(variables)
        state, _ = engine.run_round(state, population, engine.plan(population, [0, 2, 3, 4, 5]),
                                    jax.random.PRNGKey(0))
        results.append(to_np(state.variables))
    for k in results[0]:
        np.testing.assert_allclose(results[0][k], results[1][k], atol=1e-6, rtol=1e-5)


def tail_engine(tail_multiple, *, buckets=(3, 9), clients_per_call=2, epochs=1, shuffle=False,
                backend=None, client_optimizer=None):
    method = (METHODS[0.0] if client_optimizer is None else
              fl.SupervisedClient(fl.classifier_loss(MODEL.apply), client_optimizer))
    packing = fl.PackingConfig(batch_size=BATCH, step_buckets=buckets, local_epochs=epochs,
                               clients_per_call=clients_per_call, shuffle=shuffle,
                               tail_multiple=tail_multiple)
    engine = fl.FederatedEngine(method, packing=packing, backend=backend or fl.RoundBackend(),
                                mesh=fl.clients_mesh(jax.devices()[:1]))
    return engine, MODEL.init(jax.random.PRNGKey(0), jnp.zeros((1, DIM)), train=False)


@pytest.mark.parametrize("tail_multiple", [1, 2])
@pytest.mark.slow  # > 20 s on 2 cores: CI's slow step
def test_tail_batches_match_numpy_fedavg(tail_multiple):
    """Tail steps of ceil(r / g) * g rows: same FedAvg as the reference, less padding."""
    clients, population = make_population()
    engine, variables = tail_engine(tail_multiple)
    ref = to_np(variables)
    state = engine.init(variables)
    cohort = [0, 1, 2, 3, 4, 5, 6]
    plan = engine.plan(population, cohort)
    assert {c.tail for c in plan.chunks} <= set(range(tail_multiple, BATCH + 1, tail_multiple))
    state, result = engine.run_round(state, population, plan, jax.random.PRNGKey(1))
    mean_delta = np_round(ref, clients, cohort, weighting="num_examples")
    got = to_np(state.variables)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k] + mean_delta[k], atol=1e-5, rtol=1e-5)
    assert result.totals["count"] == sum(SIZES)
    # One client per call (no padding clients), every step count a bucket: tails leave less
    # padding than full last batches.
    every = tuple(range(1, 10))
    tails = tail_engine(tail_multiple, clients_per_call=1, buckets=every)[0]
    full = tail_engine(0, clients_per_call=1, buckets=every)[0]
    assert (tails.plan(population, cohort).padding_efficiency
            > full.plan(population, cohort).padding_efficiency)


def test_tail_batches_without_padding_have_efficiency_one():
    """One client per call, every step count a bucket and tails of one row: no padding at all."""
    _, population = make_population()
    engine, _ = tail_engine(1, buckets=tuple(range(1, 10)), clients_per_call=1)
    plan = engine.plan(population, [0, 1, 2, 3, 4, 5, 6])
    assert plan.padding_efficiency == 1.0
    assert [(c.steps, c.tail) for c in plan.chunks] == sorted(
        (-(-n // BATCH) - 1, n - (-(-n // BATCH) - 1) * BATCH) for n in SIZES if n)


@pytest.mark.parametrize("backend", [fl.RoundBackend(), fl.RoundBackend(vmap_width=2)])
@pytest.mark.slow  # > 20 s on 2 cores: CI's slow step
def test_tail_layout_equals_default_layout(backend):
    """Shuffled examples, two local epochs, client momentum: same batches, same result."""
    _, population = make_population(2)
    results = []
    for g in (0, 2):
        engine, variables = tail_engine(g, epochs=2, shuffle=True, backend=backend,
                                        buckets=(3, 9, 18),
                                        client_optimizer=optax.sgd(LR, momentum=0.9))
        state = engine.init(variables)
        for r, cohort in enumerate(([0, 2, 3, 4], [6, 5, 3, 1])):
            plan = engine.plan(population, cohort)
            if g:  # Clients of 9 and 12 examples: one chunk, tails of 2 and 4 rows -> 4.
                own = fl.packing.tail_widths(SIZES, engine.packing)[1]
                assert any(len({own[i] for i in c.client_ids if i >= 0}) > 1
                           for c in plan.chunks) == (r == 1)
            state, res = engine.run_round(state, population, plan, jax.random.PRNGKey(3), seed=r)
        results.append((to_np(state.variables), res.totals))
    for k in results[0][0]:
        np.testing.assert_allclose(results[0][0][k], results[1][0][k], atol=1e-5, rtol=1e-5)
    for k in results[0][1]:
        assert results[0][1][k] == pytest.approx(results[1][1][k], rel=1e-5)


def test_tail_multiple_validated_and_too_big_client_named():
    with pytest.raises(ValueError, match="tail_multiple"):
        fl.PackingConfig(batch_size=4, tail_multiple=5)
    _, population = make_population()
    engine, _ = tail_engine(2, buckets=(1,))
    with pytest.raises(ValueError, match=r"clients \[3\] have \[33\] examples"):
        engine.plan(population, [0, 3])


@pytest.mark.parametrize("weighting,drop", [
    ("client_size", True), ("num_examples", True), ("uniform", True),
    (np.sqrt, False), ("client_size", False)])
def test_weighting_and_drop_remainder_match_numpy_fedavg(weighting, drop):
    """fedjax's FedAvg setting (weight = full client size, partial batch dropped) and the other
    weightings, two rounds against the sequential reference. Client 4 (3 examples < batch 4)
    trains nothing with drop_remainder but still weighs 3 under 'client_size'."""
    clients, population = make_population()
    engine, variables = build_engine(weighting=weighting, drop_remainder=drop)
    ref = to_np(variables)
    state = engine.init(variables)
    for cohort in ([0, 1, 2, 3, 4], [6, 4, 5, 1]):
        state, result = engine.run_round(state, population, engine.plan(population, cohort),
                                         jax.random.PRNGKey(1))
        mean_delta = np_round(ref, clients, cohort, weighting=weighting, drop_remainder=drop)
        ref = {k: ref[k] + mean_delta[k] for k in ref}
        for k, v in to_np(state.variables).items():
            np.testing.assert_allclose(v, ref[k], atol=1e-5, rtol=1e-5, err_msg=k)
        sizes = np.asarray(SIZES)[cohort]
        trained = sizes // BATCH * BATCH if drop else sizes
        assert result.totals["count"] == trained.sum() == result.useful_examples
        assert result.client_updates == (trained > 0).sum()


def test_drop_remainder_does_not_compute_the_dropped_step():
    """Every step count a bucket, one client per call: with drop_remainder the computed slots are
    exactly the full batches (no padded step), fewer than without it."""
    _, population = make_population()
    cohort = [0, 2, 3, 4, 5, 6]
    every = tuple(range(1, 10))
    dropped = build_engine(drop_remainder=True, clients_per_call=1, step_buckets=every)[0]
    kept = build_engine(drop_remainder=False, clients_per_call=1, step_buckets=every)[0]
    plan = dropped.plan(population, cohort)
    sizes = np.asarray(SIZES)[cohort]
    assert sorted(c.steps for c in plan.chunks) == sorted(n // BATCH for n in sizes if n >= BATCH)
    assert plan.computed_examples == (sizes // BATCH * BATCH).sum()
    assert plan.padding_efficiency == 1.0
    assert plan.computed_examples < kept.plan(population, cohort).computed_examples
    assert plan.idle_weight == 0.0  # 'num_examples': client 4 trains nothing, weighs nothing


@pytest.mark.parametrize("drop", [False, True])
def test_local_steps_match_numpy_fedavg(drop):
    """local_steps = 5 with batch 4: client 4 (3 examples) repeats its one batch 5 times, client
    0 (5 examples: a full and a partial batch) cycles them, client 3 (33 examples) sees only
    its first 5 batches; every client is in the 5-step bucket. Two rounds vs the reference."""
    clients, population = make_population()
    engine, variables = build_engine(drop_remainder=drop, local_steps=5, step_buckets=(5,))
    ref = to_np(variables)
    state = engine.init(variables)
    for cohort in ([0, 1, 2, 3, 4], [6, 4, 5, 1]):
        plan = engine.plan(population, cohort)
        assert {c.steps for c in plan.chunks} == {5}
        state, result = engine.run_round(state, population, plan, jax.random.PRNGKey(1))
        mean_delta = np_round(ref, clients, cohort, weighting="num_examples",
                              drop_remainder=drop, local_steps=5)
        ref = {k: ref[k] + mean_delta[k] for k in ref}
        for k, v in to_np(state.variables).items():
            np.testing.assert_allclose(v, ref[k], atol=1e-5, rtol=1e-5, err_msg=k)
        # Examples seen: the rows of each client's 5 batches, cycling its epoch.
        seen = 0
        for n in np.asarray(SIZES)[cohort]:
            rows = [min(BATCH, n - s) for s in range(0, n // BATCH * BATCH if drop else n, BATCH)]
            seen += sum(rows[t % len(rows)] for t in range(5)) if rows else 0
        assert result.totals["count"] == seen == result.useful_examples


def test_local_steps_walk_through_reshuffled_epochs():
    """With shuffling, a client's L steps are consecutive batches of its epochs: each epoch's
    batches hold every example once, and a one-batch client reshuffles it each step; with a
    one-batch client, local_steps = L is exactly local_epochs = L."""
    cfg = fl.PackingConfig(batch_size=4, local_steps=7, step_buckets=(7,))
    chunk = fl.packing.ChunkPlan(7, np.array([3, 8, 1]), np.array([10, 3, 40]))
    index = fl.packing.example_index(chunk, cfg, seed=5, round_index=2)
    assert index.shape == (3, 7, 4)
    ten = index[0]  # 10 examples: 3 steps per epoch (4 + 4 + 2), epochs 0, 1 and 1 step of 2
    for epoch in (ten[0:3], ten[3:6]):
        assert sorted(epoch[epoch >= 0].tolist()) == list(range(10))
        assert (epoch[2] >= 0).sum() == 2
    assert (ten[6] >= 0).all() and len(set(ten[6].tolist())) == 4
    assert (index[2] >= 0).all() and len(np.unique(index[2])) == 28  # 40: the first 7 batches
    small = index[1]
    assert all(sorted(s[s >= 0].tolist()) == [0, 1, 2] for s in small)
    epochs = fl.PackingConfig(batch_size=4, local_epochs=7, step_buckets=(7,))
    one = fl.packing.ChunkPlan(7, np.array([8]), np.array([3]))
    np.testing.assert_array_equal(
        fl.packing.example_index(one, epochs, seed=5, round_index=2)[0], small)
    with pytest.raises(ValueError, match="local_steps=7 fixes every client's steps"):
        fl.PackingConfig(batch_size=4, local_steps=7, local_epochs=2)
    with pytest.raises(ValueError, match="local_steps=70 exceeds the largest step bucket"):
        fl.PackingConfig(batch_size=4, local_steps=70)


def test_protocol_knobs_validated():
    with pytest.raises(ValueError, match="drop_remainder .* tail_multiple=0"):
        fl.PackingConfig(batch_size=4, tail_multiple=2, drop_remainder=True)
    _, population = make_population()
    engine, _ = build_engine(drop_remainder=True)
    with pytest.raises(ValueError, match="no client of the cohort of 1 has a full batch of 4"):
        engine.plan(population, [4])
    engine, _ = build_engine(weighting=lambda n: -n)
    with pytest.raises(ValueError, match="weighting function must return"):
        engine.plan(population, [0, 2])
