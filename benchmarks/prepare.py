"""Speed of the whole prepare pipeline (Khodadadi, docs/papers.md#prepare), images/s per stage.

Inputs, built in a temporary folder from ../shared/data (never in the repo):
* `ckplus_frames_640x490`: the last 3 (peak) frames of each of the 40 CK+ videos, native 640x490
  gray, in class folders named by the video's emotion (120 images, 6 classes, 10 subjects);
* `ckplus_frames_224x224`: the same frames centre-cropped to 490x490 and resized to 224x224;
* `ckplus48_144x144`: the 981 CK+48 crops upscaled (bicubic) to 144x144 RGB (7 classes).
Each runs read -> split -> balance -> detect -> align -> normalize -> resize (paper order, paper
options, 96x96x3 output) after a warm-up pass over 4 images per class that compiles MTCNN and the
alignment warp for the input's shape, so the figures are warm; `--cold` skips the warm-up.

Run: .venv/bin/python benchmarks/prepare.py [--data ../shared/data] [--only NAME]
Prints a table and writes benchmarks/results/prepare.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import platform
import tempfile
import time

import av
import jax
from PIL import Image

from fer_jax.data import prepare, readers

ROOT = pathlib.Path(__file__).resolve().parents[1]


def video_frames(data: pathlib.Path, out: pathlib.Path, size: int | None, last: int = 3):
    """Peak frames of the CK+ videos into out/<emotion>/<video>_<frame>.png."""
    with open(data / "ckplus_videos" / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        with av.open(str(data / "ckplus_videos" / row["video"])) as container:
            frames = [fr.to_ndarray(format="gray") for fr in container.decode(video=0)]
        (out / row["emotion"]).mkdir(parents=True, exist_ok=True)
        for k in range(len(frames) - last, len(frames)):
            img = Image.fromarray(frames[k])
            if size:  # Centre square of the 640-wide frame, then the benchmark size.
                img = img.crop((75, 0, 565, 490)).resize((size, size), Image.Resampling.BILINEAR)
            img.save(out / row["emotion"] / f"{pathlib.Path(row['video']).stem}_{k:03d}.png")


def ckplus48_upscaled(data: pathlib.Path, out: pathlib.Path, size: int = 144):
    for f in sorted((data / "ckplus48" / "CK+48").glob("*/*.png")):
        (out / f.parent.name).mkdir(parents=True, exist_ok=True)
        Image.open(f).convert("RGB").resize((size, size), Image.Resampling.BICUBIC).save(
            out / f.parent.name / f.name)


def run_once(root: pathlib.Path, detector) -> dict:
    """One full pass; returns the report (counts, drops, seconds per stage)."""
    index = readers.index_class_folders(root, subject_pattern=r"^(S\d+)_")
    report = prepare.Report(index.class_names)
    t0 = time.perf_counter()
    records = prepare.records_from_index(index, report)
    n = len(records)
    prepare.run_pipeline(records, prepare.PrepareOptions(), report, detector=detector)
    total = time.perf_counter() - t0
    out = report.to_dict()
    out["pipeline"] = {"images": n, "seconds": round(total, 2),
                       "images_per_s": round(n / total, 2)}
    return out


def main():
    parser = argparse.ArgumentParser(description="prepare pipeline images/s per stage")
    parser.add_argument("--data", type=pathlib.Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--only", default="", help="run only this input")
    parser.add_argument("--cold", action="store_true", help="no warm-up pass")
    args = parser.parse_args()
    detector = prepare.make_detector(prepare.DetectOptions())
    builders = {
        "ckplus_frames_640x490": lambda out: video_frames(args.data, out, None),
        "ckplus_frames_224x224": lambda out: video_frames(args.data, out, 224),
        "ckplus48_144x144": lambda out: ckplus48_upscaled(args.data, out),
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in builders.items():
            if args.only and name != args.only:
                continue
            root = pathlib.Path(tmp) / name
            build(root)
            if not args.cold:
                # Warm-up on 4 images per class (and their augmented copies), so that the shape
                # buckets of detection and the alignment warp are compiled before timing.
                warm = pathlib.Path(tmp) / f"{name}_warm"
                for folder in root.iterdir():
                    (warm / folder.name).mkdir(parents=True)
                    for f in sorted(folder.iterdir())[:4]:
                        (warm / folder.name / f.name).symlink_to(f)
                run_once(warm, detector)
            results[name] = run_once(root, detector)
            results[name]["dropped"] = {k: len(v) for k, v in results[name]["dropped"].items()}

    print(f"{'input':24s} {'stage':10s} {'in':>6s} {'out':>6s} {'seconds':>8s} {'img/s':>8s}")
    for name, r in results.items():
        for s in r["stages"]:
            print(f"{name:24s} {s['name']:10s} {s['images_in']:6d} {s['images_out']:6d} "
                  f"{s['seconds']:8.2f} {s['images_per_s'] or 0:8.1f}  {s['dropped'] or ''}")
        p = r["pipeline"]
        print(f"{name:24s} {'pipeline':10s} {p['images']:6d} {'':6s} {p['seconds']:8.2f} "
              f"{p['images_per_s']:8.1f}")
    results["machine"] = {
        "backend": jax.default_backend(), "jax": jax.__version__, "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(), "platform": platform.platform(), "warm": not args.cold}
    out = ROOT / "benchmarks" / "results" / "prepare.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.only and out.exists():  # Keep the other inputs' figures.
        results = {**json.loads(out.read_text()), **results}
    out.write_text(json.dumps(results, indent=1, default=float) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
