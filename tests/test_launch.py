"""launch/: sweep expansion and the TPU-pod launcher's dry run."""

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_sweep_dry_run_lists_every_override():
    out = _run("launch/sweep.py", "--config=configs/supervised.py:data=fer2013",
               "--workdir=/tmp/sw", "--dry_run", "--", "--config.train.num_epochs=2")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 6  # 3 learning rates x 2 weight decays.
    assert all("--config=configs/supervised.py:data=fer2013" in line for line in lines)
    assert all(line.endswith("--config.train.num_epochs=2") for line in lines)
    assert "--workdir=/tmp/sw/learning_rate=0.0003,weight_decay=0.0" in lines[0]
    assert "--config.train.learning_rate=0.003" in lines[-1]


def test_sweep_without_get_sweep_is_an_error(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("def get_config(arg=None):\n    return None\n")
    out = _run("launch/sweep.py", f"--config={cfg}", "--workdir=/tmp/x", "--dry_run")
    assert out.returncode != 0 and "defines no get_sweep" in out.stderr


def test_tpu_pod_dry_run():
    out = _run("launch/tpu_pod.py", "--tpu=v4-32", "--zone=us-central2-b",
               "--config=configs/supervised.py", "--workdir=gs://b/runs", "--sweep", "--dry_run")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 6
    for line in lines:
        assert line.startswith("gcloud compute tpus tpu-vm ssh v4-32 --zone=us-central2-b "
                               "--worker=all")
        assert "python3 -m fer_jax.main" in line and "--distributed" in line
    assert "gs://b/runs/learning_rate=0.0003,weight_decay=0.0" in lines[0]
