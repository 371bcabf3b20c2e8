"""config.init (fer_jax/io/init.py): a model started from a run's checkpoint or converted weights.

Checkpoints are written by the Checkpointer in the layouts runs save (the supervised client's
SupervisedState, the engine's ServerState, the older TrainState dict, FedAffect's {rep, few})
from random NumPy variables. Initialised leaves must equal those arrays bit for bit, and leaves
left at their init must be the very objects passed in. Model variables come from
jax.eval_shape plus NumPy: an eager model.init takes tens of seconds on a loaded CPU.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import types

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_vfer_convert import WIDTH, _torch_state_dict

from fer_jax import experiments, models
from fer_jax import federated as fl
from fer_jax.experiments import fedaffect, occlusion, supervised, vfer
from fer_jax.io import init as init_lib
from fer_jax.io.checkpoint import Checkpointer
from fer_jax.models import MobileNetV2, convert
from fer_jax.models import vfer as vfer_models
from fer_jax.steps.fedaffect import LearnerState

REPO = pathlib.Path(__file__).resolve().parents[1]


def _shapes(model, shape):
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape),
                                             train=False))


def _random(shapes, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)


def _nest(flat: dict, seed: int) -> dict:
    """{'params/conv/kernel': shape} -> the nested tree of random float32 arrays."""
    rng = np.random.default_rng(seed)
    tree: dict = {}
    for name, shape in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = rng.standard_normal(shape).astype(np.float32)
    return tree


def _save(workdir, step, state):
    checkpointer = Checkpointer(workdir, every_steps=1)
    checkpointer.save(step, state)
    checkpointer.close()


def _state(layout, variables):
    """A state holding `variables` as a run saves it: the centralized SupervisedState, the
    federated ServerState or the earlier TrainState dict."""
    params, stats = variables["params"], variables.get("batch_stats", {})
    if layout == "centralized":
        opt_state = jax.device_get(jax.jit(optax.adam(1e-3).init)(params))
        return fl.SupervisedState(params=params, model_state={"batch_stats": stats},
                                  opt_state=opt_state, initial=jax.tree.map(np.zeros_like,
                                                                            variables))
    if layout == "federated":
        return fl.ServerState(variables=variables, opt_state=(), round=np.int32(4))
    return {"params": params, "batch_stats": stats, "step": np.int32(4)}


def _assert_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _untouched(a, b):
    """Every leaf of `a` is the very object of `b` (left at its init)."""
    return all(x is y for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _small_cnn(config, num_classes, **kwargs):
    return models.get_model("small_cnn", num_classes=num_classes,
                            **{**config.model.kwargs, **kwargs})


@pytest.mark.parametrize("layout", ["centralized", "federated", "train_state"])
def test_runlocal_checkpoint_is_reproduced_exactly(tmp_path, make_config, layout):
    shapes = _shapes(_small_cnn(make_config("supervised", "runlocal"), 8), (1, 48, 48, 1))
    early, late, fresh = (_random(shapes, seed) for seed in (1, 2, 3))
    _save(tmp_path, 2, _state(layout, early))
    _save(tmp_path, 4, _state(layout, late))
    out, report = init_lib.initialize(fresh, {"path": str(tmp_path)})
    _assert_equal(out, late)
    sizes = [int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)]
    assert report.step == 4 and len(report.loaded) == len(sizes)
    assert report.loaded_parameters == sum(sizes)
    assert report.loaded[0].startswith("params/") and report.loaded[-1].startswith("batch_stats/")
    assert report.skipped == report.not_read == report.random_init == ()
    out, report = init_lib.initialize(fresh, {"path": str(tmp_path), "step": 2})
    _assert_equal(out, early)
    assert report.step == 2


def test_src_and_dst_map_subtrees(tmp_path):
    stored = _nest({"params/encoder/conv/kernel": (3, 3, 1, 4), "params/encoder/bn/scale": (4,),
                    "params/head/kernel": (4, 8), "batch_stats/encoder/bn/mean": (4,)}, 1)
    _save(tmp_path, 3, _state("train_state", stored))
    model = _nest({"params/backbone/conv/kernel": (3, 3, 1, 4), "params/backbone/bn/scale": (4,),
                   "params/proj/kernel": (4, 2), "batch_stats/backbone/bn/mean": (4,)}, 2)
    # A module path: that module in every collection.
    out, report = init_lib.initialize(model, {"path": tmp_path, "src": "encoder",
                                              "dst": "backbone"})
    _assert_equal(out["params"]["backbone"], stored["params"]["encoder"])
    _assert_equal(out["batch_stats"]["backbone"], stored["batch_stats"]["encoder"])
    assert out["params"]["proj"]["kernel"] is model["params"]["proj"]["kernel"]
    assert report.loaded == ("params/backbone/bn/scale", "params/backbone/conv/kernel",
                             "batch_stats/backbone/bn/mean")  # Parameters first, in tree order.
    assert report.loaded_parameters == 36 + 4 + 4
    assert report.random_init == ("params/proj/kernel",) and report.random_parameters == 8
    # With a collection: that collection only; the statistics keep their init.
    out, report = init_lib.initialize(model, {"path": tmp_path, "src": "params/encoder",
                                              "dst": "backbone"})
    _assert_equal(out["params"]["backbone"], stored["params"]["encoder"])
    assert out["batch_stats"]["backbone"]["bn"]["mean"] is model["batch_stats"]["backbone"][
        "bn"]["mean"]
    assert report.random_init == ("params/proj/kernel", "batch_stats/backbone/bn/mean")
    with pytest.raises(ValueError, match=r"src='decoder' matches nothing in the checkpoint; it "
                                         r"has params/encoder, params/head, batch_stats/encoder$"):
        init_lib.initialize(model, {"path": tmp_path, "src": "decoder", "dst": "backbone"})
    with pytest.raises(ValueError, match="dst='neck' matches nothing in the model"):
        init_lib.initialize(model, {"path": tmp_path, "src": "encoder", "dst": "neck"})
    with pytest.raises(ValueError, match="changes the collection"):
        init_lib.initialize(model, {"path": tmp_path, "src": "params/encoder",
                                    "dst": "batch_stats/backbone"})
    with pytest.raises(ValueError, match="list 3 and 2 paths"):
        init_lib.initialize(model, {"path": tmp_path, "src": "a,b,c", "dst": "x,y"})


def test_plain_resnet_into_the_occlusion_net(tmp_path, make_config):
    """The occlusion net keeps its ResNet's params under params/net/backbone and its statistics
    under batch_stats/backbone: one src, two dst paths (the WORKSPACE.md command)."""
    config = make_config("occlusion", "runlocal")
    net, disc = occlusion.build_models(config, 8)
    model = _random(jax.eval_shape(lambda: occlusion.init_variables(config, net, disc)), 2)
    resnet = models.get_model(config.model.name, num_classes=8, **config.model.kwargs)
    stored = _random(_shapes(resnet, (1, 32, 32, 1)), 1)
    _save(tmp_path, 5, _state("federated", stored))
    with pytest.raises(ValueError, match=r"the checkpoint has batch_stats/\w+/\w+ \(shape "
                                         r"\(\d+,\)\), which the model lacks \(no "
                                         r"batch_stats/net/backbone/"):
        init_lib.initialize(model, {"path": tmp_path, "dst": "net/backbone"})
    out, report = init_lib.initialize(
        model, {"path": tmp_path, "dst": "params/net/backbone,batch_stats/backbone"})
    _assert_equal(out["params"]["net"]["backbone"], stored["params"])
    _assert_equal(out["batch_stats"]["backbone"], stored["batch_stats"])
    for a, b in [(out["params"]["disc"], model["params"]["disc"]),
                 (out["params"]["net"]["phi"], model["params"]["net"]["phi"]),
                 (out["batch_stats"]["phi"], model["batch_stats"]["phi"])]:
        assert _untouched(a, b)
    assert {n.split("/")[1] if n.startswith("batch_stats") else n.split("/")[2]
            for n in report.random_init} == {"phi", "fc1", "fc2", "out"}


def test_skip_leaves_the_head_at_its_init_and_another_model_names_the_parameter(
        tmp_path, make_config):
    config = make_config("supervised", "runlocal")
    stored = _random(_shapes(_small_cnn(config, 8), (1, 48, 48, 1)), 1)
    _save(tmp_path, 3, _state("centralized", stored))
    fresh = _random(_shapes(_small_cnn(config, 4), (1, 48, 48, 1)), 2)
    with pytest.raises(ValueError, match=r"step 3: params/head/bias has shape \(8,\) in the "
                                         r"checkpoint but \(4,\) in the model"):
        init_lib.initialize(fresh, {"path": tmp_path})
    out, report = init_lib.initialize(fresh, {"path": tmp_path, "skip": "head"})
    for name in ("bias", "kernel"):
        assert out["params"]["head"][name] is fresh["params"]["head"][name]
    assert report.skipped == report.random_init == ("params/head/bias", "params/head/kernel")
    assert report.random_parameters == 4 + out["params"]["head"]["kernel"].size
    _assert_equal({k: v for k, v in out["params"].items() if k != "head"},
                  {k: v for k, v in stored["params"].items() if k != "head"})
    _assert_equal(out["batch_stats"], stored["batch_stats"])
    # A checkpoint of another model: a wider first stage.
    wide = _random(_shapes(_small_cnn(config, 8, widths=(12, 16, 32, 64)), (1, 48, 48, 1)), 3)
    with pytest.raises(ValueError, match=r"params/bn1_1/bias has shape \(8,\) in the checkpoint "
                                         r"but \(12,\) in the model"):
        init_lib.initialize(wide, {"path": tmp_path, "skip": "head"})


def test_missing_and_extra_leaves_are_named(tmp_path):
    stored = _nest({"params/conv/kernel": (3, 3, 1, 4), "params/head/kernel": (4, 8)}, 1)
    _save(tmp_path, 1, {"params": stored["params"], "step": np.int32(1)})
    more = _nest({"params/conv/kernel": (3, 3, 1, 4), "params/conv/bias": (4,),
                  "params/head/kernel": (4, 8)}, 2)
    with pytest.raises(ValueError, match=r"the checkpoint has no params/conv/bias \(shape \(4,\) "
                                         r"in the model\)"):
        init_lib.initialize(more, {"path": tmp_path})
    out, report = init_lib.initialize(more, {"path": tmp_path, "skip": r"conv/bias$"})
    assert report.skipped == ("params/conv/bias",) and report.not_read == ()
    fewer = _nest({"params/conv/kernel": (3, 3, 1, 4)}, 3)
    with pytest.raises(ValueError, match=r"the checkpoint has params/head/kernel \(shape "
                                         r"\(4, 8\)\), which the model lacks"):
        init_lib.initialize(fewer, {"path": tmp_path})
    out, report = init_lib.initialize(fewer, {"path": tmp_path, "skip": ["^params/head/"]})
    assert report.not_read == ("params/head/kernel",) and report.random_init == ()
    _assert_equal(out, {"params": {"conv": stored["params"]["conv"]}})


def test_missing_sources_are_named(tmp_path):
    model = _nest({"params/conv/kernel": (3, 3, 1, 4)}, 1)
    with pytest.raises(FileNotFoundError,
                       match=re.escape(f"init source {tmp_path}/nowhere does not exist")):
        init_lib.initialize(model, {"path": tmp_path / "nowhere"})
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="plain has no checkpoints/ folder"):
        init_lib.initialize(model, {"path": tmp_path / "plain"})
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="empty/checkpoints: no finished checkpoint"):
        init_lib.initialize(model, {"path": tmp_path / "empty"})
    _save(tmp_path / "run", 2, {"params": model["params"], "step": np.int32(2)})
    with pytest.raises(ValueError, match=r"run/checkpoints has no checkpoint of step 7; it has "
                                         r"\[2\]"):
        init_lib.initialize(model, {"path": tmp_path / "run", "step": 7})
    _save(tmp_path / "other", 1, {"w": np.zeros(3, np.float32), "step": np.int32(1)})
    with pytest.raises(ValueError, match=r"the checkpoint holds \['step', 'w'\]; expected model "
                                         r"parameters under 'params' or 'variables/params'"):
        init_lib.initialize(model, {"path": tmp_path / "other"})
    (tmp_path / "w.txt").write_text("")
    with pytest.raises(ValueError, match="unknown weights format '.txt'"):
        init_lib.initialize(model, {"path": tmp_path / "w.txt"})
    np.savez(tmp_path / "w.npz", **{"params/conv/kernel": model["params"]["conv"]["kernel"]})
    with pytest.raises(ValueError, match="step=2 applies to a run's checkpoints"):
        init_lib.initialize(model, {"path": tmp_path / "w.npz", "step": 2})


def _mobilenet(seed):
    return _random(_shapes(MobileNetV2(None, width=WIDTH), (1, 32, 32, 3)), seed)


def test_converted_weights(tmp_path, monkeypatch):
    sd = _torch_state_dict(np.random.default_rng(0))
    fresh = _mobilenet(5)
    flat = convert.from_torch_state_dict(sd)
    expected = convert.load_flax_variables(flat, fresh)
    convert.save_npz(flat, tmp_path / "flax.npz")
    np.savez(tmp_path / "torch.npz", **sd)  # A state_dict export, converted on reading.

    class Tensor:
        def __init__(self, a):
            self.a = a

        def numpy(self):
            return self.a

    calls = []

    def load(path, *, map_location, weights_only):
        calls.append((map_location, weights_only))
        return {k: Tensor(v) for k, v in sd.items()}

    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(load=load))
    (tmp_path / "m.pth").write_bytes(b"")
    for name in ("flax.npz", "torch.npz", "m.pth"):
        out, report = init_lib.initialize(fresh, {"path": tmp_path / name})
        _assert_equal(out, expected)
        assert report.step is None and report.random_init == ()
    assert calls == [("cpu", True)]  # torch.load never unpickles code.
    # By hand: torchvision's OIHW conv is HWIO here, its running_var the BatchNorm's var.
    np.testing.assert_array_equal(out["params"]["Conv1"]["kernel"],
                                  sd["features.0.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(out["batch_stats"]["bn_Conv1"]["var"],
                                  sd["features.0.1.running_var"])
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="m.pth: reading a .pt / .pth file needs torch"):
        init_lib.initialize(fresh, {"path": tmp_path / "m.pth"})


def test_keras_h5(tmp_path):
    rng = np.random.default_rng(0)
    kernel, gamma, beta, mean, var = (rng.standard_normal(s).astype(np.float32)
                                      for s in ((3, 3, 3, 4), (4,), (4,), (4,), (4,)))
    with h5py.File(tmp_path / "w.h5", "w") as f:
        f.attrs["layer_names"] = [b"Conv1", b"bn_Conv1"]
        f.create_group("Conv1").attrs["weight_names"] = [b"Conv1/kernel:0"]
        f["Conv1"]["Conv1/kernel:0"] = kernel
        bn = f.create_group("bn_Conv1")
        names = ["gamma", "beta", "moving_mean", "moving_variance"]
        bn.attrs["weight_names"] = [f"bn_Conv1/{n}:0".encode() for n in names]
        for n, value in zip(names, (gamma, beta, mean, var), strict=True):
            bn[f"bn_Conv1/{n}:0"] = value
    model = _nest({"params/Conv1/kernel": (3, 3, 3, 4), "params/bn_Conv1/scale": (4,),
                   "params/bn_Conv1/bias": (4,), "batch_stats/bn_Conv1/mean": (4,),
                   "batch_stats/bn_Conv1/var": (4,)}, 1)
    out, _ = init_lib.initialize(model, {"path": tmp_path / "w.h5"})
    _assert_equal(out, {"params": {"Conv1": {"kernel": kernel},
                                   "bn_Conv1": {"scale": gamma, "bias": beta}},
                        "batch_stats": {"bn_Conv1": {"mean": mean, "var": var}}})


def test_fedaffect_encoder_from_a_supervised_run_and_from_a_fedaffect_run(tmp_path, make_config):
    config = make_config("fedaffect", "runlocal")
    rep_model, few_model = fedaffect.build_models(config, 8)
    rep_vars, few_vars = _random(jax.eval_shape(
        lambda: fedaffect.init_variables(config, rep_model, few_model, 8)), 2)
    encoder = models.get_model(config.model.name, num_classes=8, **config.model.kwargs)
    stored = _random(_shapes(encoder, (1, 48, 48, 1)), 1)
    _save(tmp_path / "sup", 6, _state("centralized", stored))
    # small_cnn's classifier is dense + head; the encoder (num_classes=None) has neither.
    config.init.update(path=str(tmp_path / "sup"), dst="rep/encoder", skip="dense|head")
    rep, few = fedaffect.apply_init(config, rep_vars, few_vars)
    body = {k: v for k, v in stored["params"].items() if k not in ("dense", "head")}
    _assert_equal(rep["params"]["encoder"], body)
    _assert_equal(few["params"]["encoder"], body)  # Handed over (Algorithm 1).
    assert _untouched(rep["params"]["projector"], rep_vars["params"]["projector"])
    assert _untouched(few["params"]["relation"], few_vars["params"]["relation"])
    both = {"rep": rep_vars, "few": few_vars}
    _, report = init_lib.initialize(both, config.init)
    assert report.not_read == ("params/dense/bias", "params/dense/kernel", "params/head/bias",
                               "params/head/kernel")
    assert report.loaded[0].startswith("rep/params/encoder/")
    with pytest.raises(ValueError, match=r"the checkpoint has params/dense/bias \(shape "
                                         r"\(\d+,\)\), which the model lacks \(no "
                                         r"rep/params/encoder/dense/bias\)"):
        init_lib.initialize(both, {**config.init, "skip": ""})
    with pytest.raises(ValueError, match=r"the model holds the models \['few', 'rep'\]: dst must "
                                         "start with one of them"):
        init_lib.initialize(both, {"path": tmp_path / "sup"})
    # A FedAffect run's {rep, few} states: both models by name, or one model's subtree.
    _save(tmp_path / "fa", 2, {"rep": LearnerState(rep["params"], (), {}),
                               "few": LearnerState(few["params"], (), {})})
    out, _ = init_lib.initialize(both, {"path": tmp_path / "fa"})
    _assert_equal(out, {"rep": rep, "few": few})
    fresh = _random(_shapes(encoder, (1, 48, 48, 1)), 3)
    out, _ = init_lib.initialize(fresh, {"path": tmp_path / "fa", "src": "rep/encoder",
                                         "skip": "dense|head"})
    _assert_equal({k: v for k, v in out["params"].items() if k not in ("dense", "head")}, body)
    with pytest.raises(ValueError, match=r"the checkpoint holds the models \['few', 'rep'\]: src "
                                         "must start with one of them"):
        init_lib.initialize(fresh, {"path": tmp_path / "fa"})


def test_fedaffect_4stage_encoder_takes_the_supervised_4stage_classifier(tmp_path, make_config):
    """model=small_cnn_4stage is configs/supervised.py's small_cnn with GroupNorm, its last pool
    left out: every conv and norm of that classifier initialises both FedAffect encoders."""
    sup = make_config("supervised", "data=fer2013", **{"model.kwargs.norm": "group"})
    stored = _random(_shapes(models.get_model(sup.model.name, num_classes=7,
                                              **sup.model.kwargs), (1, 48, 48, 1)), 1)
    _save(tmp_path / "sup", 3, _state("centralized", stored))
    config = make_config("fedaffect", "data=fer2013,representation=none,model=small_cnn_4stage")
    config.init.update(path=str(tmp_path / "sup"), dst="rep/encoder", skip="dense|head")
    rep_model, few_model = fedaffect.build_models(config, 7)
    rep_vars, few_vars = _random(jax.eval_shape(
        lambda: fedaffect.init_variables(config, rep_model, few_model, 7)), 2)
    rep, few = fedaffect.apply_init(config, rep_vars, few_vars)
    body = {k: v for k, v in stored["params"].items() if k not in ("dense", "head")}
    assert sorted(body) == sorted(few["params"]["encoder"])
    _assert_equal(few["params"]["encoder"], body)
    _assert_equal(rep["params"]["encoder"], body)
    maps = few_model.apply(few, jnp.zeros((2, 48, 48, 1)), train=False,
                           method=few_model.features)
    assert maps.shape == (2, 6, 6, 192)  # the relation module's input: 6x6, not 3x3


def test_vfer_backbone_from_config_init_and_model_weights(tmp_path, make_config):
    config = make_config("vfer", "runlocal")
    assert config.model.width == WIDTH
    fresh = _random(jax.eval_shape(lambda: vfer_models.backbone(WIDTH).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 48, 48, 3)), train=False)), 4)
    sd = _torch_state_dict(np.random.default_rng(0))
    expected = convert.load_flax_variables(convert.from_torch_state_dict(sd), fresh)
    sd["classifier.1.weight"] = np.ones((7, 1280), np.float32)  # torchvision's head: not read.
    sd["classifier.1.bias"] = np.ones(7, np.float32)
    convert.save_npz(convert.from_torch_state_dict(sd), tmp_path / "f.npz")
    assert vfer.init_backbone(config, fresh) == (fresh, None)
    config.model.weights = str(tmp_path / "f.npz")
    out, digest = vfer.init_backbone(config, fresh)
    _assert_equal(out, expected)
    assert digest == convert.file_digest(tmp_path / "f.npz")  # The feature cache's old key.
    config.model.weights = ""
    config.init.path = str(tmp_path / "f.npz")
    with pytest.raises(ValueError, match=r"f.npz: the checkpoint has params/head/bias \(shape "
                                         r"\(7,\)\), which the model lacks; a checkpoint of "):
        vfer.init_backbone(config, fresh)
    config.init.skip = "head"
    written = {}
    writer = types.SimpleNamespace(write_json=lambda name, payload: written.update({name: payload}))
    out, digest = vfer.init_backbone(config, fresh, writer=writer)
    _assert_equal(out, expected)
    assert len(digest) == 16 and written["init.json"]["not_read"] == ["params/head/bias",
                                                                      "params/head/kernel"]


def test_from_config_and_every_driver_validates_the_block(tmp_path, make_config):
    run = tmp_path / "run"
    model = _nest({"params/conv/kernel": (3, 3, 1, 4)}, 1)
    _save(run, 3, {"params": _nest({"params/conv/kernel": (3, 3, 1, 4)}, 2)["params"],
                   "step": np.int32(3)})
    config = make_config("supervised", "runlocal")
    assert init_lib.from_config(config, model) is model  # path '': no init.
    written = {}
    writer = types.SimpleNamespace(write_json=lambda name, payload: written.update({name: payload}))
    config.init.path = str(run)
    out = init_lib.from_config(config, model, writer=writer)
    assert out["params"]["conv"]["kernel"] is not model["params"]["conv"]["kernel"]
    assert written["init.json"]["step"] == 3
    assert written["init.json"]["loaded"] == ["params/conv/kernel"]
    for name, arg in [("supervised", "runlocal"), ("fedavg", "runlocal"), ("esr", "runlocal"),
                      ("manet", "runlocal"), ("occlusion", "runlocal"), ("fedaffect", "runlocal"),
                      ("vfer", "runlocal")]:
        config = make_config(name, arg)
        assert config.init.to_dict() == {"path": "", "step": 0, "src": "", "dst": "", "skip": ""}
        validate = experiments.get(config.experiment).validate_config
        config.init.path = str(run)
        validate(config)
        config.init.path = str(tmp_path / "nowhere")
        with pytest.raises(ValueError, match=r"config.init.path='.*nowhere': expected an existing "
                                             r"fer_jax run --workdir or weights file"):
            validate(config)
    config.init.path, config.model.weights = str(run), str(run)
    with pytest.raises(ValueError, match="config.model.weights=.*: expected '' when "
                                         "config.init.path is set"):
        validate(config)


@pytest.mark.parametrize("overrides,message", [
    ({"init.path": "{tmp}/empty"}, "config.init.path='{tmp}/empty': expected the --workdir of a "
                                   "fer_jax run with a finished checkpoint; {tmp}/empty/"
                                   "checkpoints has none"),
    ({"init.path": "{tmp}/w.txt"}, "config.init.path='{tmp}/w.txt': expected a fer_jax run "
                                   "--workdir or a weights file (.npz, .h5"),
    ({"init.path": "{tmp}/run", "init.step": 7}, "config.init.step=7: expected 0 (the latest) or "
                                                 "one of the checkpoint steps of {tmp}/run: [3]"),
    ({"init.path": "{tmp}/w.npz", "init.step": 2}, "config.init.step=2: expected 0 for a "
                                                   "weights file"),
    ({"init.step": -1}, "config.init.step=-1: expected >= 0"),
    ({"init.src": "encoder"}, "config.init.src='encoder': expected '' without config.init.path"),
    ({"init.path": "{tmp}/run", "init.skip": "head("}, "config.init.skip='head(': expected a "
                                                       "regular expression"),
    ({"init.path": "{tmp}/run", "init.src": "a,b,c", "init.dst": "x,y"},
     "config.init.src / config.init.dst: src 'a,b,c' and dst 'x,y' list 3 and 2 paths"),
])
def test_config_init_errors_name_the_field(tmp_path, make_config, overrides, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "w.txt").write_text("")
    np.savez(tmp_path / "w.npz", x=np.zeros(1))
    _save(tmp_path / "run", 3, {"params": _nest({"params/w": (2,)}, 0)["params"],
                                "step": np.int32(3)})
    config = make_config("supervised", "runlocal",
                         **{k: v.format(tmp=tmp_path) if isinstance(v, str) else v
                            for k, v in overrides.items()})
    with pytest.raises(ValueError) as e:
        supervised.validate_config(config)
    assert message.format(tmp=tmp_path) in str(e.value)


@pytest.mark.slow  # > 20 s on 2 cores: CI's slow step
def test_pretrain_then_adapt_through_main(tmp_path):
    """The WORKSPACE.md chain at toy size: a centralized run, then FedAvg started from it. With
    a server learning rate of 1e-12 the round-1 server model is the initial one (to 1e-12 times
    the clients' mean update): every leaf but the skipped head is the pre-trained run's."""
    tiny = ["--config.data.synthetic.num_subjects=6", "--config.data.synthetic.images_per_class=2",
            "--config.data.synthetic.test_subjects=2"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")

    def main(workdir, config, *args):
        result = subprocess.run([sys.executable, "-m", "fer_jax.main", f"--workdir={workdir}",
                                 config, *tiny, *args], cwd=REPO, capture_output=True, text=True,
                                timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]

    main(tmp_path / "pre", "--config=configs/fedavg.py:runlocal,mode=centralized",
         "--config.train.num_steps=3", "--config.train.batch_size=8")
    main(tmp_path / "adapt", "--config=configs/fedavg.py:runlocal",
         f"--config.init.path={tmp_path / 'pre'}", "--config.init.skip=head",
         "--config.fed.rounds=1", "--config.fed.cohort_size=2",
         "--config.fed.server_learning_rate=1e-12")
    report = json.loads((tmp_path / "adapt" / "init.json").read_text())
    assert report["step"] == 3 and report["skipped"] == ["params/head/bias", "params/head/kernel"]
    pre = Checkpointer(tmp_path / "pre", every_steps=1)
    adapt = Checkpointer(tmp_path / "adapt", every_steps=1)
    before, after = pre._manager.restore(3), adapt._manager.restore(1)
    pre.close()
    adapt.close()
    assert len(report["loaded"]) == len(jax.tree.leaves(before["params"])) - 2
    params = after["variables"]["params"]
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9),
                 {k: v for k, v in params.items() if k != "head"},
                 {k: v for k, v in before["params"].items() if k != "head"})
    assert not np.array_equal(params["head"]["kernel"], before["params"]["head"]["kernel"])

