"""The diversity driver: config checks and warnings, end-to-end ESR / MA-Net runs, exact resume,
the federated path, and the shipped config arguments."""

import json
import shutil
import warnings

import jax
import numpy as np
import pytest

from fer_jax.experiments import diversity

# 24x24 synthetic faces ('same' padding): 128 training images, 8 steps per epoch at batch 16.
TINY = {"data.synthetic.num_subjects": 6, "data.synthetic.images_per_class": 4,
        "data.synthetic.test_subjects": 2, "data.image_size": 24, "train.batch_size": 16,
        "eval_batch_size": 64, "log_every_steps": 4, "checkpoint_every_steps": 4}


def _final_params(workdir):
    from fer_jax.io.checkpoint import Checkpointer

    ckpt = Checkpointer(workdir, every_steps=1)
    step = ckpt.latest_step()
    state = ckpt._manager.restore(step)
    ckpt.close()
    return step, state


@pytest.mark.parametrize("overrides,message", [
    ({"model.name": "resnet18"}, "config.model.name='resnet18': expected one of"),
    ({"diversity.gamma": -1.0}, "config.diversity.gamma=-1.0"),
    ({"diversity.bandwidth": "silverman"}, "config.diversity.bandwidth='silverman'"),
    ({"esr.restart_schedule": True}, "config.esr.restart_schedule=True"),
    ({"train.schedule": "cosine_restarts"}, "config.train.schedule='cosine_restarts'"),
    ({"diversity.spatial_weight": -1.0}, "config.diversity.spatial_weight=-1.0"),
    ({"model.kwargs.padding": "valid"}, "config.data.image_size=32: expected >= 54"),
    ({"model.kwargs.width": 0.0}, "width must be > 0"),
    ({"esr.new_branch_init": "clone"}, "config.esr.new_branch_init='clone'"),
    ({"train.optimizer": "rmsprop"}, "config.train.optimizer='rmsprop'"),
    ({"augment.flip": 2.0}, "flip"),
    ({"data.channels": 2}, "config.data.channels=2"),
])
def test_bad_config_names_the_field(make_config, overrides, message):
    config = make_config("esr", "runlocal", **overrides)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        diversity.validate_config(config)


def test_federated_config_checks(make_config):
    diversity.validate_config(make_config("esr", "runlocal,mode=federated"))
    diversity.validate_config(make_config("manet", "runlocal,mode=federated"))
    with pytest.raises(ValueError, match="config.model.kwargs.norm='batch'"):
        diversity.validate_config(make_config("esr", "runlocal,mode=federated",
                                              **{"model.kwargs.norm": "batch"}))
    with pytest.raises(ValueError, match="config.fed.partition='subject'"):
        diversity.validate_config(make_config("esr", "data=fer2013,mode=federated",
                                              **{"fed.partition": "subject"}))


def test_one_branch_and_batch_of_one_warn(make_config):
    with pytest.warns(UserWarning, match="num_branches=1: there is no diversity term"):
        diversity.validate_config(make_config("esr", "runlocal", **{"model.kwargs.num_branches":
                                                                     1}))
    with pytest.warns(UserWarning, match="batch size 1"):
        diversity.validate_config(make_config("esr", "runlocal", **{"train.batch_size": 1}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        diversity.validate_config(make_config("esr", "runlocal"))  # No warning by default.


def test_config_arguments(make_config):
    c = make_config("esr", "data=ferplus")
    assert (c.data.name, c.data.image_size, c.data.channels) == ("ferplus", 96, 3)
    assert c.model.kwargs.padding == "valid" and c.model.kwargs.num_branches == 9
    c = make_config("esr", "data=fer2013,branches=15,size=48")
    assert (c.data.image_size, c.data.channels, c.model.kwargs.padding) == (48, 1, "same")
    assert c.model.kwargs.num_branches == 15
    c = make_config("esr", "mode=federated")
    assert c.mode == "federated" and not c.esr.progressive and c.model.kwargs.norm == "group"
    c = make_config("manet", "data=ferplus")
    assert c.diversity.local_weight == 0.6 and c.model.kwargs.width == 64
    for name, arg in (("esr", None), ("esr", "data=ferplus"), ("manet", None),
                      ("manet", "data=fer2013,mode=federated")):
        diversity.validate_config(make_config(name, arg))
    with pytest.raises(ValueError, match="size=64"):
        make_config("esr", "size=64")
    c = make_config("esr", "runlocal")  # One compile: all branches from step 1, 32x32.
    assert (c.data.image_size, c.esr.progressive, c.diversity.bandwidth) == (32, False, "median")
    assert make_config("esr", None).esr.progressive
    diversity.validate_config(make_config("esr", "recipe=paper"))
    diversity.validate_config(make_config("manet", "runlocal,recipe=paper"))
    with pytest.raises(ValueError, match="unknown config argument 'bogus'"):
        make_config("manet", "bogus")
    sweep = __import__("configs.esr", fromlist=["get_sweep"]).get_sweep()
    assert len(sweep) == 4 and sweep[0]["model.kwargs.cbam"] is False


@pytest.mark.slow  # ~45 s; test_esr_runlocal_end_to_end_and_exact_resume covers more, also slow.
def test_esr_runlocal_end_to_end(tmp_path, make_config):
    """configs/esr.py:runlocal through the driver: progressive ESR-2, outputs, early exits."""
    from fer_jax.io.metrics import read_jsonl

    config = make_config("esr", "runlocal", **{**TINY, "esr.progressive": True,
        "train.num_steps": 8, "model.kwargs.num_branches": 2, "model.kwargs.width": 0.125})
    diversity.validate_config(config)
    results = diversity.run(config, str(tmp_path))
    for name in ("config.json", "eval.json", "metrics.jsonl", "confusion_matrix.png"):
        assert (tmp_path / name).is_file(), name
    train = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert [(r["step"], r["train/active_branches"]) for r in train] == [(4, 1), (8, 2)]
    assert train[0]["train/d_sp"] == 0.0 and 0.0 < train[1]["train/d_sp"] < 1.0
    # The default bandwidth (median) keeps the term live: a gradient, S off both ends.
    assert train[1]["train/div_grad_norm"] > 0.0
    assert train[1]["train/s_lo_sp"] < 1.0 and train[1]["train/s_hi_sp"] < 1.0
    assert np.isfinite([r["train/loss"] for r in train]).all()
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert len(saved["test"]["branch_accuracy"]) == 2
    assert saved["test"]["early_exit_accuracy"][-1] == pytest.approx(results["test"]["accuracy"])
    assert _final_params(tmp_path)[0] == 8


@pytest.mark.slow
def test_esr_runlocal_end_to_end_and_exact_resume(tmp_path, make_config):
    from fer_jax.io.metrics import read_jsonl

    config = make_config("esr", "runlocal", **{**TINY, "esr.progressive": True,
        "train.num_steps": 12, "model.kwargs.num_branches": 2, "model.kwargs.width": 0.125,
        "esr.new_branch_init": "copy", "esr.old_branch_lr_scale": 0.2,
        "checkpoint_every_steps": 6})
    diversity.validate_config(config)
    results = diversity.run(config, str(tmp_path))
    for name in ("config.json", "eval.json", "metrics.jsonl", "confusion_matrix.png"):
        assert (tmp_path / name).is_file(), name
    records = read_jsonl(tmp_path / "metrics.jsonl")
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [4, 8, 12]
    # Progressive: 1 branch for steps 0-5, 2 for steps 6-11; diversity only with 2.
    assert [r["train/active_branches"] for r in train] == [1, 2, 2]
    assert train[0]["train/d_sp"] == 0.0
    assert np.isfinite([r["train/loss"] for r in train]).all()
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert len(saved["test"]["early_exit_accuracy"]) == 2
    assert len(saved["test"]["branch_accuracy"]) == 2
    assert saved["test"]["early_exit_accuracy"][-1] == pytest.approx(results["test"]["accuracy"])
    step, first = _final_params(tmp_path)
    assert step == 12

    # Resume from step 6: the first step of stage 2, where branch 1 is copied from branch 0.
    shutil.rmtree(tmp_path / "checkpoints" / "12")
    assert _final_params(tmp_path)[0] == 6
    diversity.run(config, str(tmp_path))
    _, second = _final_params(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, first, second)


@pytest.mark.slow
def test_manet_runlocal_end_to_end(tmp_path, make_config):
    config = make_config("manet", "runlocal", **{**TINY,
        "train.num_steps": 4, "model.kwargs.width": 4})
    diversity.validate_config(config)
    results = diversity.run(config, str(tmp_path))
    assert {"global_accuracy", "local_accuracy", "accuracy"} <= set(results["test"])
    from fer_jax.io.metrics import read_jsonl

    train = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert all(0.0 <= r["train/d_b"] <= 1.0 for r in train)


@pytest.mark.slow
def test_esr_federated_end_to_end(tmp_path, make_config):
    config = make_config("esr", "runlocal,mode=federated", **{**TINY,
        # A chunk must cover every (fake, conftest) device of the clients mesh.
        "fed.layout": "fixed", "fed.clients_per_call": jax.device_count(),
        "fed.rounds": 2, "fed.cohort_size": 2, "fed.batch_size": 16, "eval_every_rounds": 1,
        "checkpoint_every_rounds": 1, "model.kwargs.num_branches": 2,
        "model.kwargs.width": 0.125})
    diversity.validate_config(config)
    results = diversity.run(config, str(tmp_path))
    assert results["rounds"] == 2 and len(results["test"]["early_exit_accuracy"]) == 2
    from fer_jax.io.metrics import read_jsonl

    rounds = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in rounds] == [1, 2]
    assert all(0.0 <= r["train/d_sp"] <= 1.0 and np.isfinite(r["train/ce"]) for r in rounds)
    assert _final_params(tmp_path)[0] == 2


@pytest.mark.slow
def test_ferplus_esr_smoke(tmp_path, make_config, shared_data):
    """Real FER+ (8 classes, majority labels) through the ESR config, a few steps."""
    config = make_config("esr", "data=ferplus,size=48", **{
        "data.manual_dir": str(shared_data / "fer2013"), "train.num_steps": 3,
        "train.batch_size": 8, "model.kwargs.num_branches": 2, "model.kwargs.width": 0.125,
        "eval_batch_size": 512, "log_every_steps": 1})
    diversity.validate_config(config)
    results = diversity.run(config, str(tmp_path))
    assert len(results["class_names"]) == 8 and "contempt" in results["class_names"]
    from fer_jax import data as data_lib

    # The whole PrivateTest split with FER+ majority labels is evaluated.
    assert results["test"]["num_examples"] == len(data_lib.load(config.data)["test"])
