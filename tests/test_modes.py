"""Centralized = the method's client on pooled data: for every method, `mode=centralized` and a
one-client federated round on the same data and seed start equal and take the same first step."""

import jax
import numpy as np
import optax

from fer_jax import federated as fl
from fer_jax.federated import config as fed_config
from fer_jax.train import loops


def _first_steps(method, variables, data: dict, *, batch_size: int, seed: int = 0):
    """(variables after the centralized loop's first step, after a one-client FedAvg round of
    one local step with server learning rate 1) on the same `batch_size` examples."""
    n = len(next(iter(data.values())))
    assert n == batch_size, "one batch: the round takes exactly one local step"
    init_key, step_key = loops.client_keys(loops.run_key(seed))
    trainable = (True,) * len(jax.tree.leaves(variables))
    state = method.init(variables, trainable, init_key)
    idx = loops.PooledOrder(n, batch_size, seed).indices(0)
    state, _ = jax.jit(method.step)(state, {k: v[idx] for k, v in data.items()},
                                    np.ones(batch_size, bool), jax.random.fold_in(step_key, 0))
    central = jax.device_get(method.final(state))

    fed = dict(fed_config.fed_defaults(), batch_size=batch_size, tail_multiple=0,
               clients_per_call=1)
    engine = fed_config.build_engine(_Block(fed), method, max_client_size=n)
    population = fl.ArrayPopulation.from_clients([data])
    server = engine.init(variables)
    server, _ = engine.run_round(server, population, engine.plan(population, [0]),
                                 loops.run_key(seed), seed=seed)
    return central, loops.server_variables(server)


class _Block(dict):
    """A dict with attribute access, like a ConfigDict `fed` block."""

    __getattr__ = dict.__getitem__


def _assert_trees_close(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def _moved(before, after) -> bool:
    return any(not np.allclose(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True))


def test_supervised_same_first_step(make_config):
    from fer_jax import models
    from fer_jax.experiments import supervised

    config = make_config("supervised", "runlocal")
    model = models.get_model("small_cnn", num_classes=8, widths=(4, 8), convs_per_stage=(1, 1),
                             dense=16, dropout=0.3, norm="none")
    variables = supervised.init_variables(model, config)
    method = supervised.client(config, model, optax.sgd(0.1))
    rng = np.random.default_rng(0)
    data = {"image": rng.integers(0, 256, (6, 48, 48, 1), dtype=np.uint8),
            "label": np.arange(6, dtype=np.int32) % 8}
    central, federated = _first_steps(method, variables, data, batch_size=6)
    assert _moved(variables, central)
    _assert_trees_close(central, federated)
