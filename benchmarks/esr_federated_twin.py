r"""An ESR arm trained with FedAvg over Dirichlet clients beside its centralized twin (FER+).

Both runs use the same model (ESR-B at 48x48 gray, GroupNorm: the federated path cannot use
BatchNorm), the same loss and the same number of passes over the training data: the federated
run does `--rounds` rounds of `--cohort` of `--clients` Dirichlet(`--alpha`) clients, one local
epoch of client Adam each (state fresh every round), so it sees about rounds x cohort / clients
epochs; the centralized twin trains that many epochs with the config's AdamW recipe. Every run
is one `python -m fer_jax.main` into ROOT/{federated,centralized}/seedS; a run whose eval.json
exists is not run again. Writes ROOT/twin.json (PrivateTest accuracy and macro F1 per run, mean
and 95% t-interval per mode, paired federated - centralized differences) and ROOT/twin.png
(PublicTest accuracy against epochs of training data seen; PrivateTest per run).

  python benchmarks/esr_federated_twin.py --workdir /tmp/twin --seeds 0    # ~25 min on 2 cores
  python benchmarks/esr_federated_twin.py --workdir /tmp/twin --arm full   # CBAM + D_sp + D_ch
  python benchmarks/esr_federated_twin.py --workdir /tmp/twin --report_only

Arms: `noatt` (the best arm of the Table-1 ablation at CPU size: no CBAM, no diversity terms)
and `full` (CBAM + D_sp + D_ch, the config's defaults). Needs ../shared/data/fer2013 (FER+ votes).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launch import sweep  # noqa: E402  (the t-interval the sweeps use)

ARMS = {
    "noatt": ["--config.model.kwargs.cbam=False", "--config.diversity.spatial_weight=0",
              "--config.diversity.channel_weight=0"],
    "full": [],
}
ARM_TITLES = {"noatt": "no attention, no diversity terms", "full": "CBAM + D_sp + D_ch"}
CHANCE = 0.125  # 8 FER+ classes


def commands(args, seed: int) -> dict[str, list[str]]:
    """The two runs of one seed: {mode: argv}."""
    config = f"configs/esr.py:data=ferplus,size=48,branches={args.branches},width={args.width}"
    common = [sys.executable, "-m", "fer_jax.main", *ARMS[args.arm], f"--config.seed={seed}"]
    epochs = args.rounds * args.cohort / args.clients
    root = pathlib.Path(args.workdir)
    return {
        "federated": common + [
            f"--config={config},mode=federated", f"--workdir={root / 'federated' / f'seed{seed}'}",
            f"--config.fed.num_clients={args.clients}", f"--config.fed.cohort_size={args.cohort}",
            f"--config.fed.dirichlet_alpha={args.alpha}", f"--config.fed.rounds={args.rounds}",
            "--config.fed.client_optimizer=adam", "--config.fed.client_learning_rate=1e-3",
            "--config.eval_every_rounds=2", "--config.checkpoint_every_rounds=2"],
        "centralized": common + [
            f"--config={config}", f"--workdir={root / 'centralized' / f'seed{seed}'}",
            "--config.model.kwargs.norm=group", "--config.esr.progressive=False",
            f"--config.train.num_epochs={epochs:g}"],
    }


def curve(workdir: pathlib.Path, mode: str) -> tuple[list[float], list[float]]:
    """(epochs of training data seen, PublicTest accuracy) of one run's metrics.jsonl."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    config = json.loads((workdir / "config.json").read_text())
    total = json.loads((workdir / "partition.json").read_text())["sizes"]["total"] \
        if mode == "federated" else None
    xs, ys, seen = [], [], {}
    if mode == "federated":  # cumulative examples trained by the end of each round
        done = 0
        for r in records:
            if "round/examples" in r:
                done += r["round/examples"]
                seen[r["step"]] = done / total
    for r in records:
        if "val/accuracy" not in r:
            continue
        if mode == "federated":
            xs.append(seen[r["step"]])
        else:
            eval_json = json.loads((workdir / "eval.json").read_text())
            steps_per_epoch = eval_json["steps"] / config["train"]["num_epochs"]
            xs.append(r["step"] / steps_per_epoch)
        ys.append(r["val/accuracy"])
    return xs, ys


def report(args, seeds: list[int]) -> dict:
    root = pathlib.Path(args.workdir)
    runs = {}
    for mode in ("federated", "centralized"):
        for s in seeds:
            path = root / mode / f"seed{s}" / "eval.json"
            if path.exists():
                test = json.loads(path.read_text())["test"]
                runs[(mode, s)] = {"accuracy": test["accuracy"], "macro_f1": test["macro"]["f1"]}
    if not runs:
        raise SystemExit(f"{root}: no finished run (no */seed*/eval.json)")
    summary = {mode: {m: sweep.summarize([v[m] for (md, _), v in runs.items() if md == mode])
                      for m in ("accuracy", "macro_f1")}
               for mode in ("federated", "centralized")}
    paired = [runs[("federated", s)]["accuracy"] - runs[("centralized", s)]["accuracy"]
              for s in seeds if ("federated", s) in runs and ("centralized", s) in runs]
    content = {"arm": args.arm, "arm_flags": ARMS[args.arm],
               "protocol": {"clients": args.clients, "cohort": args.cohort, "alpha": args.alpha,
                            "rounds": args.rounds, "branches": args.branches,
                            "width": args.width,
                            "centralized_epochs": args.rounds * args.cohort / args.clients},
               "runs": [{"mode": m, "seed": s, **v} for (m, s), v in sorted(runs.items())],
               "summary": summary,
               "federated_minus_centralized_accuracy": sweep.summarize(paired) if paired
               else None}
    (root / "twin.json").write_text(json.dumps(content, indent=2) + "\n")
    plot(root, args, runs, seeds)
    return content


def plot(root: pathlib.Path, args, runs: dict, seeds: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    colours = {"federated": "C0", "centralized": "C1"}
    for mode in ("federated", "centralized"):
        for k, s in enumerate(seeds):
            workdir = root / mode / f"seed{s}"
            if not (workdir / "eval.json").exists():
                continue
            xs, ys = curve(workdir, mode)
            ax.plot(xs, ys, marker="o", ms=3, color=colours[mode], alpha=0.8,
                    label=f"{mode} (seed {s})" if len(seeds) > 1 else mode,
                    linestyle="-" if k == 0 else "--")
    ax.axhline(CHANCE, color="black", linestyle=":", lw=1, label=f"chance ({CHANCE})")
    ax.set_xlabel("epochs of training data seen")
    ax.set_ylabel("PublicTest accuracy (validation)")
    ax.set_ylim(0, None)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    for i, mode in enumerate(("federated", "centralized")):
        vals = [v["accuracy"] for (m, _), v in runs.items() if m == mode]
        bx.scatter([i] * len(vals), vals, color=colours[mode], s=24, zorder=3)
        if len(vals) > 1:
            s = sweep.summarize(vals)
            bx.errorbar(i + 0.15, s["mean"], yerr=s["half_width"], fmt="o", color="black",
                        capsize=5, label="mean, 95% t-interval" if i == 0 else None)
    bx.axhline(CHANCE, color="black", linestyle=":", lw=1)
    bx.set_xticks([0, 1], ["federated", "centralized"])
    bx.set_xlim(-0.5, 1.6)
    bx.set_ylim(0, None)
    bx.set_ylabel("PrivateTest accuracy (final)")
    bx.grid(axis="y", alpha=0.3)
    if bx.get_legend_handles_labels()[0]:
        bx.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"ESR-{args.branches} ({ARM_TITLES[args.arm]}), FER+ 48x48: FedAvg over "
                 f"{args.clients} "
                 f"Dirichlet({args.alpha:g}) clients, {args.cohort} per round, vs centralized, "
                 f"{len(seeds)} seed{'s' * (len(seeds) > 1)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(root / "twin.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--seeds", default="0", help="e.g. 0,1,2 or 0-2")
    parser.add_argument("--arm", choices=sorted(ARMS), default="noatt")
    parser.add_argument("--branches", type=int, default=4)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--cohort", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--report_only", action="store_true")
    args = parser.parse_args(argv)
    seeds = sweep.parse_ints(args.seeds, flag="seeds")
    failed = 0
    if not args.report_only:
        for s in seeds:
            for mode, cmd in commands(args, s).items():
                if (pathlib.Path(args.workdir) / mode / f"seed{s}" / "eval.json").exists():
                    continue
                print(" ".join(cmd), flush=True)
                failed += subprocess.run(cmd, cwd=REPO).returncode != 0
    content = report(args, seeds)
    print(json.dumps({"summary": content["summary"],
                      "federated_minus_centralized_accuracy":
                          content["federated_minus_centralized_accuracy"]}, indent=1))
    print(f"wrote {pathlib.Path(args.workdir) / 'twin.json'} and twin.png")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
