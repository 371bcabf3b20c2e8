"""Client partitioners for simulated federated learning: by subject, IID, Dirichlet label skew.

Each partitioner maps a centralized dataset onto clients as one index array per client; every
example goes to exactly one client, and the result depends only on the inputs and `seed`.

* `by_subject`: one client per subject (the natural FER federation: a user's own face images).
* `iid`: a seeded shuffle cut into `num_clients` near-equal shards.
* `dirichlet`: label skew as in Hsu, Qi & Brown, "Measuring the Effects of Non-Identical Data
  Distribution for Federated Visual Classification" (2019), following the per-class allocation
  of Yurochkin et al. (ICML 2019): for every class k draw client shares p_k ~ Dir(alpha * 1) and
  cut that class's shuffled examples at the cumulative shares. Small alpha -> each client sees few
  classes; alpha -> infinity -> IID. Draws repeat until every client has >= `min_size` examples.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous; compare fields.
class Partition:
    """Per-client example indices (sorted int64 arrays) into one dataset split.

    client_ids: optional id per client (e.g. the subject id for `by_subject`).
    """

    client_indices: tuple[np.ndarray, ...]
    client_ids: np.ndarray | None = None

    def __post_init__(self):
        for i, idx in enumerate(self.client_indices):
            if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
                raise ValueError(f"client {i}: indices must be a 1-D integer array, "
                                 f"got {idx.shape} {idx.dtype}")
        if self.client_ids is not None and len(self.client_ids) != len(self.client_indices):
            raise ValueError(f"{len(self.client_ids)} client_ids for "
                             f"{len(self.client_indices)} clients")

    @property
    def num_clients(self) -> int:
        return len(self.client_indices)

    @property
    def sizes(self) -> np.ndarray:
        return np.array([len(idx) for idx in self.client_indices], np.int64)

    def label_histograms(self, labels: np.ndarray, num_classes: int) -> np.ndarray:
        """(num_clients, num_classes) example counts per client and class."""
        labels = np.asarray(labels)
        return np.stack([np.bincount(labels[idx], minlength=num_classes)[:num_classes]
                         for idx in self.client_indices])

    def summary(self, labels: np.ndarray, num_classes: int) -> dict:
        """Clients, size statistics, label histograms and label skew, for logs and reports.

        `mean_tv_from_global` is the mean over clients of the total-variation distance between a
        client's label distribution and the pooled one: 0 for identical mixes, 1 for disjoint.
        """
        hist = self.label_histograms(labels, num_classes)
        sizes = hist.sum(axis=1)
        pooled = hist.sum(axis=0) / max(hist.sum(), 1)
        local = hist / np.maximum(sizes[:, None], 1)
        tv = 0.5 * np.abs(local - pooled).sum(axis=1)
        return {
            "num_clients": self.num_clients,
            "sizes": {"min": int(sizes.min()), "median": float(np.median(sizes)),
                      "max": int(sizes.max()), "total": int(sizes.sum())},
            "label_histograms": hist,
            "mean_tv_from_global": float(tv[sizes > 0].mean()),
        }


def _check_clients(num_examples: int, num_clients: int):
    if num_clients < 1:
        raise ValueError(f"num_clients={num_clients}; expected >= 1")
    if num_clients > num_examples:
        raise ValueError(f"num_clients={num_clients} exceeds the {num_examples} examples; "
                         "every client needs at least one")


def by_subject(subjects: np.ndarray) -> Partition:
    """One client per distinct subject, in ascending subject order (`client_ids` = subjects)."""
    subjects = np.asarray(subjects)
    if subjects.ndim != 1 or len(subjects) == 0:
        raise ValueError(f"subjects must be a non-empty 1-D array, got shape {subjects.shape}")
    ids, inverse = np.unique(subjects, return_inverse=True)
    # A stable sort groups examples by subject while keeping dataset order inside each group.
    order = np.argsort(inverse, kind="stable")
    groups = np.split(order, np.cumsum(np.bincount(inverse))[:-1])
    return Partition(tuple(g.astype(np.int64) for g in groups), client_ids=ids)


def iid(num_examples: int, num_clients: int, *, seed: int) -> Partition:
    """A seeded shuffle of range(num_examples) cut into shards whose sizes differ by <= 1."""
    _check_clients(num_examples, num_clients)
    perm = np.random.default_rng(seed).permutation(num_examples)
    return Partition(tuple(np.sort(s) for s in np.array_split(perm, num_clients)))


def dirichlet(labels: np.ndarray, num_clients: int, *, alpha: float, seed: int,
              min_size: int = 1, max_tries: int = 1000) -> Partition:
    """Dirichlet(alpha) label-skew partition (see module docstring), redrawn up to `max_tries`
    times until every client holds >= `min_size` examples.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any():
        raise ValueError(f"labels must be a 1-D array of non-negative ints, got {labels.shape} "
                         f"{labels.dtype}")
    _check_clients(len(labels), num_clients)
    if not alpha > 0:
        raise ValueError(f"alpha={alpha}; the Dirichlet concentration must be > 0")
    if min_size * num_clients > len(labels):
        raise ValueError(f"min_size={min_size} x num_clients={num_clients} exceeds the "
                         f"{len(labels)} examples")
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == k) for k in np.unique(labels)]
    for _ in range(max_tries):
        shards = [[] for _ in range(num_clients)]
        for idx in by_class:
            idx = rng.permutation(idx)
            share = rng.dirichlet(np.full(num_clients, alpha))
            # Cumulative shares -> cut points; rounding down leaves the remainder to the last.
            cuts = (np.cumsum(share)[:-1] * len(idx)).astype(np.int64)
            for client, part in enumerate(np.split(idx, cuts)):
                shards[client].append(part)
        parts = [np.sort(np.concatenate(s)) for s in shards]
        if min(len(p) for p in parts) >= min_size:
            return Partition(tuple(p.astype(np.int64) for p in parts))
    raise ValueError(f"dirichlet: no draw in {max_tries} tries gave every one of {num_clients} "
                     f"clients >= {min_size} examples (alpha={alpha}, {len(labels)} examples); "
                     "raise alpha, lower min_size or num_clients")


def from_config(fed, split, *, seed: int, dataset_name: str = "") -> Partition:
    """The partition a config's `fed` block asks for (partition, num_clients, dirichlet_alpha)."""
    if fed.partition == "subject":
        if split.subjects is None:
            raise ValueError(f"config.fed.partition='subject' but dataset {dataset_name!r} has no "
                             "subject ids; use fed.partition=iid or dirichlet")
        return by_subject(split.subjects)
    if fed.partition == "iid":
        return iid(len(split), fed.num_clients, seed=seed)
    return dirichlet(split.labels, fed.num_clients, alpha=fed.dirichlet_alpha, seed=seed)
