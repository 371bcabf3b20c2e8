"""2-D embeddings of features: exact t-SNE in NumPy and its scatter plot coloured by class,
with a marker per group (subject / client), so identity clusters can be told from class ones."""

from __future__ import annotations

import textwrap

import numpy as np


def tsne_2d(x: np.ndarray, *, perplexity: float = 30.0, iterations: int = 500,
            seed: int = 0) -> np.ndarray:
    """Exact t-SNE (van der Maaten & Hinton 2008) in NumPy, for a few hundred points.

    Gaussian affinities with per-point bandwidth by bisection on the perplexity, symmetrised
    P; Student-t Q; gradient descent with momentum 0.5 -> 0.8 and early exaggeration 12 for
    the first 100 iterations (the paper's Sec. 3.4 schedule, fixed learning rate 200).
    """
    x = np.asarray(x, np.float64)
    n = len(x)
    d2 = np.square(x[:, None] - x[None]).sum(-1)
    target = np.log(min(perplexity, (n - 1) / 3))
    lo, hi = np.full(n, 1e-20), np.full(n, 1e20)
    beta = np.ones(n) / max(np.median(d2), 1e-12)
    for _ in range(64):  # Bisection on beta = 1 / (2 sigma^2), all points at once.
        p = np.exp(-(d2 - np.where(np.eye(n, dtype=bool), np.inf, d2).min(1, keepdims=True))
                   * beta[:, None])
        np.fill_diagonal(p, 0.0)
        s = p.sum(1, keepdims=True)
        p = p / s
        entropy = -(p * np.log(np.maximum(p, 1e-300))).sum(1)
        too_flat = entropy > target
        lo = np.where(too_flat, beta, lo)
        hi = np.where(too_flat, hi, beta)
        beta = np.where(hi < 1e19, (lo + hi) / 2, beta * 2)
    p = (p + p.T) / (2 * n)
    y = np.random.default_rng(seed).normal(0, 1e-4, (n, 2))
    velocity = np.zeros_like(y)
    for it in range(iterations):
        exag = 12.0 if it < 100 else 1.0
        diff = y[:, None] - y[None]
        num = 1.0 / (1.0 + np.square(diff).sum(-1))
        np.fill_diagonal(num, 0.0)
        q = np.maximum(num / num.sum(), 1e-12)
        grad = 4 * (((exag * p - q) * num)[:, :, None] * diff).sum(1)
        velocity = (0.5 if it < 250 else 0.8) * velocity - 200.0 * grad
        y = y + velocity
    return y - y.mean(0)


MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "h", "p", "d", "8", "H", "1")


def save_embedding_plot(points: np.ndarray, labels: np.ndarray, class_names, path, *,
                        title: str, groups: np.ndarray | None = None,
                        group_name: str = "subject") -> None:
    """Scatter of `points` (N, 2): colour = class; with `groups` (N,) ints, marker = group
    (cycling through 16 markers past 16 groups; the legend says so)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    colors = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    group_ids = np.unique(groups) if groups is not None else np.zeros(1, int)
    for c in range(len(class_names)):
        for g_i, g in enumerate(group_ids):
            sel = (labels == c) & (groups == g if groups is not None else True)
            if sel.any():
                ax.scatter(points[sel, 0], points[sel, 1], s=14, color=colors(c), alpha=0.8,
                           marker=MARKERS[g_i % len(MARKERS)], linewidths=0.5)
    handles = [Line2D([], [], ls="", marker="o", color=colors(c), label=name)
               for c, name in enumerate(class_names) if (labels == c).any()]
    if groups is not None:
        cycled = " (markers repeat)" if len(group_ids) > len(MARKERS) else ""
        handles.append(Line2D([], [], ls="", label=f"marker = {group_name}{cycled}:"))
        handles += [Line2D([], [], ls="", marker=MARKERS[i % len(MARKERS)], color="0.3",
                           label=f"{group_name} {g}")
                    for i, g in enumerate(group_ids[:len(MARKERS)])]
    ax.legend(handles=handles, fontsize=6.5, markerscale=1.2, loc="center left",
              bbox_to_anchor=(1.01, 0.5), frameon=False)
    # Wrapped to the axes' width (~14 characters per inch at 9 pt): a run tag made it overflow.
    ax.set_title(textwrap.fill(title, width=70), fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
