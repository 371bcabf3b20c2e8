"""Classification metrics from predictions: accuracy, per-class P/R/F1, macro and micro means.

Conventions (same as scikit-learn's `precision_recall_fscore_support` with zero_division=0): a
class never predicted has precision 0, a class absent from the labels has recall 0; the macro mean
averages over the classes present in the labels or the predictions; micro P = R = F1 = accuracy for
single-label classification.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts; row = true class, column = predicted class."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if labels.shape != predictions.shape or labels.ndim != 1:
        raise ValueError(
            f"labels and predictions must be 1-D of equal length, got {labels.shape} and "
            f"{predictions.shape}")
    for name, a in (("labels", labels), ("predictions", predictions)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes}), got range "
                             f"[{a.min()}, {a.max()}]")
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (labels, predictions), 1)
    return cm


def classification_report(cm: np.ndarray, class_names=None) -> dict:
    """Accuracy, per-class P/R/F1/support, macro and micro means of a confusion matrix."""
    cm = np.asarray(cm, np.float64)
    tp = np.diag(cm)
    support, predicted = cm.sum(1), cm.sum(0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    present = (support > 0) | (predicted > 0)
    total = cm.sum()
    accuracy = tp.sum() / total if total else 0.0
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(cm))]
    return {
        "accuracy": float(accuracy),
        "num_examples": int(total),
        "per_class": {
            n: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for n, p, r, f, s in zip(names, precision, recall, f1, support, strict=True)
        },
        "macro": {
            "precision": float(precision[present].mean()) if present.any() else 0.0,
            "recall": float(recall[present].mean()) if present.any() else 0.0,
            "f1": float(f1[present].mean()) if present.any() else 0.0,
        },
        # Single-label: every miss is one FP and one FN, so micro P = R = F1 = accuracy.
        "micro": {"precision": float(accuracy), "recall": float(accuracy), "f1": float(accuracy)},
    }
