"""Readers for real FER datasets kept as local files: class folders, RAF-DB, AffectNet, FERG.

Each reader works in two steps. `index_*` lists the dataset's files with their canonical class
(`classes.canonical_name`), subject id and the source's own split, without decoding any pixels;
files that cannot be examples (a non-image file, a csv row whose image is missing, an AffectNet
row labelled none / uncertain / non-face) go to `Index.rejected` with the path and the reason.
Folder readers decide what is an image by content, not by suffix (`sniff_image`): a GIF or an
extensionless file that PIL recognises is an image (the Yale faces ship GIFs named
`subject01.happy`), a `.jpg` holding text is rejected as unreadable.
`load_index` then decodes every file into a `types.Dataset` (uint8, one size) and raises on the
first problem, naming the file; the prepare pipeline (`fer_jax.data.prepare`) reads the same index
tolerantly and counts each problem in its report instead.

Layouts (root = the folder given as `input.path`):
* class folders: `root/<class>/<image>` (any depth below the class folder), optional subject-id
  regex on the path below the class folder (`^(S\\d+)_` for CK+ names);
* Aff-Wild2-derived class folders (Khodadadi, docs/papers.md#prepare): the same with exactly the six
  classes anger, disgust, fear, happiness, sadness, surprise (labels 0..5 in that order);
* RAF-DB basic (Li, Deng, Du, CVPR 2017): `basic/EmoLabel/list_patition_label.txt` lines
  `train_00001.jpg 5` (1..7 = surprise, fear, disgust, happiness, sadness, anger, neutral) and
  `basic/Image/aligned/train_00001_aligned.jpg` (or `Image/original/train_00001.jpg`);
* AffectNet (Mollahosseini, Hasani, Mahoor, IEEE TAC 2017): `Manually_Annotated_Images/<dir>/
  <file>.jpg` + `training.csv` / `validation.csv` (expression 0..7; 8-10 are rejected);
* FERG-DB (Aneja et al., ACCV 2016): `FERG_DB_256/<character>/<character>_<expression>/
  <character>_<expression>_<n>.png`; the six characters are the subjects (federated clients).
"""

from __future__ import annotations

import csv
import dataclasses
import pathlib
import re
import warnings
from collections import Counter

import numpy as np
from PIL import Image

from fer_jax.data import classes as classes_lib
from fer_jax.data import types

# Suffixes that promise an image: such a file PIL cannot recognise is 'unreadable', any other
# unrecognised file 'not_image'. Recognised content is an image whatever its suffix.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
# Reasons a file never becomes an example; the prepare report counts them under these names.
NOT_IMAGE, MISSING, NO_LABEL, UNREADABLE = ("not_image", "missing_file", "no_expression_label",
                                            "unreadable")
EMPTY, TOO_LARGE = "empty_file", "too_large"
# What each reason means, for messages that name a rejected file.
REASONS = {
    NOT_IMAGE: "not an image PIL recognises, and its suffix promises none",
    UNREADABLE: "named or recognised as an image, but PIL cannot read it",
    EMPTY: "a file of 0 bytes",
    TOO_LARGE: "more pixels than PIL.Image.MAX_IMAGE_PIXELS, PIL's decompression-bomb guard",
    MISSING: "listed by the dataset's label file but absent",
    NO_LABEL: "labelled none / uncertain / non-face by the dataset",
}

AFFWILD2_CLASSES = ("anger", "disgust", "fear", "happiness", "sadness", "surprise")
RAFDB_LABELS = {1: "surprise", 2: "fear", 3: "disgust", 4: "happiness", 5: "sadness",
                6: "anger", 7: "neutral"}
AFFECTNET_LABELS = {0: "neutral", 1: "happiness", 2: "sadness", 3: "surprise", 4: "fear",
                    5: "disgust", 6: "anger", 7: "contempt"}
AFFECTNET_UNUSED = {8: "none", 9: "uncertain", 10: "non-face"}
AFFECTNET_COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
                     "expression")
FERG_CHARACTERS = ("aia", "bonnie", "jules", "malcolm", "mery", "ray")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One example on disk. label: canonical class; subject: int id or -1; split: the source's
    own split ('train' / 'test') or '' when it has none; box: annotated (x, y, w, h) or None."""

    path: pathlib.Path
    label: str
    subject: int = -1
    split: str = ""
    box: tuple[float, float, float, float] | None = None


@dataclasses.dataclass(frozen=True)
class Index:
    """A dataset's files: entries in a fixed order, rejected (path, reason) pairs, and the name
    behind every subject id (e.g. {10: 'S010'} or {0: 'aia'})."""

    name: str
    entries: tuple[Entry, ...]
    rejected: tuple[tuple[str, str], ...] = ()
    subject_names: dict[int, str] | None = None

    @property
    def class_names(self) -> tuple[str, ...]:
        return classes_lib.canonical_order(e.label for e in self.entries)


# ------------------------------------------------------------------------------ decoding.


class ImageError(ValueError):
    """A file that gives no image; the message names it, `reason` is one of REASONS' keys."""

    def __init__(self, message: str, reason: str = UNREADABLE):
        super().__init__(message)
        self.reason = reason


def open_image(path) -> Image.Image:
    """PIL's lazy `Image.open` (header only) with errors a person can act on: ImageError naming
    the file for an empty file, content PIL does not recognise, or an image larger than
    `Image.MAX_IMAGE_PIXELS` (PIL only warns up to twice that; a face image is far smaller, so
    both count as too large here, before any pixel is decoded)."""
    path = pathlib.Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError as e:
        raise ImageError(f"{path}: file not found (moved or deleted after it was listed?)",
                         MISSING) from e
    if size == 0:
        raise ImageError(f"{path}: empty file (0 bytes); expected an image", EMPTY)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{path}: image too large to decode ({e}); expected at most "
                         f"PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS} pixels (raise "
                         "it if you trust the file)", TOO_LARGE) from e
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{path}: cannot decode image ({type(e).__name__}: {e}); expected an "
                         "image file PIL reads (png, jpg, bmp, gif, tiff, webp, ...)") from e


def decode_image(path) -> tuple[np.ndarray, str]:
    """An image file as (H, W, 3) uint8 RGB plus the file's PIL mode, with fixed rules (an
    animated GIF or multi-page TIFF gives its first frame):
    gray / palette / bilevel are replicated to RGB, alpha is dropped (PIL's convert('RGB')),
    CMYK becomes R = (255 - C)(255 - K) / 255 (PIL's convert('RGB'), also for Adobe's inverted
    CMYK JPEGs), 16-bit is mapped linearly [0, 65535] -> [0, 255] (PIL's convert would clip it to
    white). Raises ImageError (a ValueError) naming the file when it is empty, too large,
    truncated or otherwise undecodable, or has float pixels."""
    with open_image(path) as im:
        mode = im.mode
        if mode == "F":
            raise ImageError(f"{path}: mode F (32-bit float) pixels; expected an 8-bit or "
                             "16-bit integer image (their scale, 0..1 or 0..255, is unknown)")
        try:
            if mode.startswith("I;16") or mode == "I":
                raw = np.asarray(im)  # Forces the decode inside the try.
            else:
                raw = np.asarray(im.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as e:
            raise ImageError(f"{path}: cannot decode image ({type(e).__name__}: {e}); expected "
                             f"a complete {im.format or 'image'} file") from e
    if mode.startswith("I;16") or mode == "I":
        # 32-bit 'I' is how PIL opens some 16-bit files; values beyond 16 bits are not ours to map.
        if raw.min() < 0 or raw.max() > 65535:
            raise ImageError(f"{path}: {mode} pixels span [{raw.min()}, {raw.max()}]; expected "
                             "8-bit or 16-bit unsigned values")
        raw = raw.astype(np.uint16)
        raw = ((raw.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        raw = np.repeat(raw.reshape(*raw.shape[:2], 1), 3, axis=2)
    if raw.ndim != 3 or raw.shape[2] != 3 or min(raw.shape[:2]) < 1:
        raise ImageError(f"{path}: decoded to shape {raw.shape}; expected (H, W, 3)")
    return np.ascontiguousarray(raw), mode


def resize_rgb(image: np.ndarray, size: int, *, channels: int = 3) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, channels) uint8: bilinear (antialiased when shrinking),
    then ITU-R BT.601 luma for channels=1 (PIL's convert('L'))."""
    im = Image.fromarray(image)
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BILINEAR)
    if channels == 1:
        im = im.convert("L")
    return np.asarray(im, np.uint8).reshape(size, size, channels)


def sniff_image(path) -> str | None:
    """None when PIL recognises the file's content as an image (it reads the header only), else
    the reason it is no example: EMPTY for 0 bytes, TOO_LARGE past the decompression-bomb guard,
    UNREADABLE for a name with an image suffix, NOT_IMAGE otherwise.
    A truncated file with a valid header passes here and fails in `decode_image`."""
    path = pathlib.Path(path)
    try:
        with open_image(path):
            return None
    except ImageError as e:
        if e.reason != UNREADABLE:
            return e.reason
        return UNREADABLE if path.suffix.lower() in IMAGE_SUFFIXES else NOT_IMAGE


def rejection_summary(rejected) -> str:
    """'60 not_image (.happy 15, .sad 15, ...), 2 unreadable (.jpg 2)': counts by reason, then by
    suffix within a reason (the 5 most common), so a user sees what kind of file was refused."""
    by_reason: dict[str, Counter] = {}
    for path, reason in rejected:
        suffix = pathlib.Path(path).suffix.lower() or "no suffix"
        by_reason.setdefault(reason, Counter())[suffix] += 1
    parts = []
    for reason, suffixes in sorted(by_reason.items(), key=lambda kv: -sum(kv[1].values())):
        kinds = ", ".join(f"{s} {n}" for s, n in suffixes.most_common(5))
        more = ", ..." if len(suffixes) > 5 else ""
        parts.append(f"{sum(suffixes.values())} {reason} ({kinds}{more})")
    return ", ".join(parts)


# ------------------------------------------------------------------------------ helpers.


def _root(path, *, inner: str, what: str) -> pathlib.Path:
    """`path` itself, or `path/inner` when the user pointed at the folder above it."""
    path = pathlib.Path(path).expanduser()
    if (path / inner).is_dir():
        return path / inner
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder {path} does not exist")
    return path


def _visible(folder: pathlib.Path):
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def subject_ids(keys: list[str]) -> tuple[np.ndarray, dict[int, str]]:
    """Int ids for subject keys: the key's digits ('S010' -> 10) when that maps keys one to one,
    else the key's rank among the sorted distinct keys ('aia' -> 0)."""
    unique = sorted(set(keys))
    digits = {k: re.sub(r"\D", "", k) for k in unique}
    by_digits = {int(d) for d in digits.values() if d}
    if all(digits.values()) and len(by_digits) == len(unique):
        ids = {k: int(digits[k]) for k in unique}
    else:
        ids = {k: i for i, k in enumerate(unique)}
    return np.array([ids[k] for k in keys], np.int32), {v: k for k, v in ids.items()}


# ------------------------------------------------------------------------------ readers.


def index_class_folders(root, *, subject_pattern: str | None = None,
                        allowed_classes: tuple[str, ...] | None = None,
                        name: str | None = None) -> Index:
    """`root/<class>/.../<image>`: the folder name is the class (through canonical_name).

    subject_pattern: a regex searched in the path below the class folder ('S010_004_1.png' or
    'video7/0001.jpg'); its first group (or whole match) is the subject key. A file it does not
    match is an error naming the file. allowed_classes: canonical classes the layout may have.
    """
    root = pathlib.Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; expected "
                                f"{root}/<class name>/<image>{'|'.join(IMAGE_SUFFIXES)}")
    regex = re.compile(subject_pattern) if subject_pattern else None
    entries, rejected, keys = [], [], []
    folders = [p for p in _visible(root) if p.is_dir()]
    for folder in folders:
        label = classes_lib.canonical_name(folder.name, source=f"class folder {folder}")
        if allowed_classes is not None and label not in allowed_classes:
            raise ValueError(f"class folder {folder} is {label!r}; this layout expects only "
                             f"{list(allowed_classes)}")
        files = sorted(p for p in folder.rglob("*")
                       if p.is_file() and not any(s.startswith(".") for s in p.parts[-2:]))
        for f in files:
            reason = sniff_image(f)
            if reason is not None:
                rejected.append((str(f), reason))
                continue
            if regex is not None:
                rel = f.relative_to(folder).as_posix()
                m = regex.search(rel)
                if not m:
                    raise ValueError(f"{f}: {rel!r} has no subject id matching "
                                     f"{subject_pattern!r}")
                keys.append(m.group(1) if regex.groups else m.group(0))
            entries.append(Entry(f, label))
    if not entries:
        raise FileNotFoundError(_no_images_message(root, folders, rejected))
    names = None
    if regex is not None:
        ids, names = subject_ids(keys)
        entries = [dataclasses.replace(e, subject=int(s)) for e, s in zip(entries, ids,
                                                                           strict=True)]
    return Index(name or root.name, tuple(entries), tuple(rejected), names)


def _no_images_message(root: pathlib.Path, folders, rejected) -> str:
    """Why a class-folder root gave no example: what was seen, and each kind's reason."""
    loose = [p for p in _visible(root) if p.is_file()]
    expected = (f"expected {root}/<class name>/<image> (any image file PIL reads: "
                f"{', '.join(s.lstrip('.') for s in IMAGE_SUFFIXES)}, any suffix or none)")
    if not folders:
        return (f"image folder {root} has no class folders ({len(loose)} files lie directly in "
                f"it); {expected}")
    seen = f"saw {len(rejected)} files in {len(folders)} class folders"
    if rejected:
        seen += f" and rejected all of them: {rejection_summary(rejected)}"
    if loose:
        seen += f"; {len(loose)} more files lie directly in {root}, outside any class folder"
    return f"image folder {root} has no readable images: {seen}; {expected}"


def index_affwild2(root, *, subject_pattern: str | None = None) -> Index:
    """Aff-Wild2-derived class folders (Khodadadi): the six basic classes, labels 0..5 in
    canonical order; the paper's file names carry no subject, so subject_pattern is optional."""
    return index_class_folders(root, subject_pattern=subject_pattern,
                               allowed_classes=AFFWILD2_CLASSES, name="affwild2")


def index_rafdb(root, *, variant: str = "aligned") -> Index:
    """RAF-DB basic: the label list gives file, label 1..7 and split (train_/test_ prefix)."""
    if variant not in ("aligned", "original"):
        raise ValueError(f"variant={variant!r}; expected 'aligned' or 'original'")
    root = _root(root, inner="basic", what="RAF-DB")
    labels = root / "EmoLabel" / "list_patition_label.txt"
    if not labels.is_file():
        raise FileNotFoundError(f"RAF-DB label list {labels} not found; expected basic/EmoLabel/"
                                "list_patition_label.txt and basic/Image/aligned/*_aligned.jpg")
    entries, rejected = [], []
    for n, line in enumerate(labels.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or int(parts[1]) not in RAFDB_LABELS:
            raise ValueError(f"{labels} line {n}: {line!r}; expected '<train|test>_NNNNN.jpg "
                             "<label 1..7>'")
        file, label = parts[0], RAFDB_LABELS[int(parts[1])]
        split = file.split("_")[0]
        if split not in ("train", "test"):
            raise ValueError(f"{labels} line {n}: {file!r} starts with neither train_ nor test_")
        stem = pathlib.Path(file)
        image = (root / "Image" / "aligned" / f"{stem.stem}_aligned{stem.suffix}"
                 if variant == "aligned" else root / "Image" / "original" / file)
        if not image.is_file():
            rejected.append((str(image), MISSING))
            continue
        entries.append(Entry(image, label, split=split))
    if not entries:
        raise FileNotFoundError(f"RAF-DB {root}: none of the {variant} images of {labels} exist "
                                f"(expected {root}/Image/{variant}/...)")
    return Index("rafdb", tuple(entries), tuple(rejected))


def _affectnet_csv(root: pathlib.Path, csv_path: pathlib.Path, split: str, entries, rejected):
    images = root / "Manually_Annotated_Images"
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in AFFECTNET_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{csv_path}: header lacks columns {missing}; expected "
                             f"{list(AFFECTNET_COLUMNS)} (+ facial_landmarks, valence, arousal)")
        for n, row in enumerate(reader, start=2):
            try:
                code = int(row["expression"])
                box = tuple(float(row[c]) for c in ("face_x", "face_y", "face_width",
                                                    "face_height"))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{csv_path} row {n}: expression / face box not numbers "
                                 f"({e})") from e
            path = images / row["subDirectory_filePath"]
            if code in AFFECTNET_UNUSED:
                rejected.append((str(path), NO_LABEL))
            elif code not in AFFECTNET_LABELS:
                raise ValueError(f"{csv_path} row {n}: expression {code}; expected 0..10")
            elif not path.is_file():
                rejected.append((str(path), MISSING))
            else:
                entries.append(Entry(path, AFFECTNET_LABELS[code], split=split, box=box))


def index_affectnet(root) -> Index:
    """AffectNet manually annotated set: training.csv -> 'train', validation.csv -> 'test' (the
    usual protocol: the test set is not public). 8 classes; codes 8-10 are rejected."""
    root = pathlib.Path(root).expanduser()
    found = [(root / f"{n}.csv", s) for n, s in (("training", "train"), ("validation", "test"))
             if (root / f"{n}.csv").is_file()]
    if not found or not (root / "Manually_Annotated_Images").is_dir():
        raise FileNotFoundError(f"AffectNet folder {root} needs Manually_Annotated_Images/ and "
                                "training.csv and/or validation.csv")
    entries, rejected = [], []
    for csv_path, split in found:
        _affectnet_csv(root, csv_path, split, entries, rejected)
    if not entries:
        raise FileNotFoundError(f"AffectNet {root}: no csv row has a usable label and image")
    return Index("affectnet", tuple(entries), tuple(rejected))


def index_ferg(root) -> Index:
    """FERG-DB: `<character>/<character>_<expression>/*.png`; subject = character's index in
    FERG_CHARACTERS (aia 0 ... ray 5), so characters can be federated clients."""
    root = _root(root, inner="FERG_DB_256", what="FERG-DB")
    entries, rejected = [], []
    for char_dir in (p for p in _visible(root) if p.is_dir()):
        char = char_dir.name.lower()
        if char not in FERG_CHARACTERS:
            raise ValueError(f"FERG character folder {char_dir}: expected one of "
                             f"{list(FERG_CHARACTERS)}")
        for expr_dir in (p for p in _visible(char_dir) if p.is_dir()):
            prefix, _, expr = expr_dir.name.partition("_")
            if prefix.lower() != char or not expr:
                raise ValueError(f"FERG expression folder {expr_dir}: expected "
                                 f"{char_dir.name}_<expression>")
            label = classes_lib.canonical_name(expr, source=f"FERG folder {expr_dir}")
            for f in (p for p in _visible(expr_dir) if p.is_file()):
                reason = sniff_image(f)
                if reason is not None:
                    rejected.append((str(f), reason))
                    continue
                entries.append(Entry(f, label, subject=FERG_CHARACTERS.index(char)))
    if not entries:
        raise FileNotFoundError(f"FERG-DB folder {root} has no <character>/<character>_"
                                "<expression>/*.png images")
    return Index("ferg", tuple(entries), tuple(rejected), dict(enumerate(FERG_CHARACTERS)))


READERS = {"folder": index_class_folders, "affwild2": index_affwild2, "rafdb": index_rafdb,
           "affectnet": index_affectnet, "ferg": index_ferg}


def load_index(index: Index, *, image_size: int = 96, channels: int = 3,
               crop_to_box: bool = False) -> types.Dataset:
    """Decodes an index into a `Dataset` of (image_size, image_size, channels) uint8 images.

    Strict: a rejected file or an undecodable image raises ValueError naming it. Splits are the
    source's own ('train' / 'test'), or one split 'all'. Labels index the canonical order of the
    classes present; subjects are None when any entry has none. crop_to_box crops AffectNet's
    annotated face box (clipped to the image) before resizing.
    """
    if index.rejected:
        path, reason = index.rejected[0]
        raise ValueError(f"{path}: {reason} ({REASONS.get(reason, reason)}); {index.name} has "
                         f"{len(index.rejected)} files that are no examples: "
                         f"{rejection_summary(index.rejected)}. Remove them, or use the prepare "
                         "command, which counts and skips them")
    class_names = index.class_names
    by_split: dict[str, list[int]] = {}
    for i, e in enumerate(index.entries):
        by_split.setdefault(e.split or "all", []).append(i)
    images = []
    for e in index.entries:
        rgb, _ = decode_image(e.path)
        if crop_to_box and e.box is not None:
            x, y, w, h = (int(round(v)) for v in e.box)
            crop = rgb[max(y, 0):y + h, max(x, 0):x + w]
            if crop.size == 0:
                raise ValueError(f"{e.path}: face box {e.box} lies outside the "
                                 f"{rgb.shape[1]}x{rgb.shape[0]} image")
            rgb = crop
        images.append(resize_rgb(rgb, image_size, channels=channels))
    images = np.stack(images)
    labels = np.array([class_names.index(e.label) for e in index.entries], np.int32)
    subjects = np.array([e.subject for e in index.entries], np.int32)
    has_subjects = bool((subjects >= 0).all())
    splits = {}
    for name, idx in by_split.items():
        idx = np.asarray(idx)
        splits[name] = types.Split(images[idx], labels[idx],
                                   subjects[idx] if has_subjects else None)
    return types.Dataset(name=index.name, class_names=class_names, splits=splits)
