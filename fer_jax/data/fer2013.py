"""FER-2013 (Goodfellow et al., ICML 2013 workshop) with optional FER+ labels (Barsoum et al. 2016).

Raw files (TFDS `manual_dir` style): `<manual_dir>/fer2013.csv` or `fer2013.csv.gz` in Kaggle's
format (header `emotion,pixels,Usage`, 2304 space-separated gray values per row, row-major 48x48)
and, optionally, FER+'s `fer2013new.csv` (`Usage,Image name,` + 10 vote columns), whose row i is
the csv's row i (FER+ README: align by position, never by image name).

Splits follow the usual protocol: Training -> 'train', PublicTest -> 'validation',
PrivateTest -> 'test'. Labels are canonical class indices (`classes.py`): FER-2013's coding
0..6 = angry, disgust, fear, happy, sad, surprise, neutral is mapped by name, not assumed.

With `labels='ferplus'` the label is the FER+ majority: argmax of the 8 emotion votes, ties to the
first in FER+ column order (neutral, happiness, surprise, ...), and a row is dropped when the
unknown or NF ("not a face") column has strictly more votes than every emotion (i.e. when argmax
over all 10 columns, first maximum winning, is unknown/NF) or when it has no emotion vote.
`label_dist` holds the 8 emotion votes normalized to sum to 1, in canonical class order.

The data are built once into array_record files (the `Fer2013` builder below) and read back with
NumPy only; see `tfds_builders.py`.
"""

from __future__ import annotations

import csv
import gzip
import pathlib
import zlib

import numpy as np
import tensorflow_datasets as tfds

from fer_jax.data import classes as classes_lib
from fer_jax.data import tfds_builders, types

SIZE = 48
NUM_PIXELS = SIZE * SIZE
CSV_NAMES = ("fer2013.csv", "fer2013.csv.gz")  # A plain csv is preferred: it parses faster.
FERPLUS_NAME = "fer2013new.csv"
HEADER = ("emotion", "pixels", "Usage")
FER2013_CODING = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
FERPLUS_COLUMNS = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
                   "contempt", "unknown", "NF")
USAGE_TO_SPLIT = {"Training": "train", "PublicTest": "validation", "PrivateTest": "test"}

# Canonical class names of each labelling and the map from a source's coding into them.
FER2013_CLASSES = classes_lib.canonical_order(FER2013_CODING)
FERPLUS_CLASSES = classes_lib.canonical_order(FERPLUS_COLUMNS[:8])
_CODE_TO_LABEL = np.array([FER2013_CLASSES.index(classes_lib.canonical_name(c))
                           for c in FER2013_CODING], np.int32)
_FERPLUS_TO_LABEL = np.array([FERPLUS_CLASSES.index(classes_lib.canonical_name(c))
                              for c in FERPLUS_COLUMNS[:8]], np.int32)


def find_files(manual_dir) -> tuple[pathlib.Path, pathlib.Path | None]:
    """The FER-2013 csv (plain or gzip) and the FER+ vote file (None if absent) in `manual_dir`."""
    root = pathlib.Path(manual_dir).expanduser()
    for name in CSV_NAMES:
        if (root / name).is_file():
            votes = root / FERPLUS_NAME
            return root / name, (votes if votes.is_file() else None)
    state = "does not exist" if not root.exists() else "has no FER-2013 csv"
    raise FileNotFoundError(
        f"FER-2013 manual_dir {root} {state}; expected {root / CSV_NAMES[0]} or "
        f"{root / CSV_NAMES[1]} (Kaggle format, header {','.join(HEADER)}), plus optionally "
        f"{root / FERPLUS_NAME} for FER+ labels")


def _decoded_lines(lines, path: pathlib.Path):
    """Binary lines as text: UTF-8 (ASCII, Kaggle's files, is a subset), a byte-order mark
    allowed on the first line (a csv re-saved by a spreadsheet). Decoding line by line lets an
    error name the exact line."""
    for n, raw in enumerate(lines, start=1):
        try:
            yield raw.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} line {n}: byte {raw[e.start:e.start + 1]!r} at column "
                             f"{e.start + 1} is not UTF-8 text; expected a csv of ASCII "
                             "digits and names") from e


def _csv_rows(path: pathlib.Path):
    """Yields (line number, fields) for every non-blank line of a csv, plain or gzip (by the
    .gz suffix). A file that is not readable (not UTF-8, corrupt or truncated gzip) raises
    ValueError naming the file and the line, never a codec or gzip traceback."""
    gz = path.suffix == ".gz"
    with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
        # Binary lines keep their '\r\n', as the csv module's newline='' asks for.
        reader = csv.reader(_decoded_lines(f, path))
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except (OSError, EOFError, zlib.error, csv.Error) as e:
                kind = "a complete gzip file" if gz else "a csv file"
                raise ValueError(f"{path}: cannot read past line {reader.line_num} "
                                 f"({type(e).__name__}: {e}); expected {kind}") from e
            if row:  # A blank line holds no example.
                yield reader.line_num, row


def _parse_pixels(text: str, where: str) -> np.ndarray:
    """2304 space-separated integers 0..255 -> (48, 48, 1) uint8, or a ValueError saying where."""
    try:
        values = np.fromstring(text, dtype=np.int32, sep=" ")
    except ValueError:
        values = None  # NumPy >= 2.3 raises on a non-integer token; the message below says more.
    # fromstring skips repeated blanks and (older NumPy) stops early, so count separators too.
    if values is None or len(values) != NUM_PIXELS or text.count(" ") != NUM_PIXELS - 1:
        tokens = text.split()
        bad = [t for t in tokens if not t.isdigit()][:3]
        detail = f"non-integer values {bad}" if bad else f"{len(tokens)} values"
        raise ValueError(f"{where}: field 'pixels' must be {NUM_PIXELS} space-separated integers "
                         f"0..255 (48x48), got {detail}")
    if values.min() < 0 or values.max() > 255:
        raise ValueError(f"{where}: field 'pixels' has values outside 0..255 "
                         f"(min {values.min()}, max {values.max()})")
    return values.astype(np.uint8).reshape(SIZE, SIZE, 1)


def read_csv(path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parses a Kaggle fer2013.csv(.gz): images (N,48,48,1) uint8, codes (N,) int32, usage (N,).

    Columns are found by name (any order, blanks around names ignored); blank lines are skipped.
    Every row is validated; an error names the file, the 0-based data row, the csv line and
    the field.
    """
    path = pathlib.Path(path)
    images, codes, usage = [], [], []
    rows = _csv_rows(path)
    _, header = next(rows, (0, None))
    if header is None:
        raise ValueError(f"{path}: file is empty; expected the header {','.join(HEADER)} and "
                         "one row per image")
    names = [h.strip() for h in header]
    missing = [c for c in HEADER if c not in names]
    if missing:
        raise ValueError(f"{path}: header lacks column(s) {missing}; expected the header "
                         f"{','.join(HEADER)} (any order), got {header}")
    col = {c: names.index(c) for c in HEADER}
    for line, row in rows:
        where = f"{path} data row {len(images)} (line {line})"
        if len(row) != len(header):
            raise ValueError(f"{where}: expected {len(header)} fields {','.join(names)}, got "
                             f"{len(row)} (truncated or malformed row?)")
        emotion, pixels, use = (row[col[c]] for c in HEADER)
        if emotion.strip() not in {str(c) for c in range(len(FER2013_CODING))}:
            raise ValueError(f"{where}: field 'emotion' must be an integer 0..6, "
                             f"got {emotion!r}")
        if use.strip() not in USAGE_TO_SPLIT:
            raise ValueError(f"{where}: field 'Usage' must be one of {list(USAGE_TO_SPLIT)}, "
                             f"got {use!r}")
        images.append(_parse_pixels(pixels.strip(), where))
        codes.append(int(emotion))
        usage.append(use.strip())
    if not images:
        raise ValueError(f"{path}: no data rows after the header")
    return np.stack(images), np.asarray(codes, np.int32), np.asarray(usage)


def read_ferplus_votes(path, usage: np.ndarray) -> np.ndarray:
    """Parses fer2013new.csv into (N, 10) int32 votes, checking it row-aligns with `usage`."""
    path = pathlib.Path(path)
    votes = []
    rows = _csv_rows(path)
    _, header = next(rows, (0, None))
    if header is None or tuple(h.strip() for h in header[2:]) != FERPLUS_COLUMNS:
        got = "an empty file" if header is None else header
        raise ValueError(f"{path}: expected the header Usage,Image name,"
                         f"{','.join(FERPLUS_COLUMNS)}, got {got}")
    for i, (line, row) in enumerate(rows):
        where = f"{path} data row {i} (line {line})"
        if len(row) != 12:
            raise ValueError(f"{where}: expected 12 fields (Usage, Image name, 10 votes), "
                             f"got {len(row)}")
        if i < len(usage) and row[0] != usage[i]:
            raise ValueError(f"{where}: Usage {row[0]!r} differs from the FER-2013 csv's "
                             f"{usage[i]!r}; the two files must list the same rows in order")
        if not all(v.strip().isdigit() for v in row[2:]):
            raise ValueError(f"{where}: votes must be non-negative integers, got {row[2:]}")
        votes.append([int(v) for v in row[2:]])
    if len(votes) != len(usage):
        raise ValueError(f"{path} has {len(votes)} data rows but the FER-2013 csv has "
                         f"{len(usage)}; row i of both files must be the same image")
    return np.asarray(votes, np.int32).reshape(-1, len(FERPLUS_COLUMNS))


def ferplus_labels(votes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FER+ majority labels from (N, 10) votes in FER+ column order.

    Returns (labels (N,) int32 canonical index into FERPLUS_CLASSES, keep (N,) bool: False where
    unknown/NF wins, label_dist (N, 8) float32 emotion votes normalized, canonical order).
    """
    votes = np.asarray(votes)
    emotion = votes[:, :8]
    # Ties between an emotion and unknown/NF go to the emotion, as argmax over all 10 would;
    # a row without a single emotion vote has no label at all.
    best = emotion.max(axis=1)
    keep = (best >= votes[:, 8:].max(axis=1)) & (best > 0)
    labels = _FERPLUS_TO_LABEL[emotion.argmax(axis=1)]
    dist = np.zeros(emotion.shape, np.float32)
    total = emotion.sum(axis=1, keepdims=True)
    dist[:, _FERPLUS_TO_LABEL] = emotion / np.maximum(total, 1)
    return labels.astype(np.int32), keep, dist


class Fer2013(tfds_builders.ManualDirBuilder, skip_registration=True):
    """FER-2013 (+ FER+ votes when fer2013new.csv is present) from a manual_dir, array_record."""

    name = "fer2013_fer_jax"
    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Place {' or '.join(CSV_NAMES)} (Kaggle 'Challenges in Representation Learning: Facial "
        f"Expression Recognition') and optionally {FERPLUS_NAME} (github.com/microsoft/FERPlus) "
        "in manual_dir.")

    def _info(self):
        features = {
            "image": tfds_builders.image_feature((SIZE, SIZE, 1)),
            "label": tfds.features.ClassLabel(names=FER2013_CLASSES),
            "row": tfds.features.Scalar(dtype=np.int32),  # Data-row index into the csv.
        }
        if self.builder_config.options["with_votes"]:
            features["votes"] = tfds.features.Tensor(shape=(10,), dtype=np.int32)
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict(features),
            description="FER-2013 48x48 gray faces; votes = FER+ counts in FER+ column order.",
            homepage="https://github.com/microsoft/FERPlus", disable_shuffling=True)

    def _split_generators(self, dl_manager):
        # Parse everything up front so that a bad row fails before any file is written.
        csv_path, votes_path = find_files(dl_manager.manual_dir)
        images, codes, usage = read_csv(csv_path)
        votes = None
        if self.builder_config.options["with_votes"]:
            votes = read_ferplus_votes(votes_path, usage)
        return {split: self._generate_examples(np.flatnonzero(usage == use), images,
                                               _CODE_TO_LABEL[codes], votes)
                for use, split in USAGE_TO_SPLIT.items() if (usage == use).any()}

    def _generate_examples(self, rows, images, labels, votes):
        for i in rows:
            example = {"image": images[i], "label": labels[i], "row": i}
            if votes is not None:
                example["votes"] = votes[i]
            yield int(i), example


def load_fer2013(*, manual_dir, data_dir=None, labels: str = "fer2013") -> types.Dataset:
    """FER-2013 as a `Dataset` with splits 'train', 'validation', 'test' (those present).

    Args:
      manual_dir: folder holding fer2013.csv(.gz) and, for `labels='ferplus'`, fer2013new.csv.
      data_dir: where the array_record build is cached (default $TFDS_DATA_DIR or
        ~/tensorflow_datasets); built on the first call only.
      labels: 'fer2013' (7 classes, `label_dist` None) or 'ferplus' (8 classes incl. contempt,
        FER+ majority label, vote shares in `label_dist`, unknown/NF-majority rows dropped).
    """
    if labels not in ("fer2013", "ferplus"):
        raise ValueError(f"labels={labels!r}; expected 'fer2013' or 'ferplus'")
    csv_path, votes_path = find_files(manual_dir)
    if labels == "ferplus" and votes_path is None:
        raise FileNotFoundError(f"labels='ferplus' needs {csv_path.parent / FERPLUS_NAME} "
                                f"(FER+ votes, github.com/microsoft/FERPlus); it is missing")
    files = [p for p in (csv_path, votes_path) if p is not None]
    with_votes = votes_path is not None
    fp = tfds_builders.fingerprint(files, options=f"with_votes={with_votes}")
    config = tfds_builders.SourceConfig(name=f"src_{fp}", version=str(Fer2013.VERSION),
                                        options={"with_votes": with_votes})
    builder = tfds_builders.prepare(Fer2013, config=config, manual_dir=csv_path.parent,
                                    data_dir=data_dir)
    keys = ("image", "label", "row") + (("votes",) if labels == "ferplus" else ())
    splits = {}
    for split in USAGE_TO_SPLIT.values():
        if split not in builder.info.splits:
            continue
        cols = tfds_builders.read_split(builder, split, keys=keys)
        order = np.argsort(cols["row"], kind="stable")  # csv order, whatever the file order
        cols = {k: v[order] for k, v in cols.items()}
        if labels == "fer2013":
            splits[split] = types.Split(cols["image"], cols["label"].astype(np.int32))
        else:
            y, keep, dist = ferplus_labels(cols["votes"])
            splits[split] = types.Split(cols["image"][keep], y[keep], label_dist=dist[keep])
    class_names = FER2013_CLASSES if labels == "fer2013" else FERPLUS_CLASSES
    return types.Dataset(name=labels, class_names=class_names, splits=splits)


__all__ = ["Fer2013", "ferplus_labels", "find_files", "load_fer2013", "read_csv",
           "read_ferplus_votes"]
