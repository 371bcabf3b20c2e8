r"""Runs a config over arms x seeds x folds, then tabulates every run's final metrics.

One `python -m fer_jax.main` per (arm, seed, fold), in sequence, into ROOT/ARM[/seedS][_foldF]
(seeds and folds only when given). A run whose eval.json exists is skipped, so a stopped sweep
resumes where it stopped. Then ROOT/sweep.json (every run's metrics, read from its eval.json by
dotted key), ROOT/sweep.md (per arm: n, mean, sample std, 95% Student-t interval) and
ROOT/sweep.png (arms with 95% error bars, runs as dots, optional chance line):

  python launch/sweep.py --config=configs/supervised.py:data=ckplus48 --workdir=/tmp/ck \
      --arm=base --seeds=0,1,2 --folds=0-9 --metric=test.accuracy --chance=0.143
  python launch/sweep.py --config=configs/esr.py:data=ferplus --workdir=/tmp/esr \
      --arm=esr4 --arm=no_div=diversity.spatial_weight=0,diversity.channel_weight=0 --seeds=0-2
  python launch/sweep.py ... --report_only    # rebuild the report from the runs on disk
  python launch/sweep.py ... --dry_run        # print the commands of the runs still to do
  python launch/sweep.py ... --print_overrides   # one override line per run, for tpu_pod.py
  python launch/sweep.py --workdir=/tmp/both --combine=a=/tmp/a/sweep.json \
      --combine=b=/tmp/b/sweep.json   # one table and figure of sweeps run apart
  python launch/sweep.py --workdir=/tmp/all --combine=/tmp/seed0/sweep.json \
      --combine=/tmp/seed1/sweep.json --unit=fold --paired_with=random   # seeds run apart

Statistics are over runs (`--unit=run`) or over folds (`--unit=fold`: a fold's value is the
mean of its seeds, so the fold, not the seed, is the sample, as when which subjects are held out
moves results more than the seed does). `--paired_with=ARM` adds every other arm's differences
from ARM, paired by (seed, fold) or by fold: mean, 95% t-interval, and in how many pairs the arm
is ahead.

Arms: `--arm NAME=KEY=VALUE,KEY=VALUE` (repeatable; `--arm NAME` = the config as it is). Without
--arm, the arms are the entries of the config file's `get_sweep(arg) -> list[dict]`, each named
by its 'name' key (not an override) or else after its overrides; a config without get_sweep is
one arm, 'default', when seeds or folds are given. Seeds override `--seed_key` (config.seed),
folds `--fold_key` (config.data.fold).
Arguments after `--` go to every run (e.g. `-- --config.train.num_epochs=5`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import pathlib
import re
import shlex
import statistics
import subprocess
import sys
import textwrap

REPO = pathlib.Path(__file__).resolve().parents[1]
EVAL_FILE = "eval.json"


# -- runs ----------------------------------------------------------------------------------

def load_sweep(config_spec: str, *, required: bool = True) -> list[dict] | None:
    """The config file's get_sweep(arg) entries; None without get_sweep when not `required`."""
    path, _, arg = config_spec.partition(":")
    sys.path.insert(0, str(REPO))  # Config files import `configs.common`.
    spec = importlib.util.spec_from_file_location("_sweep_config", REPO / path
                                                  if not pathlib.Path(path).is_absolute() else path)
    if spec is None or not pathlib.Path(spec.origin).is_file():
        raise SystemExit(f"config file {path!r} not found")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        if not required:
            return None
        raise SystemExit(f"{path} defines no get_sweep(arg); nothing to sweep (give --arm, "
                         "--seeds or --folds)")
    sweep = module.get_sweep(arg or None)
    if not sweep:
        raise SystemExit(f"{path}: get_sweep returned no runs")
    return sweep


def run_name(overrides: dict) -> str:
    return ",".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items()) or "default"


def check_arm_name(name: str, where: str) -> str:
    if not re.fullmatch(r"[\w.+-]+", name):
        raise SystemExit(f"{where}: the arm name {name!r} must be letters, digits, '_', '.', "
                         "'+' or '-' (it names the run folder)")
    return name


def sweep_arm(entry: dict) -> tuple[str, dict]:
    """A get_sweep entry -> (arm name, overrides): its 'name' key when it has one (the run
    folder and the row of the table), else a name made of its overrides."""
    overrides = {k: v for k, v in entry.items() if k != "name"}
    if "name" not in entry:
        return run_name(overrides), overrides
    return check_arm_name(str(entry["name"]), f"get_sweep entry {entry}"), overrides


def override_flags(overrides: dict) -> list[str]:
    return [f"--config.{k}={v}" for k, v in overrides.items()]


def parse_ints(text: str, *, flag: str) -> list[int]:
    """'0,1,2' / '0-9' / '0-4,7' -> sorted distinct ints."""
    out = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m or (m[2] is not None and int(m[2]) < int(m[1])):
            raise SystemExit(f"--{flag}={text!r}: expected integers and ranges like 0,1,2 or "
                             f"0-9, got {part!r}")
        out.update(range(int(m[1]), int(m[2] or m[1]) + 1))
    if not out:
        raise SystemExit(f"--{flag}={text!r}: no values")
    return sorted(out)


def parse_arm(text: str) -> tuple[str, dict]:
    """'NAME=k1=v1,k2=v2' -> (NAME, {k1: v1, k2: v2}); a comma inside a value (a tuple) stays."""
    name, _, rest = text.partition("=")
    check_arm_name(name, f"--arm={text!r} (the name is what comes before the first '=')")
    overrides = {}
    for item in filter(None, re.split(r",(?=\s*[\w.]+=)", rest)):
        key, sep, value = item.strip().partition("=")
        key = key.removeprefix("--").removeprefix("config.")
        if not sep or not re.fullmatch(r"\w+(\.\w+)*", key):
            raise SystemExit(f"--arm={text!r}: expected NAME=KEY=VALUE[,KEY=VALUE...], got "
                             f"{item!r}")
        overrides[key] = value
    return name, overrides


@dataclasses.dataclass(frozen=True)
class Run:
    arm: str
    seed: int | None
    fold: int | None
    overrides: dict
    workdir: pathlib.Path

    @property
    def done(self) -> bool:
        return (self.workdir / EVAL_FILE).is_file()


def expand(arms: list[tuple[str, dict]], root, *, seeds=None, folds=None,
           seed_key: str = "seed", fold_key: str = "data.fold") -> list[Run]:
    """One Run per (arm, seed, fold), in that nesting order, with its workdir under `root`."""
    names = [name for name, _ in arms]
    if len(set(names)) != len(names):
        raise SystemExit(f"arm names must be distinct, got {names}")
    runs = []
    for name, overrides in arms:
        for key, given in ((seed_key, seeds), (fold_key, folds)):
            if given and key in overrides:
                raise SystemExit(f"arm {name!r} sets {key} and the sweep gives it as well; drop "
                                 "one of them")
        for seed in seeds or [None]:
            for fold in folds or [None]:
                leaf = "_".join(([f"seed{seed}"] if seed is not None else [])
                                + ([f"fold{fold}"] if fold is not None else []))
                extra = ({seed_key: seed} if seed is not None else {}) | (
                    {fold_key: fold} if fold is not None else {})
                workdir = pathlib.Path(root) / name / leaf if leaf else pathlib.Path(root) / name
                runs.append(Run(name, seed, fold, {**overrides, **extra}, workdir))
    return runs


def command(config_spec: str, run: Run, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "fer_jax.main", f"--config={config_spec}",
            f"--workdir={run.workdir}", *override_flags(run.overrides), *extra]


# -- statistics ----------------------------------------------------------------------------

# Student t quantile t_{0.975, df}: the fallback when scipy is absent. Between rows the
# quantile is interpolated linearly in 1 / df (exact at the rows, within 1e-4 elsewhere).
_T975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 6: 2.4469, 7: 2.3646,
         8: 2.3060, 9: 2.2622, 10: 2.2281, 11: 2.2010, 12: 2.1788, 13: 2.1604, 14: 2.1448,
         15: 2.1314, 16: 2.1199, 17: 2.1098, 18: 2.1009, 19: 2.0930, 20: 2.0860, 21: 2.0796,
         22: 2.0739, 23: 2.0687, 24: 2.0639, 25: 2.0595, 26: 2.0555, 27: 2.0518, 28: 2.0484,
         29: 2.0452, 30: 2.0423, 40: 2.0211, 60: 2.0003, 120: 1.9799, math.inf: 1.9600}


def table_t975(df: int) -> float:
    """t_{0.975, df} from `_T975`, interpolated in 1 / df between its rows."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df in _T975:
        return _T975[df]
    rows = sorted(_T975)
    hi = next(r for r in rows if r > df)
    lo = rows[rows.index(hi) - 1]
    w = (1 / lo - 1 / df) / (1 / lo - 1 / hi)
    return (1 - w) * _T975[lo] + w * _T975[hi]


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom (scipy if installed)."""
    try:
        from scipy import stats
    except ImportError:
        return table_t975(df)
    return float(stats.t.ppf(0.975, df))


def summarize(values) -> dict:
    """n, mean, sample std (n - 1) and the 95% t-interval of the mean; None where undefined."""
    values = [float(v) for v in values]
    n = len(values)
    out = {"n": n, "mean": None, "std": None, "half_width": None, "ci95": None}
    if n == 0:
        return out
    # statistics sums exactly (fractions): equal values give std 0, not 1e-16.
    mean = statistics.mean(values)
    out["mean"] = mean
    if n >= 2:
        std = statistics.stdev(values)
        half = t975(n - 1) * std / math.sqrt(n)
        out.update(std=std, half_width=half, ci95=[mean - half, mean + half])
    return out


# -- report --------------------------------------------------------------------------------

def lookup(results: dict, key: str, *, source) -> float:
    """results['a']['b'] for key 'a.b', as a float; a clear error naming `source` otherwise."""
    node = results
    for i, part in enumerate(key.split(".")):
        if not isinstance(node, dict) or part not in node:
            where = ".".join(key.split(".")[:i]) or "the top level"
            have = sorted(node) if isinstance(node, dict) else type(node).__name__
            raise SystemExit(f"{source}: no metric {key!r} ({part!r} missing at {where}; "
                             f"it has {have})")
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise SystemExit(f"{source}: metric {key!r} must be a number, got {node!r}")
    return float(node)


def _has(results: dict, key: str) -> bool:
    """Whether results['a']['b'] exists for key 'a.b'."""
    node = results
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def collect(runs: list[Run], metrics: list[str]) -> list[dict]:
    """One record per run: arm, seed, fold, workdir and its metrics (None when not finished).

    A metric that some finished runs report and others lack (the occlusion ablation's mask IoU
    exists only for the arms with an attention branch) is None for those runs and left out of
    their arm's statistics; a metric no finished run reports is an error (a misspelt key)."""
    loaded = []
    for run in runs:
        results = None
        if run.done:
            path = run.workdir / EVAL_FILE
            try:
                results = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}: not valid JSON ({e})") from None
        loaded.append((run, results))
    reported = {m for m in metrics if any(r is not None and _has(r, m) for _, r in loaded)}
    records = []
    for run, results in loaded:
        values = None if results is None else {
            m: lookup(results, m, source=run.workdir / EVAL_FILE)
            if m not in reported or _has(results, m) else None for m in metrics}
        records.append({"arm": run.arm, "seed": run.seed, "fold": run.fold,
                        "workdir": str(run.workdir), "metrics": values})
    return records


UNITS = ("run", "fold")


def unit_values(records: list[dict], arm: str, metric: str, unit: str = "run") -> dict:
    """{unit key: value} of one arm's finished runs: per run, keyed (seed, fold); per fold, the
    mean over the fold's seeds, keyed by fold."""
    if unit not in UNITS:
        raise SystemExit(f"--unit={unit!r}: expected one of {UNITS}")
    runs = [r for r in records if r["arm"] == arm and r["metrics"] is not None
            and r["metrics"][metric] is not None]
    if unit == "run":
        return {(r["seed"], r["fold"]): r["metrics"][metric] for r in runs}
    if any(r["fold"] is None for r in runs):
        raise SystemExit(f"--unit=fold: arm {arm!r} has runs without a fold (run with --folds)")
    by_fold = {}
    for r in runs:
        by_fold.setdefault(r["fold"], []).append(r["metrics"][metric])
    return {f: statistics.mean(v) for f, v in sorted(by_fold.items())}


def summary_by_arm(records: list[dict], metrics: list[str], unit: str = "run") -> dict:
    arms = list(dict.fromkeys(r["arm"] for r in records))
    return {arm: {m: summarize(unit_values(records, arm, m, unit).values()) for m in metrics}
            for arm in arms}


def paired(records: list[dict], metrics: list[str], base: str, unit: str = "run") -> dict:
    """{arm: {metric: summary of (arm - base) over the units both have, + 'ahead'}} for every
    arm but `base`: the paired comparison (same seed and fold, or same fold)."""
    arms = list(dict.fromkeys(r["arm"] for r in records))
    if base not in arms:
        raise SystemExit(f"--paired_with={base!r}: no such arm; the arms are {arms}")
    out = {}
    for arm in arms:
        if arm == base:
            continue
        out[arm] = {}
        for m in metrics:
            a, b = unit_values(records, arm, m, unit), unit_values(records, base, m, unit)
            diffs = [a[k] - b[k] for k in a if k in b]
            out[arm][m] = {**summarize(diffs), "ahead": sum(d > 0 for d in diffs)}
    return out


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def markdown(config_spec: str, records: list[dict], summary: dict, metrics: list[str],
             unit: str = "run", pairs: dict | None = None, base: str = "") -> str:
    head = ["arm", "n"] + [f"{m} {c}" for m in metrics for c in ("mean", "std", "95% CI")]
    what = ("runs with an eval.json (n)" if unit == "run" else
            "folds (n; a fold's value is the mean of its seeds' runs)")
    lines = [f"# Sweep of `{config_spec}`", "",
             f"Per arm: {what}, mean, sample std (n - 1) and the 95% "
             "Student-t interval of the mean, mean +- t(0.975, n - 1) std / sqrt(n).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, per_metric in summary.items():
        cells = [arm, str(max(per_metric[m]["n"] for m in metrics))]
        for m in metrics:
            s = per_metric[m]
            ci = "n/a" if s["ci95"] is None else f"[{s['ci95'][0]:.4f}, {s['ci95'][1]:.4f}]"
            cells += [_fmt(s["mean"]), _fmt(s["std"]), ci]
        lines.append("| " + " | ".join(cells) + " |")
    if pairs:
        by = "(seed, fold)" if unit == "run" else "fold"
        head = ["arm", "n"] + [f"{m} {c}" for m in metrics for c in ("mean", "95% CI", "ahead")]
        lines += ["", f"## Paired with `{base}`", "",
                  f"arm - {base}, paired by {by}: n pairs, mean difference, its 95% "
                  f"Student-t interval, and in how many pairs the arm is ahead.", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for arm, per_metric in pairs.items():
            cells = [arm, str(max(per_metric[m]["n"] for m in metrics))]
            for m in metrics:
                d = per_metric[m]
                ci = ("n/a" if d["ci95"] is None else
                      f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]")
                cells += ["n/a" if d["mean"] is None else f"{d['mean']:+.4f}", ci,
                          f"{d['ahead']} of {d['n']}"]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Runs", "", "| arm | seed | fold | " + " | ".join(metrics) + " |",
              "|" + "---|" * (3 + len(metrics))]
    for r in records:
        vals = ["not finished"] * len(metrics) if r["metrics"] is None else [
            _fmt(r["metrics"][m]) for m in metrics]
        lines.append("| " + " | ".join([r["arm"], "-" if r["seed"] is None else str(r["seed"]),
                                       "-" if r["fold"] is None else str(r["fold"]), *vals])
                     + " |")
    missing = [r["workdir"] for r in records if r["metrics"] is None]
    if missing:
        lines += ["", f"{len(missing)} of {len(records)} runs have no eval.json (not run or "
                  "failed); they are left out of the statistics."]
    return "\n".join(lines) + "\n"


def plot(path, config_spec: str, records: list[dict], summary: dict, metrics: list[str],
         chance: dict, unit: str = "run") -> None:
    """One panel per metric: each arm's runs (or folds) as dots, its mean with the 95% interval
    as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(summary)
    # Arm names are override lists: one override per line, the axis as wide as the longest.
    labels = {arm: arm.replace(",", ",\n") for arm in arms}
    longest = max(len(line) for label in labels.values() for line in label.splitlines())
    width = max(4.0, len(arms) * max(0.9, 0.075 * longest) + 2.0)
    fig, axes = plt.subplots(1, len(metrics), figsize=(width * len(metrics), 4.2), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        for i, arm in enumerate(arms):
            vals = list(unit_values(records, arm, m, unit).values())
            # Runs in a strip left of the arm's mean, so the mean marker hides none of them.
            offsets = [-0.22] if len(vals) == 1 else [
                -0.32 + 0.2 * k / (len(vals) - 1) for k in range(len(vals))]
            ax.scatter([i + o for o in offsets], vals, s=14, color="0.5", zorder=2,
                       label=("one run" if unit == "run" else "one fold (mean of its seeds)")
                       if i == 0 else None)
            s = summary[arm][m]
            if s["mean"] is not None:  # n = 1: a mean without an interval
                ax.errorbar(i, s["mean"], yerr=s["half_width"], fmt="o", color="C0", ms=7,
                            capsize=6, lw=2, zorder=3,
                            label="mean, 95% t-interval" if i == 0 else None)
        if m in chance:
            ax.axhline(chance[m], ls="--", color="C3", lw=1.2, label=f"chance ({chance[m]:g})")
        names = [f"{labels[arm]}\n(n={summary[arm][m]['n']})" for arm in arms]
        ax.set_xticks(range(len(arms)), names, fontsize=8)
        ax.set_xlim(-0.6, len(arms) - 0.4)
        ax.set_xlabel("arm")
        ax.set_ylabel(m)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    done = sum(r["metrics"] is not None for r in records)
    title = f"{config_spec}: {done} runs, {len(arms)} arm{'s' * (len(arms) != 1)}"
    if unit == "fold":
        folds = len({r["fold"] for r in records if r["metrics"] is not None})
        title += f"; statistics over {folds} folds (seeds averaged within a fold)"
    fig.suptitle(textwrap.fill(title, width=int(10 * width * len(metrics))), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(root, config_spec: str, runs: list[Run], metrics: list[str],
           chance: dict | None = None, **stats) -> dict:
    """Writes ROOT/sweep.json, sweep.md and sweep.png; returns the JSON content."""
    records = collect(runs, metrics)
    if not any(r["metrics"] for r in records):
        raise SystemExit(f"{root}: none of the {len(runs)} runs has an {EVAL_FILE}; nothing to "
                         "report")
    return write_report(root, config_spec, records, metrics, chance, **stats)


def combined_records(sources: list[str], metrics: list[str]) -> tuple[str, list[dict]]:
    """(title, records) of other sweeps' sweep.json files given as `LABEL=PATH` (every arm
    renamed 'LABEL: arm', so sweeps run apart, another day or another recipe, share one table)
    or as `PATH` (arms keep their names: the seeds or folds of one grid run in pieces; a run
    (arm, seed, fold) found in two files is an error)."""
    titles, records, seen = [], [], {}
    for source in sources:
        label, sep, path = source.partition("=") if "=" in source else ("", "", source)
        if sep and (not label or not path):
            raise SystemExit(f"--combine={source!r}: expected [LABEL=]PATH/TO/sweep.json")
        try:
            content = json.loads(pathlib.Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"--combine {path}: cannot read a sweep.json ({e})") from None
        missing = [m for m in metrics if m not in content.get("metrics", [])]
        if missing:
            raise SystemExit(f"--combine {path}: metrics {missing} not in its "
                             f"{content.get('metrics')}")
        titles.append(f"{label}: {content.get('config', '?')}" if label
                      else content.get("config", "?"))
        for r in content["runs"]:
            values = r["metrics"] and {m: r["metrics"][m] for m in metrics}
            arm = f"{label}: {r['arm']}" if label else r["arm"]
            key = (arm, r["seed"], r["fold"])
            if key in seen:
                raise SystemExit(f"--combine: run {arm!r} seed {r['seed']} fold {r['fold']} is "
                                 f"in both {seen[key]} and {path}")
            seen[key] = path
            records.append({**r, "arm": arm, "metrics": values})
    titles = list(dict.fromkeys(titles))
    return " + ".join(titles), records


def write_report(root, config_spec: str, records: list[dict], metrics: list[str],
                 chance: dict | None = None, *, unit: str = "run", paired_with: str = "") -> dict:
    """Writes ROOT/sweep.json, sweep.md and sweep.png of `records`; returns the JSON content."""
    root = pathlib.Path(root)
    summary = summary_by_arm(records, metrics, unit)
    pairs = paired(records, metrics, paired_with, unit) if paired_with else None
    content = {"config": config_spec, "metrics": metrics, "unit": unit, "runs": records,
               "summary": summary}
    if pairs:
        content["paired_with"], content["paired"] = paired_with, pairs
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep.json").write_text(json.dumps(content, indent=2) + "\n")
    (root / "sweep.md").write_text(markdown(config_spec, records, summary, metrics, unit, pairs,
                                            paired_with))
    plot(root / "sweep.png", config_spec, records, summary, metrics, chance or {}, unit)
    return content


def parse_chance(items: list[str], metrics: list[str]) -> dict:
    """'VALUE' (every metric) and 'METRIC=VALUE' (that metric, over VALUE) -> {metric: value}."""
    default, out = None, {}
    for item in items:
        key, _, value = item.rpartition("=")
        try:
            number = float(value)
        except ValueError:
            raise SystemExit(f"--chance={item!r}: expected VALUE or METRIC=VALUE") from None
        if not key:
            default = number
        elif key not in metrics:
            raise SystemExit(f"--chance={item!r}: {key!r} is not one of --metric {metrics}")
        else:
            out[key] = number
    if default is not None:
        out = {m: out.get(m, default) for m in metrics}
    return out


# -- main ----------------------------------------------------------------------------------

def plan(args) -> list[Run]:
    seeds = parse_ints(args.seeds, flag="seeds") if args.seeds else None
    folds = parse_ints(args.folds, flag="folds") if args.folds else None
    if args.arm:
        arms = [parse_arm(a) for a in args.arm]
    else:
        sweep = load_sweep(args.config, required=not (seeds or folds))
        arms = [sweep_arm(o) for o in sweep] if sweep else [("default", {})]
    return expand(arms, args.workdir, seeds=seeds, folds=folds, seed_key=args.seed_key,
                  fold_key=args.fold_key)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="", help="configs/<file>.py[:args]")
    parser.add_argument("--workdir", required=True, help="root; each run writes a subfolder")
    parser.add_argument("--arm", action="append", default=[],
                        help="NAME[=KEY=VALUE,KEY=VALUE...] (repeatable); default: get_sweep")
    parser.add_argument("--seeds", default="", help="e.g. 0,1,2 or 0-2 (sets --seed_key)")
    parser.add_argument("--folds", default="", help="e.g. 0-9 (sets --fold_key)")
    parser.add_argument("--seed_key", default="seed", help="config field a seed sets")
    parser.add_argument("--fold_key", default="data.fold", help="config field a fold sets")
    parser.add_argument("--metric", action="append", default=[],
                        help="dotted key into eval.json (repeatable; default test.accuracy)")
    parser.add_argument("--chance", action="append", default=[],
                        help="chance level drawn dashed on each metric's panel: VALUE (every "
                             "metric) and/or METRIC=VALUE (that metric)")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the commands of the runs still to do")
    parser.add_argument("--report_only", action="store_true",
                        help="run nothing; rebuild the report from the runs on disk")
    parser.add_argument("--print_overrides", action="store_true",
                        help="print one line of --config overrides per run")
    parser.add_argument("--combine", action="append", default=[],
                        help="[LABEL=]PATH/TO/sweep.json (repeatable): run nothing; one report "
                             "in --workdir of these sweeps' runs, arms named 'LABEL: arm' (or "
                             "kept without a label)")
    parser.add_argument("--unit", default="run", choices=UNITS,
                        help="the statistics' sample: a run, or a fold (mean of its seeds)")
    parser.add_argument("--paired_with", default="",
                        help="ARM: add every other arm's paired differences from it")
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    metrics = args.metric or ["test.accuracy"]
    chance = parse_chance(args.chance, metrics)
    root = pathlib.Path(args.workdir)
    if args.combine:
        title, records = combined_records(args.combine, metrics)
        write_report(root, title, records, metrics, chance, unit=args.unit,
                     paired_with=args.paired_with)
        print((root / "sweep.md").read_text(), end="")
        return 0
    if not args.config:
        parser.error("--config is required (unless --combine)")
    runs = plan(args)
    if args.print_overrides:
        for run in runs:
            print(shlex.join(override_flags(run.overrides)))
        return 0
    failed = 0
    if not args.report_only:
        for run in runs:
            if run.done:
                print(f"# done, skipped: {run.workdir}", file=sys.stderr, flush=True)
                continue
            cmd = command(args.config, run, extra)
            print(shlex.join(cmd), flush=True)
            if not args.dry_run:
                failed += subprocess.run(cmd, cwd=REPO).returncode != 0
    if args.dry_run:
        return 0
    content = report(args.workdir, args.config, runs, metrics, chance, unit=args.unit,
                     paired_with=args.paired_with)
    print((root / "sweep.md").read_text(), end="")
    print(f"wrote {root / 'sweep.json'}, {root / 'sweep.md'}, {root / 'sweep.png'} "
          f"({sum(r['metrics'] is not None for r in content['runs'])} of {len(runs)} runs)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
