"""Time of each jitted fer_jax.losses function at the sizes the experiments use.

For every loss: the forward value and, for training losses, value_and_grad with respect to
the network outputs, each jitted; the table gives the first call (compile + run), the median
of --repeats warm calls, and XLA's temporary buffer size for the compiled program. Inputs
are random float32 on the default device.

  python benchmarks/losses.py                 # ~1 min on 2 CPU cores
  python benchmarks/losses.py --repeats 50
Writes benchmarks/results/losses.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from fer_jax import losses

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "losses.json"


def cases(key):
    """(name, shapes note, function of the differentiable input, that input, trains?)."""
    ks = iter(jax.random.split(key, 32))
    normal = lambda shape: jax.random.normal(next(ks), shape, jnp.float32)
    labels = lambda n, k: jax.random.randint(next(ks), (n,), 0, k)

    z_b = normal((256, 128))
    support = labels(35, 7)
    query = labels(35, 7)
    ce_labels, mask = labels(64, 7), jnp.arange(64) < 60
    weights = jnp.linspace(0.5, 2.0, 7)
    mask_target = (normal((128, 56, 56)) > 1.0).astype(jnp.float32)
    occluded = jnp.arange(128) % 2
    return [
        ("nt_xent", "N=256, d=128, tau=0.1",
         lambda z: losses.nt_xent(z, z_b, temperature=0.1), normal((256, 128)), True),
        ("rbf_similarity (spatial)", "L=15, N=64, 48x48 maps",
         lambda p: losses.rbf_similarity(p, gamma=10.0), normal((15, 64, 48, 48)), False),
        ("det_diversity (spatial)", "L=15, N=64, 48x48 maps",
         lambda p: losses.det_diversity(p, gamma=10.0), normal((15, 64, 48, 48)), True),
        ("det_diversity (channel)", "L=15, N=64, C=512",
         lambda p: losses.det_diversity(p, gamma=10.0), normal((15, 64, 512)), True),
        ("spatial_pool + channel_pool", "L=4 patches, N=64, 14x14x256",
         lambda x: (losses.spatial_pool(x), losses.channel_pool(x)),
         normal((4, 64, 14, 14, 256)), False),
        ("class_prototypes", "S=35 (C=7, K=5), 3x3x2048 maps",
         lambda f: losses.class_prototypes(f, support, 7), normal((35, 3, 3, 2048)), False),
        ("relation_mse", "Q=35, C=7",
         lambda s: losses.relation_mse(jax.nn.sigmoid(s), query, jnp.arange(7)),
         normal((35, 7)), True),
        ("weighted_cross_entropy", "N=64, K=7, weights + mask",
         lambda z: losses.weighted_cross_entropy(z, ce_labels, class_weights=weights, mask=mask),
         normal((64, 7)), True),
        ("occlusion_mask_bce", "N=128, 56x56 masks",
         lambda m: losses.occlusion_mask_bce(m, mask_target), normal((128, 56, 56)), True),
        ("discriminator_bce", "N=128",
         lambda s: losses.discriminator_bce(s, occluded), normal((128,)), True),
        ("prior_cross_entropy", "N=128, P_E=0.5",
         lambda s: losses.prior_cross_entropy(s, 0.5), normal((128,)), True),
        ("ensemble_vote", "B=15, N=64, K=8",
         losses.ensemble_vote, normal((15, 64, 8)), False),
    ]


def measure(fn, x, repeats):
    """(first call s, median warm call s, XLA temp bytes) of jax.jit(fn)(x)."""
    jitted = jax.jit(fn)
    start = time.perf_counter()
    jax.block_until_ready(jitted(x))
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(jitted(x))
        times.append(time.perf_counter() - start)
    memory = jitted.lower(x).compile().memory_analysis()
    temp = getattr(memory, "temp_size_in_bytes", None) if memory is not None else None
    return first, statistics.median(times), temp


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    rows = []
    for name, sizes, fn, x, trains in cases(jax.random.key(0)):
        modes = [("value", fn)]
        if trains:
            modes.append(("value+grad", jax.value_and_grad(fn)))
        for mode, f in modes:
            first, median, temp = measure(f, x, args.repeats)
            rows.append(dict(loss=name, sizes=sizes, mode=mode, first_call_s=first,
                             median_ms=1e3 * median,
                             temp_mib=None if temp is None else temp / 2**20))

    header = f"{'loss':30s} {'sizes':32s} {'mode':10s} {'median ms':>10s} {'1st call s':>10s}"
    print(header + f" {'temp MiB':>9s}")
    print("-" * (len(header) + 10))
    for r in rows:
        temp = "" if r["temp_mib"] is None else f"{r['temp_mib']:.1f}"
        print(f"{r['loss']:30s} {r['sizes']:32s} {r['mode']:10s} {r['median_ms']:10.3f} "
              f"{r['first_call_s']:10.2f} {temp:>9s}")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(jax=jax.__version__, device=str(jax.devices()[0]), cpus=os.cpu_count(),
                machine=platform.machine(), repeats=args.repeats,
                loadavg=os.getloadavg() if hasattr(os, "getloadavg") else None)
    RESULTS.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
