"""Video corpora for VFER (Salman & Busso, ICMI 2022; docs/papers.md#vfer): decode, find the face
in every frame, align, resize, sample, zero pre-pad, cache.

A corpus is a folder of video files plus `labels.csv` with columns `video,subject,emotion`
(more columns are ignored), like ../shared/data/ckplus_videos. `load_video_corpus`:
  1. decodes each video with PyAV (FFmpeg) to RGB frames; an unreadable file raises
     `VideoError` naming it (or, with skip_unreadable=True, is skipped and counted);
  2. keeps at most `max_frames` frames: a longer video is sampled at evenly spaced frames that
     always include the first and the last (CK+ clips end on the peak expression);
     `sampling='last'` keeps the last `max_frames` instead; both are counted ('truncated');
  3. detects faces with MTCNN (fer_jax.data.face) on every `detect_every`-th frame (frames in
     between reuse the last detection), takes the most confident face, aligns the eyes level and
     resizes to `image_size` (paper: 224x224x3, MediaPipe); a frame with no face (and no earlier
     detection) is dropped and counted; a video with no face in any frame is skipped and counted;
  4. caches the aligned uint8 frames under `cache_dir/frames/<key>.npz`, key = sha256 of the
     file's bytes and of the settings above, so a second run decodes nothing
     (`report['decoded'] == 0`); `cached_features` does the same for f's features.
`pad_sequences` zero pre-pads to a fixed length and returns the frame mask (Sec. 4.2).
The embedded default is `synthetic_corpus`: neutral -> apex clips of synthetic subjects
(fer_jax.data.synthetic) with random lengths, already face crops.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import pathlib
from collections.abc import Callable

import numpy as np

from fer_jax.data import classes as classes_lib

SAMPLING = ("uniform", "last")
REQUIRED_COLUMNS = ("video", "subject", "emotion")


class VideoError(ValueError):
    """A video file that cannot be opened or decoded (the message names the file)."""


@dataclasses.dataclass(frozen=True)
class FaceSettings:
    """How frames become face crops (part of the cache key)."""

    image_size: int = 224
    channels: int = 3
    max_frames: int = 32
    sampling: str = "uniform"
    detect_every: int = 1
    margin: float = 0.0
    min_face_size: float = 40.0

    def __post_init__(self):
        if self.sampling not in SAMPLING:
            raise ValueError(f"sampling must be one of {SAMPLING}, got {self.sampling!r}")
        if self.max_frames < 1 or self.detect_every < 1 or self.image_size < 16:
            raise ValueError(f"max_frames, detect_every must be >= 1 and image_size >= 16: {self}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")


@dataclasses.dataclass
class VideoCorpus:
    """Face-crop sequences (one (T_i, S, S, C) uint8 array per video) with labels and subjects."""

    names: list[str]
    subjects: np.ndarray          # (N,) str
    labels: np.ndarray            # (N,) int32 into class_names
    class_names: tuple[str, ...]
    frames: list[np.ndarray]
    keys: list[str]               # cache keys of the frames (content + settings)
    report: dict

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, index) -> VideoCorpus:
        index = np.asarray(index, np.int64)
        return VideoCorpus([self.names[i] for i in index], self.subjects[index],
                           self.labels[index], self.class_names,
                           [self.frames[i] for i in index], [self.keys[i] for i in index],
                           dict(self.report))


def read_labels(path) -> list[dict]:
    """Rows of a labels.csv (video, subject, emotion[, ...]); emotion names made canonical."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no labels.csv (columns video,subject,emotion)")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; header is {reader.fieldnames}")
        rows = []
        for row in reader:
            where = f"{path} line {reader.line_num}"
            if not row["video"] or not row["subject"]:
                raise ValueError(f"{where}: empty video or subject field")
            rows.append({"video": row["video"], "subject": row["subject"],
                         "emotion": classes_lib.canonical_name(row["emotion"], source=where)})
    if not rows:
        raise ValueError(f"{path}: no rows after the header")
    return rows


def decode_video(path) -> np.ndarray:
    """All frames of the first video stream, (T, H, W, 3) uint8 RGB; VideoError names the file."""
    import av

    path = pathlib.Path(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: no video stream")
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except VideoError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"{path}: cannot decode video ({type(e).__name__}: {e})") from e
    if not frames:
        raise VideoError(f"{path}: the video stream has no frames")
    return np.stack(frames)


def sample_indices(num_frames: int, max_frames: int, sampling: str = "uniform") -> np.ndarray:
    """Frame indices kept from a video of `num_frames` (all of them when it is short enough).

    'uniform': `max_frames` evenly spaced indices from first to last (both kept);
    'last': the last `max_frames` frames (the onset is cut, the peak kept).
    """
    if sampling not in SAMPLING:
        raise ValueError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
    if num_frames <= max_frames:
        return np.arange(num_frames)
    if sampling == "last":
        return np.arange(num_frames - max_frames, num_frames)
    return np.unique(np.round(np.linspace(0, num_frames - 1, max_frames)).astype(np.int64))


def face_crops(frames: np.ndarray, settings: FaceSettings, detector=None
               ) -> tuple[np.ndarray, int]:
    """Aligned face crops (T', S, S, C) uint8 of the frames where a face is known, and the number
    of frames dropped for lack of a face."""
    from fer_jax.data.face import FaceDetector, align_face

    detector = detector or FaceDetector(min_face_size=settings.min_face_size)
    crops, face, dropped = [], None, 0
    for t, frame in enumerate(frames):
        if t % settings.detect_every == 0 or face is None:
            faces = detector(frame)
            # Most confident face; a frame without one reuses the last detection if any.
            face = max(faces, key=lambda f: f.score) if faces else face
        if face is None:
            dropped += 1
            continue
        crop = align_face(frame, face, output_size=settings.image_size, margin=settings.margin,
                          channels=settings.channels)
        crops.append(np.rint(crop * 255).astype(np.uint8))
    size = (settings.image_size, settings.image_size, settings.channels)
    return (np.stack(crops) if crops else np.zeros((0, *size), np.uint8)), dropped


def file_key(path, settings) -> str:
    """sha256 of the file's bytes and the settings (any change in either gives a new key)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    h.update(json.dumps(dataclasses.asdict(settings), sort_keys=True).encode())
    return h.hexdigest()[:32]


def load_video_corpus(folder, *, settings: FaceSettings = FaceSettings(), cache_dir=None,
                      skip_unreadable: bool = False, detector=None) -> VideoCorpus:
    """Reads `folder/labels.csv` and every listed video (module docstring for the steps).

    report: videos listed, used, decoded (not from the cache), unreadable (list of files),
    no_face (list), frames_without_face, truncated (videos longer than max_frames).
    """
    folder = pathlib.Path(folder)
    rows = read_labels(folder / "labels.csv")
    class_names = classes_lib.canonical_order(r["emotion"] for r in rows)
    if detector is None:
        from fer_jax.data.face import FaceDetector

        # One detector for the corpus: its jitted nets compile once per frame-size bucket.
        detector = FaceDetector(min_face_size=settings.min_face_size)
    cache = pathlib.Path(cache_dir) / "frames" if cache_dir else None
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
    report = {"listed": len(rows), "decoded": 0, "from_cache": 0, "unreadable": [],
              "no_face": [], "frames_without_face": 0, "truncated": 0}
    names, subjects, labels, frames, keys = [], [], [], [], []
    for row in rows:
        path = folder / row["video"]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: listed in labels.csv but not found")
        key = file_key(path, settings)
        cached = cache / f"{key}.npz" if cache else None
        if cached is not None and cached.is_file():
            with np.load(cached) as z:
                crops, dropped, long = z["frames"], int(z["dropped"]), bool(z["truncated"])
            report["from_cache"] += 1
        else:
            try:
                video = decode_video(path)
            except VideoError:
                if not skip_unreadable:
                    raise
                report["unreadable"].append(row["video"])
                continue
            report["decoded"] += 1
            keep = sample_indices(len(video), settings.max_frames, settings.sampling)
            long = len(keep) < len(video)
            crops, dropped = face_crops(video[keep], settings, detector)
            if cached is not None:
                tmp = cached.with_suffix(".tmp.npz")
                np.savez(tmp, frames=crops, dropped=dropped, truncated=long)
                tmp.rename(cached)
        report["truncated"] += int(long)
        report["frames_without_face"] += dropped
        if len(crops) == 0:
            report["no_face"].append(row["video"])
            continue
        names.append(row["video"])
        subjects.append(row["subject"])
        labels.append(class_names.index(row["emotion"]))
        frames.append(crops)
        keys.append(key)
    report["used"] = len(names)
    if not names:
        raise ValueError(f"{folder}: no usable video (unreadable: {report['unreadable']}, "
                         f"no face: {report['no_face']})")
    return VideoCorpus(names, np.asarray(subjects), np.asarray(labels, np.int32), class_names,
                       frames, keys, report)


def synthetic_corpus(*, num_subjects: int, clips_per_class: int, min_frames: int = 6,
                     max_frames: int = 16, image_size: int = 48, channels: int = 3,
                     classes=("anger", "disgust", "fear", "happiness", "sadness", "surprise"),
                     seed: int = 0, **options) -> VideoCorpus:
    """Neutral -> apex synthetic clips with lengths uniform in [min_frames, max_frames].

    A clip of length n is the last n frames of a `max_frames` onset clip, so every clip ends at
    its apex like CK+; subjects are 's000', 's001', ...
    """
    from fer_jax.data import synthetic

    if not 2 <= min_frames <= max_frames:
        raise ValueError(f"need 2 <= min_frames <= max_frames, got {min_frames}, {max_frames}")
    seqs = synthetic.make_sequences(num_subjects=num_subjects, clips_per_class=clips_per_class,
                                    num_frames=max_frames, image_size=image_size,
                                    channels=channels, classes=classes, seed=seed, **options)
    rng = np.random.default_rng([seed, 11])
    lengths = rng.integers(min_frames, max_frames + 1, size=len(seqs["labels"]))
    frames = [v[max_frames - n:] for v, n in zip(seqs["videos"], lengths, strict=True)]
    subjects = np.asarray([f"s{s:03d}" for s in seqs["subjects"]])
    names = [f"{s}_{i:04d}" for i, s in enumerate(subjects)]
    digest = hashlib.sha256(json.dumps([num_subjects, clips_per_class, min_frames, max_frames,
                                        image_size, channels, list(classes), seed,
                                        sorted(options.items())]).encode()).hexdigest()[:16]
    report = {"listed": len(names), "used": len(names), "decoded": 0, "from_cache": 0,
              "unreadable": [], "no_face": [], "frames_without_face": 0, "truncated": 0}
    return VideoCorpus(names, subjects, seqs["labels"], tuple(seqs["class_names"]), frames,
                       [f"synthetic-{digest}-{i}" for i in range(len(names))], report)


def pad_sequences(sequences, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero PRE-padding: (N, length, ...) with each sequence right-aligned, mask (N, length).

    A sequence longer than `length` keeps its last `length` steps (the loaders sample frames
    before this, so it only happens when `length` < settings.max_frames).
    """
    if not sequences:
        raise ValueError("pad_sequences: no sequences")
    tail = sequences[0].shape[1:]
    out = np.zeros((len(sequences), length, *tail), sequences[0].dtype)
    mask = np.zeros((len(sequences), length), bool)
    for i, s in enumerate(sequences):
        s = s[-length:]
        if len(s):
            out[i, length - len(s):] = s
            mask[i, length - len(s):] = True
    return out, mask


def cached_features(corpus: VideoCorpus, featurize: Callable[[np.ndarray], np.ndarray],
                    *, model_key: str, cache_dir=None, batch_size: int = 64) -> list[np.ndarray]:
    """f's features (T_i, D) float32 per video; cached per (frames key, model_key) when asked.

    featurize: uint8 frames (n, S, S, C) -> (n, D). Frames of videos not cached are batched
    together (fixed batch size: one compilation).
    """
    cache = pathlib.Path(cache_dir) / "features" if cache_dir else None
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
    names = [hashlib.sha256(f"{k}|{model_key}".encode()).hexdigest()[:32] for k in corpus.keys]
    out: list = [None] * len(corpus)
    todo = []
    for i, name in enumerate(names):
        if cache and (cache / f"{name}.npy").is_file():
            out[i] = np.load(cache / f"{name}.npy")
        else:
            todo.append(i)
    if todo:
        frames = np.concatenate([corpus.frames[i] for i in todo])
        feats = []
        for start in range(0, len(frames), batch_size):
            chunk = frames[start:start + batch_size]
            padded = np.zeros((batch_size, *chunk.shape[1:]), chunk.dtype)
            padded[: len(chunk)] = chunk
            feats.append(np.asarray(featurize(padded))[: len(chunk)])
        feats = np.concatenate(feats).astype(np.float32)
        offsets = np.cumsum([0] + [len(corpus.frames[i]) for i in todo])
        for j, i in enumerate(todo):
            out[i] = feats[offsets[j]:offsets[j + 1]]
            if cache:
                np.save(cache / f"{names[i]}.npy", out[i])
    return out
