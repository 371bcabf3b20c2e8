r"""Launches a fer_jax run (or a whole sweep) on every worker of a Cloud TPU pod slice.

Every worker runs the same `python -m fer_jax.main ... --distributed` command;
jax.distributed.initialize() discovers the coordinator on Cloud TPU, and each process feeds its
own share of the clients. Runs of a sweep go one after the other, each on the whole slice.

  python launch/tpu_pod.py --tpu=my-v4-32 --zone=us-central2-b --repo_dir=~/fer_jax \
      --config=configs/fedavg.py:data=fer2013 --workdir=gs://bucket/runs/fedavg [--sweep] --dry_run

Without --dry_run the commands are executed with subprocess (gcloud must be installed and
authenticated). The workdir should be a shared bucket (gs://...) so every host sees checkpoints.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

import sweep as sweep_lib


def pod_commands(args) -> list[list[str]]:
    arms = [sweep_lib.sweep_arm(o) for o in sweep_lib.load_sweep(args.config)] if args.sweep \
        else [("", {})]
    out = []
    for name, arm_overrides in arms:
        overrides = sweep_lib.override_flags(arm_overrides)
        workdir = args.workdir.rstrip("/") + (f"/{name}" if name else "")
        remote = " ".join([
            f"cd {args.repo_dir} &&", f"{args.python} -m fer_jax.main",
            shlex.quote(f"--config={args.config}"), shlex.quote(f"--workdir={workdir}"),
            "--distributed", *map(shlex.quote, overrides), *map(shlex.quote, args.extra)])
        out.append(["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu, f"--zone={args.zone}",
                    f"--project={args.project}" if args.project else "", "--worker=all",
                    f"--command={remote}"])
        out[-1] = [c for c in out[-1] if c]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tpu", required=True, help="TPU VM name")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", default="")
    parser.add_argument("--repo_dir", default="~/fer_jax", help="checkout on every worker")
    parser.add_argument("--python", default="python3")
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--sweep", action="store_true", help="launch every run of get_sweep")
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    parser.add_argument("extra", nargs="*", help="more flags for fer_jax.main (after --)")
    args = parser.parse_args(argv)
    for cmd in pod_commands(args):
        print(shlex.join(cmd), flush=True)
        if not args.dry_run and subprocess.run(cmd).returncode != 0:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
