"""Segmented rounds (RoundBackend.steps_per_call): a chunk's local steps in several calls.

The client states are carried between calls, so the round must equal the sequential NumPy
FedAvg and the one-call round: default and tail layouts, two epochs with shuffling and client
momentum, vmap groups, 8 devices, LOCAL leaves, a NaN client, and a bounded set of compiled
shapes whatever the client sizes.
"""

import dataclasses

import jax
import numpy as np
import optax
import pytest
from test_federated_engine import nan_population, run
from test_federated_round import SIZES, build_engine, make_population, np_round, tail_engine, to_np

from fer_jax import federated as fl


def assert_trees_close(a, b, atol=1e-5):
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=1e-5, err_msg=k)


@pytest.mark.parametrize("steps,width,devices", [
    (2, 1, 1), (1, 2, 1), pytest.param(4, 1, 8, marks=pytest.mark.slow)])
def test_segmented_round_matches_numpy_fedavg(steps, width, devices):
    clients, population = make_population()
    mesh = fl.clients_mesh(jax.devices()[:devices])
    engine, variables = build_engine(
        backend=fl.RoundBackend(vmap_width=width, steps_per_call=steps),
        clients_per_call=max(2 * width, devices), mesh=mesh)
    ref = to_np(variables)
    cohort = [0, 1, 2, 3, 4, 5, 6]
    state, (result,) = run(engine, variables, population, [cohort], key=1)
    ref = {k: v + d for (k, v), d in zip(ref.items(),
                                          np_round(ref, clients, cohort,
                                                   weighting="num_examples").values(),
                                          strict=True)}
    assert_trees_close(to_np(state.variables), ref)
    assert result.totals["count"] == sum(SIZES)
    assert result.client_updates == sum(n > 0 for n in SIZES)


@pytest.mark.parametrize("width", [1, pytest.param(2, marks=pytest.mark.slow)])
@pytest.mark.slow  # > 20 s on 2 cores: CI's slow step
def test_segmented_tail_layout_equals_one_call(width):
    """Shuffled examples, two epochs, client momentum, tail steps: same state and metrics."""
    _, population = make_population(2)
    results = []
    for steps in (0, 2):
        engine, variables = tail_engine(
            2, epochs=2, shuffle=True, buckets=(3, 9, 18),
            backend=fl.RoundBackend(vmap_width=width, steps_per_call=steps),
            client_optimizer=optax.sgd(0.3, momentum=0.9))
        state = engine.init(variables)
        for r, cohort in enumerate(([0, 2, 3, 4], [6, 5, 3, 1])):
            state, res = engine.run_round(state, population, engine.plan(population, cohort),
                                          jax.random.PRNGKey(3), seed=r)
        results.append((to_np(state.variables), res.totals))
    assert_trees_close(results[0][0], results[1][0])
    for k in results[0][1]:
        assert results[1][1][k] == pytest.approx(results[0][1][k], rel=1e-5)


@pytest.mark.slow  # > 20 s on 2 cores: CI's slow step
def test_segmented_local_head_equals_one_call():
    _, population = make_population()
    head_local = fl.regex_filter([("params/head/.*", fl.LOCAL)], default=fl.FEDERATED)
    outs = []
    for steps in (0, 3):
        engine, variables = build_engine(param_filter=head_local,
                                         backend=fl.RoundBackend(steps_per_call=steps))
        store = fl.LocalStore(engine.local_template(variables), population.num_clients)
        state, _ = run(engine, variables, population, [[0, 2, 3], [0, 3]], local_store=store)
        outs.append((to_np(state.variables), store.values["params"]["head"]["kernel"].copy()))
    assert_trees_close(outs[0][0], outs[1][0])
    np.testing.assert_allclose(outs[1][1], outs[0][1], atol=1e-5)
    assert not np.allclose(outs[1][1][3], outs[1][1][4])  # client 3 trained its own head


def test_segmented_nan_client_reported_and_state_kept():
    population = nan_population()
    engine, variables = build_engine(backend=fl.RoundBackend(steps_per_call=2))
    state = engine.init(variables)
    before = to_np(state.variables)
    with pytest.raises(fl.NonFiniteClientError, match=r"clients \[3\]") as info:
        engine.run_round(state, population, engine.plan(population, [0, 3, 5]),
                         jax.random.PRNGKey(0))
    assert_trees_close(to_np(info.value.state.variables), before, atol=0)


def test_segmented_compiles_a_bounded_set_of_shapes():
    """Step buckets 1..9 and five cohorts: the step program only sees segment lengths 1 and 2."""
    _, population = make_population()
    engine, variables = build_engine(weighting="uniform",
                                     backend=fl.RoundBackend(steps_per_call=2))
    engine.packing = dataclasses.replace(engine.packing, step_buckets=tuple(range(1, 10)))
    before = fl.client_steps._cache_size()
    run(engine, variables, population,
        [[0, 2, 3], [4, 5, 6, 1], [3, 6], [2, 0, 5, 4], [1, 3]])
    assert fl.client_steps._cache_size() - before <= 2


def test_steps_per_call_validated():
    with pytest.raises(ValueError, match="steps_per_call"):
        fl.RoundBackend(steps_per_call=-1)
