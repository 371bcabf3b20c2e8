"""benchmarks/esr_federated_twin.py: its run commands and its report of finished runs, on
hand-made run files."""

import json
import pathlib

import pytest


@pytest.fixture
def bench(load_script):
    return load_script("benchmarks/esr_federated_twin.py")


def _write(workdir, records, *, config, eval_json, partition=None):
    workdir.mkdir(parents=True)
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (workdir / "config.json").write_text(json.dumps(config))
    (workdir / "eval.json").write_text(json.dumps(eval_json))
    if partition is not None:
        (workdir / "partition.json").write_text(json.dumps(partition))


def _fake(root, seed, fed_acc, cen_acc, fed_mode="federated"):
    test = lambda a: {"test": {"accuracy": a, "macro": {"f1": a / 2}}}  # noqa: E731
    # Federated: 4 rounds of 50 examples out of 200 = 0.25 epoch each, val every 2 rounds.
    _write(root / fed_mode / f"seed{seed}",
           [{"step": r, "round/examples": 50, "train/loss": 1.0} for r in (1, 2)]
           + [{"step": 2, "val/accuracy": 0.3}]
           + [{"step": r, "round/examples": 50, "train/loss": 1.0} for r in (3, 4)]
           + [{"step": 4, "val/accuracy": 0.4}],
           config={"train": {"num_epochs": 40}}, eval_json={"rounds": 4, **test(fed_acc)},
           partition={"sizes": {"total": 200}})
    # Centralized: 2 epochs of 10 steps, val after each.
    _write(root / "centralized" / f"seed{seed}",
           [{"step": 10, "val/accuracy": 0.5}, {"step": 20, "val/accuracy": 0.6}],
           config={"train": {"num_epochs": 2}}, eval_json={"steps": 20, **test(cen_acc)})


def test_commands_match_in_epochs_and_model(bench):
    args = bench.argparse.Namespace(workdir="/w", arm="noatt", branches=4, width=0.25,
                                    clients=20, cohort=10, alpha=0.5, rounds=10)
    args.local_steps, args.epochs, args.server_optimizer, args.server_lr = 0, 0.0, "fedavg", 0.0
    cmds = bench.commands(args, 3)
    fed, cen = " ".join(cmds["federated"]), " ".join(cmds["centralized"])
    assert "mode=federated" in fed and "--config.fed.rounds=10" in fed
    assert "--config.fed.local_steps=0" in fed and "--config.eval_every_rounds=2" in fed
    assert "--config.train.num_epochs=5 " in cen + " "  # 10 rounds x 10 / 20 clients
    assert "--config.model.kwargs.norm=group" in cen  # the federated path's norm
    for cmd in (fed, cen):
        assert "--config.seed=3" in cmd and "--config.model.kwargs.cbam=False" in cmd
    args.local_steps, args.rounds, args.epochs = 20, 40, 5.0  # the same twin, other rounds
    cmds = bench.commands(args, 3)
    assert "/w/federated_steps20/seed3" in " ".join(cmds["federated_steps20"])
    assert "--config.eval_every_rounds=8" in cmds["federated_steps20"]
    assert cmds["centralized"][-1] == "--config.train.num_epochs=5"
    assert "--config.fed.server_optimizer=fedavg" in cmds["federated_steps20"]
    args.server_optimizer, args.server_lr = "fedadam", 0.01  # a server optimizer: its own mode
    fed = bench.commands(args, 3)["federated_steps20_fedadam"]
    assert "--config.fed.server_optimizer=fedadam" in fed
    assert "--config.fed.server_learning_rate=0.01" in fed
    assert "/w/federated_steps20_fedadam/seed3" in " ".join(fed)
    assert [bench.label(m) for m in ("federated", "federated_steps20", "federated_fedavgm",
                                     "federated_steps20_fedadam")] == [
        "FedAvg, 1 local epoch", "FedAvg, 20 local steps", "FedAvgM, 1 local epoch",
        "FedAdam, 20 local steps"]


@pytest.mark.parametrize("arm", ["noatt", "full"])
def test_commands_parse_as_main_parses_them(bench, arm):
    """absl rejects a --config.x override before --config: each command must parse."""
    from absl import flags
    from ml_collections import config_flags

    args = bench.argparse.Namespace(workdir="/w", arm=arm, branches=4, width=0.25,
                                    clients=20, cohort=10, alpha=0.5, rounds=10)
    args.local_steps, args.epochs, args.server_optimizer, args.server_lr = 0, 0.0, "fedavg", 0.0
    root = pathlib.Path(__file__).resolve().parents[1]
    for mode, argv in bench.commands(args, 3).items():
        assert argv[1:3] == ["-m", "fer_jax.main"]
        argv = [argv[0], *(a.replace("configs/", f"{root}/configs/", 1) for a in argv[3:])]
        fv = flags.FlagValues()
        config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv)
        flags.DEFINE_string("workdir", None, "", flag_values=fv)
        fv(argv)
        config = fv.config
        assert config.seed == 3, mode
        assert config.model.kwargs.cbam == (arm == "full"), mode
        assert (config.diversity.spatial_weight == 0) == (arm == "noatt"), mode
        assert fv.workdir == f"/w/{mode}/seed3"
        if mode != "centralized":
            assert config.fed.server_optimizer == "fedavg"


def test_report_of_finished_runs(bench, tmp_path):
    _fake(tmp_path, 0, 0.40, 0.60)
    _fake(tmp_path, 1, 0.44, 0.62)
    _fake(tmp_path / "steps", 0, 0.50, 0.60, fed_mode="federated_steps20")
    (tmp_path / "federated_steps20").mkdir()
    (tmp_path / "steps" / "federated_steps20" / "seed0").rename(
        tmp_path / "federated_steps20" / "seed0")
    assert bench.modes(tmp_path) == ["federated", "federated_steps20", "centralized"]
    (tmp_path / "federated_steps50" / "seed0").mkdir(parents=True)  # a run still going
    assert bench.modes(tmp_path) == ["federated", "federated_steps20", "centralized"]
    assert bench.curve(tmp_path / "federated" / "seed0", "federated") == ([0.5, 1.0], [0.3, 0.4])
    assert bench.curve(tmp_path / "centralized" / "seed0", "centralized") == ([1.0, 2.0],
                                                                              [0.5, 0.6])
    bench.main(["--workdir", str(tmp_path), "--seeds", "0,1", "--report_only"])
    content = json.loads((tmp_path / "twin.json").read_text())
    assert content["summary"]["federated"]["accuracy"]["mean"] == pytest.approx(0.42)
    assert content["summary"]["centralized"]["macro_f1"]["mean"] == pytest.approx(0.305)
    diff = content["federated_minus_centralized_accuracy"]
    assert diff["federated"]["mean"] == pytest.approx(-0.19) and diff["federated"]["n"] == 2
    assert diff["federated_steps20"]["mean"] == pytest.approx(-0.10)
    assert content["summary"]["federated_steps20"]["accuracy"]["n"] == 1
    assert (tmp_path / "twin.png").stat().st_size > 10_000
    bench.main(["--workdir", str(tmp_path), "--seeds", "0-2", "--report_only"])  # 2 unfinished
    assert json.loads((tmp_path / "twin.json").read_text())["seeds_finished"] == [0, 1]
    with pytest.raises(SystemExit, match="no finished run"):
        bench.main(["--workdir", str(tmp_path / "none"), "--report_only"])
