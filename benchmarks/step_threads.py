"""One plain jitted SGD step of the federated benchmark's MLP (2304-128-7), free on every core
vs pinned to one: does XLA's intra-op threading pay at FedAvg's small batches?

Each (batch, pinning) runs in its own process (pinning is `os.sched_setaffinity` before jax is
imported, as `taskset -c 0` would), interleaved A B A B, and reports steps/s, examples/s,
CPU seconds per wall second and GFLOP/s (forward and the first layer's weight gradient:
4 * batch * 2304 * 128 per step). Linux only (sched_setaffinity).

  python benchmarks/step_threads.py                        # batches 16 and 64, 3,000 steps of 16
  python benchmarks/step_threads.py --batches 16 --examples 4800 --repeats 1
Writes benchmarks/results/step_threads.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "step_threads.json"


def measure(batch: int, steps: int, one_core: bool) -> dict:
    """Times `steps` SGD steps of batch `batch` in this process (pinned first if asked)."""
    if one_core:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import resource
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    key = jax.random.PRNGKey(0)
    params = (jax.random.normal(key, (2304, 128)) * 0.02, jnp.zeros(128),
              jax.random.normal(key, (128, 7)) * 0.1, jnp.zeros(7))

    def loss(p, x, y):
        logits = jax.nn.relu(x @ p[0] + p[1]) @ p[2] + p[3]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    @jax.jit
    def step(p, x, y):
        return jax.tree.map(lambda a, g: a - 0.05 * g, p, jax.grad(loss)(p, x, y))

    x = jnp.asarray(np.random.default_rng(0).random((batch, 2304), np.float32))
    y = jnp.zeros(batch, jnp.int32)
    params = jax.block_until_ready(step(params, x, y))  # compile
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        params = step(params, x, y)
    jax.block_until_ready(params)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return {"batch": batch, "one_core": one_core, "steps": steps, "wall_s": wall,
            "steps_per_s": steps / wall, "examples_per_s": steps * batch / wall,
            "cpu_per_wall": cpu / wall, "gflop_per_s": 4 * batch * 2304 * 128 * steps / wall / 1e9}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="16,64")
    ap.add_argument("--examples", type=int, default=48_000, help="examples per timed run")
    ap.add_argument("--repeats", type=int, default=2, help="A B rounds per batch")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # 'batch,steps,one_core': child process
    args = ap.parse_args(argv)
    if args.one:
        b, s, one = args.one.split(",")
        print(json.dumps(measure(int(b), int(s), one == "1")))
        return 0
    if not hasattr(os, "sched_setaffinity"):
        raise SystemExit("step_threads.py needs os.sched_setaffinity (Linux)")
    runs = []
    for batch in (int(b) for b in args.batches.split(",")):
        steps = max(1, args.examples // batch)
        for _ in range(args.repeats):
            for one_core in (False, True):
                out = subprocess.run([sys.executable, __file__, f"--one={batch},{steps},"
                                      f"{int(one_core)}"], check=True, capture_output=True,
                                     text=True).stdout
                runs.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{'batch':>5} {'cores':>9} {'steps/s':>8} {'ex/s':>8} {'CPU/wall':>8} {'GFLOP/s':>8}")
    summary = {}
    for batch in sorted({r["batch"] for r in runs}):
        for one_core in (False, True):
            rs = [r for r in runs if r["batch"] == batch and r["one_core"] == one_core]
            best = max(rs, key=lambda r: r["steps_per_s"])
            summary[f"{batch}/{'one' if one_core else 'all'}"] = best["steps_per_s"]
            print(f"{batch:>5} {'one' if one_core else 'all':>9} {best['steps_per_s']:8.0f} "
                  f"{best['examples_per_s']:8.0f} {best['cpu_per_wall']:8.2f} "
                  f"{best['gflop_per_s']:8.1f}")
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"cores": len(os.sched_getaffinity(0)), "summary_best_steps_per_s":
                                summary, "runs": runs}, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
