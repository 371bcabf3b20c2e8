r"""Expressions of the faces in images, folders and videos, with a trained workdir.

  python -m fer_jax.predict --workdir=/tmp/fer --input=photo.jpg
  python -m fer_jax.predict --workdir=/tmp/fer --input=/data/clips --output=faces.csv \
      --annotate=/tmp/annotated

Every face MTCNN finds (Zhang et al. 2016, fer_jax.data.face) is aligned eyes-level and cropped
like the prepare command does, then classified by the trained model (fer_jax.io.trained). One row
per face: file, frame and time (videos; every `--every`-th frame), face index, box (x1, y1, x2, y2
in input pixels), detection score, top class and its probability, one probability per class.
--output: a .csv or .jsonl file (default: CSV on stdout). --annotate: a folder that gets each image
with boxes and labels drawn, and per video its most confident frame as PNG and the annotated video
(MP4). Image files are recognised by content (any suffix, GIF included), videos by suffix.
A summary line (files, frames, faces, faces/s) goes to stderr.
"""

from __future__ import annotations

import csv
import dataclasses
import fractions
import json
import pathlib
import sys
import time
from collections.abc import Iterator

import numpy as np
from absl import app, flags
from PIL import Image, ImageDraw, ImageFont

from fer_jax.data import readers
from fer_jax.data.video import VideoError

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")


@dataclasses.dataclass(frozen=True)
class FacePrediction:
    """One face: box (x1, y1, x2, y2) and detection score from MTCNN, the model's probabilities."""

    box: tuple[float, float, float, float]
    score: float
    probabilities: np.ndarray


class Predictor:
    """image (H, W, 3) uint8 -> the expressions of its faces, most confident detection first.

    Faces are aligned to the model's input size and channels (align_face, `margin` of the box
    side added per side) and classified in one call per image.
    """

    def __init__(self, trained, *, min_face_size: float = 20.0, margin: float = 0.0,
                 detector=None):
        from fer_jax.data.face import FaceDetector

        self.trained, self.margin = trained, margin
        self.detector = detector or FaceDetector(min_face_size=min_face_size)
        self.seconds = {"detect": 0.0, "align": 0.0, "classify": 0.0}

    def __call__(self, image: np.ndarray) -> list[FacePrediction]:
        from fer_jax.data.face import align_face

        t0 = time.perf_counter()
        faces = sorted(self.detector(image), key=lambda f: -f.score)
        t1 = time.perf_counter()
        crops = [np.rint(align_face(image, f, output_size=self.trained.image_size,
                                    margin=self.margin, channels=self.trained.channels) * 255
                         ).astype(np.uint8) for f in faces]
        t2 = time.perf_counter()
        probs = self.trained.predict(np.stack(crops)) if crops else []
        t3 = time.perf_counter()
        for k, dt in zip(self.seconds, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            self.seconds[k] += dt
        return [FacePrediction(tuple(float(v) for v in f.box), float(f.score), p)
                for f, p in zip(faces, probs, strict=True)]


# ------------------------------------------------------------------------------ inputs.


def list_inputs(path) -> tuple[list[tuple[pathlib.Path, str]], dict[str, int]]:
    """([(file, 'image' | 'video')], {reason: count} of skipped files) for a file or a folder
    (recursive, sorted, hidden files skipped)."""
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--input={path} does not exist")
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(path).parts))
    found, skipped = [], {}
    for f in files:
        if f.suffix.lower() in VIDEO_SUFFIXES:
            found.append((f, "video"))
        elif (reason := readers.sniff_image(f)) is None:
            found.append((f, "image"))
        else:
            skipped[reason] = skipped.get(reason, 0) + 1
    if not found:
        what = f"{len(files)} files, " + ", ".join(f"{n} {r}" for r, n in skipped.items())
        raise FileNotFoundError(f"--input={path} has no image or video ({what}); images are any "
                                f"file PIL reads, videos {', '.join(VIDEO_SUFFIXES)}")
    return found, skipped


def video_frames(path, every: int = 1) -> Iterator[tuple[int, float, np.ndarray]]:
    """(index, seconds, RGB frame) of every `every`-th frame, decoded one at a time (PyAV)."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: no video stream")
            for i, frame in enumerate(container.decode(video=0)):
                if i % every == 0:
                    yield i, float(frame.time or 0.0), frame.to_ndarray(format="rgb24")
    except VideoError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"{path}: cannot decode video ({type(e).__name__}: {e})") from e


def video_rate(path) -> float:
    import av

    with av.open(str(path)) as container:
        rate = container.streams.video[0].average_rate
    return float(rate) if rate else 25.0


# ------------------------------------------------------------------------------ outputs.


def rows(file: str, faces: list[FacePrediction], class_names, *, frame: int | None = None,
         seconds: float | None = None) -> list[dict]:
    """One dict per face (the CSV / JSONL columns)."""
    out = []
    for k, f in enumerate(faces):
        top = int(np.argmax(f.probabilities))
        out.append({"file": file, "frame": frame, "time_s": seconds, "face": k,
                    "x1": round(f.box[0], 1), "y1": round(f.box[1], 1),
                    "x2": round(f.box[2], 1), "y2": round(f.box[3], 1),
                    "face_score": round(f.score, 4), "top_class": class_names[top],
                    "top_prob": round(float(f.probabilities[top]), 4),
                    **{f"p_{c}": round(float(p), 4)
                       for c, p in zip(class_names, f.probabilities, strict=True)}})
    return out


class RowWriter:
    """Rows to a .csv / .jsonl file, or CSV on stdout when path is None."""

    def __init__(self, path, class_names):
        self.columns = ["file", "frame", "time_s", "face", "x1", "y1", "x2", "y2", "face_score",
                        "top_class", "top_prob", *(f"p_{c}" for c in class_names)]
        self.path = pathlib.Path(path) if path else None
        if self.path is not None and self.path.suffix.lower() not in (".csv", ".jsonl"):
            raise ValueError(f"--output={path}: expected a .csv or .jsonl file")
        self.jsonl = self.path is not None and self.path.suffix.lower() == ".jsonl"
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "w", newline="") if self.path else sys.stdout
        if not self.jsonl:
            self.csv = csv.DictWriter(self.file, self.columns)
            self.csv.writeheader()

    def write(self, rows_: list[dict]) -> None:
        for row in rows_:
            if self.jsonl:
                probs = {k[2:]: row[k] for k in self.columns if k.startswith("p_")}
                record = {k: row[k] for k in self.columns if not k.startswith("p_")}
                self.file.write(json.dumps({**record, "probabilities": probs}) + "\n")
            else:
                self.csv.writerow(row)

    def close(self) -> None:
        if self.path is not None:
            self.file.close()


def annotate(image: np.ndarray, faces: list[FacePrediction], class_names) -> np.ndarray:
    """The image with each face's box and 'class probability' label drawn on it."""
    canvas = Image.fromarray(image).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    side = min(canvas.size)
    font = ImageFont.load_default(size=max(10, side // 30))
    width = max(1, side // 200)
    for f in faces:
        x1, y1, x2, y2 = f.box
        top = int(np.argmax(f.probabilities))
        label = f"{class_names[top]} {f.probabilities[top]:.2f}"
        draw.rectangle((x1, y1, x2, y2), outline=(0, 255, 0), width=width)
        left, upper, right, lower = draw.textbbox((0, 0), label, font=font)
        w, h = right - left + 2 * width, lower - upper + 2 * width
        y = y1 - h if y1 >= h else y2  # Above the box, or below it at the image's top.
        draw.rectangle((x1, y, x1 + w, y + h), fill=(0, 255, 0))
        draw.text((x1 + width - left, y + width - upper), label, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


class VideoWriter:
    """Annotated frames to an H.264 MP4 (even sides; PyAV)."""

    def __init__(self, path, rate: float):
        import av

        self.container = av.open(str(path), "w")
        self.stream = self.container.add_stream(
            "libx264", rate=fractions.Fraction(rate).limit_denominator(1001))
        self.stream.pix_fmt = "yuv420p"
        self.started = False

    def add(self, frame: np.ndarray) -> None:
        import av

        frame = frame[:frame.shape[0] // 2 * 2, :frame.shape[1] // 2 * 2]
        if not self.started:
            self.stream.height, self.stream.width = frame.shape[:2]
            self.started = True
        for packet in self.stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


# ------------------------------------------------------------------------------ the command.


def predict_path(predictor: Predictor, path, writer: RowWriter, *, annotate_dir=None,
                 every: int = 1, log=print) -> dict:
    """Runs `predictor` over an image, a video or a folder of both; returns the counts."""
    root = pathlib.Path(path).expanduser()
    inputs, skipped = list_inputs(root)
    names = predictor.trained.class_names
    annotate_dir = pathlib.Path(annotate_dir) if annotate_dir else None
    stats = {"images": 0, "videos": 0, "frames": 0, "faces": 0, "without_face": 0,
             "unreadable": 0, "skipped": skipped}
    t0 = time.perf_counter()
    for file, kind in inputs:
        rel = file.name if file == root else str(file.relative_to(root))
        try:
            if kind == "image":
                image, _ = readers.decode_image(file)
                faces = predictor(image)
                stats["images"] += 1
                stats["faces"] += len(faces)
                stats["without_face"] += not faces
                writer.write(rows(rel, faces, names))
                if annotate_dir is not None:
                    out = annotate_dir / f"{rel}.png"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(annotate(image, faces, names)).save(out)
                continue
            stats["videos"] += 1
            video = best = None
            if annotate_dir is not None:
                (annotate_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                # Every `every`-th frame is drawn: the annotated video keeps the source's pace.
                video = VideoWriter(annotate_dir / f"{rel}.annotated.mp4",
                                    video_rate(file) / every)
            for index, seconds, frame in video_frames(file, every):
                faces = predictor(frame)
                stats["frames"] += 1
                stats["faces"] += len(faces)
                stats["without_face"] += not faces
                writer.write(rows(rel, faces, names, frame=index, seconds=round(seconds, 3)))
                if video is not None:
                    drawn = annotate(frame, faces, names)
                    video.add(drawn)
                    confidence = max((float(f.probabilities.max()) for f in faces), default=-1)
                    if best is None or confidence > best[0]:
                        best = (confidence, index, drawn)
            if video is not None:
                video.close()
                if best is not None:
                    Image.fromarray(best[2]).save(annotate_dir / f"{rel}.frame{best[1]}.png")
        except (ValueError, VideoError) as e:  # An unreadable file is counted, not fatal.
            stats["unreadable"] += 1
            log(f"skipped {file}: {e}")
    stats["seconds"] = time.perf_counter() - t0
    stats["faces_per_s"] = stats["faces"] / stats["seconds"] if stats["seconds"] else 0.0
    stats["stage_seconds"] = dict(predictor.seconds)
    return stats


_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's --workdir (config.json, "
                               "checkpoints/, eval.json).")
_INPUT = flags.DEFINE_string("input", None, "An image, a video, or a folder of them (recursive).")
_OUTPUT = flags.DEFINE_string("output", None, "A .csv or .jsonl file; default: CSV on stdout.")
_ANNOTATE = flags.DEFINE_string("annotate", None, "A folder for annotated images, and per video "
                                "its most confident frame (PNG) and the annotated video (MP4).")
_EVERY = flags.DEFINE_integer("every", 1, "Videos: predict every N-th frame.")
_MIN_FACE = flags.DEFINE_float("min_face_size", 20.0, "Smallest face MTCNN looks for, in pixels.")
_MARGIN = flags.DEFINE_float(
    "margin", 0.0, "Fraction of the face box added on each side of the crop (the prepare "
    "command's align.margin). On the peak frames of the 40 CK+ clips a FER-2013 small CNN scored "
    "0.40 with 0, 0.28 with 0.1 and 0.20 with 0.2.")
_STEP = flags.DEFINE_integer("step", 0, "Checkpoint step; 0 = the latest.")
_FLIP_TTA = flags.DEFINE_bool("flip_tta", False, "Average each face's and its mirror's "
                              "probabilities.")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _EVERY.value < 1:
        raise app.UsageError(f"--every must be >= 1, got {_EVERY.value}")
    from fer_jax.io import trained as trained_lib

    def fail(e):
        print(f"fer_jax.predict: {e}", file=sys.stderr)
        sys.exit(1)

    try:
        model = trained_lib.load(_WORKDIR.value, step=_STEP.value or None,
                                 flip_tta=_FLIP_TTA.value)
        writer = RowWriter(_OUTPUT.value, model.class_names)
    except (OSError, ValueError) as e:
        fail(e)
    predictor = Predictor(model, min_face_size=_MIN_FACE.value, margin=_MARGIN.value)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    try:
        stats = predict_path(predictor, _INPUT.value, writer, annotate_dir=_ANNOTATE.value,
                             every=_EVERY.value, log=log)
    except FileNotFoundError as e:
        fail(e)
    finally:
        writer.close()
    frames = f", {stats['frames']} video frames" if stats["videos"] else ""
    log(f"{stats['images']} images, {stats['videos']} videos{frames}: {stats['faces']} faces "
        f"({stats['without_face']} images/frames without a face, {stats['unreadable']} unreadable "
        f"files) in {stats['seconds']:.1f} s, {stats['faces_per_s']:.1f} faces/s (compilation "
        f"included); classes of {model.workdir} step {model.step}"
        + (f"; rows in {_OUTPUT.value}" if _OUTPUT.value else "")
        + (f"; annotated in {_ANNOTATE.value}" if _ANNOTATE.value else ""))


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir", "input"])
    app.run(main)
