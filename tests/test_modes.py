"""Centralized = the method's client on pooled data: for every method, `mode=centralized` and a
one-client federated round on the same data and seed start equal and take the same first step."""

import jax
import numpy as np
import optax
import pytest

from fer_jax import federated as fl
from fer_jax.federated import config as fed_config
from fer_jax.train import loops


def _first_steps(method, variables, data: dict, *, batch_size: int, seed: int = 0):
    """(variables after the centralized loop's first step, after a one-client FedAvg round of
    one local step with server learning rate 1) on the same `batch_size` examples."""
    n = len(next(iter(data.values())))
    assert n == batch_size, "one batch: the round takes exactly one local step"
    learner = loops.PooledLearner(method, variables, data, batch_size, seed=seed)
    learner.step(0)
    central = jax.device_get(learner.variables())

    fed = dict(fed_config.fed_defaults(), batch_size=batch_size, tail_multiple=0,
               clients_per_call=1, num_devices=1)  # One device of the 8 fake ones.
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


@pytest.mark.slow  # > 20 s on 2 cores: CI's slow step
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


def _faces(n, size=48, classes=8, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8),
            "label": (np.arange(n) % classes).astype(np.int32)}


@pytest.mark.slow  # ESR / MA-Net / ResNet / FedAffect compiles: 70-120 s each.
@pytest.mark.parametrize("name,kwargs", [
    ("esr", {"model.kwargs.num_branches": 2, "model.kwargs.width": 0.125,
             "esr.progressive": False}),
    ("manet", {"model.kwargs.width": 4}),
])
def test_diversity_same_first_step(make_config, name, kwargs):
    from fer_jax.experiments import diversity

    config = make_config(name, "runlocal,mode=federated", **kwargs)
    model = diversity.build_model(config, 8)
    variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, 48, 48, 1)),
                                           train=False))()
    method = diversity.client(config, model, optax.sgd(0.1))
    central, federated = _first_steps(method, variables, _faces(4), batch_size=4)
    assert _moved(variables, central)
    _assert_trees_close(central, federated)


@pytest.mark.slow  # ESR / MA-Net / ResNet / FedAffect compiles: 70-120 s each.
def test_occlusion_same_first_step(make_config):
    from fer_jax.experiments import occlusion

    config = make_config("occlusion", "runlocal,mode=federated", **{
        "model.kwargs.width": 4, "model.attention_hidden": 4, "model.disc_hidden": 8})
    net, disc = occlusion.build_models(config, 8)
    variables = occlusion.init_variables(config, net, disc)
    opt = optax.adam(1e-2)
    method = occlusion.client(config, net, disc, opt, opt, 4)
    central, federated = _first_steps(method, variables, _faces(4, size=32), batch_size=4)
    assert _moved(variables, central)
    _assert_trees_close(central, federated)


@pytest.mark.slow  # ESR / MA-Net / ResNet / FedAffect compiles: 70-120 s each.
def test_fedaffect_same_first_step(make_config):
    from fer_jax.experiments import fedaffect

    config = make_config("fedaffect", "runlocal")
    rep_model, few_model = fedaffect.build_models(config, 8)
    rep_vars, few_vars = fedaffect.init_variables(config, rep_model, few_model, 8)
    rep_method, few_method = fedaffect.build_methods(config, rep_model, few_model, 8,
                                                     max_labeled=16)
    data = _faces(16)
    central, federated = _first_steps(rep_method, rep_vars, {"image": data["image"]},
                                      batch_size=16)
    assert _moved(rep_vars, central)
    _assert_trees_close(central, federated)
    central, federated = _first_steps(few_method, few_vars, data, batch_size=16)
    assert _moved(few_vars, central)
    _assert_trees_close(central, federated)


@pytest.mark.slow  # > 20 s on 2 cores: CI's slow step
def test_vfer_same_first_step():
    from fer_jax.models import vfer as vfer_models
    from fer_jax.steps import vfer as steps

    head = vfer_models.VFERHead(3, dense=(5, 4), lstm=3)
    rng = np.random.default_rng(2)
    data = {"features": rng.normal(size=(5, 4, 6)).astype(np.float32),
            "frame_mask": np.ones((5, 4), bool),
            "label": np.array([0, 1, 2, 1, 0], np.int32)}
    v = head.init(jax.random.PRNGKey(0), data["features"], data["frame_mask"], train=False)
    variables = {"params": {"v": v["params"], "personal": v["params"]},
                 "batch_stats": {"v": v["batch_stats"]}}
    method = steps.PersonalizeClient(head, optax.adam(1e-2))
    central, federated = _first_steps(method, variables, data, batch_size=5)
    assert _moved(variables, central)
    _assert_trees_close(central, federated)


_SMALL = {  # runlocal shrunk further: the point is that each mode runs end to end.
    "supervised": ["--config.train.num_steps=6", "--config.fed.rounds=2"],
    "fedavg": ["--config.train.num_steps=6", "--config.fed.rounds=2"],
    "esr": ["--config.train.num_steps=4", "--config.fed.rounds=2",
            "--config.model.kwargs.num_branches=2", "--config.model.kwargs.width=0.125"],
    "manet": ["--config.train.num_steps=4", "--config.fed.rounds=2",
              "--config.model.kwargs.width=4"],
    "occlusion": ["--config.train.num_steps=4", "--config.fed.rounds=2",
                  "--config.occlusion.eval_modes=clean,R16"],
    "fedaffect": ["--config.fed.rounds=1", "--config.fedaffect.eval_episodes=8",
                  "--config.fedaffect.plot_points=24"],
    "vfer": ["--config.fed.rounds=1", "--config.ifer.epochs=1", "--config.vfer.epochs=1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["centralized", "federated"])
@pytest.mark.parametrize("name", sorted(_SMALL))
def test_every_config_runs_in_both_modes_on_two_cpu_devices(tmp_path, name, mode):
    """`python -m fer_jax.main --cpu_devices=2 --config=configs/<name>.py:runlocal,mode=<mode>`
    finishes, writes eval.json and prints the summary line with its outputs."""
    import os
    import pathlib
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, "-m", "fer_jax.main", "--cpu_devices=2", f"--workdir={tmp_path}",
           f"--config=configs/{name}.py:runlocal,mode={mode}", *_SMALL[name]]
    result = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 local / 2 global devices" in result.stderr
    assert (tmp_path / "eval.json").is_file()
    assert f"Outputs in {tmp_path}" in result.stdout
    config = __import__("json").loads((tmp_path / "config.json").read_text())
    assert config["mode"] == mode
