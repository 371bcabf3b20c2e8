"""Datasets for fer_jax: the synthetic default, FER-2013 / FER+, CK+48, partitioners, augmentation.

`load(data_config)` is what experiments call: it dispatches on `data_config.name` and returns a
`fer_jax.data.types.Dataset` of NumPy arrays. Real datasets are read from local files only
(TFDS `manual_dir` style); nothing is downloaded.
"""

from __future__ import annotations

import os
import pathlib

from fer_jax.data.types import Dataset, Split

__all__ = ["DATASETS", "Dataset", "Split", "load", "resolve_manual_dir", "split_label"]

# name -> folder under the data root that holds its raw files.
DATASETS = {"synthetic": None, "fer2013": "fer2013", "ferplus": "fer2013", "ckplus48": "ckplus48",
            "prepared": "prepared"}


def resolve_manual_dir(name: str, manual_dir: str = "") -> pathlib.Path:
    """`manual_dir` if given, else $FER_JAX_DATA/<folder>, else ../shared/data/<folder>."""
    if manual_dir:
        return pathlib.Path(manual_dir).expanduser()
    root = os.environ.get("FER_JAX_DATA", os.path.join("..", "shared", "data"))
    return pathlib.Path(root).expanduser() / DATASETS[name]


def split_label(name: str, split: str) -> str:
    """How a split of dataset `name` is called in its source, for figures and tables:
    ('fer2013', 'test') -> 'PrivateTest'; the split itself where the source has no other name."""
    if name in ("fer2013", "ferplus"):
        from fer_jax.data import fer2013

        return {v: k for k, v in fer2013.USAGE_TO_SPLIT.items()}.get(split, split)
    return split


def load(data) -> Dataset:
    """Loads the dataset described by a config's `data` block (see configs/supervised.py)."""
    if data.name not in DATASETS:
        raise ValueError(f"config.data.name={data.name!r}; expected one of {sorted(DATASETS)}")
    data_dir = data.data_dir or None
    if data.name == "synthetic":
        from fer_jax.data import synthetic

        s = data.synthetic
        return synthetic.make_dataset(
            num_subjects=s.num_subjects, images_per_class=s.images_per_class,
            test_subjects=s.test_subjects, image_size=data.image_size, channels=data.channels,
            seed=s.seed)
    manual_dir = resolve_manual_dir(data.name, data.manual_dir)
    if data.name == "prepared":  # configs/prepare.py output; its dataset.json finds the build.
        from fer_jax.data import prepare

        return prepare.load_prepared(manual_dir=manual_dir)
    if data.name in ("fer2013", "ferplus"):
        from fer_jax.data import fer2013

        labels = "ferplus" if data.name == "ferplus" else "fer2013"
        return fer2013.load_fer2013(manual_dir=manual_dir, data_dir=data_dir, labels=labels)
    from fer_jax.data import ckplus

    return ckplus.load_ckplus48(manual_dir=manual_dir, data_dir=data_dir,
                                num_folds=data.num_folds, fold=data.fold)
