"""FedAvg rounds on this machine: fer_jax.federated on its automatic defaults vs a plain loop.

The protocol (standard FedAvg): a lazily generated population of clients of 16-159 examples,
cohorts of 10 / 100 / 1,000 clients, batch 16, one local epoch in stored order, client SGD 0.05,
server learning rate 1, weights = client sizes. Three models: a tiny MLP 64-32-7 on 8x8x1
inputs, an MLP 2304-128-7 and a 2-conv CNN on 48x48x1. In one process per (model, cohort),
interleaved round after round (A B C A B C: the machine's speed drifts), it times
  engine   `FederatedEngine(method, packing=PackingConfig(batch_size=16))`: no backend given, so
           the engine picks its layout (RoundBackend.auto()); `engine.compile(population)` first;
  plain    what a user writes by hand: per client a Python loop of one jitted SGD step (the
           last batch padded and masked: one compiled shape), deltas summed on device;
  central  the centralized floor: one jitted SGD step per batch of 16 over the cohort's examples;
and reports client updates/s, useful examples/s, start-up (process start, imports included, to
the end of the engine's first round; a hand layout after the first counts the shared set-up and
its own engine only) on a cold and on a warm persistent compilation cache (a
second process on the cache the first filled, as a rerun of `fer_jax.main` finds it), compile
seconds, peak RSS and the ratios engine / plain and engine / central. The chosen layout prints
as KxV and sL (L local steps per call; s* = all in one call). Round 1 of engine and plain
must agree (max |difference| reported).
--layouts adds hand-set engine layouts (KxV: K clients per call, vmap width V, the CPU default
unrolled steps; KxVsL: L local steps per call) to compare with the automatic one; --devices N
makes the host N JAX devices (default 0 = what `fer_jax.main` does for a federated run: one
per core, at most the cohort; on an accelerator its devices); --out names the JSON file.

  python benchmarks/federated_throughput.py                    # 3 models x 10/100/1000 clients
  python benchmarks/federated_throughput.py --cohorts 10,100 --repeats 1 --layouts auto,1x1,16x16
Writes benchmarks/results/federated_throughput_auto.json (or --out).
"""

from __future__ import annotations

import time

T_START = time.perf_counter()  # before jax is imported: start-up includes the imports

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "federated_throughput_auto.json"
BATCH, LR = 16, 0.05
SIZES = dict(size_distribution="uniform", min_size=16, max_size=159)
MODELS = {"tiny": (8, 8, 1), "mlp": (48, 48, 1), "cnn": (48, 48, 1)}


def build_model(name):
    """(flax module, input shape) of a benchmark model; inputs are uint8 images."""
    import flax.linen as nn
    import jax.numpy as jnp

    class MLP(nn.Module):
        hidden: int

        @nn.compact
        def __call__(self, x, *, train):
            del train
            x = x.reshape(x.shape[0], -1).astype(jnp.float32) / 255.0
            return {"logits": nn.Dense(7)(nn.relu(nn.Dense(self.hidden)(x)))}

    class CNN(nn.Module):
        """conv 3x3x16 - pool 2 - conv 3x3x32 - pool 2 - dense 7."""

        @nn.compact
        def __call__(self, x, *, train):
            del train
            x = x.astype(jnp.float32) / 255.0
            for width in (16, 32):
                x = nn.max_pool(nn.relu(nn.Conv(width, (3, 3))(x)), (2, 2), strides=(2, 2))
            return {"logits": nn.Dense(7)(x.reshape(x.shape[0], -1))}

    if name == "tiny":
        return MLP(32)
    if name == "mlp":
        return MLP(128)
    if name == "cnn":
        return CNN()
    raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")


class PlainLoop:
    """The hand-written baseline: per client, a jitted SGD step over its batches (the last one
    padded to 16 rows and masked), then a jitted weighted delta sum; one server step per round."""

    def __init__(self, loss_fn, variables):
        import jax
        import jax.numpy as jnp
        import optax

        opt = optax.sgd(LR)
        key = jax.random.PRNGKey(0)

        def step(params, batch, mask):
            grads, _ = jax.grad(loss_fn, has_aux=True)(params, {}, batch, mask, key)
            updates, _ = opt.update(grads, opt.init(params), params)
            return optax.apply_updates(params, updates)

        self._step = jax.jit(step)
        self._add = jax.jit(lambda acc, p, server, w: jax.tree.map(
            lambda a, x, s: a + w * (x - s), acc, p, server))
        self._server = jax.jit(lambda server, acc, total: jax.tree.map(
            lambda s, a: s + a / total, server, acc))
        self.params = jax.tree.map(jnp.array, variables["params"])

    def round(self, population, client_ids):
        import jax
        import numpy as np

        server, acc, total = self.params, jax.tree.map(np.zeros_like, self.params), 0.0
        for c in client_ids:
            n = int(population.sizes(np.array([c]))[0])
            steps = -(-n // BATCH)
            index = np.arange(steps * BATCH)
            data = population.gather(np.array([c]), np.where(index < n, index, -1)[None])
            p = server
            for j in range(steps):
                rows = slice(j * BATCH, (j + 1) * BATCH)
                p = self._step(p, {k: v[0, rows] for k, v in data.items()}, index[rows] < n)
            acc, total = self._add(acc, p, server, float(n)), total + n
        self.params = self._server(server, acc, total)
        jax.block_until_ready(self.params)


class Centralized:
    """The floor: one jitted SGD step per batch of 16 over fixed examples (last partial batch
    dropped), batches already on the device."""

    def __init__(self, loss_fn, variables, images, labels):
        import jax
        import jax.numpy as jnp
        import optax

        opt = optax.sgd(LR)
        key = jax.random.PRNGKey(0)

        def step(params, batch):
            grads, _ = jax.grad(loss_fn, has_aux=True)(params, {}, batch, jnp.ones(BATCH, bool),
                                                        key)
            updates, _ = opt.update(grads, opt.init(params), params)
            return optax.apply_updates(params, updates)

        self.examples = len(labels) // BATCH * BATCH
        self._batches = [jax.device_put({"image": images[i:i + BATCH],
                                         "label": labels[i:i + BATCH]})
                         for i in range(0, self.examples, BATCH)]
        self._step = jax.jit(step)
        self.params = jax.block_until_ready(self._step(jax.tree.map(jnp.array,
                                                                    variables["params"]),
                                                       self._batches[0]))

    def epoch(self) -> float:
        import jax

        t0 = time.perf_counter()
        p = self.params
        for batch in self._batches:
            p = self._step(p, batch)
        self.params = jax.block_until_ready(p)
        return time.perf_counter() - t0


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(model_name, cohort, layouts, repeats, population_size, devices, cache_dir=None,
            startup_only=False):
    """One (model, cohort) in this process; returns a dict of measurements.

    cache_dir: JAX's persistent compilation cache there (as `fer_jax.main` enables it).
    startup_only: only the engine's start-up (a warm-cache rerun); no timed rounds."""
    import jax

    from fer_jax import experiments

    if devices == 0:  # fer_jax.main's automatic split (experiments.host_cpu_devices)
        jax.config.update("jax_num_cpu_devices", max(1, min(experiments.host_cores(), cohort)))
    elif devices > 1:
        jax.config.update("jax_num_cpu_devices", devices)
    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    import jax.numpy as jnp
    import numpy as np
    import optax

    from fer_jax import federated as fl

    t_import = time.perf_counter() - T_START
    model = build_model(model_name)
    shape = MODELS[model_name]
    population = fl.SyntheticPopulation(population_size, image_shape=shape, seed=0, **SIZES)
    loss_fn = fl.classifier_loss(model.apply)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + shape, jnp.uint8),
                           train=False)
    sampler = fl.CohortSampler(population_size, cohort)
    key = jax.random.PRNGKey(0)
    devices = len(jax.devices()) if devices == 0 else devices
    mesh = fl.clients_mesh(jax.devices()[:devices])

    def engine_for(layout):
        # One method object per engine: engines then share no compiled program.
        method = fl.SupervisedClient(loss_fn, optax.sgd(LR))
        packing = fl.PackingConfig(batch_size=BATCH, shuffle=False)
        if layout == "auto":
            return fl.FederatedEngine(method, packing=packing, mesh=mesh)
        shape, _, steps = layout.partition("s")
        k, v = (int(x) for x in shape.split("x"))
        return fl.FederatedEngine(
            method, packing=fl.PackingConfig(batch_size=BATCH, shuffle=False,
                                             clients_per_call=k * devices),
            backend=fl.RoundBackend(vmap_width=v, steps_per_call=int(steps or 0)), mesh=mesh)

    # An arm's start-up: the shared part (imports, model, population) plus its own engine's
    # construction, compile and first round; a later arm does not count the earlier arms' time.
    setup_s = time.perf_counter() - T_START
    arms = {}
    for layout in layouts:
        t_arm = time.perf_counter()
        engine = engine_for(layout)
        state = engine.init(variables)
        t0 = time.perf_counter()
        compile_s = engine.compile(population, cohort_size=cohort)
        plan = engine.plan(population, sampler.sample(0, 0))
        state, result = engine.run_round(state, population, plan, key)
        jax.block_until_ready(state)
        arms[layout] = {"engine": engine, "state": state, "compile_s": compile_s,
                        "first_round_s": time.perf_counter() - t0 - compile_s,
                        "startup_s": setup_s + time.perf_counter() - t_arm, "times": [],
                        "layout": result.layout, "rss_mb": rss_mb()}
    if startup_only:
        return {layout: {k: arm[k] for k in ("compile_s", "first_round_s", "startup_s")}
                for layout, arm in arms.items()}
    plain = PlainLoop(loss_fn, variables)
    t0 = time.perf_counter()
    plain.round(population, sampler.sample(0, 0))
    plain_first = time.perf_counter() - t0
    first = arms[layouts[0]]["state"].variables["params"]
    diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(
        jax.tree.leaves(first), jax.tree.leaves(plain.params), strict=True))
    ids = sampler.sample(0, 0)
    index = np.arange(population.sizes(ids).max())
    data = population.gather(ids, np.where(index < population.sizes(ids)[:, None], index, -1))
    valid = np.arange(data["label"].shape[1]) < population.sizes(ids)[:, None]
    central = Centralized(loss_fn, variables, data["image"][valid], data["label"][valid])
    useful, plain_times, central_times = [], [], []
    for r in range(1, repeats + 1):
        ids = sampler.sample(0, r)
        useful.append(int(population.sizes(ids).sum()))
        for arm in arms.values():
            t0 = time.perf_counter()
            arm["state"], _ = arm["engine"].run_round(
                arm["state"], population, arm["engine"].plan(population, ids), key)
            jax.block_until_ready(arm["state"])
            arm["times"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        plain.round(population, ids)
        plain_times.append(time.perf_counter() - t0)
        central_times.append(central.epoch())
    ex = float(np.mean(useful))
    plain_s = float(np.median(plain_times))
    central_rate = central.examples / float(np.median(central_times))
    out = {"model": model_name, "cohort": cohort, "devices": devices, "repeats": repeats,
           "population": population_size, "import_s": t_import,
           "plain": {"s_per_round": plain_s, "client_updates_per_s": cohort / plain_s,
                     "useful_examples_per_s": ex / plain_s, "first_round_s": plain_first,
                     "times": plain_times},
           "central": {"examples_per_s": central_rate, "times": central_times},
           "round1_max_abs_diff_engine_vs_plain": diff, "peak_rss_mb": rss_mb(), "engine": {}}
    for layout, arm in arms.items():
        s = float(np.median(arm["times"]))
        out["engine"][layout] = {
            "s_per_round": s, "client_updates_per_s": cohort / s,
            "useful_examples_per_s": ex / s, "compile_s": arm["compile_s"],
            "first_round_s": arm["first_round_s"], "startup_s": arm["startup_s"],
            "rss_mb_after_round1": arm["rss_mb"], "layout": arm["layout"], "times": arm["times"],
            "ratio_vs_plain": plain_s / s, "ratio_vs_central": ex / s / central_rate}
    return out


def spawn(args):
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(args)],
                         capture_output=True, text=True, check=False)
    if out.returncode:
        print(out.stderr[-3000:], file=sys.stderr)
        return {"config": args, "error": out.stderr[-500:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(args):
    """One (model, cohort): a cold start into a fresh compilation cache (the timed run), then
    a second process on the now warm cache (start-up only)."""
    with tempfile.TemporaryDirectory(prefix="fer_jax_bench_cache_") as cache:
        r = spawn([*args, cache, False])
        if "error" in r:
            return r
        warm = spawn([*args, cache, True])
    for layout, e in r["engine"].items():
        e["startup_warm_s"] = warm.get(layout, {}).get("startup_s", float("nan"))
        e["compile_warm_s"] = warm.get(layout, {}).get("compile_s", float("nan"))
    return r


def rows(r):
    if "error" in r:
        return [f"{r['config']}: ERROR"]
    lines = []
    for layout, e in r["engine"].items():
        chosen = e["layout"]
        lines.append(
            f"{r['model']:5s} {r['cohort']:5d} {r['devices']:3d} {layout:6s} "
            f"{chosen['clients_per_call']:3d}x{chosen['vmap_width']:<3d}"
            f"{'s' + str(chosen.get('steps_per_call') or '*'):3s} {e['s_per_round']:8.3f} "
            f"{e['client_updates_per_s']:8.1f} {e['useful_examples_per_s']:9.0f} "
            f"{e['startup_s']:7.1f} {e['startup_warm_s']:6.1f} {e['compile_s']:7.1f} "
            f"{r['peak_rss_mb']:6.0f} "
            f"{r['plain']['s_per_round']:8.3f} {r['central']['examples_per_s']:9.0f} "
            f"{e['ratio_vs_plain']:5.2f} {e['ratio_vs_central']:5.2f} "
            f"{r['round1_max_abs_diff_engine_vs_plain']:.1e}")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--models", default="tiny,mlp,cnn")
    ap.add_argument("--cohorts", default="10,100,1000")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds after round 1")
    ap.add_argument("--layouts", default="auto",
                    help="engine layouts: auto and/or KxV (clients per call and device x vmap)")
    ap.add_argument("--population", type=int, default=100_000)
    ap.add_argument("--devices", type=int, default=0,
                    help="host JAX devices; 0 = one per core up to the cohort (fer_jax.main's)")
    ap.add_argument("--note", default="", help="stored with the results (e.g. machine load)")
    ap.add_argument("--out", default=str(RESULTS), help="the JSON file written")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(*json.loads(args.one))))
        return
    layouts = args.layouts.split(",")
    print("model cohort dev layout chosen  s/round  upd/s   useful/s startup warm compile RSS_MB "
          "plain_s  central/s  x_plain x_central diff", flush=True)
    results = []
    for m in args.models.split(","):
        for c in (int(x) for x in args.cohorts.split(",")):
            r = measure([m, c, layouts, args.repeats, args.population, args.devices])
            results.append(r)
            print("\n".join(rows(r)), flush=True)
            out = pathlib.Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"note": args.note, "batch": BATCH, "lr": LR,
                                       "sizes": SIZES, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
