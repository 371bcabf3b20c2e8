"""Throughput of the fer_jax models: jitted train step (fwd + bwd + Adam) and forward pass.

Prints a table and writes benchmarks/results/models_throughput.json. Compile time is
``jit(...).lower(...).compile()``; images/s is batch / median step time over ``--steps``
timed calls after a warm-up call. The VM's speed swings (docs/performance.md#measuring) and jobs
share its 2 cores: the 1-minute load average is recorded next to the numbers.

Run (about 1-4 minutes on 2 CPU cores)::

  .venv/bin/python benchmarks/models_throughput.py
  .venv/bin/python benchmarks/models_throughput.py --steps 5 --only mobilenetv2
"""

import argparse
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

from fer_jax.models import count_params, get_model

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "models_throughput.json"

# (label, model name, model kwargs, input (H, W, C), mode)
CASES = [
    ("small_cnn", "small_cnn", {}, (48, 48, 1), "train"),
    ("small_cnn", "small_cnn", {}, (48, 48, 1), "forward"),
    ("resnet18", "resnet18", {"stem": "imagenet"}, (96, 96, 3), "train"),
    ("resnet18", "resnet18", {"stem": "imagenet"}, (96, 96, 3), "forward"),
    ("mobilenetv2 conv", "mobilenetv2", {"depthwise": "conv"}, (96, 96, 3), "train"),
    ("mobilenetv2 shifted", "mobilenetv2", {"depthwise": "shifted"}, (96, 96, 3), "train"),
    ("mobilenetv2 conv", "mobilenetv2", {"depthwise": "conv"}, (96, 96, 3), "forward"),
    ("mobilenetv2 shifted", "mobilenetv2", {"depthwise": "shifted"}, (96, 96, 3), "forward"),
]


def make_train_step(model, tx):
    """The step every method's trainer runs: cross entropy, BN stats update, Adam."""

    def step(params, batch_stats, opt_state, x, y, key):
        def loss_fn(p):
            out, new = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                   mutable=["batch_stats"], rngs={"dropout": key})
            loss = optax.softmax_cross_entropy_with_integer_labels(out["logits"], y).mean()
            return loss, new["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    # Donating the state lets XLA update it in place (docs/performance.md#donation).
    return jax.jit(step, donate_argnums=(0, 1, 2))


def bench(name, kwargs, hw, mode, *, batch, steps, num_classes=7):
    model = get_model(name, num_classes=num_classes, **kwargs)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(size=(batch, *hw)), jnp.float32)
    y = jnp.asarray(rng.integers(0, num_classes, size=batch))
    # rbg keys: jitting init with threefry compiles one PRNG program per parameter
    # (17-35 s for MobileNetV2 here); the benchmark measures the step, not init.
    key = jax.random.key(0, impl="rbg")
    variables = jax.jit(lambda k: model.init(k, x[:1], train=False))(key)
    params, stats = variables["params"], variables["batch_stats"]

    if mode == "train":
        tx = optax.adam(1e-3)
        opt_state = tx.init(params)
        args = (params, stats, opt_state, x, y, key)
        t0 = time.perf_counter()
        fn = make_train_step(model, tx).lower(*args).compile()
        compile_s = time.perf_counter() - t0

        def call(state):
            p, s, o = state
            p, s, o, loss = fn(p, s, o, x, y, key)
            jax.block_until_ready(loss)
            return p, s, o

        state = (params, stats, opt_state)
    else:
        t0 = time.perf_counter()
        fwd = jax.jit(lambda v, x: model.apply(v, x, train=False)["logits"]).lower(
            variables, x).compile()
        compile_s = time.perf_counter() - t0

        def call(state):
            jax.block_until_ready(fwd(variables, x))
            return state

        state = None

    state = call(state)  # warm-up: first-touch allocations
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state = call(state)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    return {
        "params": count_params(variables)["total"],
        "compile_s": round(compile_s, 2),
        "step_s_median": round(step_s, 4),
        "step_s_all": [round(t, 4) for t in times],
        "images_per_s": round(batch / step_s, 1),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed calls per case")
    parser.add_argument("--only", default=None, help="run the cases whose label contains this")
    args = parser.parse_args()
    if args.batch < 1 or args.steps < 1:
        raise ValueError(f"--batch and --steps must be >= 1, got {args.batch}, {args.steps}")

    rows = []
    header = f"{'model':<20} {'input':<9} {'mode':<8} {'params':>10} {'compile s':>9} " \
             f"{'step s':>8} {'images/s':>9}"
    print(header)
    print("-" * len(header))
    for label, name, kwargs, hw, mode in CASES:
        if args.only and args.only not in label:
            continue
        load = os.getloadavg()[0]
        r = bench(name, kwargs, hw, mode, batch=args.batch, steps=args.steps)
        r.update(model=label, name=name, kwargs=kwargs, input=list(hw), mode=mode,
                 batch=args.batch, load_avg_1min=round(load, 2))
        rows.append(r)
        size = "x".join(map(str, hw))
        print(f"{label:<20} {size:<9} {mode:<8} {r['params']:>10,} {r['compile_s']:>9.2f} "
              f"{r['step_s_median']:>8.3f} {r['images_per_s']:>9.1f}   (load {load:.1f})",
              flush=True)

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {"jax": jax.__version__, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "cpus": os.cpu_count(),
            "machine": platform.machine(), "python": platform.python_version()}
    RESULTS.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
