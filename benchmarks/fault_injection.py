"""Kill runlocal runs with SIGKILL at random moments, resume them, compare with straight runs.

Per config: a straight run (cold compilation cache) and a second straight run (warm; its wall
time T sets the kill window and the two must be bit-identical), then trials until `--kills` runs
were really killed (at most 3 x --kills; a run that finished before its kill is rerun and
checked too, but not counted as a kill). A trial starts a fresh run and SIGKILLs it, the three
modes in turn: "random" after a delay drawn uniformly from [0, 0.75 T) (below T: on a loaded
machine run times vary by 10-20%), "in_write" 0-20 ms after the 1st, 2nd or 3rd checkpoint write
is seen in progress (an orbax temporary folder under checkpoints/), "after_checkpoint" at a
random moment in the 0.5 T after the first checkpoint is committed. The killed workdir is then
resumed by the same command until it finishes.
Checked per trial:
* the final checkpoint (whole state: params, optimizer, step, RNG) equals the straight run's
  bit for bit;
* every checkpoint ever left in the workdir (set-aside ones too) is finite;
* metrics.jsonl holds no record twice (same step and same keys).
The resumed run also finds the killed run's lock file and takes it over (counted).
`--blowup` adds the learning-rate-1e30 supervised run with a checkpoint every step: it must stop
with a FloatingPointError and leave only finite checkpoints.

Run: .venv/bin/python benchmarks/fault_injection.py [--kills 20] [--configs supervised,fedavg,
fedaffect] [--blowup] [--seed 0]. Updates benchmarks/results/fault_injection.json: each
invocation adds a pass per config, the summary totals all passes.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Small runlocal variants: several checkpoints per run, minutes on 2 loaded CPU cores.
CONFIGS = {
    "supervised": ["--config=configs/supervised.py:runlocal", "--config.train.num_steps=24",
                   "--config.checkpoint_every_steps=8", "--config.log_every_steps=4",
                   "--config.data.synthetic.num_subjects=6",
                   "--config.data.synthetic.images_per_class=4",
                   "--config.data.synthetic.test_subjects=2"],
    "fedavg": ["--config=configs/fedavg.py:runlocal", "--config.fed.rounds=6",
               "--config.checkpoint_every_rounds=2", "--config.eval_every_rounds=3",
               "--config.data.synthetic.num_subjects=8",
               "--config.data.synthetic.images_per_class=4",
               "--config.data.synthetic.test_subjects=2"],
    "fedaffect": ["--config=configs/fedaffect.py:runlocal", "--config.checkpoint_every_rounds=1"],
}


def _command(workdir: pathlib.Path, args: list[str], cache: pathlib.Path) -> list[str]:
    return [sys.executable, "-m", "fer_jax.main", f"--workdir={workdir}",
            f"--compilation_cache_dir={cache}", *args]


def _env() -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu")


def _straight(workdir, args, cache, log) -> float:
    t0 = time.perf_counter()
    result = subprocess.run(_command(workdir, args, cache), cwd=REPO, env=_env(),
                            capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if result.returncode:
        raise RuntimeError(f"straight run in {workdir} failed:\n{result.stderr[-3000:]}")
    log.write(result.stderr)
    return seconds


def _writes(workdir: pathlib.Path) -> set[str]:
    """Names of orbax temporary folders (checkpoint writes in progress) under checkpoints/."""
    ckpts = workdir / "checkpoints"
    return {p.name for p in ckpts.iterdir() if "tmp" in p.name} if ckpts.is_dir() else set()


def _kill(workdir, args, cache, mode: str, warm: float, rng) -> dict:
    proc = subprocess.Popen(_command(workdir, args, cache), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.perf_counter()
    if mode == "random":
        delay = rng.uniform(0, 0.75 * warm)
        while time.perf_counter() - t0 < delay and proc.poll() is None:
            time.sleep(0.005)
    elif mode == "in_write":  # During the 1st, 2nd or 3rd checkpoint write.
        target, seen = rng.randint(1, 3), set()
        while len(seen) < target and proc.poll() is None:
            seen |= _writes(workdir)
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.02))
    else:  # "after_checkpoint": a random moment after the first checkpoint is committed.
        while not _steps(workdir / "checkpoints") and proc.poll() is None:
            time.sleep(0.005)
        delay = time.perf_counter() - t0 + rng.uniform(0, 0.5 * warm)
        while time.perf_counter() - t0 < delay and proc.poll() is None:
            time.sleep(0.005)
    in_write = bool(_writes(workdir))
    finished = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return {"mode": mode, "killed_at_s": round(time.perf_counter() - t0, 3),
            "write_in_progress_at_kill": in_write, "finished_before_kill": finished,
            "checkpoints_at_kill": _steps(workdir / "checkpoints"),
            "lock_left": (workdir / "RUNNING.lock").exists()}


def _steps(directory: pathlib.Path) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _final_state(workdir: pathlib.Path):
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(workdir / "checkpoints")
    step = manager.latest_step()
    state = manager.restore(step)
    manager.close()
    return step, state


def _all_finite(workdir: pathlib.Path) -> tuple[int, int]:
    """(checkpoints read, non-finite ones) over checkpoints/ and checkpoints.set_aside/."""
    import orbax.checkpoint as ocp

    from fer_jax.io.checkpoint import finite_check

    read = bad = 0
    for folder in (workdir / "checkpoints", workdir / "checkpoints.set_aside"):
        for step_dir in sorted(folder.glob("*")) if folder.is_dir() else []:
            if not step_dir.name.split(".")[0].isdigit():
                continue
            try:
                state = ocp.StandardCheckpointer().restore(step_dir / "default")
            except Exception:  # noqa: BLE001 - a set-aside damaged one does not read.
                continue
            read += 1
            bad += bool(finite_check(state)[0])
    return read, bad


def _same(a, b) -> bool:
    import jax

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return (jax.tree.structure(a) == jax.tree.structure(b) and
            all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb, strict=True)))


def _duplicates(workdir: pathlib.Path) -> int:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return 0
    counts = collections.Counter()
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        counts[(record["step"], tuple(sorted(k for k in record if k != "time")))] += 1
    return sum(c - 1 for c in counts.values() if c > 1)


def run_config(name: str, kills: int, root: pathlib.Path, rng, log) -> dict:
    args = CONFIGS[name]
    cache = root / "cache"
    cold = _straight(root / f"{name}_straight", args, cache, log)
    warm = _straight(root / f"{name}_straight2", args, cache, log)
    step, reference = _final_state(root / f"{name}_straight")
    repeat_identical = _same(reference, _final_state(root / f"{name}_straight2")[1])
    trials = []
    # Trials until `kills` runs were really killed (one that finished first still counts for
    # the duplicate and finiteness checks: its rerun evaluates again), at most 3 x kills.
    for i in range(3 * kills):
        if sum(not t["finished_before_kill"] for t in trials) >= kills:
            break
        workdir = root / f"{name}_kill{i}"
        mode = ("random", "in_write", "after_checkpoint")[i % 3]
        trial = _kill(workdir, args, cache, mode, warm, rng)
        t0 = time.perf_counter()
        resumed = subprocess.run(_command(workdir, args, cache), cwd=REPO, env=_env(),
                                 capture_output=True, text=True)
        trial["resume_s"] = round(time.perf_counter() - t0, 1)
        trial["resume_rc"] = resumed.returncode
        trial["stale_lock_taken_over"] = "taking over the stale lock" in resumed.stderr
        log.write(f"==== {name} trial {i} {trial}\n{resumed.stderr}\n")
        if resumed.returncode == 0:
            final_step, state = _final_state(workdir)
            trial["bit_identical"] = final_step == step and _same(reference, state)
        else:
            trial["bit_identical"] = False
            trial["resume_error"] = resumed.stderr.strip().splitlines()[-1:]
        trial["checkpoints_read"], trial["non_finite_checkpoints"] = _all_finite(workdir)
        trial["duplicated_metric_records"] = _duplicates(workdir)
        trials.append(trial)
        print(name, i, trial, flush=True)
        shutil.rmtree(workdir, ignore_errors=True)
    return {"args": args, "final_step": step, "straight_cold_s": round(cold, 1),
            "straight_warm_s": round(warm, 1), "two_straight_runs_identical": repeat_identical,
            "trials": trials}


def summarize(passes: list[dict]) -> dict:
    """Totals over every pass of a config (passes accumulate over invocations)."""
    trials = [t for p in passes for t in p["trials"]]
    killed = [t for t in trials if not t["finished_before_kill"]]
    return {
        "kills": len(killed),
        "kills_by_mode": dict(collections.Counter(t["mode"] for t in killed)),
        "kills_during_checkpoint_write": sum(t["write_in_progress_at_kill"] for t in killed),
        "resumed_bit_identical": sum(t["bit_identical"] for t in killed),
        "straight_runs_identical": all(p["two_straight_runs_identical"] for p in passes),
        "non_finite_checkpoints": sum(t["non_finite_checkpoints"] for t in trials),
        "duplicated_metric_records": sum(t["duplicated_metric_records"] for t in trials),
        "trials_with_duplicates": sum(t["duplicated_metric_records"] > 0 for t in trials),
        "stale_locks_taken_over": sum(t["stale_lock_taken_over"] for t in killed),
        "runs_finished_before_kill": len(trials) - len(killed)}


def blowup(root: pathlib.Path) -> dict:
    """Supervised runlocal with learning rate 1e30, a checkpoint every step."""
    workdir = root / "blowup"
    args = [*CONFIGS["supervised"], "--config.train.learning_rate=1e30",
            "--config.checkpoint_every_steps=1"]
    result = subprocess.run(_command(workdir, args, root / "cache"), cwd=REPO, env=_env(),
                            capture_output=True, text=True)
    read, bad = _all_finite(workdir)
    lines = result.stderr.strip().splitlines()
    return {"args": args, "rc": result.returncode,
            "floating_point_error": any("FloatingPointError" in line for line in lines),
            "last_line": lines[-1] if lines else "", "checkpoints_left": _steps(
                workdir / "checkpoints"), "checkpoints_read": read, "non_finite_checkpoints": bad}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--configs", default="supervised,fedavg,fedaffect")
    parser.add_argument("--blowup", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/fault_injection.json"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    out = pathlib.Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {"configs": {}}
    results["machine"] = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
                          "(JAX_PLATFORMS=cpu), shared with other jobs")
    with tempfile.TemporaryDirectory(prefix="fault_injection_") as tmp:
        root = pathlib.Path(tmp)
        if args.blowup:
            results["learning_rate_1e30"] = blowup(root)
            print(results["learning_rate_1e30"], flush=True)
            out.write_text(json.dumps(results, indent=2) + "\n")
        with open(root / "log.txt", "w") as log:
            for name in filter(None, args.configs.split(",")):
                entry = results["configs"].setdefault(name, {"passes": []})
                try:
                    one = run_config(name, args.kills, root, rng, log)
                except RuntimeError as e:
                    entry["error"] = str(e)[-1500:]
                    print(name, entry["error"], flush=True)
                    continue
                entry.pop("error", None)
                entry["passes"].append({"seed": args.seed, **one})
                entry["summary"] = summarize(entry["passes"])
                print(name, entry["summary"], flush=True)
                out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
