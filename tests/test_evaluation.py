"""Metrics checked against hand-computed values; the confusion-matrix figure is a real PNG."""

import numpy as np
import pytest
from PIL import Image

from fer_jax.evaluation import metrics, plots


def test_confusion_matrix_counts():
    labels = np.array([0, 0, 1, 1, 1, 2])
    preds = np.array([0, 1, 1, 1, 0, 0])
    cm = metrics.confusion_matrix(labels, preds, 3)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [1, 2, 0], [1, 0, 0]])


def test_report_by_hand():
    # Class 0: tp 1, predicted 3, support 2 -> P 1/3, R 1/2, F1 0.4.
    # Class 1: tp 2, predicted 3, support 3 -> P 2/3, R 2/3, F1 2/3.
    # Class 2: tp 0, predicted 0, support 1 -> P 0 (zero division), R 0, F1 0.
    cm = metrics.confusion_matrix(np.array([0, 0, 1, 1, 1, 2]), np.array([0, 1, 1, 1, 0, 0]), 3)
    r = metrics.classification_report(cm, ["a", "b", "c"])
    assert r["accuracy"] == pytest.approx(3 / 6)
    assert r["per_class"]["a"]["precision"] == pytest.approx(1 / 3)
    assert r["per_class"]["a"]["f1"] == pytest.approx(0.4)
    assert r["per_class"]["b"]["recall"] == pytest.approx(2 / 3)
    assert r["per_class"]["c"]["support"] == 1 and r["per_class"]["c"]["f1"] == 0
    assert r["macro"]["precision"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert r["macro"]["f1"] == pytest.approx((0.4 + 2 / 3 + 0) / 3)
    assert r["micro"]["f1"] == pytest.approx(0.5)


def test_macro_skips_classes_absent_everywhere():
    cm = metrics.confusion_matrix(np.array([0, 1]), np.array([0, 1]), 4)
    r = metrics.classification_report(cm)
    assert r["macro"]["f1"] == 1.0  # Classes 2 and 3 neither occur nor are predicted.


def test_bad_inputs():
    with pytest.raises(ValueError, match="must lie in"):
        metrics.confusion_matrix(np.array([0, 5]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="equal length"):
        metrics.confusion_matrix(np.array([0, 1]), np.array([0]), 3)


def test_confusion_png(tmp_path):
    cm = np.array([[5, 1], [2, 7]])
    path = plots.save_confusion_matrix(cm, ["anger", "happiness"], tmp_path / "cm.png", title="t")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_subject_differences_mark_skipped_subjects_and_the_mean(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    drawn = {}
    savefig = plt.Figure.savefig

    def capture(fig, *args, **kwargs):
        ax = fig.axes[0]
        drawn["ticks"] = [t.get_text() for t in ax.get_xticklabels()]
        drawn["legend"] = [t.get_text() for t in ax.get_legend().get_texts()]
        drawn["bars"] = [round(b.get_height(), 3) for b in ax.patches]
        drawn["title"] = ax.get_title()
        drawn["ylim"] = ax.get_ylim()
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", capture)
    title = "VFER on ckplus_videos: micro F1 after - before personalization, a long run tag"
    path = plots.save_subject_differences(["a", "b", "c", "d"], [0.1, 0.0, -0.3, 0.0],
                                          tmp_path / "f3.png", title=title, skipped=["d"])
    with Image.open(path) as im:
        assert im.format == "PNG"
    # Adapted subjects sorted by gain as bars (a zero change as a dot: a zero-height bar is
    # invisible), the skipped one last and not a bar; zero and every value inside the y-range.
    assert drawn["ticks"] == ["a", "b", "c", "d"] and drawn["bars"] == [0.1, -0.3]
    assert sorted(drawn["legend"]) == ["adapted, no change", "mean over 3 adapted: -0.067",
                                       "skipped (not adapted)"]
    assert drawn["ylim"][0] < -0.3 and drawn["ylim"][1] > 0.1
    assert drawn["title"].replace("\n", " ") == title  # wrapped, not cut


def test_panels_and_threshold_curve_figures(tmp_path):
    from fer_jax.evaluation import plots

    records = [{"step": e, "ifer/train_loss": 2.0 / e, "ifer/dev_loss": 2.1 / e} for e in (1, 2)]
    records += [{"step": 1, "central/macro_f1": 0.3, "after/macro_f1": float("nan")}]
    path = plots.save_panels(records, [("IFER", "epoch", ["ifer/train_loss", "ifer/dev_loss"],
                                        "loss"),
                                       ("rounds", "round", ["central/macro_f1", "after/macro_f1"],
                                        "F1"),
                                       ("empty", "round", ["missing"], "x")],
                             tmp_path / "curve.png", title="t")
    assert path.stat().st_size > 0
    path = plots.save_threshold_curve([0.0, 0.5, 0.9], [0.5, 0.75, None], [1.0, 0.4, 0.0],
                                      tmp_path / "th.png", chance=1 / 6, marked=0.5,
                                      counts=[10, 4, 0], title="pseudo labels")
    assert path.stat().st_size > 0
