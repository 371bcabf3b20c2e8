"""PNG figures written to the workdir (matplotlib, headless Agg backend)."""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_confusion_matrix(cm: np.ndarray, class_names, path: str | pathlib.Path, *,
                          title: str = "") -> pathlib.Path:
    """Row-normalised confusion matrix with counts, true class on the rows."""
    cm = np.asarray(cm)
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, np.float64), where=rows > 0)
    size = 1.0 + 0.7 * len(cm)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(cm)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(cm)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(cm)):
        for j in range(len(cm)):
            ax.text(j, i, f"{norm[i, j]:.2f}\n({cm[i, j]})", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_subject_differences(subjects, differences, path: str | pathlib.Path, *,
                             title: str = "", ylabel: str = "micro F1 after - before"
                             ) -> pathlib.Path:
    """One bar per subject, sorted by value, green above zero and red below (the per-subject
    micro-F1 gain plot of Salman & Busso 2022, Fig. 3)."""
    diffs = np.asarray(differences, np.float64)
    order = np.argsort(-diffs, kind="stable")
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(diffs) + 1.5), 3.2))
    colors = ["tab:green" if d > 0 else ("tab:red" if d < 0 else "tab:gray") for d in diffs[order]]
    ax.bar(range(len(diffs)), diffs[order], color=colors)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(diffs)), [str(subjects[i]) for i in order], rotation=90, fontsize=7)
    ax.set_xlabel("subject")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
