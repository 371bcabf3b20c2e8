"""CK+48 (Lucey et al. 2010; Kanade et al. 2000) and generic class-per-folder image datasets.

CK+48 is the widely circulated 48x48 gray crop of the last 3 (peak) frames of the 327 labelled
CK+ sequences: `<manual_dir>/CK+48/<emotion>/S010_004_00000017.png`, where the folder is the
class and the file name starts with the subject (`S010` -> subject id 10). The 3 frames of a
sequence are near-duplicates, so train/test are split by subject: a deterministic subject-wise
k-fold (`subject_folds`), never by file.

Class names come from folder names through `classes.canonical_name` ('happy' -> 'happiness') and
are kept in canonical order, so CK+48's 7 classes are (anger, disgust, fear, happiness, sadness,
surprise, contempt); a folder name that maps to no class is an error naming that folder.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from fer_jax.data import classes as classes_lib
from fer_jax.data import readers, tfds_builders, types

CKPLUS48_FOLDER = "CK+48"
CKPLUS48_SHAPE = (48, 48, 1)
SUBJECT_PATTERN = r"^(S\d+)_"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
_MODES = {1: "L", 3: "RGB"}


@dataclasses.dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous; compare fields.
class ImageFolder:
    """Raw contents of a class-per-folder tree, files in sorted (class folder, file) order.

    files: relative paths `<class folder>/<file>`; names: canonical class name per file;
    subjects: int subject id per file, or None without a subject pattern.
    """

    images: np.ndarray
    files: tuple[str, ...]
    names: tuple[str, ...]
    subjects: np.ndarray | None


def read_image(path, *, image_size=None, channels: int = 1) -> np.ndarray:
    """One image file as (H, W, channels) uint8, resized (bilinear) to `image_size` if given.

    Decoded by `readers.decode_image` (its rules for 16-bit, CMYK, palette and alpha; a file it
    cannot decode raises ValueError naming it), then made gray with PIL's BT.601 luma.
    """
    if channels not in _MODES:
        raise ValueError(f"channels={channels}; expected 1 (gray) or 3 (RGB)")
    rgb, _ = readers.decode_image(path)
    im = Image.fromarray(rgb).convert(_MODES[channels])
    if image_size is not None:
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        if im.size != (w, h):
            im = im.resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(im, np.uint8).reshape(im.size[1], im.size[0], channels)


def _subject_ids(files: list[pathlib.Path], pattern: str) -> np.ndarray:
    """Int subject ids from the digits of `pattern`'s first group (or whole match) per file."""
    regex = re.compile(pattern)
    keys = []
    for f in files:
        m = regex.search(f.name)
        key = m and (m.group(1) if regex.groups else m.group(0))
        digits = re.sub(r"\D", "", key or "")
        if not digits:
            raise ValueError(f"{f}: file name has no subject id matching {pattern!r} with digits "
                             "(expected e.g. S010_004_00000017.png -> subject 10)")
        keys.append((key, int(digits)))
    # 'S010' and 'T010' would both become 10: refuse rather than merge two subjects.
    by_id = {}
    for key, sid in keys:
        if by_id.setdefault(sid, key) != key:
            raise ValueError(f"subject ids {by_id[sid]!r} and {key!r} both map to {sid}")
    return np.array([sid for _, sid in keys], np.int32)


def read_image_folder(root, *, image_size=None, channels: int = 1,
                      subject_pattern: str | None = SUBJECT_PATTERN) -> ImageFolder:
    """Reads `root/<class>/<image>` into arrays; errors name the folder or file at fault."""
    root = pathlib.Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; expected "
                                f"{root}/<class name>/<image>{'|'.join(IMAGE_SUFFIXES)}")
    files, names = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        name = classes_lib.canonical_name(folder.name, source=f"class folder {folder}")
        entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
        for p in entries:
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                raise ValueError(f"{p}: not an image file; expected {'|'.join(IMAGE_SUFFIXES)}")
        if not entries:
            raise ValueError(f"class folder {folder} contains no images")
        files += entries
        names += [name] * len(entries)
    if not files:
        raise FileNotFoundError(f"image folder {root} has no class folders; expected "
                                f"{root}/<class name>/<image>")
    subjects = None if subject_pattern is None else _subject_ids(files, subject_pattern)
    images = [read_image(f, image_size=image_size, channels=channels) for f in files]
    for f, im in zip(files, images, strict=True):
        # Without a target size every image must already share the first one's shape.
        if im.shape != images[0].shape:
            raise ValueError(f"{f}: image is {im.shape[1]}x{im.shape[0]} but {files[0]} is "
                             f"{images[0].shape[1]}x{images[0].shape[0]}; pass image_size")
    rel = tuple(f"{f.parent.name}/{f.name}" for f in files)
    return ImageFolder(np.stack(images), rel, tuple(names), subjects)


def load_image_folder(root, *, image_size=None, channels: int = 1,
                      subject_pattern: str | None = SUBJECT_PATTERN) -> types.Dataset:
    """A class-per-folder tree as a `Dataset` with one split 'all' (read directly, no cache)."""
    folder = read_image_folder(root, image_size=image_size, channels=channels,
                               subject_pattern=subject_pattern)
    class_names = classes_lib.canonical_order(folder.names)
    labels = np.array([class_names.index(n) for n in folder.names], np.int32)
    split = types.Split(folder.images, labels, folder.subjects)
    return types.Dataset(name=pathlib.Path(root).name, class_names=class_names,
                         splits={"all": split})


def subject_folds(subjects: np.ndarray, *, num_folds: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Splits the unique subjects into `num_folds` disjoint, near-equal folds (sorted ids each).

    Deterministic for (set of subjects, num_folds, seed): a seeded permutation of the sorted
    unique ids, cut into contiguous pieces.
    """
    unique = np.unique(subjects)
    if not 2 <= num_folds <= len(unique):
        raise ValueError(f"num_folds={num_folds}; expected 2..{len(unique)} (number of subjects)")
    perm = np.random.default_rng(seed).permutation(unique)
    return tuple(np.sort(f) for f in np.array_split(perm, num_folds))


class CkPlus48(tfds_builders.ManualDirBuilder, skip_registration=True):
    """CK+48 from `<manual_dir>/CK+48/<emotion>/*.png` into one array_record split 'images'."""

    name = "ckplus48_fer_jax"
    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Place the {CKPLUS48_FOLDER}/<emotion>/<Sxxx_yyy_zzzzzzzz>.png tree in manual_dir.")

    def _info(self):
        features = tfds.features.FeaturesDict({
            "image": tfds_builders.image_feature(CKPLUS48_SHAPE),
            # Stored over all canonical classes so the file format does not depend on folders.
            "label": tfds.features.ClassLabel(names=classes_lib.CANONICAL),
            "subject": tfds.features.Scalar(dtype=np.int32),
            "file": tfds.features.Text(),
        })
        return tfds.core.DatasetInfo(
            builder=self, features=features, disable_shuffling=True,
            description="CK+48 peak-frame face crops; subject from the file name.",
            homepage="https://www.jeffcohn.net/Resources/")

    def _split_generators(self, dl_manager):
        # Read and validate everything before TFDS writes anything.
        folder = read_image_folder(pathlib.Path(dl_manager.manual_dir) / CKPLUS48_FOLDER)
        if folder.images.shape[1:] != CKPLUS48_SHAPE:
            raise ValueError(f"{dl_manager.manual_dir}/{CKPLUS48_FOLDER}/{folder.files[0]}: CK+48 "
                             f"images must be 48x48 gray, got {folder.images.shape[1:]}")
        return {"images": self._generate_examples(folder)}

    def _generate_examples(self, folder: ImageFolder):
        for i, file in enumerate(folder.files):
            yield i, {"image": folder.images[i], "label": folder.names[i],
                      "subject": folder.subjects[i], "file": file}


def load_ckplus48(*, manual_dir, data_dir=None, num_folds: int = 10, fold: int = 0,
                  seed: int = 0) -> types.Dataset:
    """CK+48 as a `Dataset` with subject-disjoint 'train' / 'test' (test = fold `fold`).

    Args:
      manual_dir: folder containing `CK+48/`.
      data_dir: where the array_record build is cached (default $TFDS_DATA_DIR or
        ~/tensorflow_datasets); built on the first call only.
      num_folds, fold, seed: subject-wise k-fold (see `subject_folds`); 0 <= fold < num_folds.
    """
    root = pathlib.Path(manual_dir).expanduser()
    tree = root / CKPLUS48_FOLDER
    if not tree.is_dir():
        raise FileNotFoundError(f"CK+48 manual_dir {root} has no {CKPLUS48_FOLDER}/ folder; "
                                f"expected {tree}/<emotion>/<Sxxx_yyy_zzzzzzzz>.png")
    if not 0 <= fold < num_folds:
        raise ValueError(f"fold={fold}; expected 0 <= fold < num_folds={num_folds}")
    files = [p for p in tree.rglob("*") if p.is_file()]
    config = tfds_builders.SourceConfig(
        name=f"src_{tfds_builders.fingerprint(files, root=tree)}", version=str(CkPlus48.VERSION))
    builder = tfds_builders.prepare(CkPlus48, config=config, manual_dir=root, data_dir=data_dir)
    cols = tfds_builders.read_split(builder, "images", keys=("image", "label", "subject", "file"))
    order = np.argsort(cols["file"], kind="stable")  # Sorted file order, whatever the file order.
    cols = {k: v[order] for k, v in cols.items()}
    # Stored labels index CANONICAL; re-index them into the classes this dataset has.
    present = [classes_lib.CANONICAL[i] for i in np.unique(cols["label"])]
    class_names = classes_lib.canonical_order(present)
    remap = np.array([class_names.index(c) if c in class_names else -1
                      for c in classes_lib.CANONICAL], np.int32)
    full = types.Split(cols["image"], remap[cols["label"]], cols["subject"].astype(np.int32))
    test_subjects = subject_folds(full.subjects, num_folds=num_folds, seed=seed)[fold]
    is_test = np.isin(full.subjects, test_subjects)
    return types.Dataset(name="ckplus48", class_names=class_names,
                         splits={"train": full.take(~is_test), "test": full.take(is_test)})
