"""Federated round throughput on this machine: fer_jax.federated vs a centralized jitted loop.

For cohorts of 10, 100 and 1,000 clients (small CNN and an MLP on 48x48x1 inputs, batch 16, one
local epoch, client sizes uniform or log-normal, a lazily generated population of 100,000
clients) it measures seconds per round (median of --repeats rounds after one warm-up round),
compile time (a first round over one planned chunk of every chunk shape, so that no timed
round compiles), client updates/s, useful examples/s, padding efficiency, peak RSS, and the
ratio of useful examples/s to a centralized jitted training loop of the same model, batch size
and examples (timed after each round, A B A B).
--devices (default 1,2) puts the 'clients' mesh axis over that many host devices (on a 2-core
CPU, 2 devices = one client per core); the ratio is then also reported against a
data-parallel centralized loop over the same devices (ratio_vs_central_dp).
--tails (default 4) compares tail batches (PackingConfig.tail_multiple, 0 = each epoch's last
batch padded to 16 rows); --steps_per_call compares segmented rounds
(RoundBackend.steps_per_call, 0 = all of a client's steps in one call); --backends compares
sequential / chunked / vmap client layouts; --scaling compares peak RSS for populations of
1,000 and 100,000 clients.
Every configuration runs in its own subprocess so compile time and peak RSS are its own.

  python benchmarks/federated_throughput.py                  # full table (long on 2 cores)
  python benchmarks/federated_throughput.py --quick          # cohorts 10 and 100, 3 repeats
Writes benchmarks/results/federated_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import time

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "federated_throughput.json"
SIZES = {"uniform": dict(size_distribution="uniform", min_size=8, max_size=40),
         "lognormal": dict(size_distribution="lognormal", min_size=2, max_size=64,
                           median_size=16.0, sigma=0.6)}
BATCH = 16
# Client layouts (clients per call K, vmap width V, unrolls); "auto" is the measured CPU choice.
BACKENDS = {
    "sequential": dict(k=1, vmap=1, step_unroll=True, group_unroll=True),
    "chunked": dict(k=4, vmap=1, step_unroll=True, group_unroll=True),
    "chunked16": dict(k=16, vmap=1, step_unroll=True, group_unroll=True),
    "vmap": dict(k=None, vmap=None, step_unroll=True, group_unroll=True),
    "chunked_vmap": dict(k=16, vmap=16, step_unroll=True, group_unroll=True),
}
AUTO = {"cnn": "sequential", "mlp": "chunked"}


def build_model(name):
    import flax.linen as nn
    import jax.numpy as jnp

    if name == "cnn":
        from fer_jax.models import get_model

        # The small CNN of configs/supervised.py with configs/fedavg.py's federated settings
        # (no BatchNorm: padded client batches would enter its statistics).
        cnn = get_model("small_cnn", num_classes=7, widths=(24, 48, 96, 192),
                        convs_per_stage=(1, 2, 2, 1), dense=256, dropout=0.3, norm="none")

        class ScaledCNN(nn.Module):
            """uint8 images -> [0, 1] -> the small CNN (as fedavg's apply function does)."""

            inner: nn.Module

            def __call__(self, x, *, train):
                return self.inner(x.astype(jnp.float32) / 255.0, train=train)

        return ScaledCNN(cnn), "small_cnn 24-48-96-192, convs (1,2,2,1), dense 256, no norm"

    class MLP(nn.Module):
        """2304-128-7 on images scaled to [0, 1]."""

        @nn.compact
        def __call__(self, x, *, train):
            del train
            x = x.reshape(x.shape[0], -1).astype(jnp.float32) / 255.0
            return {"logits": nn.Dense(7)(nn.relu(nn.Dense(128)(x)))}

    if name == "mlp":
        return MLP(), "MLP 2304-128-7"
    raise ValueError(f"unknown model {name!r}")


def run_one(model_name, dist, cohort, backend_name, population_size, repeats, tail=0,
            steps_per_call=0, devices=1):
    """One configuration in this process; returns a dict of measurements.

    devices > 1: the 'clients' mesh axis spans that many host devices (jax_num_cpu_devices, as
    `python -m fer_jax.main --cpu_devices`), each computing its share of every chunk."""
    import jax

    if devices > 1:
        jax.config.update("jax_num_cpu_devices", devices)
    import jax.numpy as jnp
    import numpy as np
    import optax

    from fer_jax import federated as fl

    model, model_desc = build_model(model_name)
    population = fl.SyntheticPopulation(population_size, seed=0, **SIZES[dist])
    b = BACKENDS[backend_name]
    k = (b["k"] or cohort) * devices
    vmap = b["vmap"] or cohort
    loss_fn = fl.classifier_loss(model.apply)
    method = fl.SupervisedClient(loss_fn, optax.sgd(0.05))
    max_steps = -(-SIZES[dist]["max_size"] // BATCH)
    engine = fl.FederatedEngine(
        method, packing=fl.PackingConfig(batch_size=BATCH, step_buckets=tuple(
            range(1, max_steps + 1)), clients_per_call=k, tail_multiple=tail),
        backend=fl.RoundBackend(vmap_width=vmap, step_unroll=b["step_unroll"],
                                group_unroll=b["group_unroll"], steps_per_call=steps_per_call),
        mesh=fl.clients_mesh(jax.devices()[:devices]))
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 48, 48, 1), jnp.uint8),
                           train=False)
    state = engine.init(variables)
    sampler = fl.CohortSampler(population_size, cohort)
    key = jax.random.PRNGKey(0)
    # Compile round: one chunk of every chunk shape (step bucket x tail width) among the first
    # 5,000 clients' chunks, as planned (re-planning those clients would regroup them), so that
    # no timed round compiles a shape its cohort happens to meet first.
    probe = np.arange(min(population_size, 5000))
    shapes = {}
    for chunk in engine.plan(population, probe).chunks:
        shapes.setdefault((chunk.steps, chunk.tail), chunk)
    chunks = tuple(shapes.values())
    ids = np.concatenate([c.client_ids for c in chunks])
    sizes = np.concatenate([c.num_examples for c in chunks])
    compile_plan = fl.packing.CohortPlan(chunks, ids[ids >= 0], sizes[ids >= 0], BATCH, 1)
    t0 = time.perf_counter()
    state, _ = engine.run_round(state, population, compile_plan, key)
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - t0
    # Centralized baselines, timed in turn with the rounds (A B A B: the VM's speed drifts): the
    # warm-up cohort's examples in batches of 16, one jitted step each; with devices > 1 also a
    # data-parallel loop (each device 16 / devices of every batch, gradients averaged).
    images, labels = cohort_examples(population, sampler.sample(0, 0))
    central = Centralized(loss_fn, variables, images, labels, key)
    central_dp = (Centralized(loss_fn, variables, images, labels, key, devices=devices)
                  if devices > 1 else None)
    times, effs, updates, useful, c_times, dp_times = [], [], [], [], [], []
    for r in range(repeats + 1):
        plan = engine.plan(population, sampler.sample(0, r))
        t0 = time.perf_counter()
        state, result = engine.run_round(state, population, plan, key)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
        effs.append(result.padding_efficiency)
        updates.append(result.client_updates)
        useful.append(result.useful_examples)
        if r:
            c_times.append(central.epoch())
            if central_dp is not None:
                dp_times.append(central_dp.epoch())
    med = float(np.median(times[1:]))
    fed_rate = float(np.mean(useful[1:])) / med
    central_rate = central.examples / float(np.median(c_times))
    dp = {}
    if central_dp is not None:
        dp_rate = central_dp.examples / float(np.median(dp_times))
        dp = {"central_dp_examples_per_s": dp_rate, "ratio_vs_central_dp": fed_rate / dp_rate}
    return {
        "model": model_name, "model_desc": model_desc, "sizes": dist, "cohort": cohort,
        "backend": backend_name, "clients_per_call": k, "vmap_width": vmap, "tail_multiple": tail,
        "steps_per_call": steps_per_call, "devices": devices,
        "population": population_size, "rounds_timed": repeats,
        "s_per_round": med, "round_times": times, "compile_s": compile_s,
        "compiled_shapes": len(shapes),
        "client_updates_per_s": float(np.mean(updates[1:])) / med,
        "useful_examples_per_s": fed_rate, "padding_efficiency": float(np.mean(effs[1:])),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "central_examples_per_s": central_rate, "ratio_vs_central": fed_rate / central_rate,
        "central_times": c_times, **dp,
    }


def cohort_examples(population, client_ids):
    """(images, labels) of all examples of the clients `client_ids`, client after client."""
    import numpy as np

    ids = np.asarray(client_ids)
    sizes = population.sizes(ids)
    index = np.where(np.arange(sizes.max())[None] < sizes[:, None], np.arange(sizes.max()), -1)
    data = population.gather(ids, index)
    valid = index >= 0
    return data["image"][valid], data["label"][valid]


class Centralized:
    """A centralized jitted SGD loop over (images, labels) in batches of `batch` (a partial
    last batch is dropped).

    devices > 1: data parallel over that many devices (shard_map; each takes batch / devices
    rows of every batch, gradients pmean'ed: the same update as one device's batch).
    """

    def __init__(self, loss_fn, variables, images, labels, key, *, batch=BATCH, devices=1):
        import jax
        import jax.numpy as jnp
        import numpy as np
        import optax
        from jax.sharding import Mesh, NamedSharding
        from jax.sharding import PartitionSpec as P

        self.examples = n = len(labels) // batch * batch
        opt = optax.sgd(0.05)
        # Copies: the step donates its carry, the caller's variables must survive.
        params = jax.tree.map(jnp.array, variables["params"])
        model_state = jax.tree.map(jnp.array, {k: v for k, v in variables.items()
                                               if k != "params"})
        per = batch // devices

        def step(carry, batch, dkey):
            params, model_state, opt_state = carry
            if devices > 1:
                dkey = jax.random.fold_in(dkey, jax.lax.axis_index("batch"))
            (_, (model_state, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, model_state, batch, jnp.ones(per, bool), dkey)
            if devices > 1:
                grads = jax.lax.pmean(grads, "batch")
            upd, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, upd), model_state, opt_state

        batches = [{"image": images[i:i + batch], "label": labels[i:i + batch]}
                   for i in range(0, n, batch)]
        carry = (params, model_state, opt.init(params))
        if devices > 1:
            mesh = Mesh(np.asarray(jax.devices()[:devices]), ("batch",))
            step = jax.shard_map(step, mesh=mesh, in_specs=(P(), P("batch"), P()),
                                 out_specs=P(), check_vma=False)
            rows = NamedSharding(mesh, P("batch"))
            batches = [jax.device_put(b, rows) for b in batches]
            carry = jax.device_put(carry, NamedSharding(mesh, P()))
        self._step = jax.jit(step, donate_argnums=0)
        self._batches, self._key = batches, key
        self._carry = self._step(carry, batches[0], key)  # compile
        jax.block_until_ready(self._carry)

    def epoch(self) -> float:
        """Seconds for one pass over the examples."""
        import jax

        t0 = time.perf_counter()
        carry = self._carry
        for i, batch in enumerate(self._batches):
            carry = self._step(carry, batch, jax.random.fold_in(self._key, i))
        jax.block_until_ready(carry)
        self._carry = carry
        return time.perf_counter() - t0


def batch_curve(model_name, batches=(4, 8, 12, 16), steps=60):
    """Examples/s of the centralized train step at each batch size (what a tail step costs)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fer_jax import federated as fl

    model, _ = build_model(model_name)
    loss_fn = fl.classifier_loss(model.apply)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 48, 48, 1), jnp.uint8),
                           train=False)
    rng = np.random.default_rng(0)
    out = {}
    for b in batches:
        images = rng.integers(0, 256, (b * steps, 48, 48, 1), dtype=np.uint8)
        labels = rng.integers(0, 7, b * steps).astype(np.int32)
        loop = Centralized(loss_fn, variables, images, labels, jax.random.PRNGKey(0), batch=b)
        out[b] = loop.examples / loop.epoch()
    return {"model": model_name, "examples_per_s_by_batch": out}


def spawn(args_list):
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(args_list)],
                         capture_output=True, text=True, check=False)
    if out.returncode:
        print(out.stderr[-3000:], file=sys.stderr)
        return {"config": args_list, "error": out.stderr[-500:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def config_key(r):
    """What identifies a configuration: model, sizes, cohort, backend, population, tail,
    steps per call, devices."""
    if "config" in r:  # a failed run
        cfg = list(r["config"]) + [0, 0, 1][len(r["config"]) - 6:]
        return cfg[:5] + cfg[6:9]
    return [r.get("model"), r.get("sizes"), r.get("cohort"), r.get("backend"),
            r.get("population"), r.get("tail_multiple", 0), r.get("steps_per_call", 0),
            r.get("devices", 1)]


def row(r):
    if "error" in r:
        return f"{r['config']}: ERROR"
    return (f"{r['model']:4s} {r['sizes']:9s} {r['cohort']:5d} {r['backend']:12s} "
            f"{r['population']:7d} {r.get('tail_multiple', 0):4d} "
            f"{r.get('steps_per_call', 0):3d} {r.get('devices', 1):3d} {r['s_per_round']:8.3f} "
            f"{r['compile_s']:7.1f} "
            f"{r['client_updates_per_s']:8.1f} {r['useful_examples_per_s']:8.0f} "
            f"{r['padding_efficiency']:5.2f} {r['peak_rss_mb']:7.0f} "
            f"{r['central_examples_per_s']:8.0f} {r['ratio_vs_central']:5.2f}"
            + (f"  dp {r['central_dp_examples_per_s']:5.0f} {r['ratio_vs_central_dp']:5.2f}"
               if "central_dp_examples_per_s" in r else ""))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--models", default="cnn,mlp")
    ap.add_argument("--dists", default="uniform,lognormal")
    ap.add_argument("--cohorts", default="10,100,1000")
    ap.add_argument("--population", type=int, default=100_000)
    ap.add_argument("--tails", default="4",
                    help="PackingConfig.tail_multiple values to compare (0 = full last batches)")
    ap.add_argument("--steps_per_call", default="0",
                    help="RoundBackend.steps_per_call values to compare (0 = one call per chunk)")
    ap.add_argument("--devices", default="1,2",
                    help="host devices on the 'clients' mesh axis to compare (1 = one device)")
    ap.add_argument("--backends", action="store_true", help="compare client layouts at C=32")
    ap.add_argument("--scaling", action="store_true", help="peak RSS vs population size")
    ap.add_argument("--batch_curve", action="store_true",
                    help="centralized examples/s at batch 4, 8, 12, 16 (first of --models)")
    ap.add_argument("--no-main", action="store_true", help="skip the main table")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(*json.loads(args.one))))
        return
    if args.batch_curve:
        curve = batch_curve(args.models.split(",")[0])
        print(json.dumps(curve))
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": []}
        RESULTS.write_text(json.dumps(previous | {"batch_curve": curve}, indent=1))
        return
    cohorts = [10, 100] if args.quick else [int(c) for c in args.cohorts.split(",")]
    repeats = 3 if args.quick else args.repeats
    configs = []
    if not args.no_main:
        configs += [[m, d, c, AUTO[m], args.population, repeats, int(t), int(L), int(n)]
                    for m in args.models.split(",") for d in args.dists.split(",")
                    for c in cohorts for t in args.tails.split(",")
                    for L in args.steps_per_call.split(",") for n in args.devices.split(",")]
    if args.backends:
        configs += [[m, "uniform", 32, b, args.population, repeats]
                    for m in args.models.split(",") for b in BACKENDS]
    if args.scaling:
        configs += [["mlp", "uniform", 100, AUTO["mlp"], n, repeats] for n in (1_000, 100_000)]
    print("model sizes     C     backend      populat tail spc dev  s/round compile upd/s    "
          "ex/s     eff   RSS_MB  central  ratio", flush=True)
    results = []
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": []}
    for cfg in configs:
        r = spawn(cfg)
        results.append(r)
        print(row(r), flush=True)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        # Keep earlier runs of other configurations; replace same-configuration entries.
        done = [config_key(q) for q in results]
        keep = [p for p in previous["runs"] if config_key(p) not in done]
        RESULTS.write_text(json.dumps({"machine": "2-core CPU VM (shared)", "batch": BATCH,
                                       "runs": keep + results}, indent=1))


if __name__ == "__main__":
    main()
