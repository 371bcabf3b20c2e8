"""Speed of the occlusion method's jitted steps (fer_jax.steps.occlusion) on this machine.

ResNet-18 with the small stem on 48x48 gray faces (the CK+48 ablation's model), batch 64,
random uint8 inputs. Rows: occluder synthesis alone (mix 1:1 + draw + paste, jitted), the
F+R step without phi or D (M_Res: the supervised cost plus occluders), the full M_ResAttAdv
alternation as `train_step` (one jitted call, F run forward once for both steps), and as
`d_step` + `f_step` (two jitted calls, two forwards of F). First call (compile + run) and the
median of --repeats warm calls.

  python benchmarks/occlusion_step.py                    # ~3 min on 2 CPU cores
  python benchmarks/occlusion_step.py --width 32 --repeats 5
  python benchmarks/occlusion_step.py --landmarks        # + mean MTCNN eye/mouth on CK+48
Writes benchmarks/results/occlusion_step.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fer_jax.data import occluders
from fer_jax.models.occlusion import FeatureDiscriminator, occlusion_net
from fer_jax.steps import occlusion as st

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "occlusion_step.json"


def _time(fn, repeats):
    """(first call s, median warm s) of fn(); fn must return something to block on."""
    t = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t
    warm = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        warm.append(time.perf_counter() - t)
    return first, statistics.median(warm)


def step_rows(args):
    rs = np.random.RandomState(0)
    batch = {"image": rs.randint(0, 256, (args.batch, 48, 48, 1)).astype(np.uint8),
             "label": rs.randint(0, 7, args.batch).astype(np.int32)}
    rows = []

    x = jnp.asarray(batch["image"], jnp.float32) / 255
    synth = jax.jit(lambda k, x: occluders.occlude_batch(
        k, x, occluders.mix_flags(k, x.shape[0], 0.5)))
    first, warm = _time(lambda: synth(jax.random.PRNGKey(0), x), args.repeats)
    rows.append(dict(name="occluders (mix 1:1, draw, paste)", first_s=first, warm_ms=warm * 1e3,
                     images_per_s=args.batch / warm))

    for name, attention, adversarial, split in (
            ("M_Res F+R step", False, False, False),
            ("M_ResAttAdv train_step (shared F fwd)", True, True, False),
            ("M_ResAttAdv d_step + f_step (2 jits)", True, True, True)):
        net = occlusion_net("resnet18", 7, attention=attention, stem="small", width=args.width)
        disc = FeatureDiscriminator(256)
        tx, d_tx = optax.adam(1e-3), optax.adam(1e-3)
        settings = st.OcclusionSettings(image_size=48, channels=1, attention=attention,
                                        adversarial=adversarial)
        state = st.init_state(net, disc, tx, d_tx, seed=0, input_shape=(48, 48, 1),
                              adversarial=adversarial)
        kw = dict(net=net, disc=disc, settings=settings)
        if split:
            d = jax.jit(functools.partial(st.d_step, d_tx=d_tx, **kw), donate_argnums=0)
            f = jax.jit(functools.partial(st.f_step, tx=tx, **kw), donate_argnums=0)
            step = lambda s, b, d=d, f=f: f(d(s, b)[0], b)
        else:
            step = jax.jit(functools.partial(st.train_step, tx=tx, d_tx=d_tx, **kw),
                           donate_argnums=0)
        holder = {"state": state}

        def call(step=step, holder=holder):
            holder["state"], m = step(holder["state"], batch)
            return m["loss"]

        first, warm = _time(call, args.repeats)
        rows.append(dict(name=name, first_s=first, warm_ms=warm * 1e3,
                         images_per_s=args.batch / warm))
    return rows


def landmark_means(args):
    """Mean eye / mouth centres of MTCNN landmarks over CK+48 crops, as fractions of 48."""
    from fer_jax.data import ckplus, resolve_manual_dir
    from fer_jax.data.face import FaceDetector

    ds = ckplus.load_ckplus48(manual_dir=resolve_manual_dir("ckplus48"), data_dir=None,
                              num_folds=10, fold=0)
    images = np.concatenate([ds["train"].images, ds["test"].images])[:args.landmark_images]
    det = FaceDetector()
    eyes, mouth = [], []
    for image in images:
        faces = det(image)
        if faces:
            eyes.append(np.asarray(occluders.landmark_centres("eyes", faces[0].landmarks[None]))[0])
            mouth.append(np.asarray(occluders.landmark_centres("mouth",
                                                               faces[0].landmarks[None]))[0])
    h = images.shape[1]
    return {"images": len(images), "faces": len(eyes),
            "eyes_row_col_frac": (np.mean(eyes, 0) / h).round(3).tolist(),
            "mouth_row_col_frac": (np.mean(mouth, 0) / h).round(3).tolist(),
            "eyes_std_px": np.std(eyes, 0).round(2).tolist(),
            "mouth_std_px": np.std(mouth, 0).round(2).tolist()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--landmarks", action="store_true")
    parser.add_argument("--landmark_images", type=int, default=981)
    args = parser.parse_args()
    result = {"machine": dict(platform=platform.platform(), cpus=os.cpu_count(),
                              jax=jax.__version__, backend=jax.default_backend()),
              "model": f"resnet18 stem=small width={args.width}, 48x48x1, batch {args.batch}",
              "rows": step_rows(args)}
    for r in result["rows"]:
        print(f"{r['name']:<36} first {r['first_s']:6.1f} s   warm {r['warm_ms']:8.1f} ms   "
              f"{r['images_per_s']:8.1f} img/s")
    if args.landmarks:
        result["landmarks"] = landmark_means(args)
        print(json.dumps(result["landmarks"]))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
