"""Checkpointer guards: non-finite states refused, damaged checkpoints skipped, chosen steps."""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from fer_jax.io import checkpoint as ckpt_lib
from fer_jax.io.checkpoint import Checkpointer, NonFiniteStateError
from fer_jax.io.metrics import MetricWriter, read_jsonl

_NOISE = np.random.default_rng(0).uniform(-1, 1, (64, 32)).astype(np.float32)


def _state(scale: float):
    """A state shaped like a training one: float params and moments, int step, uint32 key.

    `noise` (|x| < 1) makes the stored data incompressible, so a cut file cannot still decode.
    """
    return {"params": {"w": jnp.full((64, 32), scale), "b": jnp.zeros(32),
                       "noise": jnp.asarray(_NOISE)},
            "opt_state": {"nu": jnp.full((64, 32), scale * scale)},
            "step": jnp.asarray(3, jnp.int32), "rng": jnp.asarray([1, 2], jnp.uint32)}


def _truncate_largest_data_file(step_dir: pathlib.Path) -> pathlib.Path:
    files = list(step_dir.glob("default/ocdbt.process_*/d/*"))
    victim = max(files, key=lambda p: p.stat().st_size)
    data = victim.read_bytes()
    victim.write_bytes(data[:len(data) // 2])
    return victim


def test_finite_check_names_the_bad_leaves_and_the_largest_value():
    state = _state(2.0)
    state["opt_state"]["nu"] = state["opt_state"]["nu"].at[3, 4].set(jnp.inf)
    state["host"] = np.array([np.nan, 1.0], np.float32)  # A NumPy leaf is checked on host.
    bad, largest = ckpt_lib.finite_check(state)
    assert bad == ["opt_state/nu", "host"]
    assert largest == 2.0  # Over the finite leaves: w (nu holds the Inf).
    assert ckpt_lib.finite_check(_state(-7.0)) == ([], 49.0)


def test_non_finite_state_is_never_written(tmp_path):
    ckpt = Checkpointer(tmp_path, every_steps=1)
    with pytest.raises(NonFiniteStateError, match="no checkpoint has been written yet"):
        ckpt.save(1, _state(np.nan))
    assert ckpt.latest_step() is None
    assert "no checkpoint has been written yet" in ckpt.describe_last_good()

    ckpt.save(2, _state(1.0))
    # A learning rate of 1e30: the weights overflow to Inf (finite ones of 1e30 square to Inf).
    with pytest.raises(NonFiniteStateError) as info:
        ckpt.save(3, _state(1e30))
    message = str(info.value)
    assert isinstance(info.value, FloatingPointError)
    assert "step 3" in message and "opt_state/nu" in message and "params/w" not in message
    assert f"last good checkpoint (step 2) is kept in {tmp_path / 'checkpoints' / '2'}" in message
    assert ckpt.latest_step() == 2 and not (tmp_path / "checkpoints" / "3").exists()
    ckpt.close()


def test_describe_last_good_reports_magnitude_and_earlier_steps(tmp_path):
    ckpt = Checkpointer(tmp_path, every_steps=1, max_to_keep=3)
    ckpt.save(1, _state(1.0))
    ckpt.save(2, _state(3e17))  # Finite but diverged.
    text = ckpt.describe_last_good()
    assert "(step 2)" in text and "largest |value| 9e+34" in text
    assert "earlier kept steps [1]" in text and "--restore_step" in text
    ckpt.close()
    # A new process reads the magnitude from the checkpoint's metadata.
    assert "largest |value| 9e+34" in Checkpointer(tmp_path, every_steps=1).describe_last_good()


def test_restore_refuses_a_non_finite_checkpoint_written_elsewhere(tmp_path):
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(tmp_path / "checkpoints")
    manager.save(1, args=ocp.args.StandardSave(_state(1.0)))
    manager.save(2, args=ocp.args.StandardSave(_state(np.inf)))
    manager.wait_until_finished()
    manager.close()
    ckpt = Checkpointer(tmp_path, every_steps=1)
    with pytest.raises(NonFiniteStateError,
                       match="step 2 .* non-finite values in opt_state/nu, params/w"):
        ckpt.restore(_state(0.0), step=2)
    assert "(step 1)" in ckpt.describe_last_good()  # Checked by reading step 2 back.
    state, step = ckpt.restore_or(_state(0.0))  # Falls back past it and sets it aside.
    assert step == 1 and float(state["params"]["w"][0, 0]) == 1.0
    assert (tmp_path / "checkpoints.set_aside" / "2").is_dir()
    ckpt.close()


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    ckpt = Checkpointer(tmp_path, every_steps=1)
    ckpt.save(40, _state(1.0))
    ckpt.save(54, _state(2.0))
    ckpt.close()
    victim = _truncate_largest_data_file(tmp_path / "checkpoints" / "54")

    ckpt = Checkpointer(tmp_path, every_steps=1)
    with caplog.at_level("WARNING"):
        state, step = ckpt.restore_or(_state(0.0))
    assert step == 40
    np.testing.assert_array_equal(state["params"]["w"], np.ones((64, 32)))
    lines = [r.getMessage() for r in caplog.records if "does not read back" in r.getMessage()]
    assert len(lines) == 1 and str(tmp_path / "checkpoints" / "54") in lines[0]
    # Set aside with its reason, so the run's next save of step 54 is not skipped.
    aside = tmp_path / "checkpoints.set_aside" / "54"
    assert (aside / victim.relative_to(tmp_path / "checkpoints" / "54")).is_file()
    assert "does not read back" in (aside / "SET_ASIDE_REASON.txt").read_text()
    assert ckpt.latest_step() == 40
    ckpt.save(54, _state(5.0))
    assert float(ckpt.restore(_state(0.0))["params"]["w"][0, 0]) == 5.0
    ckpt.close()


def test_no_intact_checkpoint_names_the_steps_and_how_to_start_afresh(tmp_path):
    ckpt = Checkpointer(tmp_path, every_steps=1)
    ckpt.save(8, _state(1.0))
    ckpt.close()
    _truncate_largest_data_file(tmp_path / "checkpoints" / "8")
    ckpt = Checkpointer(tmp_path, every_steps=1)
    with pytest.raises(ckpt_lib.CheckpointRestoreError,
                       match=r"step 8: .*--restore_step=0"):
        ckpt.restore_or(_state(0.0))
    assert ckpt.latest_step() == 8  # Nothing moved when there is nothing to fall back to.
    assert ckpt.restore_or(_state(0.0), step=0)[1] == 0  # The way out the message names.
    assert ckpt.latest_step() is None
    ckpt.close()


def test_chosen_restore_step_sets_newer_ones_aside(tmp_path, monkeypatch):
    ckpt = Checkpointer(tmp_path, every_steps=1, max_to_keep=3)
    for step in (1, 2, 3):
        ckpt.save(step, _state(float(step)))
    ckpt.close()
    monkeypatch.setenv(ckpt_lib.RESTORE_STEP_ENV, "2")  # What `main --restore_step=2` sets.
    ckpt = Checkpointer(tmp_path, every_steps=1, max_to_keep=3)
    state, step = ckpt.restore_or(_state(0.0))
    assert step == 2 and float(state["params"]["w"][0, 0]) == 2.0
    assert ckpt.latest_step() == 2 and (tmp_path / "checkpoints.set_aside" / "3").is_dir()
    with pytest.raises(ckpt_lib.CheckpointRestoreError, match="no checkpoint of step 7"):
        ckpt.restore_or(_state(0.0), step=7)
    ckpt.close()


def test_max_to_keep_is_configurable(tmp_path):
    ckpt = Checkpointer(tmp_path, every_steps=1, max_to_keep=3)
    for step in range(1, 6):
        ckpt.save(step, _state(1.0))
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                  if p.name.isdigit()) == [3, 4, 5]
    ckpt.close()
    with pytest.raises(ValueError, match="keep_checkpoints"):
        Checkpointer(tmp_path, every_steps=1, max_to_keep=0)


def test_metric_writer_truncate_after_drops_replayed_steps(tmp_path):
    writer = MetricWriter(tmp_path, tensorboard=False)
    for step in (4, 8, 12):
        writer.write(step, {"train/loss": float(step)})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 16, "train/lo')  # Cut short by SIGKILL.
    writer = MetricWriter(tmp_path, tensorboard=False)
    assert writer.truncate_after(8) == 2  # Step 12 and the cut line.
    writer.write(12, {"train/loss": 0.5})
    writer.close()
    assert [(r["step"], r["train/loss"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == [
        (4, 4.0), (8, 8.0), (12, 0.5)]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["step"] == 4


def test_metric_writer_truncate_to_records_drops_records_of_the_step_logged_after_its_save(
        tmp_path):
    writer = MetricWriter(tmp_path, tensorboard=False)
    writer.write(4, {"train/loss": 4.0})
    writer.write(8, {"train/loss": 8.0})
    saved_at = writer.records_written()  # The checkpoint of step 8 is written here.
    writer.write(8, {"test/accuracy": 0.5})  # The final evaluation, logged after the save.
    writer.close()
    writer = MetricWriter(tmp_path, tensorboard=False)
    assert saved_at == 2 and writer.records_written() == 3
    assert writer.truncate_after(8) == 0  # By step alone the evaluation would stay...
    assert writer.truncate_after(8, records=saved_at) == 1  # ...and be logged twice.
    assert writer.records_written() == 2
    writer.write(8, {"test/accuracy": 0.5})
    writer.close()
    assert [sorted(r) for r in read_jsonl(tmp_path / "metrics.jsonl")] == [
        ["step", "time", "train/loss"], ["step", "time", "train/loss"],
        ["step", "test/accuracy", "time"]]


def test_run_rerun_after_its_final_checkpoint_logs_each_record_once(tmp_path):
    from ml_collections import ConfigDict

    from fer_jax.train.run import Run

    config = ConfigDict({"mode": "centralized", "checkpoint_every_steps": 2,
                         "keep_checkpoints": 2})

    def attempt():  # Train 4 steps, save, evaluate at the last step (as the drivers do).
        run = Run(config, tmp_path)
        state, start = run.restore(_state(1.0))
        for step in range(start + 1, 5):
            run.writer.write(step, {"train/loss": float(step)})
            run.save(step, _state(float(step)), final=step == 4)
        run.writer.write(4, {"test/accuracy": 0.75})
        run.close()
        return start

    assert attempt() == 0
    assert attempt() == 4  # A rerun (or one killed after the save) evaluates step 4 again.
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], "test/accuracy" in r) for r in records] == [
        (1, False), (2, False), (3, False), (4, False), (4, True)]
    ckpt = Checkpointer(tmp_path, every_steps=2)
    assert ckpt.metadata(4)["metrics_records"] == 4
    ckpt.close()
