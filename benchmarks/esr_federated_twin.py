r"""An ESR arm trained with FedAvg over Dirichlet clients beside its centralized twin (FER+).

Both runs use the same model (ESR-B at 48x48 gray, GroupNorm: the federated path cannot use
BatchNorm), the same loss and the same number of passes over the training data: the federated
run does `--rounds` rounds of `--cohort` of `--clients` Dirichlet(`--alpha`) clients, one local
epoch of client Adam each (state fresh every round), so it sees about rounds x cohort / clients
epochs; the centralized twin trains that many epochs with the config's AdamW recipe. Every run
is one `python -m fer_jax.main` into ROOT/{federated,centralized}/seedS; a run whose eval.json
exists is not run again. `--local_steps L` trains each client L steps instead of an epoch (more,
shorter rounds for the same data: less client drift) into ROOT/federated_stepsL/seedS, beside
the same centralized twin (`--epochs`: its length, default rounds x cohort / clients);
`--server_optimizer fedavgm|fedadam|fedyogi` replaces the server's plain average (mode name
suffixed `_fedadam` etc.; `--server_lr`, 0 = the optimizer's default). Writes
ROOT/twin.json (PrivateTest accuracy and macro F1 per run, mean and 95% t-interval per mode,
paired federated - centralized differences) and ROOT/twin.png (PublicTest accuracy against
epochs of training data seen; PrivateTest per run), over every federated mode under ROOT.

  python benchmarks/esr_federated_twin.py --workdir /tmp/twin --seeds 0    # ~25 min on 2 cores
  python benchmarks/esr_federated_twin.py --workdir /tmp/twin --arm full   # CBAM + D_sp + D_ch
  python benchmarks/esr_federated_twin.py --workdir /tmp/twin --local_steps 20 --rounds 40 \
      --epochs 5     # 40 rounds of 20 client steps beside the same 5-epoch twin
  python benchmarks/esr_federated_twin.py --workdir /tmp/twin --report_only

Arms: `noatt` (the best arm of the Table-1 ablation at CPU size: no CBAM, no diversity terms)
and `full` (CBAM + D_sp + D_ch, the config's defaults). Needs ../shared/data/fer2013 (FER+ votes).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fer_jax.federated.aggregate import SERVER_OPTIMIZERS  # noqa: E402
from launch import sweep  # noqa: E402  (the t-interval the sweeps use)

ARMS = {
    "noatt": ["--config.model.kwargs.cbam=False", "--config.diversity.spatial_weight=0",
              "--config.diversity.channel_weight=0"],
    "full": [],
}
ARM_TITLES = {"noatt": "no attention, no diversity terms", "full": "CBAM + D_sp + D_ch"}
CHANCE = 0.125  # 8 FER+ classes


def federated_mode(local_steps: int, server: str = "fedavg") -> str:
    mode = f"federated_steps{local_steps}" if local_steps else "federated"
    return mode if server == "fedavg" else f"{mode}_{server}"


def centralized_epochs(args) -> float:
    return args.epochs or args.rounds * args.cohort / args.clients


def commands(args, seed: int) -> dict[str, list[str]]:
    """The two runs of one seed: {mode: argv}."""
    config = f"configs/esr.py:data=ferplus,size=48,branches={args.branches},width={args.width}"
    # absl's config flag must come before its overrides, so each command is
    # main + --config + --workdir, then the arm's and the mode's overrides.
    main = [sys.executable, "-m", "fer_jax.main"]
    common = [*ARMS[args.arm], f"--config.seed={seed}"]
    root = pathlib.Path(args.workdir)
    server = args.server_optimizer
    fed = federated_mode(args.local_steps, server)
    every = max(1, args.rounds // 5)
    return {
        fed: main + [
            f"--config={config},mode=federated", f"--workdir={root / fed / f'seed{seed}'}",
            *common,
            f"--config.fed.num_clients={args.clients}", f"--config.fed.cohort_size={args.cohort}",
            f"--config.fed.dirichlet_alpha={args.alpha}", f"--config.fed.rounds={args.rounds}",
            f"--config.fed.local_steps={args.local_steps}",
            f"--config.fed.server_optimizer={server}",
            f"--config.fed.server_learning_rate={args.server_lr:g}",
            "--config.fed.client_optimizer=adam", "--config.fed.client_learning_rate=1e-3",
            f"--config.eval_every_rounds={every}", f"--config.checkpoint_every_rounds={every}"],
        "centralized": main + [
            f"--config={config}", f"--workdir={root / 'centralized' / f'seed{seed}'}",
            *common,
            "--config.model.kwargs.norm=group", "--config.esr.progressive=False",
            f"--config.train.num_epochs={centralized_epochs(args):g}"],
    }


def label(mode: str) -> str:
    if mode == "centralized":
        return "centralized"
    steps, server = re.fullmatch(r"federated(?:_steps(\d+))?(?:_(\w+))?", mode).groups()
    name = {None: "FedAvg", "fedavgm": "FedAvgM", "fedadam": "FedAdam", "fedyogi": "FedYogi"}
    return f"{name.get(server, server)}, " + (f"{steps} local steps" if steps else "1 local epoch")


def modes(root: pathlib.Path) -> list[str]:
    """The federated modes with a finished run under ROOT (one local epoch first), then
    'centralized'."""
    fed = sorted((p.name for p in root.glob("federated*") if any(p.glob("seed*/eval.json"))),
                 key=lambda m: (m != "federated", len(m), m))
    return fed + ["centralized"]


def curve(workdir: pathlib.Path, mode: str) -> tuple[list[float], list[float]]:
    """(epochs of training data seen, PublicTest accuracy) of one run's metrics.jsonl."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    xs, ys = [], []
    if mode.startswith("federated"):  # x = cumulative examples trained by the end of the round
        total = json.loads((workdir / "partition.json").read_text())["sizes"]["total"]
        seen, done = {}, 0
        for r in records:
            if "round/examples" in r:
                done += r["round/examples"]
                seen[r["step"]] = done / total
        epoch_of = lambda step: seen[step]  # noqa: E731
    else:  # x = steps / steps per epoch
        config = json.loads((workdir / "config.json").read_text())
        steps = json.loads((workdir / "eval.json").read_text())["steps"]
        epoch_of = lambda step: step * config["train"]["num_epochs"] / steps  # noqa: E731
    for r in records:
        if "val/accuracy" in r:
            xs.append(epoch_of(r["step"]))
            ys.append(r["val/accuracy"])
    return xs, ys


def report(args, seeds: list[int]) -> dict:
    root = pathlib.Path(args.workdir)
    all_modes = modes(root)
    runs = {}
    for mode in all_modes:
        for s in seeds:
            path = root / mode / f"seed{s}" / "eval.json"
            if path.exists():
                test = json.loads(path.read_text())["test"]
                runs[(mode, s)] = {"accuracy": test["accuracy"], "macro_f1": test["macro"]["f1"]}
    if not runs:
        raise SystemExit(f"{root}: no finished run (no */seed*/eval.json)")
    summary = {mode: {m: sweep.summarize([v[m] for (md, _), v in runs.items() if md == mode])
                      for m in ("accuracy", "macro_f1")} for mode in all_modes}
    paired = {}
    for mode in all_modes[:-1]:
        diffs = [runs[(mode, s)]["accuracy"] - runs[("centralized", s)]["accuracy"]
                 for s in seeds if (mode, s) in runs and ("centralized", s) in runs]
        paired[mode] = sweep.summarize(diffs) if diffs else None
    content = {"arm": args.arm, "arm_flags": ARMS[args.arm],
               "protocol": {"clients": args.clients, "cohort": args.cohort, "alpha": args.alpha,
                            "branches": args.branches, "width": args.width,
                            "commands": {m: " ".join(c) for m, c in
                                                   commands(args, seeds[0]).items()}},
               "seeds_finished": sorted({s for _, s in runs}),
               "runs": [{"mode": m, "seed": s, **v} for (m, s), v in sorted(runs.items())],
               "summary": summary,
               "federated_minus_centralized_accuracy": paired}
    (root / "twin.json").write_text(json.dumps(content, indent=2) + "\n")
    plot(root, args, runs, content["seeds_finished"], all_modes)
    return content


def plot(root: pathlib.Path, args, runs: dict, seeds: list[int], all_modes: list[str]) -> None:
    """Validation curves and final test accuracy; `seeds` are those with a finished run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wide = max(1.0, 0.35 * len(all_modes))  # room for one tick label per mode
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(8 + 3 * wide, 4.6),
                                 gridspec_kw={"width_ratios": [2, wide]})
    colours = {mode: f"C{i}" for i, mode in enumerate(all_modes)}
    names = {mode: label(mode) for mode in all_modes}
    for mode in all_modes:
        for k, s in enumerate(seeds):
            workdir = root / mode / f"seed{s}"
            if not (workdir / "eval.json").exists():
                continue
            xs, ys = curve(workdir, mode)
            ax.plot(xs, ys, marker="o", ms=3, color=colours[mode], alpha=0.8,
                    label=f"{names[mode]} (seed {s})" if len(seeds) > 1 else names[mode],
                    linestyle="-" if k == 0 else "--")
    ax.axhline(CHANCE, color="black", linestyle=":", lw=1, label=f"chance ({CHANCE})")
    ax.set_xlabel("epochs of training data seen")
    ax.set_ylabel("PublicTest accuracy (validation)")
    ax.set_ylim(0, None)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0, -0.16),
              ncol=3, frameon=False)
    for i, mode in enumerate(all_modes):
        vals = [v["accuracy"] for (m, _), v in runs.items() if m == mode]
        bx.scatter([i] * len(vals), vals, color=colours[mode], s=24, zorder=3)
        if len(vals) > 1:
            s = sweep.summarize(vals)
            bx.errorbar(i + 0.15, s["mean"], yerr=s["half_width"], fmt="o", color="black",
                        capsize=5, label="mean, 95% t-interval" if i == 0 else None)
    bx.axhline(CHANCE, color="black", linestyle=":", lw=1)
    bx.set_xticks(range(len(all_modes)),
                  [names[m].replace(", ", ",\n").replace(" local", "\nlocal") for m in all_modes],
                  fontsize=8)
    bx.set_xlim(-0.5, len(all_modes) - 0.4)
    bx.set_ylim(0, None)
    bx.set_ylabel("PrivateTest accuracy (final)")
    bx.grid(axis="y", alpha=0.3)
    if bx.get_legend_handles_labels()[0]:
        bx.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"ESR-{args.branches} ({ARM_TITLES[args.arm]}), FER+ 48x48: federated over "
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
    parser.add_argument("--server_optimizer", default="fedavg",
                        choices=SERVER_OPTIMIZERS)
    parser.add_argument("--server_lr", type=float, default=0.0,
                        help="server learning rate (0: the optimizer's default)")
    parser.add_argument("--local_steps", type=int, default=0,
                        help="client steps per round (0 = one local epoch)")
    parser.add_argument("--epochs", type=float, default=0.0,
                        help="centralized twin's epochs (0 = rounds x cohort / clients)")
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
