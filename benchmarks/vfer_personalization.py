"""VFER personalization on real CK+ videos over several seeds (each seed its own subject split):
runs `configs/vfer.py:data=ckplus` per seed (or reads finished runs) and writes one summary.

  python benchmarks/vfer_personalization.py --root /tmp/vfer_seeds --seeds 0,1,2 \
      -- --config.init.path=/tmp/mnv2_fer --config.init.skip=head
  python benchmarks/vfer_personalization.py --runs DIR0,DIR1,DIR2     # summarize finished runs

What it reports (JSON, default benchmarks/results/vfer_personalization.json, and a figure):
- IFER's pseudo labels vs the confidence threshold on every subject's videos (g never sees a
  video), per seed and pooled: videos selected and the fraction correct;
- per test subject: macro / micro F1 before and after personalization, adapted or skipped;
  the change over adapted subjects pooled across seeds, mean with its 95% t-interval;
- the central v before and after each head-only FedAvg round (macro F1), per seed.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fer_jax.evaluation import plots  # noqa: E402
from launch import sweep  # noqa: E402  (Student-t summaries)

RESULTS = REPO / "benchmarks" / "results" / "vfer_personalization.json"


def run_seed(config: str, workdir: pathlib.Path, seed: int, extra: list[str]) -> None:
    if (workdir / "eval.json").exists():
        print(f"{workdir}: finished run found, not rerun")
        return
    cmd = [sys.executable, "-m", "fer_jax.main", f"--config={config}", f"--workdir={workdir}",
           f"--config.seed={seed}", *extra]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def summarize_run(workdir: pathlib.Path) -> dict:
    path = workdir / "eval.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the run did not finish")
    ev = json.loads(path.read_text())
    config = json.loads((workdir / "config.json").read_text())
    threshold = config["personalize"]["threshold"]
    first = ev["rounds"][0]
    skipped = set(first["subjects_skipped_no_confident_video"])
    subjects = []
    for s, before in ev["before_per_subject"].items():
        after = ev["after_per_subject"][s]
        subjects.append({
            "subject": s, "adapted": s not in skipped, "videos": before["num_examples"],
            "macro_f1": [before["macro"]["f1"], after["macro"]["f1"]],
            "micro_f1": [before["micro"]["f1"], after["micro"]["f1"]]})
    curve = ev["pseudo_label_curve"]
    at = {c["threshold"]: c for c in curve["test_subjects"]}[threshold]
    return {
        "workdir": str(workdir), "seed": config["seed"], "threshold": threshold,
        "init": config.get("init", {}).get("path", ""),
        "ifer_dev": {"accuracy": ev["ifer_dev"]["accuracy"],
                     "macro_f1": ev["ifer_dev"]["macro"]["f1"]},
        "split": ev["split"], "pseudo_label_curve": curve["all_subjects"],
        "test_pseudo_labels_at_threshold": at,
        "before": {"macro_f1": ev["before_personalization"]["macro"]["f1"],
                   "micro_f1": ev["before_personalization"]["micro"]["f1"]},
        "after": {"macro_f1": ev["after_personalization"]["macro"]["f1"],
                  "micro_f1": ev["after_personalization"]["micro"]["f1"]},
        "subjects": subjects,
        "central_macro_f1": [ev["central_before_fedavg"]["macro"]["f1"]]
        + [c["macro"]["f1"] for c in ev["central_after_fedavg"]],
        "central_updated": [r.get("central_updated") for r in ev["rounds"]],
        "seconds": ev["seconds"]["total"]}


def pooled_curve(runs: list[dict]) -> list[dict]:
    """The pseudo-label curve with every seed's videos pooled (each seed has its own g)."""
    out = []
    for i, point in enumerate(runs[0]["pseudo_label_curve"]):
        rows = [r["pseudo_label_curve"][i] for r in runs]
        n = sum(r["videos_selected"] for r in rows)
        correct = sum(r["videos_selected"] * (r["accuracy"] or 0.0) for r in rows)
        out.append({"threshold": point["threshold"], "videos_selected": n,
                    "videos": sum(r["videos"] for r in rows),
                    "accuracy": correct / n if n else None})
    return out


def summarize(runs: list[dict]) -> dict:
    adapted = [s for r in runs for s in r["subjects"] if s["adapted"]]
    change = {m: sweep.summarize([s[m][1] - s[m][0] for s in adapted])
              for m in ("macro_f1", "micro_f1")}
    return {
        "seeds": [r["seed"] for r in runs],
        "subjects_tested": sum(len(r["subjects"]) for r in runs),
        "subjects_adapted": len(adapted),
        "change_over_adapted_subjects": change,
        "pooled_before_after": {
            k: {"before": sweep.summarize([r["before"][k] for r in runs]),
                "after": sweep.summarize([r["after"][k] for r in runs])}
            for k in ("macro_f1", "micro_f1")},
        "central_macro_f1_change_last_round": sweep.summarize(
            [r["central_macro_f1"][-1] - r["central_macro_f1"][0] for r in runs]),
        "pseudo_label_curve_pooled": pooled_curve(runs),
        "ifer_dev_macro_f1": sweep.summarize([r["ifer_dev"]["macro_f1"] for r in runs]),
    }


def figure(runs: list[dict], summary: dict, path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.8))
    k = len(json.loads((pathlib.Path(runs[0]["workdir"]) / "eval.json").read_text())[
        "class_names"])
    def accuracy(curve):
        return [np.nan if p["accuracy"] is None else p["accuracy"] for p in curve]

    pooled = summary["pseudo_label_curve_pooled"]
    thresholds = [p["threshold"] for p in pooled]
    if len(runs) <= 4:  # a legend entry per seed
        for r in runs:
            ax.plot(thresholds, accuracy(r["pseudo_label_curve"]), "o-", alpha=0.6,
                    label=f"seed {r['seed']} accuracy")
    else:  # thin lines under the pooled one; a legend entry per seed would cover the curves
        for i, r in enumerate(runs):
            ax.plot(thresholds, accuracy(r["pseudo_label_curve"]), "o-", color="tab:blue",
                    alpha=0.35, ms=3, label=None if i else "accuracy, one line per seed")
        ax.plot(thresholds, accuracy(pooled), "o-", color="tab:blue", lw=2.2,
                label="accuracy, seeds pooled")
    ax.plot(thresholds, [p["videos_selected"] / p["videos"] for p in pooled],
            "s--", color="0.3", label="fraction selected (seeds pooled)")
    ax.axhline(1 / k, color="black", ls=":", lw=1, label=f"chance ({1 / k:.3f})")
    ax.axvline(runs[0]["threshold"], color="0.5", ls="--", lw=1,
               label=f"p_threshold {runs[0]['threshold']:g}")
    ax.set_xlabel("confidence threshold")
    ax.set_ylabel("fraction")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title("IFER pseudo labels on every video of the corpus", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)

    rows = [(f"s{r['seed']}:{s['subject']}", s) for r in runs for s in r["subjects"]]
    rows.sort(key=lambda x: (not x[1]["adapted"], -(x[1]["micro_f1"][1] - x[1]["micro_f1"][0])))
    plots.draw_subject_changes(bx, [s["micro_f1"][1] - s["micro_f1"][0] for _, s in rows],
                               [s["adapted"] for _, s in rows],
                               skipped_label="skipped (no video above p_threshold)")
    ch = summary["change_over_adapted_subjects"]["micro_f1"]
    if ch["mean"] is not None:
        ci = ch["ci95"]
        bx.axhline(ch["mean"], color="tab:blue", ls="--", lw=1.2,
                   label=f"mean over {ch['n']} adapted {ch['mean']:+.3f}"
                   + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""))
    bx.set_xticks(range(len(rows)), [n for n, _ in rows], rotation=90, fontsize=7)
    bx.set_ylabel("micro F1 after - before")
    bx.set_title("per test subject (seed:subject)", fontsize=9)
    if bx.get_legend_handles_labels()[0]:
        bx.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/vfer.py:data=ckplus")
    parser.add_argument("--root", default=None, help="workdirs ROOT/seed<s> (runs them)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--runs", default=None, help="comma-separated finished workdirs")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--figure", default=None, help="PNG (default: --out with .png)")
    parser.add_argument("--title", default="VFER personalization on CK+ videos")
    args, extra = parser.parse_known_args(argv)
    extra = [x for x in extra if x != "--"]
    if args.runs:
        dirs = [pathlib.Path(d) for d in args.runs.split(",")]
    elif args.root:
        dirs = []
        for seed in (int(s) for s in args.seeds.split(",")):
            workdir = pathlib.Path(args.root) / f"seed{seed}"
            run_seed(args.config, workdir, seed, extra)
            dirs.append(workdir)
    else:
        parser.error("give --root (run the seeds) or --runs (summarize finished runs)")
    runs = [summarize_run(d) for d in dirs]
    summary = summarize(runs)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "runs": runs}, indent=1))
    fig_path = pathlib.Path(args.figure) if args.figure else out.with_suffix(".png")
    figure(runs, summary, fig_path, args.title)
    ch = summary["change_over_adapted_subjects"]
    print(f"{summary['subjects_adapted']} of {summary['subjects_tested']} test subjects adapted; "
          f"macro F1 change {ch['macro_f1']['mean']}, micro {ch['micro_f1']['mean']} "
          f"(95% t-intervals in {out}); figure {fig_path}")
    for p in summary["pseudo_label_curve_pooled"]:
        acc = "-" if p["accuracy"] is None else f"{p['accuracy']:.3f}"
        print(f"  threshold {p['threshold']:.2f}: {p['videos_selected']:3d} / {p['videos']} "
              f"videos selected, accuracy {acc}")


if __name__ == "__main__":
    main()
