r"""Client-level DP-FedAvg: time per round with DP vs without, and (--utility) accuracy vs epsilon.

Overhead (default): one lazily generated population (clients of 16-64 48x48 images), one model,
two engines that differ only in `dp` (clip + noise + accounting vs none; both weighting='uniform',
the same layout), both compiled first, then rounds interleaved A B A B on the same cohorts (the
machine's speed drifts). Reports the median seconds per round of each, the overhead in percent,
the first DP round's one-off accounting (the RDP curve) and a target-epsilon calibration time.

  python benchmarks/dp_fedavg.py                        # small CNN, 1,000 clients, cohorts of 50
  python benchmarks/dp_fedavg.py --model mlp --cohort 200 --rounds 20 --out /tmp/dp.json

Utility-privacy (--utility): FedAvg (configs/fedavg.py, small CNN) on FER-2013 in --clients
Dirichlet(0.5) clients, --train_cohort per round (large cohorts: the mean's noise is zC / m),
--train_rounds rounds (150 x 100 of 1,000 clients: ~15 passes over the data), weighting
uniform, once non-private and once per --epsilons target (noise multiplier calibrated by the
engine), each a
`python -m fer_jax.main` run in <workdir>/<arm>; writes the table (PrivateTest accuracy, epsilon,
noise multiplier, seconds) to the JSON, and accuracy vs epsilon plus every arm's accuracy by
round to a PNG beside it. Needs the raw FER-2013 csv in ../shared/data/fer2013.

  python benchmarks/dp_fedavg.py --utility --extra=--cpu_devices=2

The measured table (docs/results.md#dp-utility; ~25 min per arm on 2 CPU cores) used 60 rounds
and the non-private settings its probes chose (the config's SGD / FedAvg stays at the class
prior for 40 rounds):
  python benchmarks/dp_fedavg.py --utility --train_rounds=60 --extra=--cpu_devices=2 \
      "--extra=--config.model.kwargs.widths=(16,32,64)" \
      --extra=--config.fed.server_optimizer=fedavgm --extra=--config.fed.client_optimizer=adam \
      --extra=--config.fed.client_learning_rate=1e-3 --extra=--config.fed.local_epochs=2
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def build_model(name):
    """The throughput benchmark's models ('mlp' = MLP(128), 'cnn'), so the two time the same."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from federated_throughput import build_model as throughput_model

    return throughput_model(name)


def overhead(args) -> dict:
    import jax
    import numpy as np
    import optax

    from fer_jax import federated as fl
    from fer_jax.federated import dp as dp_lib

    model = build_model(args.model)
    population = fl.SyntheticPopulation(args.clients, image_shape=(48, 48, 1), min_size=16,
                                        max_size=64)
    variables = jax.jit(lambda k: model.init(k, np.zeros((1, 48, 48, 1), np.uint8),
                                             train=False))(jax.random.PRNGKey(0))
    method = fl.SupervisedClient(fl.classifier_loss(model.apply), optax.sgd(0.05))
    devices = jax.device_count()
    per_call = args.clients_per_call or devices
    packing = fl.PackingConfig(batch_size=16, clients_per_call=per_call, tail_multiple=4)
    backend = fl.RoundBackend(vmap_width=args.vmap_width)
    dp = dp_lib.DPConfig(clip_norm=1.0, noise_multiplier=args.noise_multiplier)
    arms = {name: fl.FederatedEngine(method, packing=packing, backend=backend,
                                     weighting="uniform", dp=cfg)
            for name, cfg in (("plain", None), ("dp", dp))}
    states, compile_s = {}, {}
    for name, engine in arms.items():
        states[name] = engine.init(variables)
        compile_s[name] = engine.compile(population, cohort_size=args.cohort)
    sampler = fl.CohortSampler(args.clients, args.cohort)
    key = jax.random.PRNGKey(0)
    seconds = {name: [] for name in arms}
    first_dp_round = None
    for r in range(args.rounds + 1):  # round 0: warm-up (the DP ledger's RDP curve)
        ids = sampler.sample(0, r)
        for name, engine in arms.items():
            t0 = time.perf_counter()
            states[name], result = engine.run_round(states[name], population,
                                                    engine.plan(population, ids), key)
            jax.block_until_ready(states[name].variables)
            dt = time.perf_counter() - t0
            if r:
                seconds[name].append(dt)
            elif name == "dp":
                first_dp_round = dt
        print(f"round {r}: " + ", ".join(f"{n} {s[-1]:.3f}s" for n, s in seconds.items() if s)
              + (f", epsilon {result.dp['epsilon']:.3f}" if result.dp else ""), flush=True)
    t0 = time.perf_counter()
    z = dp_lib.calibrate(args.clients, args.cohort, 100, 4.0, dp_lib.default_delta(args.clients))
    calibrate_s = time.perf_counter() - t0
    med = {name: float(np.median(s)) for name, s in seconds.items()}
    params = sum(x.size for x in jax.tree.leaves(variables))
    return {
        "what": "seconds per round, DP-FedAvg (clip + server noise + accounting) vs FedAvg, same"
                " engine layout, cohorts and data; rounds interleaved",
        "model": args.model, "parameters": int(params), "clients": args.clients,
        "cohort": args.cohort, "rounds_timed": args.rounds, "clients_per_call": per_call,
        "vmap_width": args.vmap_width, "devices": devices, "platform": jax.default_backend(),
        "noise_multiplier": args.noise_multiplier,
        "median_s_per_round": med, "overhead_percent": 100 * (med["dp"] / med["plain"] - 1),
        "all_s": seconds, "compile_s": compile_s,
        "first_dp_round_s (RDP curve, once)": first_dp_round,
        "calibrate_s (target eps 4, 100 rounds)": calibrate_s, "calibrated_z": z,
        "final_epsilon": arms["dp"].privacy_report()["epsilon"],
    }


def utility(args) -> dict:
    """Runs the arms (skipping finished ones: eval.json exists) and tabulates them."""
    workdir = pathlib.Path(args.workdir)
    arms = [("non-private", None)] + [(f"eps{e:g}", e) for e in args.epsilons]
    rows = []
    for name, eps in arms:
        out = workdir / name
        cmd = [sys.executable, "-m", "fer_jax.main",
               "--config=configs/fedavg.py:data=fer2013,partition=dirichlet",
               f"--workdir={out}", f"--config.fed.num_clients={args.clients}",
               f"--config.fed.cohort_size={args.train_cohort}",
               f"--config.fed.rounds={args.train_rounds}", "--config.fed.weighting=uniform",
               f"--config.eval_every_rounds={max(args.train_rounds // 5, 1)}"]
        if eps is not None:
            cmd += ["--config.fed.dp.enabled=True", f"--config.fed.dp.clip_norm={args.clip}",
                    f"--config.fed.dp.target_epsilon={eps}"]
            if args.quantile:
                cmd += [f"--config.fed.dp.target_quantile={args.quantile}"]
        cmd += args.extra
        t0 = time.perf_counter()
        if not (out / "eval.json").exists():
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, cwd=REPO, check=True)
        result = json.loads((out / "eval.json").read_text())
        privacy = result.get("privacy", {})
        rows.append({"arm": name, "target_epsilon": eps,
                     "epsilon": privacy.get("epsilon") if privacy.get("enabled") else None,
                     "delta": privacy.get("delta"),
                     "noise_multiplier": privacy.get("noise_multiplier"),
                     "test_accuracy": result["test"]["accuracy"],
                     "test_macro_f1": result["test"]["macro"]["f1"],
                     "seconds": time.perf_counter() - t0, "workdir": str(out)})
        print(json.dumps(rows[-1]), flush=True)
    fed = json.loads((workdir / arms[0][0] / "config.json").read_text())["fed"]
    server = (f"server {fed['server_optimizer']}, client {fed['client_optimizer']} "
              f"{fed['client_learning_rate']:g} x {fed['local_epochs']} epochs")
    return {"what": "FedAvg on FER-2013 (PrivateTest accuracy) at client-level epsilon, same "
                    "rounds, clients, cohorts and uniform weighting",
            "server": server, "extra_flags": args.extra,
            "clients": args.clients, "cohort": args.train_cohort, "rounds": args.train_rounds,
            "clip_norm": args.clip, "target_quantile": args.quantile or None, "rows": rows}


def _curve(workdir: str) -> tuple[list[int], list[float]]:
    """(round, accuracy) of one arm's periodic evaluations (metrics.jsonl): on the validation
    split (`val/accuracy`, FER-2013's PublicTest) when the data has one, else the test split."""
    from fer_jax.evaluation import plots
    from fer_jax.io.metrics import read_jsonl

    path = pathlib.Path(workdir) / "metrics.jsonl"
    series = plots.learning_curve_series(read_jsonl(path) if path.exists() else [])
    return series["eval"].get("val/accuracy") or series["eval"].get("eval/accuracy", ([], []))


def _majority(workdir: str) -> float:
    """The majority class's share of the test set (the rate of a model stuck at the prior)."""
    import numpy as np

    confusion = np.asarray(json.loads((pathlib.Path(workdir) / "eval.json").read_text())
                           ["confusion_matrix"])
    return float(confusion.sum(axis=1).max() / confusion.sum())


def plot(table: dict, path: pathlib.Path) -> None:
    """Left: final accuracy vs epsilon; right: accuracy per round of every arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table["rows"] if r["target_epsilon"] is not None]
    plain = [r for r in table["rows"] if r["target_epsilon"] is None]
    majority = _majority(table["rows"][0]["workdir"])
    fig, (ax, curves) = plt.subplots(1, 2, figsize=(10, 4))
    ax.plot([r["epsilon"] for r in rows], [r["test_accuracy"] for r in rows], "o-",
            label="DP-FedAvg")
    for r in rows:
        ax.annotate(f"z={r['noise_multiplier']:.2f}", (r["epsilon"], r["test_accuracy"]),
                    textcoords="offset points", xytext=(4, 6), fontsize=8)
    for r in plain:
        ax.axhline(r["test_accuracy"], color="gray", ls="--", label="non-private")
    for a in (ax, curves):
        a.axhline(majority, color="tab:red", ls=":", lw=1, label="majority class")
        a.axhline(1 / 7, color="lightgray", ls=":", label="chance (1/7)")
    ax.set_ylabel("PrivateTest accuracy")
    curves.set_ylabel("PublicTest accuracy (periodic evaluations)")
    ax.set_xlabel(f"client-level epsilon (delta = {rows[0]['delta']:.1e})" if rows
                  else "client-level epsilon")
    ax.set_title("final accuracy vs epsilon")
    ax.legend(fontsize=8)
    for r in table["rows"]:
        x, y = _curve(r["workdir"])
        label = "non-private" if r["target_epsilon"] is None else f"eps {r['epsilon']:.2g}"
        curves.plot(x, y, "o-", ms=3, label=label)
    curves.set_xlabel("round")
    curves.set_title("accuracy during training")
    curves.legend(fontsize=8)
    fig.suptitle(f"{table.get('server', 'FedAvg')}, FER-2013, {table['clients']} Dirichlet(0.5) "
                 f"clients, cohort {table['cohort']}, {table['rounds']} rounds, clip "
                 f"{table['clip_norm']:g}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/"
                        "dp_fedavg.json, or dp_fedavg_utility.json with --utility)")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--cohort", type=int, default=50)
    parser.add_argument("--model", choices=("cnn", "mlp"), default="cnn")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per arm")
    parser.add_argument("--clients_per_call", type=int, default=0, help="0 = the devices")
    parser.add_argument("--vmap_width", type=int, default=1)
    parser.add_argument("--noise_multiplier", type=float, default=1.0)
    parser.add_argument("--utility", action="store_true")
    parser.add_argument("--epsilons", type=lambda s: [float(x) for x in s.split(",")],
                        default=[1.0, 4.0, 8.0])
    parser.add_argument("--train_rounds", type=int, default=150)
    parser.add_argument("--train_cohort", type=int, default=100)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--quantile", type=float, default=0.0, help="> 0: adaptive clipping")
    parser.add_argument("--workdir", default="/tmp/dp_fedavg_utility")
    parser.add_argument("--extra", action="append", default=[],
                        help="more flags for fer_jax.main (repeat), e.g. --extra=--cpu_devices=2")
    args = parser.parse_args()
    out = pathlib.Path(args.out or RESULTS / ("dp_fedavg_utility.json" if args.utility
                                              else "dp_fedavg.json"))
    os.chdir(REPO)
    figures = utility(args) if args.utility else overhead(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    if args.utility:
        plot(figures, out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in figures.items() if k not in ("all_s", "rows")}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
