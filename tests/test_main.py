"""The entry point end to end: config errors before any work, runlocal outputs, exact resume."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--config.train.num_steps=24", "--config.checkpoint_every_steps=8",
        "--config.log_every_steps=4", "--config.data.synthetic.num_subjects=6",
        "--config.data.synthetic.images_per_class=4", "--config.data.synthetic.test_subjects=2"]


def _main(workdir, *args, timeout=300):
    cmd = [sys.executable, "-m", "fer_jax.main", f"--workdir={workdir}", *args]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def _final_params(workdir):
    from fer_jax.io.checkpoint import Checkpointer

    ckpt = Checkpointer(workdir, every_steps=1)
    step = ckpt.latest_step()
    state = ckpt._manager.restore(step)
    ckpt.close()
    return step, state


@pytest.mark.parametrize("args,message", [
    (["--config=configs/supervised.py", "--config.train.nope=1"], "nope"),
    (["--config=configs/supervised.py", "--config.train.optimizer=rmsprop"],
     "config.train.optimizer='rmsprop': expected one of"),
    (["--config=configs/supervised.py:data=imagenet"], "config.data.name='imagenet'"),
    (["--config=configs/supervised.py:bogus"], "unknown config argument 'bogus'"),
    (["--config=configs/supervised.py", "--config.augment.flip=2.0"], "augment.flip"),
])
def test_bad_config_fails_before_any_work(tmp_path, args, message):
    workdir = tmp_path / "run"
    result = _main(workdir, *args)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert not workdir.exists()  # Nothing was written.


@pytest.mark.slow  # > 20 s on 2 cores: CI's slow step
def test_cpu_devices_splits_the_host_for_the_clients_axis(tmp_path):
    assert "--cpu_devices must be >= 0" in _main(tmp_path / "bad", "--cpu_devices=-1",
                                                 "--config=configs/fedavg.py:runlocal").stderr
    assert not (tmp_path / "bad").exists()
    result = _main(tmp_path / "run", "--cpu_devices=2", "--config=configs/fedavg.py:runlocal",
                   "--config.fed.rounds=1", "--config.fed.cohort_size=2",
                   "--config.data.synthetic.num_subjects=4",
                   "--config.data.synthetic.images_per_class=2",
                   "--config.data.synthetic.test_subjects=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 local / 2 global devices" in result.stderr
    # One client per device: the experiment rounds clients_per_call up to the device count.
    assert "fed.clients_per_call 1 -> 2" in result.stderr
    assert (tmp_path / "run" / "eval.json").is_file()


@pytest.mark.parametrize("flag,name,mode,fed,distributed,expected", [
    (None, "supervised", "federated", {"cohort_size": 10}, False, 2),  # one device per core
    (None, "supervised", "federated", {"cohort_size": 1}, False, 1),   # at most the cohort
    (None, "fedaffect", "federated", None, False, 2),                  # no config.fed
    (None, "vfer", "federated", None, False, 1),         # measured slower on a split host
    (None, "supervised", "centralized", {"cohort_size": 10}, False, 1),
    (None, "prepare", None, None, False, 1),
    (None, "supervised", "federated", {"cohort_size": 10}, True, 1),   # multi-process
    (0, "supervised", "federated", {"cohort_size": 10}, False, 0),     # explicit: as given
    (3, "vfer", "centralized", None, False, 3),
])
def test_host_cpu_split_by_default_only_for_measured_federated_runs(
        flag, name, mode, fed, distributed, expected):
    import ml_collections

    from fer_jax import experiments

    config = ml_collections.ConfigDict({"experiment": name, **({"mode": mode} if mode else {})})
    if fed is not None:
        config.fed = fed
    if name == "fedaffect":
        config.repr = {"cohort_size": 3}
        config.fewshot = {"cohort_size": 5}
    n, why = experiments.host_cpu_devices(config, requested=flag, distributed=distributed,
                                          cores=2)
    assert n == expected
    assert ("automatic" in why) == (flag is None)
    if name == "fedaffect" and flag is None:  # its cohort: the larger of its two engines'
        assert experiments.host_cpu_devices(config, cores=16)[0] == 5


def test_missing_data_dir_is_a_clear_error(tmp_path):
    result = _main(tmp_path / "run", "--config=configs/supervised.py:data=fer2013",
                   f"--config.data.manual_dir={tmp_path / 'nowhere'}")
    assert result.returncode != 0
    assert "nowhere" in result.stderr and "fer2013.csv" in result.stderr, result.stderr[-2000:]


@pytest.mark.slow  # > 20 s on 2 cores: CI's slow step
def test_runlocal_writes_outputs_and_resumes(tmp_path, make_config):
    from fer_jax.experiments import supervised
    from fer_jax.io.metrics import read_jsonl

    config = make_config("supervised", "runlocal", **{
        "train.num_steps": 24, "checkpoint_every_steps": 8, "log_every_steps": 4})
    results = supervised.run(config, str(tmp_path))
    for name in ("config.json", "eval.json", "metrics.jsonl", "confusion_matrix.png"):
        assert (tmp_path / name).is_file(), name
    assert list((tmp_path / "tb").iterdir()), "no TensorBoard events"
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "train/loss" in r] == list(range(4, 25, 4))
    assert 0.0 <= results["test"]["accuracy"] <= 1.0
    assert json.loads((tmp_path / "eval.json").read_text())["steps"] == 24
    step, first = _final_params(tmp_path)
    assert step == 24

    # Drop the final checkpoint: the rerun must resume from step 16 and end on identical params.
    import shutil

    shutil.rmtree(tmp_path / "checkpoints" / "24")
    assert _final_params(tmp_path)[0] == 16
    supervised.run(config, str(tmp_path))
    step, second = _final_params(tmp_path)
    assert step == 24
    for a, b in zip(_leaves(first["params"]), _leaves(second["params"]), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # > 20 s on 2 cores: CI's slow step
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, make_config):
    from fer_jax.experiments import supervised

    same = {"train.warmup_epochs": 0.0, "train.optimizer": "sgd", "checkpoint_every_steps": 8}
    supervised.run(make_config("supervised", "runlocal", **{"train.num_steps": 8, **same}),
                   str(tmp_path))
    bad = make_config("supervised", "runlocal", **{
        "train.num_steps": 40, "log_every_steps": 4, "train.learning_rate": 1e38, **same})
    with pytest.raises(FloatingPointError, match="last good checkpoint \\(step 8\\)"):
        supervised.run(bad, str(tmp_path))
    step, state = _final_params(tmp_path)
    assert step == 8
    assert all(np.isfinite(x).all() for x in _leaves(state["params"]))


@pytest.mark.slow
def test_killed_run_resumes_to_identical_params(tmp_path):
    args = ["--config=configs/supervised.py:runlocal", *TINY]
    straight = _main(tmp_path / "straight", *args)
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fer_jax.main", f"--workdir={killed_dir}", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (killed_dir / "checkpoints" / "8").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "checkpoints" / "24").exists(), "the run finished before the kill"
    resumed = _main(killed_dir, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from the checkpoint" in resumed.stderr
    (_, a), (_, b) = _final_params(tmp_path / "straight"), _final_params(killed_dir)
    for x, y in zip(_leaves(a["params"]), _leaves(b["params"]), strict=True):
        np.testing.assert_array_equal(x, y)


def _leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_resume_with_a_changed_state_structure_is_a_clear_error(tmp_path):
    import jax.numpy as jnp

    from fer_jax.io.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path, every_steps=1)
    ckpt.save(1, {"w": jnp.ones(3)})
    with pytest.raises(ValueError, match="step 1 .* does not have the structure of this run"):
        ckpt.restore_or({"w": jnp.ones(3), "momentum": jnp.zeros(3)})
    ckpt.close()
