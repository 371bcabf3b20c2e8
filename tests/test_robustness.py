"""One run per workdir (lock file), one-line errors of fer_jax.main, the compilation cache."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from fer_jax.io import lock as lock_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--config=configs/supervised.py:runlocal", "--config.train.num_steps=24",
        "--config.checkpoint_every_steps=8", "--config.log_every_steps=4",
        "--config.data.synthetic.num_subjects=6", "--config.data.synthetic.images_per_class=4",
        "--config.data.synthetic.test_subjects=2"]
HOLD = ("import sys, time\nfrom fer_jax.io.lock import WorkdirLock\n"
        "with WorkdirLock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)\n")


def _main(workdir, *args, timeout=600):
    cmd = [sys.executable, "-m", "fer_jax.main", f"--workdir={workdir}", *args]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_is_exclusive_and_released(tmp_path):
    with lock_lib.WorkdirLock(tmp_path / "run") as held:
        holder = json.loads(held.path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(lock_lib.WorkdirLockedError) as info:
            lock_lib.WorkdirLock(tmp_path / "run").acquire()
        assert f"PID {os.getpid()} on host {socket.gethostname()}" in str(info.value)
        assert f"kill {os.getpid()}" in str(info.value)
    assert not held.path.exists()
    lock_lib.WorkdirLock(tmp_path / "run").acquire().release()  # Free again.


def test_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    path = tmp_path / lock_lib.LOCK_NAME
    dead = _dead_pid()
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead,
                                "started": "2026-01-01T00:00:00"}))
    with caplog.at_level("WARNING"), lock_lib.WorkdirLock(tmp_path) as held:
        assert json.loads(held.path.read_text())["pid"] == os.getpid()
    assert any(f"PID {dead}" in r.getMessage() and "stale" in r.getMessage()
               for r in caplog.records)
    # A live PID whose start time differs from the recorded one is a reused PID: stale too.
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                "pid_start_ticks": -1}))
    lock_lib.WorkdirLock(tmp_path).acquire().release()


def test_lock_of_another_host_is_not_taken_over(tmp_path):
    path = tmp_path / lock_lib.LOCK_NAME
    path.write_text(json.dumps({"host": "elsewhere-7", "pid": _dead_pid(), "started": "x"}))
    with pytest.raises(lock_lib.WorkdirLockedError, match=f"host elsewhere-7 .*delete {path}"):
        lock_lib.WorkdirLock(tmp_path).acquire()


@pytest.mark.slow  # > 20 s on 2 cores: CI's slow step
def test_second_run_on_a_workdir_is_refused_naming_the_holder(tmp_path):
    workdir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = _main(workdir, *TINY)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 1
    lines = _error_lines(result.stderr)
    assert lines[-1].startswith("fer_jax.main: error: workdir "), result.stderr[-2000:]
    assert f"in use by PID {holder.pid} on host {socket.gethostname()}" in lines[-1]
    # Refused before writing anything: the workdir holds only the holder's lock.
    assert sorted(p.name for p in workdir.iterdir()) == [lock_lib.LOCK_NAME]


def test_unknown_config_key_is_one_line_naming_path_and_closest_keys(tmp_path):
    result = _main(tmp_path / "run", "--config=configs/supervised.py:runlocal",
                   "--config.train.learning_rat=1")
    assert result.returncode == 1
    assert _error_lines(result.stderr) == [
        "fer_jax.main: error: unknown config key config.train.learning_rat (in "
        "--config.train.learning_rat=1); did you mean config.train.learning_rate? valid keys "
        "of config.train: " + ", ".join(_train_keys())]
    assert not (tmp_path / "run").exists()


def _train_keys():
    sys.path.insert(0, str(REPO))
    from configs import supervised

    return sorted(supervised.get_config("runlocal").train.keys())


@pytest.mark.slow  # > 20 s on 2 cores: CI's slow step
def test_unwritable_workdir_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = _main(blocker / "run", "--config=configs/supervised.py:runlocal")
    assert result.returncode == 1
    last = _error_lines(result.stderr)[-1]
    assert last.startswith(f"fer_jax.main: error: --workdir={blocker / 'run'}: cannot write "
                           "there (Not a directory"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_run_fills_the_compilation_cache_and_releases_its_lock(tmp_path):
    cache = tmp_path / "cache"
    result = _main(tmp_path / "run", *TINY, f"--compilation_cache_dir={cache}")
    assert result.returncode == 0, result.stderr[-3000:]
    entries = [p.name for p in cache.iterdir()]
    assert any(name.startswith("jit_step") for name in entries), entries
    assert not (tmp_path / "run" / lock_lib.LOCK_NAME).exists()
    assert (tmp_path / "run" / "eval.json").is_file()
