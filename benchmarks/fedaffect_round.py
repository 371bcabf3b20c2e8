"""One FedAffect round on this machine: SimCLR round + encoder hand-off + few-shot round.

Builds the embedded default (configs/fedaffect.py, synthetic faces, clients = subjects) through
the driver's own functions, runs one warm-up round (compiles), then times --repeats rounds
(median) of each part. Reports clients/s, images/s (SimCLR: useful images, each seen as 2
views; few-shot: C*K + Q images per episode), the time split, and the ratio of the federated
images/s to the engine's centralized floor: the same client method's jitted step in a host
loop over the same number of images (SimCLR, batch M) and episodes (few-shot) on pooled data.

  python benchmarks/fedaffect_round.py [--repeats 5] [--cohort 8] [--arg runlocal]
Writes benchmarks/results/fedaffect_round.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "fedaffect_round.json"
REPO = pathlib.Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cohort", type=int, default=8)
    parser.add_argument("--arg", default="", help="configs/fedaffect.py argument")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))

    import jax
    import numpy as np

    from configs import fedaffect as fa_config
    from fer_jax import data as data_lib
    from fer_jax.experiments import fedaffect as fa
    from fer_jax.train import loops

    config = fa_config.get_config(args.arg)
    config.repr.cohort_size = config.fewshot.cohort_size = args.cohort
    fa.validate_config(config)
    dataset = data_lib.load(config.data)
    c = dataset.num_classes
    clients = fa.build_clients(config, dataset["train"], c)
    s = clients["summary"]
    rep_model, few_model = fa.build_models(config, c)
    rep_vars, few_vars = fa.init_variables(config, rep_model, few_model, c)
    rep_m, few_m = fa.build_methods(config, rep_model, few_model, c,
                                    max_labeled=max(s["labeled_sizes"]))
    rep_e, few_e = fa.build_engines(config, rep_m, few_m, max_unlabeled=max(s["unlabeled_sizes"]),
                                    max_labeled=max(s["labeled_sizes"]), num_classes=c)
    rep_s, few_s = rep_e.init(rep_vars), few_e.init(few_vars)
    key = jax.random.PRNGKey(0)
    qpc = few_m.queries_per_class
    ep_images = c * config.fedaffect.shots + (c * qpc if qpc else config.fedaffect.queries)
    rows = []
    for r in range(args.repeats + 1):
        t0 = time.perf_counter()
        ids = fa.sample_cohort(clients["rep_clients"], args.cohort, 0, r)
        rep_s, rr = rep_e.run_round(rep_s, clients["rep_population"],
                                    rep_e.plan(clients["rep_population"], ids), key)
        jax.block_until_ready(rep_s)
        t1 = time.perf_counter()
        rep_now, few_now = jax.device_get(rep_s.variables), jax.device_get(few_s)
        few_s = few_e.place(few_now.replace(variables=fa.hand_off_variables(few_now.variables,
                                                                            rep_now)))
        t2 = time.perf_counter()
        ids = fa.sample_cohort(clients["few_clients"], args.cohort, 1, r)
        few_s, fr = few_e.run_round(few_s, clients["few_population"],
                                    few_e.plan(clients["few_population"], ids), key)
        jax.block_until_ready(few_s)
        t3 = time.perf_counter()
        rows.append(dict(simclr_s=t1 - t0, handoff_s=t2 - t1, fewshot_s=t3 - t2,
                         round_s=t3 - t0, simclr_clients=rr.client_updates,
                         simclr_images=rr.useful_examples, simclr_pad_eff=rr.padding_efficiency,
                         fewshot_clients=fr.client_updates,
                         episodes=fr.totals["episodes"]))
        print(f"round {r}: {rows[-1]}", flush=True)
    timed = rows[1:]
    med = lambda k: float(np.median([t[k] for t in timed]))
    mean = lambda k: float(np.mean([t[k] for t in timed]))
    simclr_img_s = mean("simclr_images") / med("simclr_s")
    few_img_s = mean("episodes") * ep_images / med("fewshot_s")

    # Centralized floor: the same steps, jitted, host loop, pooled data, same counts.
    n_rep = int(round(mean("simclr_images") / config.repr.batch_size))
    n_few = int(round(mean("episodes")))
    train = dataset["train"]
    rep_c = loops.PooledLearner(rep_m, rep_vars, {"image": train.images[clients["unlabeled"]]},
                                config.repr.batch_size, seed=0)
    few_c = loops.PooledLearner(few_m, few_vars, {
        "image": train.images[clients["labeled"]],
        "label": train.labels[clients["labeled"]].astype(np.int32)},
        fa.episode_sizes(config, c, max(s["labeled_sizes"]))[0], seed=1)
    rep_c.run(0, 1), few_c.run(0, 1)  # compile
    central = {"simclr": [], "fewshot": []}
    for i in range(3):
        t0 = time.perf_counter()
        rep_c.run(1 + i * n_rep, n_rep)
        jax.block_until_ready(rep_c.state)
        t1 = time.perf_counter()
        few_c.run(1 + i * n_few, n_few)
        jax.block_until_ready(few_c.state)
        central["simclr"].append(t1 - t0)
        central["fewshot"].append(time.perf_counter() - t1)
    c_simclr = n_rep * config.repr.batch_size / float(np.median(central["simclr"]))
    c_few = n_few * ep_images / float(np.median(central["fewshot"]))
    result = {
        "config": f"configs/fedaffect.py:{args.arg}", "cohort": args.cohort,
        "model": config.model.name, "model_kwargs": dict(config.model.kwargs),
        "image_size": config.data.image_size, "batch_size_M": config.repr.batch_size,
        "episodes_per_round": config.fewshot.episodes_per_round,
        "episode_images": ep_images, "repeats": args.repeats,
        "compile_round_s": rows[0]["round_s"],
        "round_s": med("round_s"), "simclr_s": med("simclr_s"), "handoff_s": med("handoff_s"),
        "fewshot_s": med("fewshot_s"),
        "simclr_share": med("simclr_s") / med("round_s"),
        "clients_per_s": (mean("simclr_clients") + mean("fewshot_clients")) / med("round_s"),
        "simclr_clients_per_s": mean("simclr_clients") / med("simclr_s"),
        "fewshot_clients_per_s": mean("fewshot_clients") / med("fewshot_s"),
        "simclr_images_per_s": simclr_img_s, "simclr_view_images_per_s": 2 * simclr_img_s,
        "fewshot_images_per_s": few_img_s,
        "simclr_padding_efficiency": mean("simclr_pad_eff"),
        "central_simclr_images_per_s": c_simclr, "central_fewshot_images_per_s": c_few,
        "simclr_ratio_vs_central": simclr_img_s / c_simclr,
        "fewshot_ratio_vs_central": few_img_s / c_few,
        "rounds": rows,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=1))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
