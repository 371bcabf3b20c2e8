"""configs/fedavg.py end to end: per-round metrics, partition report, exact resume, bad values."""

import json
import shutil

import jax
import numpy as np
import pytest

BASE = {"fed.rounds": 4, "fed.cohort_size": 3, "eval_every_rounds": 2,
        "checkpoint_every_rounds": 2, "data.synthetic.num_subjects": 8,
        "data.synthetic.images_per_class": 3, "data.synthetic.test_subjects": 2}


def _params(workdir):
    from fer_jax.io.checkpoint import Checkpointer

    ckpt = Checkpointer(workdir, every_steps=1)
    step = ckpt.latest_step()
    state = ckpt._manager.restore(step)
    ckpt.close()
    return step, [np.asarray(x) for x in jax.tree.leaves(state["variables"])]


@pytest.mark.slow  # > 20 s on 2 cores: CI's slow step
def test_fedavg_round_metrics_and_exact_resume(tmp_path, make_config):
    from fer_jax.experiments import supervised as fedavg
    from fer_jax.io.metrics import read_jsonl

    config = make_config("fedavg", "runlocal", **BASE)
    fedavg.validate_config(config)
    fedavg.run(config, str(tmp_path))
    for name in ("config.json", "eval.json", "metrics.jsonl", "confusion_matrix.png",
                 "partition.json"):
        assert (tmp_path / name).is_file(), name
    partition = json.loads((tmp_path / "partition.json").read_text())
    assert partition["num_clients"] == 6  # 8 subjects, 2 held out: one client per subject.
    rounds = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "round/clients" in r]
    assert [r["step"] for r in rounds] == [1, 2, 3, 4]
    for r in rounds:
        assert r["round/clients"] == 3
        assert r["round/examples"] == 3 * 8 * 3  # 3 clients x 8 classes x 3 images.
        assert 0 < r["round/padding_efficiency"] <= 1
        assert np.isfinite(r["train/loss"])
        # The automatic layout for a CNN on CPU: a client per device, one local step per call.
        assert (r["layout/clients_per_call"], r["layout/vmap_width"],
                r["layout/steps_per_call"]) == (jax.device_count(), 1, 1)
    step, straight = _params(tmp_path)
    assert step == 4

    shutil.rmtree(tmp_path / "checkpoints" / "4")  # Resume from round 2.
    fedavg.run(config, str(tmp_path))
    step, resumed = _params(tmp_path)
    assert step == 4
    for a, b in zip(straight, resumed, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("field,value,message", [
    ("fed.partition", "random", "config.fed.partition='random'"),
    ("fed.server_optimizer", "fedsgd", "config.fed.server_optimizer='fedsgd'"),
    ("fed.dirichlet_alpha", 0.0, "config.fed.dirichlet_alpha=0.0"),
    ("fed.tail_multiple", 17, "config.fed.tail_multiple=17"),
    # The automatic layout chooses these: a value set beside it would be silently ignored.
    ("fed.clients_per_call", 4, "config.fed.clients_per_call=4.*fed.layout='fixed'"),
    ("fed.unroll", False, "config.fed.unroll=False.*fed.layout='fixed'"),
])
def test_bad_values_name_the_field(field, value, message, make_config):
    from fer_jax.experiments import supervised as fedavg

    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace(r"\.*", ".*")):
        fedavg.validate_config(make_config("fedavg", "runlocal", **BASE, **{field: value}))


def test_fixed_layout_takes_the_layout_knobs(make_config):
    from fer_jax.experiments import supervised as fedavg

    fedavg.validate_config(make_config("fedavg", "runlocal", **BASE, **{
        "fed.layout": "fixed", "fed.clients_per_call": 4, "fed.unroll": False}))


def test_subject_partition_needs_subject_ids(make_config):
    from fer_jax.experiments import supervised as fedavg

    config = make_config("fedavg", "runlocal", **{**BASE, "data.name": "fer2013"})
    with pytest.raises(ValueError, match="iid or dirichlet"):
        fedavg.validate_config(config)
