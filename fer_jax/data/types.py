"""In-memory dataset containers shared by every reader, the synthetic generator and partitioners.

FER datasets fit in host memory (FER-2013 is 80 MB as uint8), so every reader returns plain NumPy
arrays; the federated engine and the training loops move batches to devices themselves.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a dataset.

    images: (N, H, W, C) uint8, C = 1 (gray) or 3 (RGB).
    labels: (N,) int32 index into the owning `Dataset.class_names`.
    subjects: (N,) int32 subject id per image, or None when the dataset has none (FER-2013).
    label_dist: (N, num_classes) float32 soft labels (e.g. FER+ vote shares), or None.
    """

    images: np.ndarray
    labels: np.ndarray
    subjects: np.ndarray | None = None
    label_dist: np.ndarray | None = None

    def __post_init__(self):
        n = len(self.images)
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(
                f"Split.images must be (N, H, W, C) uint8, got {self.images.shape} "
                f"{self.images.dtype}"
            )
        for name in ("labels", "subjects", "label_dist"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"Split.{name} has {len(value)} rows, images has {n}")

    def __len__(self) -> int:
        return len(self.images)

    def take(self, index: np.ndarray) -> Split:
        """The sub-split at `index` (an integer index array or boolean mask)."""
        pick = lambda a: None if a is None else a[index]
        return Split(self.images[index], self.labels[index], pick(self.subjects),
                     pick(self.label_dist))


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A named dataset: canonical class names (see `classes.py`) and its splits by name."""

    name: str
    class_names: tuple[str, ...]
    splits: dict[str, Split]

    def __post_init__(self):
        # The data boundary of every reader: the jitted losses gather log-probabilities at the
        # labels with no range check (a check there would need a host sync per step), so an
        # out-of-range label must be stopped here, where it can still be named.
        k = len(self.class_names)
        for split_name, split in self.splits.items():
            where = f"dataset {self.name!r} split {split_name!r}"
            check_labels(split.labels, k, where=where)
            dist = split.label_dist
            if dist is not None and dist.shape[1:] != (k,):
                raise ValueError(f"{where}: label_dist has shape {dist.shape}; expected "
                                 f"(N, {k}), one column per class of {self.class_names}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return next(iter(self.splits.values())).images.shape[1:]

    def __getitem__(self, split: str) -> Split:
        if split not in self.splits:
            raise KeyError(f"dataset {self.name!r} has no split {split!r}; it has "
                           f"{sorted(self.splits)}")
        return self.splits[split]


def check_labels(labels, num_classes: int, *, where: str) -> None:
    """Raises ValueError unless `labels` is a 1-D integer array of classes in [0, num_classes);
    the message names `where`, the first bad value and its row, and how many rows are bad."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: labels must be (N,) integer class indices, got "
                         f"{labels.dtype} {labels.shape}")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise ValueError(f"{where}: label {labels[bad[0]]} at row {bad[0]} is outside "
                         f"[0, {num_classes}) ({bad.size} such rows); expected an index into its "
                         f"{num_classes} class names")
