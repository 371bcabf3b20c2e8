"""The experiments' metric series: periodic evaluations on the validation split are `val/*`, the
final test evaluation alone is `eval/*` (a learning curve never mixes the two)."""

import json

import pytest
from test_real_data import _write_tiny

from configs import supervised as supervised_config
from fer_jax.experiments import supervised
from fer_jax.io.metrics import read_jsonl


def test_validation_and_test_series_are_apart(tmp_path):
    config = supervised_config.get_config("data=fer2013")
    config.data.manual_dir = str(_write_tiny(tmp_path / "raw", votes=False))
    config.data.data_dir = str(tmp_path / "tfds")
    config.train.batch_size = 2
    config.train.num_epochs = 3
    config.train.warmup_epochs = 0.0
    config.model.kwargs.widths = (4, 4, 4, 4)
    config.model.kwargs.dense = 8
    config.eval_batch_size = 4
    config.checkpoint_every_steps = 100
    config.log_every_steps = 1
    workdir = tmp_path / "run"
    supervised.run(config, str(workdir))

    records = read_jsonl(workdir / "metrics.jsonl")
    val = [r for r in records if "val/accuracy" in r]
    test = [r for r in records if "eval/accuracy" in r]
    result = json.loads((workdir / "eval.json").read_text())
    assert [r["step"] for r in val] == [1, 2, 3]  # every epoch (1 step each), the last at the end
    assert len(test) == 1 and test[0]["eval/accuracy"] == pytest.approx(
        result["test"]["accuracy"])
    assert val[-1]["val/accuracy"] == pytest.approx(result["validation"]["accuracy"])


def _tiny_fer(config, tmp_path):
    config.data.manual_dir = str(_write_tiny(tmp_path / "raw", votes=False))
    config.data.data_dir = str(tmp_path / "tfds")
    return config


@pytest.mark.slow  # ~30 s: compiles an ESR client step
def test_federated_diversity_evaluates_rounds_on_validation(tmp_path, make_config):
    from fer_jax.experiments import diversity

    config = _tiny_fer(make_config("esr", "runlocal,mode=federated,data=fer2013,size=48", **{
        "data.image_size": 24, "fed.partition": "iid", "fed.num_clients": 2,
        "fed.cohort_size": 2, "fed.rounds": 2, "fed.batch_size": 2, "eval_every_rounds": 1,
        "checkpoint_every_rounds": 1, "eval_batch_size": 4}), tmp_path)
    workdir = tmp_path / "run"
    diversity.run(config, str(workdir))
    records = read_jsonl(workdir / "metrics.jsonl")
    val = [r["step"] for r in records if "val/accuracy" in r]
    test = [r for r in records if "eval/accuracy" in r]
    assert val == [1, 2]  # round 1, then the final validation report
    assert len(test) == 1 and test[0]["step"] == 2


@pytest.mark.slow  # ~30 s: compiles the occlusion step
def test_occlusion_evaluates_epochs_on_validation(tmp_path, make_config):
    from fer_jax.experiments import occlusion

    config = _tiny_fer(make_config("occlusion", "runlocal,data=fer2013", **{
        "train.batch_size": 2, "train.num_epochs": 2, "train.num_steps": 0, "eval_batch_size": 4,
        "occlusion.eval_modes": "clean"}), tmp_path)
    workdir = tmp_path / "run"
    occlusion.run(config, str(workdir))
    records = read_jsonl(workdir / "metrics.jsonl")
    # Per epoch but the last (the loop leaves the end to the final evaluation).
    assert [r["step"] for r in records if "val/clean_accuracy" in r] == [1]
    test = [r for r in records if "eval/clean_accuracy" in r]  # the final test evaluation only
    assert len(test) == 1 and test[0]["step"] == 2
