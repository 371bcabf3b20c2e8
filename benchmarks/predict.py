"""Faces per second of `fer_jax.predict` (MTCNN + alignment + a trained model) on real media of
../shared/data, with the time split by stage, and a sanity figure for the model's answers.

Sources: the first --frames frames of two real videos (640x360 `single_face.mp4`, 640x490 CK+
clip), --images CK+48 crops (48x48 gray, every class folder). Warm figures: each source's first
item (the compilations of its shape) is timed apart. Sanity: top class of the last (peak) frame
of every CK+ clip against labels.csv, over the clips whose class the model has.

Run: .venv/bin/python benchmarks/predict.py --workdir=/tmp/fer [--data ../shared/data] \
       [--note 'what the model is']
Prints a table and writes benchmarks/results/predict.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import platform
import time

import jax
import numpy as np

from fer_jax import predict
from fer_jax.data import classes as classes_lib
from fer_jax.data import readers
from fer_jax.io import trained as trained_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def measure(predictor, items) -> dict:
    """items: images; the first call (compilation) is reported apart from the warm ones."""
    predictor.seconds = dict.fromkeys(predictor.seconds, 0.0)
    start = time.perf_counter()
    faces = len(predictor(items[0]))
    first = time.perf_counter() - start
    predictor.seconds = dict.fromkeys(predictor.seconds, 0.0)
    start = time.perf_counter()
    for image in items[1:]:
        faces += len(predictor(image))
    warm = time.perf_counter() - start
    n = len(items) - 1
    return {"items": len(items), "faces": faces, "first_call_s": round(first, 2),
            "warm_s": round(warm, 2), "faces_per_s": round(n / warm, 2) if warm else None,
            "ms_per_item": {k: round(1000 * v / n, 1) for k, v in predictor.seconds.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a trained workdir")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--images", type=int, default=10, help="per CK+48 class folder")
    parser.add_argument("--note", default="", help="what the trained model is (kept in the json)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "predict.json"))
    args = parser.parse_args()
    data = pathlib.Path(args.data)
    model = trained_lib.load(args.workdir)
    predictor = predict.Predictor(model)

    videos = {"single_face.mp4": data / "videos_unlabelled" / "single_face.mp4",
              "ckplus S055_004.mp4": data / "ckplus_videos" / "S055_004.mp4"}
    results = {}
    for name, path in videos.items():
        frames = [f for _, _, f in predict.video_frames(path)][:args.frames]
        results[name] = measure(predictor, frames)
    crops = [readers.decode_image(f)[0]
             for folder in sorted((data / "ckplus48" / "CK+48").iterdir())
             for f in sorted(folder.glob("*.png"))[:args.images]]
    results["ckplus48 crops"] = measure(predictor, crops)

    # Sanity: the peak (last) frame of each CK+ clip.
    hits, scored, missed = 0, 0, 0
    with open(data / "ckplus_videos" / "labels.csv", newline="") as f:
        clips = list(csv.DictReader(f))
    for clip in clips:
        label = classes_lib.canonical_name(clip["emotion"])
        if label not in model.class_names:
            continue
        last = [f for _, _, f in predict.video_frames(data / "ckplus_videos" / clip["video"])][-1]
        faces = predictor(last)
        if not faces:
            missed += 1
            continue
        scored += 1
        hits += model.class_names[int(np.argmax(faces[0].probabilities))] == label
    results["ckplus_peak_frames"] = {
        "clips": len(clips), "scored": scored, "no_face": missed,
        "accuracy": round(hits / scored, 4) if scored else None,
        "chance": round(1 / len(model.class_names), 4)}

    report = {"workdir": str(model.workdir), "step": model.step, "note": args.note,
              "model": model.config.model.name, "classes": list(model.class_names),
              "input": [model.image_size, model.image_size, model.channels],
              "host": {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "jax": jax.__version__, "backend": jax.default_backend(),
                       "loadavg_1min": round(os.getloadavg()[0], 2)},
              "results": results}
    pathlib.Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"{'source':<22} {'items':>5} {'faces':>5} {'first s':>8} {'faces/s':>8} "
          f"{'detect ms':>9} {'align ms':>8} {'model ms':>8}")
    for name, r in results.items():
        if "faces_per_s" in r:
            ms = r["ms_per_item"]
            print(f"{name:<22} {r['items']:>5} {r['faces']:>5} {r['first_call_s']:>8} "
                  f"{r['faces_per_s']:>8} {ms['detect']:>9} {ms['align']:>8} {ms['classify']:>8}")
    peak = results["ckplus_peak_frames"]
    print(f"CK+ peak frames: accuracy {peak['accuracy']} on {peak['scored']} clips (chance "
          f"{peak['chance']}), {peak['no_face']} without a face; load average "
          f"{report['host']['loadavg_1min']}; written {args.out}")


if __name__ == "__main__":
    main()
