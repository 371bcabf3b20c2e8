"""PNG figures written to the workdir (matplotlib, headless Agg backend)."""

from __future__ import annotations

import pathlib
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
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
    # Wrapped to the figure's width (~8 title characters per inch): long run tags were cut off.
    ax.set_title(textwrap.fill(title, width=int(8 * (size + 1.5))), fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_subject_changes(ax, differences, adapted, *,
                         skipped_label: str = "skipped (not adapted)") -> None:
    """One mark per subject at x = 0, 1, ...: a bar for an adapted subject's change (green gain,
    red loss; a zero change as a grey dot, since a zero-height bar is invisible), a grey 'x' at 0
    for a skipped one; the zero line, and a y-range that holds zero and every value."""
    diffs = np.asarray(differences, np.float64)
    labelled = set()

    def once(label):  # one legend entry per kind of mark
        first = label not in labelled
        labelled.add(label)
        return label if first else None

    for x, (d, was_adapted) in enumerate(zip(diffs, adapted, strict=True)):
        if not was_adapted:
            ax.plot(x, 0.0, "x", color="0.5", ms=7, label=once(skipped_label))
        elif d == 0:
            ax.plot(x, 0.0, "o", color="tab:gray", ms=5, label=once("adapted, no change"))
        else:
            ax.bar(x, d, color="tab:green" if d > 0 else "tab:red")
    ax.axhline(0.0, color="black", linewidth=0.8)
    finite = diffs[np.isfinite(diffs)]
    lo, hi = min(float(finite.min(initial=0.0)), 0.0), max(float(finite.max(initial=0.0)), 0.0)
    pad = 0.08 * (hi - lo) or 0.05
    ax.set_ylim(lo - pad, hi + pad)


def save_subject_differences(subjects, differences, path: str | pathlib.Path, *,
                             title: str = "", ylabel: str = "micro F1 after - before",
                             skipped=()) -> pathlib.Path:
    """One bar per subject, sorted by value, green above zero and red below (the per-subject
    micro-F1 gain plot of Salman & Busso 2022, Fig. 3), and the mean over adapted subjects.

    skipped: subjects that were not adapted (their difference is 0 by construction); they are
    drawn as grey 'x' marks labelled 'skipped', not as bars, and left out of the mean.
    """
    diffs = np.asarray(differences, np.float64)
    names = [str(x) for x in subjects]
    skipped = {str(x) for x in skipped}
    order = np.argsort(-diffs, kind="stable")
    adapted = [i for i in order if names[i] not in skipped]
    order = adapted + [i for i in order if names[i] in skipped]  # skipped ones on the right
    width = max(5.0, 0.35 * len(diffs) + 2.0)
    fig, ax = plt.subplots(figsize=(width, 3.6))
    draw_subject_changes(ax, diffs[order], [names[i] not in skipped for i in order])
    if adapted:
        mean = float(diffs[adapted].mean())
        ax.axhline(mean, color="tab:blue", ls="--", lw=1.2,
                   label=f"mean over {len(adapted)} adapted: {mean:+.3f}")
    ax.set_xticks(range(len(diffs)), [names[i] for i in order], rotation=90, fontsize=7)
    ax.set_xlim(-0.7, len(diffs) - 0.3)
    ax.set_xlabel("subject")
    ax.set_ylabel(ylabel)
    ax.set_title(textwrap.fill(title, width=int(9 * width)), fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_panels(records, panels, path: str | pathlib.Path, *, title: str = "") -> pathlib.Path:
    """One subplot per stage of a run whose stages share metrics.jsonl's 'step' (e.g. VFER:
    IFER epochs, VFER epochs, then FedAvg rounds, each logged from step 1).

    panels: [(panel title, x label, [keys], y label)]; a key missing from the records is left
    out, a panel with no points says so. Non-finite values are skipped.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (name, xlabel, keys, ylabel) in zip(axes[0], panels, strict=True):
        drawn = 0
        for key in keys:
            points = sorted((r["step"], float(r[key])) for r in records
                            if isinstance(r.get(key), int | float) and np.isfinite(r[key]))
            if points:
                x, y = zip(*points, strict=True)
                ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=key)
                drawn += 1
        if not drawn:
            ax.text(0.5, 0.5, "nothing logged", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
        else:
            ax.legend(fontsize=7)
        ax.set_title(textwrap.fill(name, width=46), fontsize=9)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_threshold_curve(thresholds, accuracy, coverage, path: str | pathlib.Path, *,
                         chance: float | None = None, marked: float | None = None,
                         title: str = "", counts=None) -> pathlib.Path:
    """Pseudo-label accuracy of the selected videos and the fraction selected vs the confidence
    threshold (accuracy is None where nothing is selected); `marked`: the configured threshold,
    `counts`: videos selected at each threshold, written beside the accuracy points."""
    t = np.asarray(thresholds, np.float64)
    acc = np.array([np.nan if a is None else a for a in accuracy], np.float64)
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    ax.plot(t, acc, "o-", color="tab:blue", label="accuracy of selected pseudo labels")
    ax.plot(t, coverage, "s--", color="tab:orange", label="fraction of videos selected")
    if counts is not None:
        for x, y, n in zip(t, acc, counts, strict=True):
            if np.isfinite(y):
                ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(0, 5),
                            ha="center", fontsize=7, color="tab:blue")
    if chance is not None:
        ax.axhline(chance, color="black", ls=":", lw=1, label=f"chance ({chance:.3f})")
    if marked is not None:
        ax.axvline(marked, color="0.5", ls="--", lw=1, label=f"configured threshold {marked:g}")
    ax.set_xlabel("confidence threshold (video probability must exceed it)")
    ax.set_ylabel("fraction")
    ax.set_ylim(-0.02, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(textwrap.fill(title, width=60), fontsize=9)
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# Prefixes of metrics.jsonl keys that are evaluations (the training loop logs 'train/...' and,
# in federated runs, 'round/...').
EVAL_PREFIXES = ("eval", "val", "validation", "test")


def learning_curve_series(records) -> dict[str, dict[str, tuple[list, list]]]:
    """{'loss': {key: (steps, values)}, 'eval': {key: (steps, values)}} of metrics.jsonl records.

    loss: every training loss ('train/...loss...', and each model's '<model>/loss' of a run
    training several, e.g. FedAffect's 'repr/loss' and 'fewshot/loss'); eval: every key under
    EVAL_PREFIXES except interval half-widths ('ci95'), plus training-episode accuracies
    ('<model>/train_accuracy': FedAffect evaluates only at the end, so its per-round curve is
    this). Non-finite values and records without the key are skipped, points sorted by step."""
    keys = sorted({k for r in records for k in r if k not in ("step", "time")})

    def is_eval(k):
        return k.split("/", 1)[0] in EVAL_PREFIXES

    groups = {"loss": [k for k in keys if not is_eval(k) and (
                  (k.startswith("train/") and "loss" in k) or k.endswith("/loss"))],
              "eval": [k for k in keys if (is_eval(k) and "ci95" not in k)
                       or k.endswith("/train_accuracy")]}
    out = {}
    for group, names in groups.items():
        out[group] = {}
        for key in names:
            points = sorted((r["step"], float(r[key])) for r in records
                            if isinstance(r.get(key), int | float) and np.isfinite(r[key]))
            out[group][key] = ([p[0] for p in points], [p[1] for p in points])
    return out


def series_label(key: str, split_names: dict[str, str] | None = None) -> str:
    """A legend entry: the metrics key, with the split its prefix stands for when known
    ('val/accuracy' -> 'val/accuracy (PublicTest)' given {'val': 'PublicTest'})."""
    split = (split_names or {}).get(key.split("/", 1)[0])
    return f"{key} ({split})" if split else key


def save_learning_curve(records, path: str | pathlib.Path, *, title: str = "",
                        chance: float | None = None, xlabel: str | None = None,
                        split_names: dict[str, str] | None = None) -> pathlib.Path:
    """Training loss (left) and every evaluation metric (right) over steps or rounds.

    records: metrics.jsonl dicts with 'step' (see `learning_curve_series` for the keys drawn).
    chance: the chance accuracy, drawn as a dashed line on the right. xlabel: default 'round'
    when the records hold 'round/...' keys (federated runs), else 'step'. split_names: the
    split each evaluation prefix reads, for the legend ({'val': 'PublicTest', 'eval':
    'PrivateTest'}: the periodic and the final evaluations of a FER-2013 run).
    """
    series = learning_curve_series(records)
    if xlabel is None:
        xlabel = "round" if any(k.startswith("round/") for r in records for k in r) else "step"
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, group, ylabel in ((ax_loss, "loss", "training loss"),
                              (ax_eval, "eval", "accuracy / evaluation metric")):
        for key, (x, y) in series[group].items():
            if not x:
                continue
            ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3,
                    label=series_label(key, split_names))
        ax.set_xlabel(xlabel)
        if xlabel in ("round", "step"):  # whole rounds / steps, not 1.25
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if not series[group]:
            ax.text(0.5, 0.5, f"no {ylabel} logged", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
    if chance is not None:
        ax_eval.axhline(chance, color="black", linestyle="--", linewidth=1,
                        label=f"chance ({chance:.3f})")
    for ax in (ax_loss, ax_eval):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
