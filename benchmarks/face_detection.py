"""MTCNN (Zhang et al. 2016) detector figures on the real data of ../shared/data, and the speed of
detection + eye-level alignment (96x96x3, the data-preparation paper's size).

Figures: per source, the share of images with exactly one face, with none and with several, and
warm ms per image. Ground truth: every CK+48 crop and CK+ video frame shows one face; in
`face_noface.mov` frames 0-71 show a face and 72-168 do not; in `noface_face.mov` frames 96-167
show a face and 0-95 and 168 (black) do not (frame ranges from the scene cuts, checked by eye);
every frame of `single_face.mp4` and `WolfgangLanger_Pexels.mp4` shows one face.

Run: .venv/bin/python benchmarks/face_detection.py [--data ../shared/data] [--step 5]
Prints a table and writes benchmarks/results/face_detection.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

import av
import jax
import numpy as np
from PIL import Image

from fer_jax.data.face import FaceDetector, align_face

ROOT = pathlib.Path(__file__).resolve().parents[1]
MOV_FACE_FRAMES = {"face_noface.mov": range(0, 72), "noface_face.mov": range(96, 168)}


def frames(path, step, fmt="rgb24"):
    with av.open(str(path)) as container:
        return [(i, f.to_ndarray(format=fmt)) for i, f in enumerate(container.decode(video=0))
                if i % step == 0]


def evaluate(det, items, **kwargs):
    """items: (name, image, expected face count). Times exclude the first call of each shape."""
    counts, times, seen, failures = [], [], set(), []
    for name, image, expected in items:
        start = time.perf_counter()
        n = len(det(image, **kwargs))
        if image.shape in seen:  # warm calls only: compilation is reported separately
            times.append(time.perf_counter() - start)
        seen.add(image.shape)
        counts.append((n, expected))
        if n != expected:
            failures.append({"image": name, "faces": n, "expected": expected})
    counts = np.array(counts)
    face, noface = counts[counts[:, 1] == 1, 0], counts[counts[:, 1] == 0, 0]
    return {
        "images_with_face": int(len(face)),
        "exactly_one_rate": float(np.mean(face == 1)) if len(face) else None,
        "missed": int(np.sum(face == 0)),
        "several": int(np.sum(face > 1)),
        "images_without_face": int(len(noface)),
        "false_positive_images": int(np.sum(noface > 0)),
        "ms_per_image": 1000 * float(np.median(times)) if times else None,
        "failures": failures[:20],
    }


def throughput(det, images, repeats):
    """Images/s of detection alone and of detection + alignment of the best face (warm)."""
    for img in images:  # warm-up pass: every shape bucket compiled before timing
        align_face(img, det(img)[0])
    out = {}
    for mode in ("detect", "detect+align"):
        start, n = time.perf_counter(), 0
        for _ in range(repeats):
            for img in images:
                faces = det(img)
                if mode == "detect+align" and faces:
                    align_face(img, faces[0], output_size=96, margin=0.0)
                n += 1
        out[mode] = n / (time.perf_counter() - start)
    return out


def main():
    parser = argparse.ArgumentParser(description="MTCNN detector figures and speed")
    parser.add_argument("--data", type=pathlib.Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--step", type=int, default=5, help="use every n-th frame of .mp4 videos")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    det = FaceDetector()
    results = {"config": {"thresholds": det.thresholds, "min_face_size": det.min_face_size,
                          "scale_factor": det.scale_factor, "step": args.step}}

    ck = sorted((args.data / "ckplus48" / "CK+48").glob("*/*.png"))
    ck_items = [(f.name, np.asarray(Image.open(f)), 1) for f in ck]
    results["ckplus48"] = evaluate(det, ck_items)
    results["ckplus48_pad0.25_min96"] = evaluate(det, ck_items, pad_fraction=0.25, min_side=96)

    vid_items = []
    for path in sorted((args.data / "ckplus_videos").glob("*.mp4")):
        vid_items += [(f"{path.name}#{i}", f, 1) for i, f in frames(path, args.step, "gray")]
    results["ckplus_video_frames"] = evaluate(det, vid_items)

    for name in ("single_face.mp4", "WolfgangLanger_Pexels.mp4"):
        items = [(f"{name}#{i}", f, 1) for i, f in frames(args.data / "videos_unlabelled" / name,
                                                         args.step)]
        results[name] = evaluate(det, items)
    for name, face_range in MOV_FACE_FRAMES.items():
        # Every frame: the face / no-face boundary is the point of these clips.
        items = [(f"{name}#{i}", f, int(i in face_range))
                 for i, f in frames(args.data / "videos_unlabelled" / name, 1)]
        results[name] = evaluate(det, items)

    # Speed on 640x490 CK+ frames (native) and on 224x224 centre crops of them, resized.
    sample = [f for _, f, _ in vid_items[:: max(1, len(vid_items) // 24)]][:24]
    small = [np.asarray(Image.fromarray(f[:, 75:565]).resize((224, 224), Image.BILINEAR))
             for f in sample]
    results["speed_images_per_s"] = {
        "640x490": throughput(det, sample, args.repeats),
        "224x224": throughput(det, small, args.repeats),
    }
    results["compilations"] = det.trace_counts
    results["machine"] = {
        "backend": jax.default_backend(), "devices": str(jax.devices()), "jax": jax.__version__,
        "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
        "platform": platform.platform(),
    }

    print(f"{'source':32s} {'faces':>6s} {'exactly1':>9s} {'missed':>6s} {'several':>7s} "
          f"{'noface':>6s} {'FP':>4s} {'ms/img':>7s}")
    for key, r in results.items():
        if isinstance(r, dict) and "exactly_one_rate" in r:
            rate = "-" if r["exactly_one_rate"] is None else f"{r['exactly_one_rate']:.4f}"
            ms = "-" if r["ms_per_image"] is None else f"{r['ms_per_image']:.1f}"
            print(f"{key:32s} {r['images_with_face']:6d} {rate:>9s} {r['missed']:6d} "
                  f"{r['several']:7d} {r['images_without_face']:6d} "
                  f"{r['false_positive_images']:4d} {ms:>7s}")
            for fail in r["failures"]:
                print(f"    failure: {fail}")
    for size, speed in results["speed_images_per_s"].items():
        print(f"{size}: detect {speed['detect']:.1f} img/s, detect+align "
              f"{speed['detect+align']:.1f} img/s")
    print("machine:", results["machine"])
    out = ROOT / "benchmarks" / "results" / "face_detection.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=float))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
