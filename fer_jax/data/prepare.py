"""FER data preparation as an explicit, ordered list of steps, with a per-stage report.

Khodadadi's pipeline (docs/papers.md#prepare): a class-stratified split with test ratio 0.25 (each
class shuffled, then cut, no overlap); balancing of the training split only, after the split so
nothing leaks, by augmenting (random rotation in [0, 90] degrees, brightness in [0.2, 1.0],
horizontal flip) and oversampling every class up to the majority count; MTCNN face detection
without margin, dropping images with no face or several faces; eye-level alignment; pixels scaled
to [0, 1]; resizing to 96x96x3. `PAPER_ORDER` is that order; any order passing `check_steps` runs.

Data flow: a reader's `Index` (fer_jax.data.readers) or an in-memory `Dataset` becomes a list of
`Record`s (ragged images allowed), every step maps records to records, and `Report` keeps the
counts per split and class after every stage, each dropped file with its reason, and the seconds
each stage took. `write_prepared` stores the result as a TFDS array_record dataset (uint8, the
[0, 1] floats quantised to 8 bits; training rescales on device) that `load_prepared` reads back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import time
from collections import Counter

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from fer_jax.data import classes as classes_lib
from fer_jax.data import readers, tfds_builders, types
from fer_jax.io.progress import Progress

STEPS = ("split", "balance", "detect", "align", "normalize", "resize")
PAPER_ORDER = STEPS
SPLIT_MODES = ("stratified", "subject", "predefined")
SEVERAL_FACES = ("drop", "best")
NORMALIZE_METHODS = ("scale", "minmax")
# Reasons a record is dropped after reading (reading's own reasons live in readers.py).
NO_FACE, SEVERAL, ALIGN_FAILED, UNUSED_SPLIT = ("no_face", "several_faces", "align_failed",
                                                "unused_source_split")
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601, PIL's convert('L').


@dataclasses.dataclass(frozen=True)
class SplitOptions:
    """mode: 'stratified' (per class), 'subject' (disjoint subjects), 'predefined' (source's).
    test_subjects (mode 'subject'): exactly these subject ids go to test (leave-these-out, e.g.
    one FERG character: the FedAffect paper's Table 1); empty = random whole subjects up to
    test_ratio of the images."""

    mode: str = "stratified"
    test_ratio: float = 0.25
    seed: int = 0
    test_subjects: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class BalanceOptions:
    """Augmentation ranges (paper defaults). both_directions: angle sign drawn at random, as in
    Keras ImageDataGenerator(rotation_range=90). target: count per class, 0 = majority class."""

    rotation_min_deg: float = 0.0
    rotation_max_deg: float = 90.0
    both_directions: bool = True
    brightness_min: float = 0.2
    brightness_max: float = 1.0
    flip: float = 0.5
    target: int = 0
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class DetectOptions:
    """MTCNN settings (fer_jax.data.face); several: 'drop' (paper) or 'best' (highest score)."""

    min_face_size: float = 20.0
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    pad_fraction: float = 0.0
    min_side: int = 0
    several: str = "drop"


@dataclasses.dataclass(frozen=True)
class AlignOptions:
    """Crop side in pixels and margin per side as a fraction of the box (paper: no margin)."""

    output_size: int = 96
    margin: float = 0.0


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    steps: tuple[str, ...] = PAPER_ORDER
    split: SplitOptions = SplitOptions()
    balance: BalanceOptions = BalanceOptions()
    detect: DetectOptions = DetectOptions()
    align: AlignOptions = AlignOptions()
    normalize: str = "scale"  # 'scale' x / 255 (paper), 'minmax' per-image stretch to [0, 1].
    size: int = 96
    channels: int = 3


def check_steps(steps) -> tuple[str, ...]:
    """Validates an order of steps; raises ValueError saying which rule it breaks."""
    steps = tuple(steps)
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise ValueError(f"steps {list(steps)}: unknown {unknown}; expected names from {STEPS}")
    if len(set(steps)) != len(steps):
        raise ValueError(f"steps {list(steps)}: a step appears twice")
    for needed in ("split", "resize"):
        if needed not in steps:
            raise ValueError(f"steps {list(steps)}: '{needed}' is required (split makes the "
                             "train/test sets, resize gives every image the output shape)")
    at = {s: i for i, s in enumerate(steps)}
    if "balance" in at and at["balance"] < at["split"]:
        raise ValueError(f"steps {list(steps)}: 'balance' must come after 'split' (balancing "
                         "before splitting leaks augmented copies of test images into training)")
    if "align" in at:
        if "detect" not in at or at["detect"] > at["align"]:
            raise ValueError(f"steps {list(steps)}: 'align' needs 'detect' before it (landmarks)")
        between = [s for s in steps[at["detect"] + 1:at["align"]] if s in ("balance", "resize")]
        if between:
            raise ValueError(f"steps {list(steps)}: {between} between 'detect' and 'align' would "
                             "move the face after its landmarks were found")
    return steps


@dataclasses.dataclass
class Record:
    """One image on its way through the steps: uint8 RGB until 'normalize', float32 after."""

    image: np.ndarray
    label: str
    source: str
    subject: int = -1
    split: str = "all"
    hint: str = ""  # The source's own split, for split mode 'predefined'.
    augmented: bool = False
    face: object | None = None  # The detected face until 'align' consumes it.


# ------------------------------------------------------------------------------ the report.


class Report:
    """Counts per split and class after every stage, drops with paths, seconds per stage."""

    def __init__(self, class_names: tuple[str, ...]):
        self.class_names = tuple(class_names)
        self.stages: list[dict] = []
        self.drops: list[dict] = []
        self.notes: dict = {}

    def drop(self, stage: str, reason: str, source: str, detail: str = "", split: str = ""):
        self.drops.append({"stage": stage, "reason": reason, "path": source, "split": split,
                           "detail": detail})

    def counts(self, records) -> dict[str, dict[str, int]]:
        out: dict[str, Counter] = {}
        for r in records:
            out.setdefault(r.split, Counter())[r.label] += 1
        return {s: {c: out[s][c] for c in self.class_names} for s in sorted(out)}

    def stage(self, name: str, seconds: float, n_in: int, records, **extra) -> None:
        dropped = Counter(d["reason"] for d in self.drops if d["stage"] == name)
        self.stages.append({"name": name, "seconds": round(seconds, 3), "images_in": n_in,
                            "images_out": len(records),
                            "images_per_s": round(n_in / seconds, 2) if seconds > 0 else None,
                            "dropped": dict(dropped), "counts": self.counts(records), **extra})

    def to_dict(self) -> dict:
        by_reason: dict[str, list] = {}
        for d in self.drops:
            by_reason.setdefault(d["reason"], []).append(
                {k: v for k, v in d.items() if k != "reason" and v})
        return {"class_names": list(self.class_names), "stages": self.stages,
                "dropped": by_reason, **self.notes}

    def to_markdown(self, *, max_paths: int = 30) -> str:
        d = self.to_dict()
        lines = ["# Data preparation report", ""]
        for key in ("input", "steps", "output"):
            if key in d:
                lines.append(f"- **{key}**: `{json.dumps(d[key])}`")
        lines += ["", "## Stages", "", "| stage | in | out | dropped | seconds | images/s |",
                  "|---|---|---|---|---|---|"]
        for s in self.stages:
            dropped = ", ".join(f"{k} {v}" for k, v in s["dropped"].items()) or "-"
            lines.append(f"| {s['name']} | {s['images_in']} | {s['images_out']} | {dropped} | "
                         f"{s['seconds']:.2f} | {s['images_per_s'] or '-'} |")
        lines += ["", "## Counts per class after each stage", "",
                  "| stage | split | " + " | ".join(self.class_names) + " | total |",
                  "|---|---|" + "---|" * (len(self.class_names) + 1)]
        for s in self.stages:
            for split, per in s["counts"].items():
                lines.append(f"| {s['name']} | {split} | "
                             + " | ".join(str(per[c]) for c in self.class_names)
                             + f" | {sum(per.values())} |")
        lines += ["", "## Dropped files", ""]
        if not d["dropped"]:
            lines.append("None.")
        for reason, items in d["dropped"].items():
            lines.append(f"### {reason} ({len(items)})")
            lines += [f"- `{i['path']}`" + (f" ({i['detail']})" if i.get("detail") else "")
                      for i in items[:max_paths]]
            if len(items) > max_paths:
                lines.append(f"- ... {len(items) - max_paths} more in report.json")
            lines.append("")
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ sources.


def records_from_index(index: readers.Index, report: Report, *,
                       crop_to_box: bool = False) -> list[Record]:
    """Decodes every entry; unreadable files and the index's rejects become counted drops."""
    t0, records, modes = time.perf_counter(), [], Counter()
    for path, reason in index.rejected:
        report.drop("read", reason, path)
    for e in index.entries:
        try:
            rgb, mode = readers.decode_image(e.path)
        except readers.ImageError as err:
            report.drop("read", err.reason, str(e.path), str(err).split(": ", 1)[-1])
            continue
        if crop_to_box and e.box is not None:
            x, y, w, h = (int(round(v)) for v in e.box)
            rgb = rgb[max(y, 0):y + h, max(x, 0):x + w] if w > 0 and h > 0 else rgb[:0]
            if rgb.size == 0:
                report.drop("read", readers.UNREADABLE, str(e.path), f"face box {e.box} empty")
                continue
        modes[mode] += 1
        records.append(Record(rgb, e.label, str(e.path), e.subject, hint=e.split))
    n_in = len(index.entries) + len(index.rejected)
    report.stage("read", time.perf_counter() - t0, n_in, records, source_modes=dict(modes))
    return records


def records_from_dataset(dataset: types.Dataset, report: Report) -> list[Record]:
    """Any loaded `Dataset` (fer2013, ckplus48, synthetic, ...); split names become hints."""
    t0, records = time.perf_counter(), []
    for split_name, split in dataset.splits.items():
        for i in range(len(split)):
            image = split.images[i]
            rgb = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image
            subject = -1 if split.subjects is None else int(split.subjects[i])
            records.append(Record(rgb, dataset.class_names[split.labels[i]],
                                  f"{dataset.name}/{split_name}/{i}", subject, hint=split_name))
    report.stage("read", time.perf_counter() - t0, len(records), records)
    return records


# ------------------------------------------------------------------------------ the steps.


def split_records(records, opts: SplitOptions, report: Report) -> list[Record]:
    """Assigns 'train' / 'test'; seeded per class (stratified) or per subject; never both."""
    if opts.mode == "predefined":
        if not any(r.hint for r in records):
            raise ValueError("split.mode='predefined' but the input has no splits of its own; "
                             "use 'stratified' or 'subject'")
        out = []
        for r in records:
            if r.hint in ("train", "test"):
                out.append(dataclasses.replace(r, split=r.hint))
            else:
                report.drop("split", UNUSED_SPLIT, r.source, f"source split {r.hint!r}")
        return out
    test = np.zeros(len(records), bool)
    if opts.mode == "stratified":
        labels = np.array([r.label for r in records])
        for c, name in enumerate(classes_lib.CANONICAL):
            idx = np.flatnonzero(labels == name)
            perm = np.random.default_rng([opts.seed, c]).permutation(idx)
            test[perm[:int(round(len(idx) * opts.test_ratio))]] = True
    else:
        subjects = np.array([r.subject for r in records])
        if (subjects < 0).any():
            raise ValueError("split.mode='subject' needs a subject id for every image; set "
                             "input.subject_pattern (or use a reader with subjects)")
        unique, sizes = np.unique(subjects, return_counts=True)
        if opts.test_subjects:
            missing = sorted(set(opts.test_subjects) - set(unique.tolist()))
            if missing:
                raise ValueError(f"split.test_subjects: subject ids {missing} have no image "
                                 f"(present: {unique.tolist()})")
            test = np.isin(subjects, list(opts.test_subjects))
            if test.all():
                raise ValueError("split.test_subjects holds every subject: nothing is left to "
                                 "train on")
            return [dataclasses.replace(r, split="test" if t else "train")
                    for r, t in zip(records, test, strict=True)]
        perm = np.random.default_rng(opts.seed).permutation(len(unique))
        # Whole subjects go to test until it holds test_ratio of the images; one stays in train.
        cum = np.cumsum(sizes[perm])
        n_test = min(int(np.searchsorted(cum, opts.test_ratio * len(records))) + 1,
                     len(unique) - 1)
        test = np.isin(subjects, unique[perm[:n_test]])
    return [dataclasses.replace(r, split="test" if t else "train")
            for r, t in zip(records, test, strict=True)]


def augment_image(image: np.ndarray, *, angle: float, brightness: float,
                  flip: bool) -> np.ndarray:
    """Rotate by `angle` degrees about the centre (bilinear, edge pixels fill the corners, as
    Keras' fill_mode='nearest'), multiply by `brightness` (PIL ImageEnhance.Brightness), flip."""
    from scipy import ndimage

    x = image.astype(np.float32)
    if angle:
        x = ndimage.rotate(x, angle, axes=(1, 0), reshape=False, order=1, mode="nearest")
    x = x * brightness
    if flip:
        x = x[:, ::-1]
    if image.dtype == np.uint8:
        return np.clip(np.round(x), 0, 255).astype(np.uint8)
    return np.clip(x, 0.0, 1.0).astype(image.dtype)


def balance_records(records, opts: BalanceOptions, report: Report) -> list[Record]:
    """Oversamples training classes to the target with augmented copies; test untouched."""
    train = [r for r in records if r.split == "train"]
    counts = Counter(r.label for r in train)
    if not counts:
        return list(records)
    target = opts.target or max(counts.values())
    extra = []
    for c, name in enumerate(classes_lib.CANONICAL):
        pool = [r for r in train if r.label == name]
        if not pool or len(pool) >= target:
            continue
        rng = np.random.default_rng([opts.seed, c])
        for k, i in enumerate(rng.choice(len(pool), target - len(pool), replace=True)):
            angle = rng.uniform(opts.rotation_min_deg, opts.rotation_max_deg)
            if opts.both_directions and rng.random() < 0.5:
                angle = -angle
            src = pool[i]
            image = augment_image(src.image, angle=angle, flip=bool(rng.random() < opts.flip),
                                  brightness=rng.uniform(opts.brightness_min,
                                                         opts.brightness_max))
            extra.append(dataclasses.replace(src, image=image, source=f"{src.source}#aug{k}",
                                             augmented=True, face=None))
    report.notes.setdefault("balance", {})["target"] = target
    return list(records) + extra


def _uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def make_detector(opts: DetectOptions):
    """image -> faces with MTCNN (Zhang et al. 2016); jitted nets are cached per shape bucket."""
    from fer_jax.data.face import FaceDetector

    det = FaceDetector(min_face_size=opts.min_face_size, thresholds=opts.thresholds)
    return lambda image: det(image, pad_fraction=opts.pad_fraction, min_side=opts.min_side)


def detect_records(records, opts: DetectOptions, report: Report, *, detector=None):
    """Keeps images with exactly one face (or the best of several with several='best')."""
    detector = detector or make_detector(opts)
    out, progress = [], Progress(len(records), desc="detect")
    for n, r in enumerate(records, start=1):
        faces = list(detector(_uint8(r.image)))
        if not faces:
            report.drop("detect", NO_FACE, r.source, split=r.split)
        elif len(faces) > 1 and opts.several == "drop":
            report.drop("detect", SEVERAL, r.source, f"{len(faces)} faces", split=r.split)
        else:
            out.append(dataclasses.replace(r, face=max(faces, key=lambda f: f.score)))
        progress.update(n)
    return out


def align_records(records, opts: AlignOptions, report: Report) -> list[Record]:
    """Levels the eye centres and crops the face box (fer_jax.data.face.align_face)."""
    from fer_jax.data.face import align_face

    out, progress = [], Progress(len(records), desc="align")
    for n, r in enumerate(records, start=1):
        progress.update(n)
        try:
            crop = align_face(_uint8(r.image), r.face, output_size=opts.output_size,
                              margin=opts.margin, channels=3)
        except ValueError as err:
            report.drop("align", ALIGN_FAILED, r.source, str(err), split=r.split)
            continue
        # align_face returns [0, 1]; keep the record's pixel type (uint8 before 'normalize').
        image = crop if r.image.dtype != np.uint8 else _uint8(crop)
        out.append(dataclasses.replace(r, image=image, face=None))
    return out


def normalize_image(image: np.ndarray, method: str) -> np.ndarray:
    """'scale': x / 255 (paper); 'minmax': (x - min) / (max - min) per image (flat -> 0)."""
    x = image.astype(np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)
    if method == "minmax":
        lo, hi = float(x.min()), float(x.max())
        x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    return x


def resize_image(image: np.ndarray, size: int, channels: int) -> np.ndarray:
    """Bilinear (antialiased when shrinking) to (size, size), then luma if channels == 1."""
    if image.dtype == np.uint8:
        return readers.resize_rgb(image, size, channels=channels)
    if image.shape[:2] != (size, size):
        image = np.stack([np.asarray(Image.fromarray(image[:, :, c], mode="F").resize(
            (size, size), Image.Resampling.BILINEAR)) for c in range(3)], axis=-1)
    if channels == 1:
        image = (image @ _LUMA)[:, :, None]
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def run_pipeline(records: list[Record], opts: PrepareOptions, report: Report, *,
                 detector=None) -> list[Record]:
    """Runs `opts.steps` in order, recording counts and seconds per stage in `report`."""
    steps = check_steps(opts.steps)
    for step in steps:
        t0, n_in = time.perf_counter(), len(records)
        if step == "split":
            records = split_records(records, opts.split, report)
        elif step == "balance":
            records = balance_records(records, opts.balance, report)
        elif step == "detect":
            records = detect_records(records, opts.detect, report, detector=detector)
        elif step == "align":
            records = align_records(records, opts.align, report)
        elif step == "normalize":
            records = [dataclasses.replace(r, image=normalize_image(r.image, opts.normalize))
                       for r in records]
        else:
            # Landmarks of a face that is not aligned would be stale after resizing: drop them.
            records = [dataclasses.replace(r, image=resize_image(r.image, opts.size,
                                                                 opts.channels), face=None)
                       for r in records]
        report.stage(step, time.perf_counter() - t0, n_in, records)
    return records


# ------------------------------------------------------------------------------ storage.


class PreparedFer(tfds_builders.ManualDirBuilder, skip_registration=True):
    """A prepared dataset, splits 'train' / 'test', from the records `write_prepared` hands in."""

    name = "prepared_fer_jax"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        shape = tuple(self.builder_config.options["shape"])
        features = tfds.features.FeaturesDict({
            "image": tfds_builders.image_feature(shape),
            "label": tfds.features.ClassLabel(names=classes_lib.CANONICAL),
            "subject": tfds.features.Scalar(dtype=np.int32),  # -1 = no subject id.
            "augmented": tfds.features.Scalar(dtype=np.int32),
            "file": tfds.features.Text(),
        })
        return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True,
                                     description="FER images prepared by fer_jax (prepare.py).")

    def _split_generators(self, dl_manager):
        del dl_manager
        return {name: self._generate_examples(recs) for name, recs in self.records.items()}

    def _generate_examples(self, records):
        for i, r in enumerate(records):
            yield i, {"image": _uint8(r.image), "label": r.label, "subject": r.subject,
                      "augmented": int(r.augmented), "file": r.source}


def _content_hash(records, shape) -> str:
    h = hashlib.sha256(repr(shape).encode())
    for r in records:
        h.update(f"{r.split}\0{r.label}\0{r.subject}\0{r.source}\n".encode())
        h.update(_uint8(r.image).tobytes())
    return h.hexdigest()[:16]


def write_prepared(records: list[Record], workdir, *, data_dir=None) -> dict:
    """Writes records as array_record under data_dir (default workdir/tfds) and a pointer file
    `workdir/dataset.json` that `load_prepared(manual_dir=workdir)` follows. Returns its dict."""
    workdir = pathlib.Path(workdir)
    shapes = {r.image.shape for r in records}
    if not records:
        raise ValueError("no images are left after the steps; the report says where they went")
    if len(shapes) != 1:
        raise ValueError(f"records have shapes {sorted(shapes)}; 'resize' makes them one")
    shape = next(iter(shapes))
    data_dir = pathlib.Path(data_dir or workdir / "tfds").expanduser()
    splits = {s: [r for r in records if r.split == s] for s in ("train", "test")}
    config = tfds_builders.SourceConfig(name=f"src_{_content_hash(records, shape)}",
                                        version=str(PreparedFer.VERSION),
                                        options={"shape": list(shape)})
    builder = PreparedFer(config=config, data_dir=os.fspath(data_dir),
                          file_format="array_record")
    builder.records = {s: recs for s, recs in splits.items() if recs}  # TFDS wants non-empty.
    if not builder.is_prepared():
        builder.download_and_prepare()
    class_names = classes_lib.canonical_order(r.label for r in records)
    pointer = {"builder": PreparedFer.name, "config": config.name, "version": config.version,
               "shape": list(shape), "data_dir": os.fspath(data_dir.resolve()),
               "class_names": list(class_names),
               "splits": {s: len(recs) for s, recs in splits.items()}}
    (workdir / "dataset.json").write_text(json.dumps(pointer, indent=2) + "\n")
    return pointer


def load_prepared(*, manual_dir, data_dir=None) -> types.Dataset:
    """The dataset a prepare run wrote into `manual_dir` (its workdir): 'train' and 'test'."""
    pointer_path = pathlib.Path(manual_dir).expanduser() / "dataset.json"
    if not pointer_path.is_file():
        raise FileNotFoundError(f"{pointer_path} not found; expected the workdir of a prepare "
                                "run (python -m fer_jax.main --config=configs/prepare.py ...)")
    p = json.loads(pointer_path.read_text())
    config = tfds_builders.SourceConfig(name=p["config"], version=p["version"],
                                        options={"shape": p["shape"]})
    builder = PreparedFer(config=config, data_dir=os.fspath(data_dir or p["data_dir"]),
                          file_format="array_record")
    if not builder.is_prepared():
        raise FileNotFoundError(f"{pointer_path} names {p['config']} in {data_dir or p['data_dir']}"
                                ", which holds no such build; rerun the prepare command")
    class_names = tuple(p["class_names"])
    remap = np.array([class_names.index(c) if c in class_names else -1
                      for c in classes_lib.CANONICAL], np.int32)
    splits = {}
    for name, n in p["splits"].items():
        if n == 0:
            splits[name] = types.Split(np.zeros((0, *p["shape"]), np.uint8),
                                       np.zeros(0, np.int32))
            continue
        cols = tfds_builders.read_split(builder, name, keys=("image", "label", "subject"))
        subjects = cols["subject"].astype(np.int32)
        splits[name] = types.Split(cols["image"], remap[cols["label"]],
                                   None if (subjects < 0).any() else subjects)
    return types.Dataset(name="prepared", class_names=class_names, splits=splits)
