r"""The occlusion method's four-model ablation, read from a sweep: accuracy per evaluation mode
and each arm's paired gain over the baseline M_Res, with 95% t-intervals over seeds.

Run the sweep first (WORKSPACE.md#fer-pretrained has the FER-2013 command), then:

  python benchmarks/occlusion_ablation.py --sweep /tmp/occ_fer \
      --json benchmarks/results/occlusion_fer2013_3seeds.json --png docs/figures/occ.png

Every run's eval.json (the workdirs listed in SWEEP/sweep.json) gives `accuracy[mode]` and
`mask_iou[mode]`. Arms pair with the baseline by seed (and fold): all arms of a sweep see the
same evaluation occlusions (`occlusion.eval_seed`), so a paired difference removes the seed's
split of luck that the arms share. Printed and written: per arm and mode the mean (95% t), the
paired difference to the baseline (95% t), the baseline's seed-to-seed std, and whether the gain
exceeds that spread (the issue's criterion); mask IoU of phi for the arms that have it.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launch import sweep  # noqa: E402  (the t-interval the sweeps use)

MODES = ("clean", "synthetic", "R8", "R16", "R24", "eyes", "mouth")
LABELS = {"res": "M_Res", "resatt": "M_ResAtt", "resadv": "M_ResAdv",
          "resattadv": "M_ResAttAdv"}


def load_runs(sweep_dir: pathlib.Path) -> list[dict]:
    """[{'arm', 'seed', 'fold', 'accuracy': {mode: x}, 'mask_iou': {mode: x}}] of the sweep."""
    path = sweep_dir / "sweep.json"
    if not path.is_file():
        raise SystemExit(f"{path}: no such file (run launch/sweep.py first, or --report_only)")
    runs = []
    for run in json.loads(path.read_text())["runs"]:
        eval_path = pathlib.Path(run["workdir"]) / "eval.json"
        if not eval_path.is_file():
            continue
        result = json.loads(eval_path.read_text())
        if "accuracy" not in result:
            raise SystemExit(f"{eval_path}: no 'accuracy' per mode; not an occlusion run")
        runs.append({"arm": run["arm"], "seed": run["seed"], "fold": run.get("fold"),
                     "accuracy": result["accuracy"], "mask_iou": result.get("mask_iou", {})})
    if not runs:
        raise SystemExit(f"{sweep_dir}: none of the sweep's runs has an eval.json")
    return runs


def analyse(runs: list[dict], baseline: str = "res", modes=MODES) -> dict:
    """Per arm: 'accuracy' and 'mask_iou' {mode: summary}, 'paired' {mode: summary of arm -
    baseline over the (seed, fold) pairs both have}; 'baseline_std' {mode: std}; 'exceeds_spread'
    {arm: {mode: paired mean > baseline std}}. Accuracies as fractions."""
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    if baseline not in arms:
        raise SystemExit(f"baseline arm {baseline!r} not in the sweep's arms {arms}")
    modes = [m for m in modes if all(m in r["accuracy"] for r in runs)]
    by_key = {(r["arm"], r["seed"], r["fold"]): r for r in runs}
    out = {"baseline": baseline, "modes": modes, "arms": {}}
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm]
        pairs = [(r, by_key[(baseline, r["seed"], r["fold"])]) for r in mine
                 if (baseline, r["seed"], r["fold"]) in by_key]
        out["arms"][arm] = {
            "n": len(mine),
            "accuracy": {m: sweep.summarize([r["accuracy"][m] for r in mine]) for m in modes},
            "mask_iou": {m: sweep.summarize([r["mask_iou"][m] for r in mine])
                         for m in modes if all(m in r["mask_iou"] for r in mine)},
            "paired": {m: sweep.summarize([a["accuracy"][m] - b["accuracy"][m]
                                           for a, b in pairs]) for m in modes},
        }
    base = out["arms"][baseline]["accuracy"]
    out["baseline_std"] = {m: base[m]["std"] for m in modes}
    out["exceeds_spread"] = {
        arm: {m: (v["paired"][m]["mean"] is not None and out["baseline_std"][m] is not None
                  and v["paired"][m]["mean"] > out["baseline_std"][m]) for m in modes}
        for arm, v in out["arms"].items() if arm != baseline}
    return out


def table(result: dict) -> str:
    """Markdown: accuracy (%) per arm and mode, then the paired gains over the baseline."""
    modes, base = result["modes"], result["baseline"]

    def pct(s, signed=False):
        if s["mean"] is None:
            return "-"
        text = f"{100 * s['mean']:+.2f}" if signed else f"{100 * s['mean']:.2f}"
        if s["ci95"] is not None:
            lo, hi = (100 * x for x in s["ci95"])
            text += f" [{lo:+.2f}, {hi:+.2f}]" if signed else f" [{lo:.2f}, {hi:.2f}]"
        return text

    lines = ["| model | n | " + " | ".join(modes) + " |", "|---|---|" + "---|" * len(modes)]
    for arm, v in result["arms"].items():
        lines.append(f"| {LABELS.get(arm, arm)} | {v['n']} | "
                     + " | ".join(pct(v["accuracy"][m]) for m in modes) + " |")
    lines += ["", f"Paired by seed, minus {LABELS.get(base, base)} (points; * = above the "
              "baseline's seed-to-seed std):", "",
              "| model | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    std = result["baseline_std"]
    lines.append(f"| {LABELS.get(base, base)} std | "
                 + " | ".join("-" if std[m] is None else f"{100 * std[m]:.2f}" for m in modes)
                 + " |")
    for arm, v in result["arms"].items():
        if arm == base:
            continue
        flags = result["exceeds_spread"][arm]
        lines.append(f"| {LABELS.get(arm, arm)} | " + " | ".join(
            pct(v["paired"][m], signed=True) + (" *" if flags[m] else "") for m in modes) + " |")
    return "\n".join(lines)


def plot(result: dict, path: pathlib.Path, *, title: str, chance: float | None = None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes, base = result["modes"], result["baseline"]
    arms = list(result["arms"])
    fig, (ax_acc, ax_gain) = plt.subplots(1, 2, figsize=(13, 4.6))
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        x = [j + (i - (len(arms) - 1) / 2) * width for j in range(len(modes))]
        acc = result["arms"][arm]["accuracy"]
        ax_acc.errorbar(x, [100 * acc[m]["mean"] for m in modes],
                        yerr=[100 * (acc[m]["half_width"] or 0) for m in modes], fmt="o",
                        ms=4, capsize=2,
                        label=f"{LABELS.get(arm, arm)} (n={result['arms'][arm]['n']})")
    if chance is not None:
        ax_acc.axhline(100 * chance, color="red", linestyle="--", linewidth=1,
                       label=f"chance ({100 * chance:.1f}%)")
    ax_acc.set_xticks(range(len(modes)), modes)
    ax_acc.set_xlabel("evaluation occlusion")
    ax_acc.set_ylabel("test accuracy (%), mean and 95% t-interval")
    ax_acc.set_title("accuracy per evaluation mode", fontsize=10)
    ax_acc.legend(fontsize=8, loc="lower left")
    ax_acc.grid(alpha=0.3, axis="y")

    others = [a for a in arms if a != base]
    width = 0.8 / max(len(others), 1)
    for i, arm in enumerate(others, start=1):
        x = [j + (i - 1 - (len(others) - 1) / 2) * width for j in range(len(modes))]
        paired = result["arms"][arm]["paired"]
        ax_gain.errorbar(x, [100 * paired[m]["mean"] for m in modes],
                         yerr=[100 * (paired[m]["half_width"] or 0) for m in modes], fmt="o",
                         ms=4, capsize=2, color=f"C{i}", label=LABELS.get(arm, arm))
    std = result["baseline_std"]
    ax_gain.bar(range(len(modes)), [100 * (std[m] or 0) for m in modes], width=0.9,
                color="0.85", zorder=0, label=f"{LABELS.get(base, base)} seed-to-seed std")
    ax_gain.axhline(0.0, color="black", linewidth=0.8)
    ax_gain.set_xticks(range(len(modes)), modes)
    ax_gain.set_xlabel("evaluation occlusion")
    ax_gain.set_ylabel(f"minus {LABELS.get(base, base)}, paired by seed (points)")
    ax_gain.set_title(f"gain over {LABELS.get(base, base)}, mean and 95% t-interval",
                      fontsize=10)
    ax_gain.legend(fontsize=8)
    ax_gain.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", required=True, type=pathlib.Path,
                    help="a launch/sweep.py --workdir of the occlusion config")
    ap.add_argument("--baseline", default="res", help="the arm the others are paired with")
    ap.add_argument("--json", type=pathlib.Path, help="write the analysis here")
    ap.add_argument("--png", type=pathlib.Path, help="write the figure here")
    ap.add_argument("--title", default=None)
    ap.add_argument("--chance", type=float, default=None, help="chance accuracy (fraction)")
    args = ap.parse_args(argv)
    result = analyse(load_runs(args.sweep), args.baseline)
    print(table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"sweep": str(args.sweep), **result}, indent=1) + "\n")
    if args.png:
        n = max(v["n"] for v in result["arms"].values())
        plot(result, args.png, chance=args.chance,
             title=args.title or f"occlusion ablation ({args.sweep.name}), {n} seeds")
    return result


if __name__ == "__main__":
    main()
