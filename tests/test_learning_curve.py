"""The learning-curve figure (fer_jax.evaluation.plots.save_learning_curve)."""

import math

import numpy as np
from PIL import Image

from fer_jax.evaluation import plots


def _records():
    """A centralized run's metrics.jsonl: loss every 10 steps, evaluations every 20."""
    out = []
    for step in range(10, 61, 10):
        out.append({"step": step, "time": 1.0 + step, "train/loss": 2.0 / step,
                    "train/accuracy": 0.1, "train/images_per_s": 300.0})
        if step % 20 == 0:
            out.append({"step": step, "time": 2.0 + step, "eval/accuracy": step / 100,
                        "eval/macro_f1": step / 200})
    out.append({"step": 60, "time": 90.0, "val/accuracy": 0.5, "test/accuracy": math.nan})
    return out


def test_series_pick_loss_and_every_evaluation():
    series = plots.learning_curve_series(list(reversed(_records())))  # Order does not matter.
    assert list(series["loss"]) == ["train/loss"]
    assert series["loss"]["train/loss"] == ([10, 20, 30, 40, 50, 60],
                                            [2.0 / s for s in (10, 20, 30, 40, 50, 60)])
    assert sorted(series["eval"]) == ["eval/accuracy", "eval/macro_f1", "test/accuracy",
                                      "val/accuracy"]
    assert series["eval"]["eval/accuracy"] == ([20, 40, 60], [0.2, 0.4, 0.6])
    assert series["eval"]["test/accuracy"] == ([], [])  # NaN skipped.
    fed = plots.learning_curve_series([{"step": 1, "round/seconds": 3.0, "train/loss": 1.0}])
    assert fed["eval"] == {} and list(fed["loss"]) == ["train/loss"]
    # A run of two models (FedAffect): both losses, the training-episode accuracy per round,
    # the final evaluation without its interval half-width.
    two = plots.learning_curve_series(
        [{"step": r, "repr/loss": 4.0 - r, "fewshot/loss": 2.0 / r, "fewshot/train_accuracy":
          0.1 * r, "fewshot/clients": 8, "round/seconds": 1.0} for r in (1, 2)]
        + [{"step": 2, "eval/1shot_accuracy": 0.4, "eval/ci95": 0.01}])
    assert sorted(two["loss"]) == ["fewshot/loss", "repr/loss"]
    assert two["loss"]["repr/loss"] == ([1, 2], [3.0, 2.0])
    assert sorted(two["eval"]) == ["eval/1shot_accuracy", "fewshot/train_accuracy"]
    assert two["eval"]["fewshot/train_accuracy"] == ([1, 2], [0.1, 0.2])


def test_writes_png(tmp_path):
    path = plots.save_learning_curve(_records(), tmp_path / "curves" / "lc.png",
                                     title="small_cnn on synthetic", chance=0.125)
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape == (418, 1100, 3)  # 10 x 3.8 inches at 110 dpi.
    # Two panels with lines: many distinct colours, not a blank canvas.
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50
    empty = plots.save_learning_curve([], tmp_path / "empty.png")  # Nothing logged yet: no error.
    assert empty.is_file()


def test_legend_names_the_split_of_each_prefix():
    from fer_jax import data as data_lib

    assert data_lib.split_label("fer2013", "test") == "PrivateTest"
    assert data_lib.split_label("ferplus", "validation") == "PublicTest"
    assert data_lib.split_label("ckplus48", "test") == "test"
    names = {"val": "PublicTest", "eval": "PrivateTest"}
    assert plots.series_label("val/accuracy", names) == "val/accuracy (PublicTest)"
    assert plots.series_label("eval/macro_f1", names) == "eval/macro_f1 (PrivateTest)"
    assert plots.series_label("train/loss", names) == "train/loss"
    assert plots.series_label("eval/accuracy") == "eval/accuracy"
