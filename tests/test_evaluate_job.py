"""Loading a trained workdir (fer_jax.io.trained) and the evaluation job (configs/evaluate.py).

Fast tests save checkpoints in the layouts fer_jax runs write (centralized client state,
federated server state, the earlier TrainState) from perturbed variables, and check restored
predictions against the model applied directly to those variables. The slow test trains the
supervised runlocal config through fer_jax.main for 3 steps and evaluates it the same way.
"""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from fer_jax import models
from fer_jax.data import classes as classes_lib
from fer_jax.data import synthetic
from fer_jax.experiments import evaluate
from fer_jax.io import trained as trained_lib
from fer_jax.io.checkpoint import Checkpointer

REPO = pathlib.Path(__file__).resolve().parents[1]
CLASSES = classes_lib.CANONICAL  # The 8 classes of the synthetic faces.
FOUR = ("anger", "happiness", "sadness", "surprise")


def _digest(root) -> dict:
    """sha256 of every file under root (the byte-identity check of a trained workdir)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(pathlib.Path(root).rglob("*")) if p.is_file()}


def _variables(config, num_classes, seed):
    """Random model variables of the right shapes (NumPy: compiling model.init's initialisers
    takes tens of seconds on a loaded CPU, and a restore must not pass for a fresh init)."""
    model = models.get_model(config.model.name, num_classes=num_classes,
                             **config.model.kwargs)
    shape = (1, config.data.image_size, config.data.image_size, config.data.channels)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape),
                                               train=False))
    rng = np.random.default_rng(seed)
    variables = jax.tree.map(lambda s: 0.3 * rng.standard_normal(s.shape).astype(s.dtype), shapes)
    variables["batch_stats"] = jax.tree.map(lambda x: 1 + np.abs(x), variables["batch_stats"])
    return model, variables


def _state(layout: str, variables, other):
    """A checkpointed state holding `variables` in one of the layouts runs save."""
    opt_state = jax.device_get(jax.jit(optax.adam(1e-3).init)(variables["params"]))
    if layout == "centralized":
        return {"params": variables["params"], "model_state": {"batch_stats":
                                                               variables["batch_stats"]},
                "opt_state": opt_state, "initial": other}
    if layout == "federated":
        return {"variables": variables, "opt_state": opt_state, "round": np.int32(3)}
    return {"params": variables["params"], "batch_stats": variables["batch_stats"],
            "opt_state": opt_state, "step": np.int32(3), "rng": np.array([0, 1], np.uint32)}


def _workdir(path, make_config, *, layout="centralized", class_names=CLASSES, step=3):
    """A training workdir without training: config.json, eval.json, one checkpoint."""
    config = make_config("supervised", "runlocal")
    model, variables = _variables(config, len(class_names), seed=1)
    _, other = _variables(config, len(class_names), seed=2)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config.to_dict()))
    (path / "eval.json").write_text(json.dumps({"class_names": list(class_names)}))
    checkpointer = Checkpointer(path, every_steps=1)
    checkpointer.save(step, _state(layout, variables, other))
    checkpointer.close()
    return model, variables


def _apply_probs(model, variables, images_u8):
    """The independent reference: softmax of the model applied to images / 255."""
    apply = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, x, train=False)["logits"], -1))
    return np.asarray(apply(variables, np.asarray(images_u8, np.float32) / 255.0))


@pytest.mark.parametrize("layout", ["centralized", "federated", "train_state"])
def test_load_restores_variables_without_writing(tmp_path, make_config, layout):
    model, variables = _workdir(tmp_path / "run", make_config, layout=layout)
    before = _digest(tmp_path / "run")
    loaded = trained_lib.load(tmp_path / "run")
    assert _digest(tmp_path / "run") == before
    assert loaded.step == 3 and loaded.class_names == CLASSES
    assert (loaded.image_size, loaded.channels) == (48, 1)
    for a, b in zip(jax.tree.leaves(loaded.variables), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if layout != "centralized":
        return  # Same variables restored: the predictions below would be the same.
    images = np.random.default_rng(0).integers(0, 256, (11, 48, 48, 1), dtype=np.uint8)
    probs = loaded.predict(images)
    np.testing.assert_allclose(probs, _apply_probs(model, variables, images), atol=1e-5)
    np.testing.assert_allclose(loaded.predict(images[3]), probs[3], atol=1e-6)  # One image.
    # RGB input is reduced to the model's gray (the mean of equal channels is the channel).
    rgb = np.repeat(images, 3, axis=-1)
    np.testing.assert_allclose(loaded.predict(rgb, batch_size=4), probs, atol=1e-5)
    big = loaded.predict(np.zeros((2, 96, 80, 3), np.uint8))  # Any size: resized on device.
    assert big.shape == (2, 8) and np.allclose(big.sum(1), 1, atol=1e-5)
    tta = trained_lib.load(tmp_path / "run", flip_tta=True).predict(images)
    mirrored = _apply_probs(model, variables, images[:, :, ::-1])
    np.testing.assert_allclose(tta, (probs + mirrored) / 2, atol=1e-5)


def test_load_errors_name_the_problem(tmp_path, make_config):
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        trained_lib.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is not a training workdir: it has no config"):
        trained_lib.load(tmp_path / "empty")
    _workdir(tmp_path / "run", make_config)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="bare/checkpoints: no finished checkpoint"):
        trained_lib.load(tmp_path / "bare")
    with pytest.raises(ValueError, match=r"no checkpoint of step 7; it has \[3\]"):
        trained_lib.load(tmp_path / "run", step=7)
    # Another model (wider first conv) than the checkpoint's.
    config["model"]["kwargs"]["widths"] = [12, 16, 32, 64]
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"does not hold the model of .*small_cnn, 8 classes, "
                                         r"48x48x1 input\): params/bn1_1/bias has shape \(8,\) "
                                         r"in the checkpoint but \(12,\) in the model"):
        trained_lib.load(tmp_path / "run")
    config["model"]["kwargs"]["widths"] = [8, 16, 32, 64]
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    (tmp_path / "run" / "eval.json").write_text(json.dumps({"class_names": list(FOUR)}))
    with pytest.raises(ValueError, match=r"params/head/bias has shape \(8,\) in the checkpoint "
                                         r"but \(4,\) in the model"):
        trained_lib.load(tmp_path / "run")
    config["model"]["name"] = "relation_net"
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model.name='relation_net' .* is not a zoo classifier"):
        trained_lib.load(tmp_path / "run")


def test_score_full_and_restricted_by_hand():
    model = ("anger", "happiness", "sadness")
    data = ("anger", "happiness", "contempt")  # contempt: the model lacks it.
    probs = np.array([[0.5, 0.2, 0.3],    # anger     -> full anger,   restricted anger
                      [0.2, 0.3, 0.5],    # anger     -> full sadness, restricted happiness
                      [0.1, 0.6, 0.3],    # happiness -> happiness both
                      [0.4, 0.1, 0.5],    # happiness -> full sadness, restricted anger
                      [0.9, 0.05, 0.05]])  # contempt: left out
    labels = np.array([0, 0, 1, 1, 2])
    out = evaluate.score(probs, labels, model, data)
    assert out["num_examples"] == 4
    assert out["classes"]["left_out_images"] == {"contempt": 1}
    assert out["classes"]["shared"] == ["anger", "happiness"]
    assert out["classes"]["model_only"] == ["sadness"]
    assert out["full"]["accuracy"] == 0.5 and out["full"]["chance"] == pytest.approx(1 / 3)
    assert out["full"]["confusion_matrix"] == [[1, 0, 1], [0, 1, 1], [0, 0, 0]]
    r = out["restricted"]
    assert r["accuracy"] == 0.5 and r["chance"] == 0.5 and r["class_names"] == ["anger",
                                                                                 "happiness"]
    assert r["confusion_matrix"] == [[1, 1], [1, 1]]
    same = evaluate.score(probs[:4], labels[:4], model[:2] + ("sadness",), model)
    assert "restricted" not in same  # Same classes: one report.
    with pytest.raises(ValueError, match=r"classes \['neutral'\] share none with the model's"):
        evaluate.score(probs, labels, model, ("neutral",))


def _four_class_folder(root, size=64):
    """Synthetic faces of four classes as RGB PNGs in class folders; returns (images, labels)."""
    ds = synthetic.make_dataset(num_subjects=3, images_per_class=1, test_subjects=1,
                                image_size=size, channels=3, seed=5)
    images, labels = [], []
    for split in ds.splits.values():
        for k, (image, label) in enumerate(zip(split.images, split.labels, strict=True)):
            name = ds.class_names[label]
            if name in FOUR:
                (root / name).mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(root / name / f"{len(images):03d}_{k}.png")
                images.append(image)
                labels.append(FOUR.index(name))
    return np.stack(images), np.array(labels)


def _expected(model, variables, root):
    """Full and restricted accuracy of the folder, from the model applied directly."""
    files = sorted(root.glob("*/*.png"))
    gray = np.stack([np.asarray(Image.open(f).convert("L").resize((48, 48),
                                                                  Image.Resampling.BILINEAR))
                     for f in files])[..., None]
    probs = _apply_probs(model, variables, gray)
    truth = np.array([CLASSES.index(f.parent.name) for f in files])
    shared = [CLASSES.index(c) for c in FOUR]
    restricted = np.array(shared)[probs[:, shared].argmax(-1)]
    return (probs.argmax(-1) == truth).mean(), (restricted == truth).mean(), len(files)


def test_evaluate_job_on_fewer_classes(tmp_path, make_config):
    model, variables = _workdir(tmp_path / "run", make_config)
    root = tmp_path / "faces"
    _four_class_folder(root)
    before = _digest(tmp_path / "run")
    config = make_config("evaluate", "data=folder", trained=str(tmp_path / "run"),
                         **{"data.manual_dir": str(root)})
    evaluate.validate_config(config)
    out = evaluate.run(config, str(tmp_path / "eval"))
    assert _digest(tmp_path / "run") == before
    full, restricted, n = _expected(model, variables, root)
    assert out["split"] == "all" and out["num_examples"] == n == 12
    assert out["full"]["accuracy"] == pytest.approx(full)
    assert out["restricted"]["accuracy"] == pytest.approx(restricted)
    assert out["restricted"]["class_names"] == list(FOUR)
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["restricted"]["confusion_matrix"] == out["restricted"]["confusion_matrix"]
    assert {p.name for p in (tmp_path / "eval").iterdir()} == {
        "config.json", "eval.json", "metrics.jsonl", "confusion_matrix.png",
        "confusion_matrix_restricted.png"}
    with pytest.raises(ValueError, match="lies in config.trained"):
        evaluate.run(config, str(tmp_path / "run" / "eval"))


@pytest.mark.parametrize("override,message", [
    ({"trained": ""}, "config.trained='': expected the --workdir of a training run"),
    ({"trained": "/nonexistent/run"}, "config.trained='/nonexistent/run': expected a training"),
    ({"data.name": "imagenet"}, "config.data.name='imagenet': expected one of"),
    ({"data.name": "folder"}, "config.data.manual_dir='': expected the root of the class"),
    ({"data.channels": 2}, "config.data.channels=2"),
])
def test_validate_config(tmp_path, make_config, override, message):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    evaluate.validate_config(make_config("evaluate", trained=str(tmp_path / "run")))
    with pytest.raises(ValueError, match=message):
        evaluate.validate_config(make_config("evaluate", **{"trained": str(tmp_path / "run"),
                                                            **override}))


def _main(workdir, *args):
    cmd = [sys.executable, "-m", "fer_jax.main", f"--workdir={workdir}", *args]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_trained_runlocal_evaluated_through_main(tmp_path):
    """The supervised runlocal config trained 3 steps, evaluated on its own test split (the
    run's eval.json reproduced) and on a 4-class folder (restricted and unrestricted)."""
    data = ["--config.data.synthetic.num_subjects=6", "--config.data.synthetic.images_per_class=2",
            "--config.data.synthetic.test_subjects=2"]
    _main(tmp_path / "run", "--config=configs/supervised.py:runlocal", *data,
          "--config.train.num_steps=3", "--config.train.batch_size=16")
    before = _digest(tmp_path / "run")
    trained = json.loads((tmp_path / "run" / "eval.json").read_text())
    same = _main(tmp_path / "same", "--config=configs/evaluate.py",
                 f"--config.trained={tmp_path / 'run'}", *data)
    again = json.loads((tmp_path / "same" / "eval.json").read_text())
    assert again["full"]["confusion_matrix"] == trained["confusion_matrix"]
    assert "restricted" not in again and "over the model's 8 classes" in same.stdout
    root = tmp_path / "faces"
    _four_class_folder(root)
    out = _main(tmp_path / "four", "--config=configs/evaluate.py:data=folder",
                f"--config.trained={tmp_path / 'run'}", f"--config.data.manual_dir={root}")
    four = json.loads((tmp_path / "four" / "eval.json").read_text())
    loaded = trained_lib.load(tmp_path / "run")
    full, restricted, n = _expected(loaded.model, loaded.variables, root)
    assert four["num_examples"] == n
    assert four["full"]["accuracy"] == pytest.approx(full)
    assert four["restricted"]["accuracy"] == pytest.approx(restricted)
    assert "restricted to the 4 classes the dataset shares (chance 0.250)" in out.stdout
    assert _digest(tmp_path / "run") == before
