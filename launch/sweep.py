r"""Expands a config file's sweep into runs; runs them in sequence or prints them.

A config file may define `get_sweep(arg) -> list[dict]`, each dict a set of overrides
(`{'train.learning_rate': 1e-3}`). Every run gets its own workdir, named after its overrides:

  python launch/sweep.py --config=configs/supervised.py:data=fer2013 --workdir=/tmp/sweep
  python launch/sweep.py --config=configs/supervised.py --workdir=/tmp/sweep --dry_run
  python launch/sweep.py ... --print_overrides   # one override line per run, for tpu_pod.py

Extra arguments after `--` are passed to every run (e.g. `-- --config.train.num_epochs=5`).
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import shlex
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_sweep(config_spec: str) -> list[dict]:
    path, _, arg = config_spec.partition(":")
    sys.path.insert(0, str(REPO))  # Config files import `configs.common`.
    spec = importlib.util.spec_from_file_location("_sweep_config", REPO / path
                                                  if not pathlib.Path(path).is_absolute() else path)
    if spec is None or not pathlib.Path(spec.origin).is_file():
        raise SystemExit(f"config file {path!r} not found")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise SystemExit(f"{path} defines no get_sweep(arg); nothing to sweep")
    sweep = module.get_sweep(arg or None)
    if not sweep:
        raise SystemExit(f"{path}: get_sweep returned no runs")
    return sweep


def run_name(overrides: dict) -> str:
    return ",".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items()) or "default"


def override_flags(overrides: dict) -> list[str]:
    return [f"--config.{k}={v}" for k, v in overrides.items()]


def commands(config_spec: str, workdir: str, extra: list[str]) -> list[list[str]]:
    return [[sys.executable, "-m", "fer_jax.main", f"--config={config_spec}",
             f"--workdir={pathlib.Path(workdir) / run_name(o)}", *override_flags(o), *extra]
            for o in load_sweep(config_spec)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="configs/<file>.py[:args]")
    parser.add_argument("--workdir", required=True, help="root; each run writes a subfolder")
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    parser.add_argument("--print_overrides", action="store_true",
                        help="print one line of --config overrides per run")
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.print_overrides:
        for o in load_sweep(args.config):
            print(shlex.join(override_flags(o)))
        return 0
    failed = 0
    for cmd in commands(args.config, args.workdir, extra):
        print(shlex.join(cmd), flush=True)
        if not args.dry_run:
            failed += subprocess.run(cmd, cwd=REPO).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
