"""VFER pipeline throughput on CPU: writes benchmarks/results/vfer_pipeline.json.

1. frames/s of decode (PyAV) + MTCNN detect + align + f (MobileNetV2 features) on real CK+ clips
   (skipped without ../shared/data), at the given face size;
2. seconds per personalization round (pseudo labels by a jitted vmap over subjects + the engine's
   vmapped fine-tune of v + head-only FedAvg) for 10 and 1,000 simulated subjects whose 1280-d
   frame features are drawn from a fixed bank (O(1) memory per subject).
  python benchmarks/vfer_pipeline.py [--videos 6] [--size 96] [--subjects 10,1000]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fer_jax import federated as fl
from fer_jax.data import video
from fer_jax.experiments import vfer as exp
from fer_jax.federated.population import hash_uniform
from fer_jax.models import vfer as models
from fer_jax.steps import vfer as steps
from fer_jax.steps.supervised import preprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("FER_JAX_SHARED_DATA", ROOT.parent / "shared" / "data"))


def pipeline_fps(num_videos: int, size: int, max_frames: int) -> dict:
    folder = SHARED / "ckplus_videos"
    if not folder.is_dir():
        return {"skipped": f"{folder} not found"}
    rows = video.read_labels(folder / "labels.csv")[:num_videos]
    settings = video.FaceSettings(image_size=size, max_frames=max_frames)
    det = None
    from fer_jax.data.face import FaceDetector

    det = FaceDetector(min_face_size=settings.min_face_size)
    f = models.backbone(1.0)
    fv = f.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False)
    feat = jax.jit(lambda x: f.apply(fv, preprocess(x, image_size=size, channels=3),
                                     train=False)["embedding"])
    # Warm-up (compilations) on the first video, then time the rest.
    times = {"decode": 0.0, "detect_align": 0.0, "features": 0.0}
    frames = 0
    for i, row in enumerate(rows):
        t0 = time.perf_counter()
        v = video.decode_video(folder / row["video"])
        v = v[video.sample_indices(len(v), max_frames)]
        t1 = time.perf_counter()
        crops, _ = video.face_crops(v, settings, det)
        t2 = time.perf_counter()
        padded = np.zeros((max_frames, size, size, 3), np.uint8)
        padded[: len(crops)] = crops
        np.asarray(feat(padded))
        t3 = time.perf_counter()
        if i == 0:
            continue
        frames += len(v)
        times["decode"] += t1 - t0
        times["detect_align"] += t2 - t1
        times["features"] += t3 - t2
    total = sum(times.values())
    return {"videos_timed": len(rows) - 1, "frames": frames, "face_size": size,
            "seconds": times, "frames_per_s": frames / total,
            "frames_per_s_by_stage": {k: frames / v for k, v in times.items()}}


class BankPopulation:
    """Subjects of `videos` clips each; clip j of subject c = bank clip hash(c, j)."""

    def __init__(self, num_clients, videos, bank_feats, bank_mask, num_classes):
        self.num_clients, self.videos = num_clients, videos
        self.feats, self.mask, self.k = bank_feats, bank_mask, num_classes

    def sizes(self, ids):
        ids = np.asarray(ids)
        return np.where(ids >= 0, self.videos, 0)

    def gather(self, ids, index):
        ids, index = np.asarray(ids), np.asarray(index)
        pick = (hash_uniform(1, ids[:, None], index) * len(self.feats)).astype(np.int64)
        valid = (index >= 0) & (ids[:, None] >= 0)
        return {"features": np.where(valid[..., None, None], self.feats[pick], 0),
                "frame_mask": self.mask[pick] & valid[..., None],
                "label": (pick % self.k).astype(np.int32)}


def personalization_round(num_subjects: int, videos: int, frames: int, k: int = 6,
                          vmap_width: int = 8, threshold: float = 0.0) -> dict:
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(256, frames, 1280)).astype(np.float32)
    bank_mask = np.ones((256, frames), bool)
    g, v = models.IFERHead(k), models.VFERHead(k)
    gv = g.init(jax.random.PRNGKey(0), bank[0], train=False)
    vv = v.init(jax.random.PRNGKey(1), bank[:2], bank_mask[:2], train=False)
    engine = fl.FederatedEngine(
        steps.PersonalizeClient(v, optax.adam(1e-3)),
        server_optimizer=fl.server_optimizer("fedavg"),
        param_filter=fl.regex_filter(steps.PARAM_RULES, fl.FROZEN),
        packing=fl.PackingConfig(batch_size=32, local_epochs=2,
                                 clients_per_call=min(64, -(-num_subjects // vmap_width)
                                                      * vmap_width)),
        backend=fl.RoundBackend(vmap_width=vmap_width))
    state = engine.init({"params": {"v": vv["params"]}, "batch_stats": {"v": vv["batch_stats"]}})
    pop = BankPopulation(num_subjects, videos, bank, bank_mask, k)
    ids = np.arange(num_subjects)
    out = []
    for r in range(3):  # round 0 compiles
        t0 = time.perf_counter()
        data = pop.gather(ids, np.tile(np.arange(videos), (num_subjects, 1)))
        labels, sel, _ = jax.device_get(exp.pseudo_label_subjects(
            gv, data["features"], data["frame_mask"], np.ones((num_subjects, videos), bool),
            head=g, max_per_class=50, threshold=threshold))
        t1 = time.perf_counter()
        state, result = engine.run_round(state, pop, engine.plan(pop, ids),
                                         jax.random.PRNGKey(r))
        jax.block_until_ready(state.variables)
        out.append({"pseudo_label_s": t1 - t0, "round_s": time.perf_counter() - t0,
                    "selected_fraction": float(sel.mean())})
    timed = out[1:]
    return {"subjects": num_subjects, "videos_per_subject": videos, "frames": frames,
            "vmap_width": vmap_width, "compile_round_s": out[0]["round_s"],
            "seconds_per_round": float(np.median([o["round_s"] for o in timed])),
            "pseudo_label_s": float(np.median([o["pseudo_label_s"] for o in timed])),
            "bytes_sent_per_client_v_only": steps.payload_bytes(vv["params"])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--videos", type=int, default=6)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--max_frames", type=int, default=16)
    ap.add_argument("--subjects", default="10,1000")
    ap.add_argument("--videos_per_subject", type=int, default=8)
    args = ap.parse_args()
    results = {"meta": {"jax": jax.__version__, "backend": jax.default_backend(),
                        "cpus": os.cpu_count(), "machine": platform.machine()}}
    results["pipeline"] = pipeline_fps(args.videos, args.size, args.max_frames)
    print(json.dumps(results["pipeline"], indent=1))
    results["personalization"] = []
    for n in map(int, args.subjects.split(",")):
        res = personalization_round(n, args.videos_per_subject, args.max_frames)
        print(json.dumps(res))
        results["personalization"].append(res)
    path = ROOT / "benchmarks" / "results" / "vfer_pipeline.json"
    path.write_text(json.dumps(results, indent=2))
    print("wrote", path)


if __name__ == "__main__":
    main()
