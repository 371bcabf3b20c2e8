"""Step time of ESR-9 + CBAM with and without the diversity terms (issue 8: target <= +10%).

One jitted training step (forward, backward, AdamW, donated state) of the same model with
diversity weights 1 (Eq. (4): sum of branch CEs - D_sp - D_ch) and 0 (sum of CEs only: XLA
drops the determinant work, the CBAM maps are still computed). The two variants are timed
alternately, A B A B: this VM's speed drifts ~2x within minutes (docs/performance.md#measuring).

  python benchmarks/esr_step.py                                # ESR-9, 96x96x3, batch 32
  python benchmarks/esr_step.py --image_size 48 --batch 64     # 'same' padding, 48x48x1
Writes benchmarks/results/esr_step.json.
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

from fer_jax.models import count_params
from fer_jax.models.esr import ESR
from fer_jax.steps import diversity as steps

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "esr_step.json"


def make_step(model, tx, weight: float, size: int, channels: int):
    """The ESR client's jitted step (the method's one step) and its client."""
    loss_fn = functools.partial(steps.esr_loss, gamma=10.0, spatial_weight=weight,
                                channel_weight=weight)
    method = steps.client(model, tx, loss_fn, image_size=size, channels=channels, augment=None)
    step = jax.jit(method.step, donate_argnums=0)
    key = jax.random.PRNGKey(0)

    def run(state, batch):
        state, m = step(state, batch, jnp.ones(len(batch["label"]), bool), key)
        count = m["count"]
        return state, {"loss": m["loss_sum"] / count, "d_sp": m["d_sp_sum"] / count,
                       "d_ch": m["d_ch_sum"] / count}

    return run, method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--branches", type=int, default=9)
    parser.add_argument("--image_size", type=int, default=96, choices=(48, 96))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=4, help="A B alternations")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    size = args.image_size
    channels = 3 if size == 96 else 1
    model = ESR(8, num_branches=args.branches, padding="valid" if size == 96 else "same",
                width=args.width)
    tx = optax.adamw(1e-3, weight_decay=1e-4)
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (args.batch, size, size, channels), dtype=np.uint8),
             "label": rng.integers(0, 8, (args.batch,)).astype(np.int32)}

    variants = {"with_diversity": 1.0, "without_diversity": 0.0}
    fns, states, compile_s = {}, {}, {}
    variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0),
                                           jnp.zeros((1, size, size, channels)), train=False))()
    for name, w in variants.items():
        fns[name], method = make_step(model, tx, w, size, channels)
        # Jitted: copies every leaf, so the two variants never donate one shared buffer.
        states[name] = jax.jit(method.init, static_argnums=1)(
            variables, (True,) * len(jax.tree.leaves(variables)), None)
        t0 = time.perf_counter()
        states[name], m = fns[name](states[name], batch)
        jax.block_until_ready(m["loss"])
        compile_s[name] = time.perf_counter() - t0
        states[name], m = fns[name](states[name], batch)  # One more warm-up call.
        jax.block_until_ready(m["loss"])
        print(f"{name}: first call {compile_s[name]:.1f} s, loss {float(m['loss']):.3f}, "
              f"D_sp {float(m['d_sp']):.4f}, D_ch {float(m['d_ch']):.4f}", flush=True)

    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name in variants:
            for _ in range(args.steps):
                t0 = time.perf_counter()
                states[name], m = fns[name](states[name], batch)
                jax.block_until_ready(m["loss"])
                times[name].append(time.perf_counter() - t0)

    med = {name: statistics.median(t) for name, t in times.items()}
    overhead = med["with_diversity"] / med["without_diversity"] - 1.0
    params = count_params(jax.tree.map(np.asarray, {"params": states["with_diversity"].params}))
    result = {
        "model": f"ESR-{args.branches} + CBAM (width {args.width})",
        "input": f"{size}x{size}x{channels}", "batch": args.batch,
        "trainable_params": params["trainable"],
        "median_step_s": med, "min_step_s": {n: min(t) for n, t in times.items()},
        "images_per_s": {n: args.batch / s for n, s in med.items()},
        "diversity_overhead": overhead, "first_call_s": compile_s,
        "timed_steps_per_variant": args.rounds * args.steps,
        # Other jobs on the machine distort everything: record how busy it was.
        "load_average_after": os.getloadavg(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "jax": jax.__version__, "backend": jax.default_backend()},
    }
    for name in variants:
        print(f"{name:18s} median {med[name] * 1e3:8.1f} ms/step  "
              f"{args.batch / med[name]:7.1f} images/s")
    print(f"diversity adds {overhead * 100:+.1f}% to the step (target <= +10%)")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
