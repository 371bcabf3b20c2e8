"""Engine properties: aggregation, sharding, recompilation, bad inputs, partial federation,
resume, sampling and lazy populations (issue 4, items 2-7)."""

import dataclasses
import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_federated_round import SIZES, build_engine, make_population, to_np

from fer_jax import federated as fl


def run(engine, variables, population, cohorts, key=0, **kw):
    state = engine.init(variables)
    results = []
    for cohort in cohorts:
        state, res = engine.run_round(state, population, engine.plan(population, cohort),
                                      jax.random.PRNGKey(key), **kw)
        results.append(res)
    return state, results


def test_weighted_mean_masks_zero_weight_and_rejects_bad_weights():
    x = {"a": np.array([[1.0, 2.0], [np.nan, np.inf], [3.0, 6.0]], np.float32)}
    out = fl.weighted_mean(x, np.array([1.0, 0.0, 3.0]))
    np.testing.assert_allclose(out["a"], [2.5, 5.0])
    with pytest.raises(ValueError, match="all client weights are zero"):
        fl.weighted_mean(x, np.zeros(3))
    with pytest.raises(ValueError, match="leading client axis"):
        fl.weighted_mean(x, np.ones(2))
    with pytest.raises(ValueError, match=">= 0"):
        fl.weighted_mean(x, np.array([1.0, -1.0, 1.0]))


@pytest.mark.slow  # > 20 s on 2 cores: CI's slow step
def test_eight_devices_match_one_device():
    assert jax.device_count() == 8, "conftest forces 8 host devices"
    _, population = make_population()
    cohorts = [[0, 1, 2, 3, 4, 5, 6]]
    one, _ = build_engine(clients_per_call=8)
    eight, variables = build_engine(clients_per_call=8, mesh=fl.clients_mesh())
    s1, _ = run(one, variables, population, cohorts)
    s8, _ = run(eight, variables, population, cohorts)
    assert s8.variables["params"]["head"]["kernel"].sharding.mesh.size == 8
    for k, v in to_np(s1.variables).items():
        np.testing.assert_allclose(to_np(s8.variables)[k], v, atol=1e-6, rtol=1e-5)


def test_no_recompilation_across_rounds():
    """XLA compilations (jax.monitoring's backend-compile events), not jit cache entries: the
    round's first chunk takes a fresh accumulator whose (equivalent) sharding object differs from
    a chunk output's on a 1-device mesh, a second dispatch-cache entry but no new compilation."""
    compiled = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(kwargs.get("fun_name", ""))

    _, population = make_population()
    engine, variables = build_engine(weighting="uniform")
    state = engine.init(variables)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        per_round = []
        for cohort in [[0, 2, 3], [4, 5, 6, 1], [3, 6], [2, 0, 5, 4], [1, 3]]:
            state, _ = engine.run_round(state, population, engine.plan(population, cohort),
                                        jax.random.PRNGKey(0))
            per_round.append(list(compiled))
            compiled.clear()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    # Two step buckets (3, 9): at most both chunk shapes and the server update compile in round 1
    # (the cohort meets both buckets; fewer if an earlier test compiled them); none afterwards.
    round_fns = {"jit(client_chunk)", "jit(server_update)"}
    assert len([f for f in per_round[0] if f in round_fns]) <= 3
    assert [[f for f in names if f in round_fns] for names in per_round[1:]] == [[]] * 4


def test_partial_chunks_of_buckets_share_chunks():
    """Batch 4, SIZES -> steps [2, 0, 5, 9, 1, 3, 3], a bucket per step count, 2 clients per
    call: bucket 3 fills a chunk (clients 5, 6); the other buckets' single clients pair up in
    ascending steps, (4, 0) at 2 steps and (2, 3) at 9, instead of four chunks each half
    padding (1 + 2 + 5 + 9 = 17 chunk-steps -> 11). The round equals one client per call."""
    _, population = make_population()
    every = tuple(range(1, 10))
    engine, variables = build_engine(clients_per_call=2, step_buckets=every)
    plan = engine.plan(population, list(range(7)))
    got = sorted((tuple(c.client_ids.tolist()), c.steps) for c in plan.chunks)
    assert got == [((2, 3), 9), ((4, 0), 2), ((5, 6), 3)]
    assert sum(c.steps for c in plan.chunks) == 14
    single, _ = build_engine(clients_per_call=1, step_buckets=every)
    cohorts = [list(range(7)), [6, 3, 0]]
    paired, _ = run(engine, variables, population, cohorts)
    alone, _ = run(single, variables, population, cohorts)
    for k, v in to_np(alone.variables).items():
        np.testing.assert_allclose(to_np(paired.variables)[k], v, atol=1e-6, rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
    _, population = make_population()
    engine, _ = build_engine()
    with pytest.raises(ValueError, match="empty cohort"):
        engine.plan(population, [])
    with pytest.raises(ValueError, match="zero examples"):
        engine.plan(population, [1])
    small = dataclasses.replace(engine.packing, step_buckets=(1, 2, 4))
    with pytest.raises(ValueError, match=r"clients \[3\] have \[33\] examples, more than"):
        fl.plan_cohort([0, 3], population.sizes([0, 3]), small)
    with pytest.raises(ValueError, match="outside"):
        population.sizes([len(SIZES)])
    with pytest.raises(ValueError, match="weighting"):
        build_engine(weighting="median")


def nan_population():
    clients, _ = make_population()
    clients[3]["image"][7] = np.nan
    return fl.ArrayPopulation.from_clients(clients)


def test_nan_client_is_reported_and_state_kept():
    population = nan_population()
    engine, variables = build_engine()
    state = engine.init(variables)
    before = to_np(state.variables)
    with pytest.raises(fl.NonFiniteClientError, match=r"clients \[3\]") as info:
        engine.run_round(state, population, engine.plan(population, [0, 3, 5]),
                         jax.random.PRNGKey(0))
    assert info.value.client_ids == [3]
    after = to_np(info.value.state.variables)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])
    assert int(info.value.state.round) == 0


def test_nan_client_dropped_on_request():
    engine, variables = build_engine(on_nonfinite="drop")
    dropped, results = run(engine, variables, nan_population(), [[0, 3, 5]])
    assert results[0].nonfinite_client_ids == [3]
    _, population = make_population()
    clean, _ = run(engine, variables, population, [[0, 5]])
    for k, v in to_np(clean.variables).items():
        np.testing.assert_allclose(to_np(dropped.variables)[k], v, atol=1e-6)


@pytest.mark.slow  # > 20 s on 2 cores: CI's slow step
def test_partial_federation_local_head_and_frozen_body():
    _, population = make_population()
    head_local = fl.regex_filter([("params/head/.*", fl.LOCAL)], default=fl.FEDERATED)
    engine, variables = build_engine(param_filter=head_local)
    store = fl.LocalStore(engine.local_template(variables), population.num_clients)
    state, _ = run(engine, variables, population, [[0, 2]], local_store=store)
    got, init = to_np(state.variables), to_np(variables)
    np.testing.assert_array_equal(got["w2"], init["w2"])  # server head untouched
    assert not np.allclose(got["w1"], init["w1"])          # body federated
    assert store.seen[[0, 2]].all() and not store.seen[[3, 4]].any()
    head0 = store.values["params"]["head"]["kernel"][0].copy()
    assert not np.allclose(head0, init["w2"])
    # A later visit starts from the stored head: client 0's head keeps training from head0.
    state, _ = engine.run_round(state, population, engine.plan(population, [0]),
                                jax.random.PRNGKey(0), local_store=store)
    assert not np.allclose(store.values["params"]["head"]["kernel"][0], head0)
    with pytest.raises(ValueError, match="local_store"):
        engine.run_round(state, population, engine.plan(population, [0]), jax.random.PRNGKey(0))

    frozen_body = fl.regex_filter([("params/hidden/.*", fl.FROZEN)])
    engine, variables = build_engine(param_filter=frozen_body)
    state, _ = run(engine, variables, population, [[0, 2]])
    got = to_np(state.variables)
    np.testing.assert_array_equal(got["w1"], init["w1"])
    assert not np.allclose(got["w2"], init["w2"])


def test_resumed_run_equals_uninterrupted(tmp_path):
    _, population = make_population()
    sampler = fl.CohortSampler(len(SIZES), 4)
    engine, variables = build_engine(server="fedavgm", clients_per_call=2)
    seed, key = 3, jax.random.PRNGKey(5)

    def rounds(state, sstate, n):
        for _ in range(n):
            ids, sstate = sampler.next(sstate)
            if population.sizes(ids).sum() == 0:
                continue
            state, _ = engine.run_round(state, population, engine.plan(population, ids), key,
                                        seed=seed)
        return state, sstate

    full, _ = rounds(engine.init(variables), fl.SamplerState(seed), 4)
    part, sstate = rounds(engine.init(variables), fl.SamplerState(seed), 2)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "ck", {"server": part, "sampler": dataclasses.asdict(sstate),
                                "key": np.asarray(key)})
    ckpt.wait_until_finished()
    like = {"server": engine.init(variables), "sampler": dataclasses.asdict(sstate),
            "key": np.asarray(key)}
    restored = ckpt.restore(tmp_path / "ck", jax.tree.map(ocp.utils.to_shape_dtype_struct, like))
    state = engine.place(restored["server"])  # back on the mesh
    resumed, _ = rounds(state, fl.SamplerState(**{k: int(v) for k, v in
                                                  restored["sampler"].items()}), 2)
    assert int(resumed.round) == int(full.round) == 4
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(full), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sampler_reproducible_and_without_replacement():
    s = fl.CohortSampler(1000, 50)
    a, b = s.sample(7, 3), s.sample(7, 3)
    np.testing.assert_array_equal(a, b)
    assert len(set(a.tolist())) == 50 and not np.array_equal(a, s.sample(7, 4))
    e = fl.CohortSampler(100, 10, mode="epoch")
    seen = np.concatenate([e.sample(0, r) for r in range(10)])
    assert sorted(seen.tolist()) == list(range(100))
    with pytest.raises(ValueError, match="cohort_size"):
        fl.CohortSampler(10, 11)


def test_lazy_population_memory_is_independent_of_size():
    small = fl.SyntheticPopulation(1_000, size_distribution="lognormal", max_size=64)
    huge = fl.SyntheticPopulation(100_000, size_distribution="lognormal", max_size=64)
    nbytes = lambda p: sum(v.nbytes for v in vars(p).values() if isinstance(v, np.ndarray))
    assert nbytes(small) == nbytes(huge)
    ids = np.array([0, 99_999, 54_321])
    sizes = huge.sizes(ids)
    assert ((sizes >= 2) & (sizes <= 64)).all()
    index = np.where(np.arange(8) < sizes[:, None], np.arange(8), -1)
    batch = huge.gather(ids, index)
    assert batch["image"].shape == (3, 8, 48, 48, 1)
    np.testing.assert_array_equal(huge.gather(ids, index)["image"], batch["image"])


def test_weighted_mean_averages_integer_leaves_in_float():
    """Integer rows are not truncated: (1 * [3, 5] + 2 * [4, 9]) / 3, computed here by hand."""
    x = {"count": np.array([[3, 5], [4, 9]], np.int32), "flag": np.array([True, False]),
         "half": np.array([[1.0], [2.0]], np.float16)}
    out = fl.weighted_mean(x, np.array([1.0, 2.0]))
    np.testing.assert_allclose(out["count"], [11 / 3, 23 / 3], rtol=1e-6)
    assert out["count"].dtype == np.float32
    np.testing.assert_allclose(out["flag"], 1 / 3, rtol=1e-6)
    assert out["half"].dtype == np.float16  # floating leaves keep their dtype
    np.testing.assert_allclose(out["half"], [5 / 3], rtol=1e-3)


def _count_compiles(fn):
    """(fn's result, names of the XLA compilations it triggered)."""
    compiled = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(kwargs.get("fun_name", ""))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        return fn(), compiled
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@pytest.mark.parametrize("backend,tail", [  # rolled step loops: they compile fastest
    (fl.RoundBackend(step_unroll=1, group_unroll=1), 0), (fl.RoundBackend(steps_per_call=2), 2)])
def test_compile_leaves_nothing_to_compile_in_rounds(backend, tail):
    """engine.compile(population) then rounds over cohorts of every size mix: no compilation.
    A fresh method object so that nothing is shared with the other tests' compilations."""
    import optax
    from test_federated_round import BATCH, MODEL

    _, population = make_population()
    method = fl.SupervisedClient(fl.classifier_loss(MODEL.apply), optax.sgd(0.1))
    engine = fl.FederatedEngine(
        method, packing=fl.PackingConfig(batch_size=BATCH, step_buckets=(1, 2, 3, 5, 9),
                                         clients_per_call=2, tail_multiple=tail),
        backend=backend, mesh=fl.clients_mesh(jax.devices()[:1]))
    variables = build_engine()[1]
    state = engine.init(variables)
    seconds, compiled = _count_compiles(lambda: engine.compile(population))
    assert seconds > 0 and "jit(server_update)" in compiled
    shapes = fl.packing.chunk_shapes(population.sizes(np.arange(len(SIZES))), engine.packing)
    assert len(shapes) >= 4  # several buckets (and tail widths) to cover

    def rounds(state):
        for cohort in [[0, 2, 3], [4, 5, 6, 1], [3, 6], [2, 0, 5, 4], [1, 3], [0, 2, 3, 4, 5, 6]]:
            state, _ = engine.run_round(state, population, engine.plan(population, cohort),
                                        jax.random.PRNGKey(0))
        return state

    state, compiled = _count_compiles(lambda: rounds(state))
    assert compiled == [] and int(state.round) == 6


def test_auto_layout_probes_records_and_matches_numpy():
    """No backend given: the engine times a few layouts at the first plan(), within a few
    seconds, reports its choice in every RoundResult, and still computes FedAvg exactly."""
    import optax
    from test_federated_round import BATCH, MODEL, np_round

    clients, population = make_population()
    method = fl.SupervisedClient(fl.classifier_loss(MODEL.apply), optax.sgd(0.3))
    engine = fl.FederatedEngine(
        method, packing=fl.PackingConfig(batch_size=BATCH, step_buckets=(3, 9), shuffle=False),
        mesh=fl.clients_mesh(jax.devices()[:1]))
    variables = build_engine()[1]
    ref = to_np(variables)
    state = engine.init(variables)
    cohort = [0, 1, 2, 3, 4, 5, 6]
    plan = engine.plan(population, cohort)
    layout = engine.layout
    assert layout["mode"] == "auto" and layout["source"] == "probe"
    # 16x16 capped at the cohort's 7 clients; the first two candidates are always timed.
    assert {"7x7", "4x1"} <= set(layout["estimated_s_per_round"]) <= {"1x1", "4x1", "7x7"}
    assert layout["unroll"] == 1  # no convolution: rolled step loops (they compile faster)
    chosen = f"{layout['clients_per_call']}x{layout['vmap_width']}"
    assert layout["estimated_s_per_round"][chosen] == min(layout["estimated_s_per_round"].values())
    assert layout["probe_s"] < 60  # budget 5 s of probing plus one compile, on a loaded machine
    assert engine.packing.clients_per_call == layout["clients_per_call"]
    state, result = engine.run_round(state, population, plan, jax.random.PRNGKey(1))
    assert result.layout == layout
    mean_delta = np_round(ref, clients, cohort, weighting="num_examples")
    for k, v in to_np(state.variables).items():
        np.testing.assert_allclose(v, ref[k] + mean_delta[k], atol=1e-5, rtol=1e-5, err_msg=k)


def test_auto_layout_probe_is_cached_beside_the_compilation_cache(tmp_path, monkeypatch):
    """With a compilation cache directory, a second engine for the same client program, data
    and cohort reuses the first one's probe (no timing); another model probes again; a corrupt
    cache file is ignored and rewritten; probe_cache=False always probes."""
    import flax.linen as nn
    import optax
    from test_federated_round import BATCH, MODEL

    class Wider(nn.Module):
        @nn.compact
        def __call__(self, x, *, train):
            del train
            return {"logits": nn.Dense(3)(nn.tanh(nn.Dense(9)(x)))}

    from fer_jax.federated import round as round_lib

    # No compilation cache directory in this process: no cache file; then one in tmp_path.
    assert jax.config.jax_compilation_cache_dir is None and round_lib._layout_cache_path() is None
    monkeypatch.setattr(round_lib, "_layout_cache_path", lambda: tmp_path / "layouts.json")
    clients, population = make_population()
    cohort = [0, 1, 2, 3, 4, 5, 6]
    timed = []
    original = fl.FederatedEngine._time_chunk
    monkeypatch.setattr(fl.FederatedEngine, "_time_chunk",
                        lambda self, *a: timed.append(1) or original(self, *a))

    def layout(*, lr=0.3, model=MODEL, backend=None):
        method = fl.SupervisedClient(fl.classifier_loss(model.apply), optax.sgd(lr))
        engine = fl.FederatedEngine(
            method, packing=fl.PackingConfig(batch_size=BATCH, step_buckets=(3, 9),
                                             shuffle=False),
            backend=backend, mesh=fl.clients_mesh(jax.devices()[:1]))
        x = np.zeros((1, *clients[0]["image"].shape[1:]), np.float32)
        engine.init(model.init(jax.random.PRNGKey(0), x, train=False))
        engine.plan(population, cohort)
        return dict(engine.layout)

    first = layout()
    assert first["source"] == "probe" and timed and (tmp_path / "layouts.json").exists()
    timed.clear()
    again = layout()  # a new engine, the same program and data
    assert timed == [] and again["source"] == "probe (cached)"
    assert again["estimated_s_per_round"] == first["estimated_s_per_round"]
    assert again["clients_per_call"] == first["clients_per_call"]
    assert layout(model=Wider())["source"] == "probe" and timed  # another model: probed
    timed.clear()
    assert layout(lr=0.1)["source"] == "probe" and timed  # a constant of the program changed
    timed.clear()
    (tmp_path / "layouts.json").write_text("{not json")
    assert layout()["source"] == "probe" and timed
    assert json.loads((tmp_path / "layouts.json").read_text())  # rewritten, readable
    timed.clear()
    assert layout(backend=fl.RoundBackend.auto(probe_cache=False))["source"] == "probe" and timed


def test_auto_layout_keeps_convolutions_unvmapped_on_cpu():
    import flax.linen as nn
    import jax.numpy as jnp
    import optax

    class Conv(nn.Module):
        @nn.compact
        def __call__(self, x, *, train):
            del train
            x = nn.Conv(2, (3, 3))(x[..., None])
            return nn.Dense(3)(x.reshape(x.shape[0], -1))

    rng = np.random.default_rng(0)
    population = fl.ArrayPopulation({"image": rng.normal(size=(40, 5, 5)).astype(np.float32),
                                     "label": rng.integers(0, 3, 40).astype(np.int32)},
                                    [10, 10, 10, 10])
    method = fl.SupervisedClient(fl.classifier_loss(Conv().apply), optax.sgd(0.1))
    variables = Conv().init(jax.random.PRNGKey(0), jnp.zeros((1, 5, 5)), train=False)
    mesh = fl.clients_mesh(jax.devices()[:1])

    def trained(backend):
        engine = fl.FederatedEngine(method, packing=fl.PackingConfig(batch_size=4),
                                    backend=backend, mesh=mesh)
        state = engine.init(variables)
        plan = engine.plan(population, [0, 1, 2, 3])
        state, _ = engine.run_round(state, population, plan, jax.random.PRNGKey(1))
        return engine, jax.tree.map(np.asarray, state.variables)

    engine, auto = trained(None)
    assert engine.layout["source"].startswith("cost model")
    # One client per call, unvmapped, one local step per call (segmented rounds).
    assert (engine.layout["clients_per_call"], engine.layout["vmap_width"],
            engine.layout["steps_per_call"]) == (1, 1, 1)
    assert engine.spec.backend.steps_per_call == 1
    # Same round as the one-call layout (3 steps per client unrolled in one program).
    _, one_call = trained(fl.RoundBackend(vmap_width=1))
    for a, b in zip(jax.tree.leaves(auto), jax.tree.leaves(one_call), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # A steps_per_call the user set is kept.
    engine, _ = trained(fl.RoundBackend.auto(steps_per_call=2))
    assert engine.layout["steps_per_call"] == 2
    with pytest.raises(ValueError, match="layout 'best' is not one of"):
        fl.RoundBackend(layout="best")


def test_log_layout_logs_once_per_engine(caplog):
    import logging

    import optax

    from fer_jax.train import loops

    method = fl.SupervisedClient(lambda *a: None, optax.sgd(0.1))
    engines = [fl.FederatedEngine(method, backend=fl.RoundBackend(vmap_width=1),
                                  mesh=fl.clients_mesh(jax.devices()[:1])) for _ in range(2)]
    with caplog.at_level(logging.INFO, logger="absl"):
        for _ in range(3):
            for e in engines:
                loops.log_layout("test", e)
    lines = [r.getMessage() for r in caplog.records if "test layout:" in r.getMessage()]
    assert lines == ["test layout: 1 clients per call, vmap width 1, all local steps per call, "
                     "unroll True (fixed: given)"] * 2
