"""launch/sweep.py: arms x seeds x folds expansion, resumable runs, statistics and the report."""

import importlib.util
import json
import math
import pathlib
import shlex
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sweep", REPO / "launch" / "sweep.py")
sweep = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("sweep", sweep)  # dataclasses look their module up there
_spec.loader.exec_module(sweep)

# Two arms x three seeds of made-up final accuracies / macro F1 (no training anywhere).
ACCURACY = {"base": [0.5, 0.6, 0.7], "wide": [0.75, 0.8, 0.85]}
F1 = {"base": [0.4, 0.4, 0.4], "wide": [0.6, 0.7, 0.8]}


def _cli(*args):
    return subprocess.run([sys.executable, "launch/sweep.py", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def _eval_json(workdir, accuracy, f1):
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "eval.json").write_text(json.dumps(
        {"test": {"accuracy": accuracy, "macro": {"f1": f1}}, "steps": 10}))


def _fake_runs(root):
    for arm, values in ACCURACY.items():
        for seed, (acc, f1) in enumerate(zip(values, F1[arm], strict=True)):
            _eval_json(root / arm / f"seed{seed}", acc, f1)


@pytest.fixture
def grid_config(tmp_path):
    cfg = tmp_path / "grid.py"
    cfg.write_text("def get_config(arg=None):\n    return None\n\n\n"
                   "def get_sweep(arg=None):\n"
                   "    return [{'train.learning_rate': 0.1}, {'train.learning_rate': 0.01}]\n")
    return cfg


# -- statistics ------------------------------------------------------------------------------

def test_t_table_against_textbook_values():
    # Two-sided 95% critical values of Student's t as printed in standard tables.
    for df, want in [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (19, 2.093), (29, 2.045),
                     (40, 2.021), (120, 1.980), (10**9, 1.960)]:
        assert sweep.table_t975(df) == pytest.approx(want, abs=6e-4), df
    with pytest.raises(ValueError, match="degrees of freedom"):
        sweep.table_t975(0)


def test_t_table_interpolation_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in [1, 2, 7, 31, 35, 45, 59, 61, 90, 150, 500, 5000]:
        assert sweep.table_t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-4), df
        assert sweep.t975(df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-12)


@pytest.mark.parametrize("quantile", ["t975", "table_t975"])
def test_summary_hand_computed(quantile, monkeypatch):
    monkeypatch.setattr(sweep, "t975", getattr(sweep, quantile))
    s = sweep.summarize([0.5, 0.6, 0.7])
    # mean 0.6; std sqrt((0.01 + 0 + 0.01) / 2) = 0.1; half-width 4.303 * 0.1 / sqrt(3).
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1)
    assert s["half_width"] == pytest.approx(0.2484, abs=1e-4)
    assert s["ci95"] == pytest.approx([0.6 - 0.2484, 0.6 + 0.2484], abs=1e-4)
    s = sweep.summarize([0.7, 0.9])  # std sqrt(0.02) = 0.1414; 12.706 * 0.1414 / sqrt(2) = 1.2706
    assert s["half_width"] == pytest.approx(1.2706, abs=1e-3)
    assert sweep.summarize([0.4, 0.4, 0.4])["half_width"] == 0.0
    one = sweep.summarize([0.3])
    assert one["mean"] == 0.3 and one["std"] is None and one["ci95"] is None
    assert sweep.summarize([])["mean"] is None


# -- expansion -------------------------------------------------------------------------------

def test_parse_seeds_folds_and_arms():
    assert sweep.parse_ints("0,1,2", flag="seeds") == [0, 1, 2]
    assert sweep.parse_ints("0-3,7,2", flag="folds") == [0, 1, 2, 3, 7]
    for bad in ["a", "3-1", "1-", ","]:
        with pytest.raises(SystemExit, match="--folds"):
            sweep.parse_ints(bad, flag="folds")
    assert sweep.parse_arm("base") == ("base", {})
    assert sweep.parse_arm("wide=model.kwargs.widths=(8,16),config.train.learning_rate=0.1") == (
        "wide", {"model.kwargs.widths": "(8,16)", "train.learning_rate": "0.1"})
    for bad in ["a/b=x=1", "x=lr", "=x=1"]:
        with pytest.raises(SystemExit, match="--arm"):
            sweep.parse_arm(bad)


def test_dry_run_expands_arms_seeds_folds_and_skips_finished(tmp_path):
    root = tmp_path / "root"
    args = ["--config=configs/supervised.py:data=ckplus48", f"--workdir={root}", "--arm=base",
            "--arm=fast=train.learning_rate=0.1,train.num_epochs=2", "--seeds=0,1",
            "--folds=0-2", "--dry_run", "--", "--cpu_devices=2"]
    out = _cli(*args)
    assert out.returncode == 0, out.stderr
    lines = [shlex.split(line) for line in out.stdout.splitlines()]
    assert len(lines) == 2 * 2 * 3
    assert all(line[1:4] == ["-m", "fer_jax.main", "--config=configs/supervised.py:data=ckplus48"]
               and line[-1] == "--cpu_devices=2" for line in lines)
    # Arm-major, then seed, then fold; each run's folder and overrides.
    assert lines[0][4:] == [f"--workdir={root}/base/seed0_fold0", "--config.seed=0",
                            "--config.data.fold=0", "--cpu_devices=2"]
    assert lines[5][4] == f"--workdir={root}/base/seed1_fold2"
    assert lines[-1][4:-1] == [f"--workdir={root}/fast/seed1_fold2",
                               "--config.train.learning_rate=0.1", "--config.train.num_epochs=2",
                               "--config.seed=1", "--config.data.fold=2"]
    assert not root.exists()  # a dry run writes nothing
    _eval_json(root / "fast" / "seed0_fold1", 0.5, 0.5)
    again = _cli(*args)
    assert len(again.stdout.splitlines()) == 11
    assert f"--workdir={root}/fast/seed0_fold1 " not in again.stdout
    assert f"done, skipped: {root}/fast/seed0_fold1" in again.stderr


def test_get_sweep_entries_are_the_arms(grid_config, tmp_path):
    out = _cli(f"--config={grid_config}", f"--workdir={tmp_path}", "--seeds=3", "--dry_run")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2
    assert f"--workdir={tmp_path}/learning_rate=0.1/seed3 --config.train.learning_rate=0.1 " \
           "--config.seed=3" in lines[0]
    # Without seeds or folds: one run per entry, named after its overrides (as before).
    plain = _cli(f"--config={grid_config}", f"--workdir={tmp_path}", "--print_overrides")
    assert plain.stdout.splitlines() == ["--config.train.learning_rate=0.1",
                                         "--config.train.learning_rate=0.01"]


def test_named_get_sweep_entries(tmp_path):
    """A get_sweep entry's 'name' names its folder and row and is not an override; a name that
    cannot be a folder is an error naming the entry."""
    cfg = tmp_path / "named.py"
    cfg.write_text("def get_config(arg=None):\n    return None\n\n\n"
                   "def get_sweep(arg=None):\n"
                   "    return [{'name': 'fast', 'train.learning_rate': 0.1}, {'name': 'base'}]\n")
    out = _cli(f"--config={cfg}", f"--workdir={tmp_path}", "--seeds=0", "--dry_run")
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    assert f"--workdir={tmp_path}/fast/seed0 --config.train.learning_rate=0.1 " \
           "--config.seed=0" in first
    assert f"--workdir={tmp_path}/base/seed0 --config.seed=0" in second
    assert "--config.name" not in second
    assert sweep.sweep_arm({"a.b": 1}) == ("b=1", {"a.b": 1})
    with pytest.raises(SystemExit, match="the arm name 'a/b' must be"):
        sweep.sweep_arm({"name": "a/b", "seed": 1})


def test_expansion_errors():
    with pytest.raises(SystemExit, match="arm names must be distinct"):
        sweep.expand([("a", {}), ("a", {})], "/tmp/r")
    with pytest.raises(SystemExit, match="arm 'a' sets seed and the sweep gives it"):
        sweep.expand([("a", {"seed": 1})], "/tmp/r", seeds=[0])
    # A config without get_sweep: seeds alone make one 'default' arm; nothing at all is an error.
    out = _cli("--config=configs/prepare.py", "--workdir=/tmp/r", "--dry_run")
    assert out.returncode != 0 and "defines no get_sweep" in out.stderr


# -- running and reporting -------------------------------------------------------------------

def test_runs_skip_finished_ones_and_write_the_report(tmp_path, monkeypatch):
    root = tmp_path / "root"
    calls = []

    def fake_main(cmd, cwd):  # stands in for `python -m fer_jax.main`: writes eval.json
        del cwd
        calls.append(cmd)
        workdir = pathlib.Path(next(a for a in cmd if a.startswith("--workdir="))[10:])
        arm, seed = workdir.parent.name, int(workdir.name.removeprefix("seed"))
        _eval_json(workdir, ACCURACY[arm][seed], F1[arm][seed])
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(sweep.subprocess, "run", fake_main)
    _eval_json(root / "base" / "seed1", ACCURACY["base"][1], F1["base"][1])  # finished before
    argv = ["--config=configs/x.py", f"--workdir={root}", "--arm=base", "--arm=wide=a.b=1",
            "--seeds=0-2", "--metric=test.accuracy", "--metric=test.macro.f1"]
    assert sweep.main(argv) == 0
    assert len(calls) == 5 and not any(f"{root}/base/seed1" in " ".join(c) for c in calls)
    content = json.loads((root / "sweep.json").read_text())
    assert [(r["arm"], r["seed"]) for r in content["runs"]] == [
        ("base", 0), ("base", 1), ("base", 2), ("wide", 0), ("wide", 1), ("wide", 2)]
    assert content["runs"][4]["metrics"] == {"test.accuracy": 0.8, "test.macro.f1": 0.7}
    base, wide = content["summary"]["base"], content["summary"]["wide"]
    assert base["test.accuracy"]["mean"] == pytest.approx(0.6)
    assert base["test.accuracy"]["half_width"] == pytest.approx(0.2484, abs=1e-4)
    # wide: accuracy std 0.05 -> 4.303 * 0.05 / sqrt(3) = 0.1242; F1 std 0.1 -> 0.2484.
    assert wide["test.accuracy"]["half_width"] == pytest.approx(0.1242, abs=1e-4)
    assert wide["test.macro.f1"]["ci95"] == pytest.approx([0.7 - 0.2484, 0.7 + 0.2484], abs=1e-4)
    assert base["test.macro.f1"]["std"] == pytest.approx(0.0, abs=1e-12)
    assert (root / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Everything finished: a second call runs nothing and rebuilds the same report.
    calls.clear()
    assert sweep.main(argv) == 0 and calls == []
    assert json.loads((root / "sweep.json").read_text()) == content


def test_report_only_from_run_folders(tmp_path):
    root = tmp_path / "root"
    _fake_runs(root)
    out = _cli("--config=configs/supervised.py:data=ckplus48", f"--workdir={root}", "--arm=base",
               "--arm=wide", "--arm=missing", "--seeds=0,1,2", "--metric=test.accuracy",
               "--metric=test.macro.f1", "--chance=0.143", "--report_only")
    assert out.returncode == 0, out.stderr
    md = (root / "sweep.md").read_text()
    assert ("| base | 3 | 0.6000 | 0.1000 | [0.3516, 0.8484] | 0.4000 | 0.0000 | "
            "[0.4000, 0.4000] |") in md
    assert "| wide | 3 | 0.8000 | 0.0500 | [0.6758, 0.9242] | 0.7000 | 0.1000 | " \
           "[0.4516, 0.9484] |" in md
    assert "| missing | 0 | n/a | n/a | n/a |" in md
    assert "3 of 9 runs have no eval.json" in md
    assert "| wide | 1 | - | 0.8000 | 0.7000 |" in md
    assert (root / "sweep.png").stat().st_size > 10_000
    assert not any((root / "missing").glob("*"))  # report_only starts no run


def test_report_errors_name_the_file(tmp_path):
    root = tmp_path / "root"
    _fake_runs(root)
    runs = sweep.expand([("base", {})], root, seeds=[0])
    with pytest.raises(SystemExit, match=r"base/seed0/eval.json: no metric 'test.top5'.*"
                                         r"'top5' missing at test"):
        sweep.report(root, "c", runs, ["test.top5"])
    with pytest.raises(SystemExit, match="metric 'test.macro' must be a number"):
        sweep.report(root, "c", runs, ["test.macro"])
    with pytest.raises(SystemExit, match="none of the 1 runs has an eval.json"):
        sweep.report(root, "c", sweep.expand([("x", {})], root, seeds=[0]), ["test.accuracy"])
    with pytest.raises(SystemExit, match="is not one of --metric"):
        sweep.parse_chance(["test.f1=0.1"], ["test.accuracy"])
    assert sweep.parse_chance(["0.2", "b=0.5"], ["a", "b", "c"]) == {"a": 0.2, "b": 0.5, "c": 0.2}
    assert sweep.parse_chance(["b=0.5"], ["a", "b"]) == {"b": 0.5}
    assert sweep.parse_chance([], ["a"]) == {}
    assert math.isclose(sweep.summarize([1, 2, 3, 4])["std"], math.sqrt(5 / 3))


def test_metric_some_arms_lack_is_na_there(tmp_path):
    """The occlusion ablation's mask IoU exists only for arms with an attention branch: those
    runs are n/a for it and out of its statistics; the other metrics are unaffected."""
    root = tmp_path / "root"
    _fake_runs(root)
    for seed, iou in enumerate([0.1, 0.2, 0.3]):
        path = root / "wide" / f"seed{seed}" / "eval.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "mask_iou": {"R8": iou}}))
    runs = sweep.expand([("base", {}), ("wide", {})], root, seeds=[0, 1, 2])
    content = sweep.report(root, "c", runs, ["test.accuracy", "mask_iou.R8"])
    base = [r for r in content["runs"] if r["arm"] == "base"]
    assert all(r["metrics"]["mask_iou.R8"] is None for r in base)
    assert [r["metrics"]["test.accuracy"] for r in base] == ACCURACY["base"]
    assert content["summary"]["base"]["mask_iou.R8"]["n"] == 0
    assert content["summary"]["wide"]["mask_iou.R8"]["mean"] == pytest.approx(0.2)
    md = (root / "sweep.md").read_text()
    assert "| base | 3 | 0.6000 | 0.1000 | [0.3516, 0.8484] | n/a | n/a | n/a |" in md
    assert (root / "sweep.png").is_file()
    # A metric no run reports is still an error (a misspelt key), naming a run's file.
    with pytest.raises(SystemExit, match="no metric 'mask_iou.R9'"):
        sweep.report(root, "c", runs, ["mask_iou.R9"])


def test_combine_merges_sweeps_run_apart(tmp_path):
    root = tmp_path / "root"
    _fake_runs(root)
    out = _cli("--config=configs/supervised.py:data=ckplus48", f"--workdir={root}", "--arm=base",
               "--arm=wide", "--seeds=0,1,2", "--metric=test.accuracy", "--report_only")
    assert out.returncode == 0, out.stderr
    both = tmp_path / "both"
    out = _cli(f"--workdir={both}", f"--combine=day1={root / 'sweep.json'}",
               f"--combine=day2={root / 'sweep.json'}", "--metric=test.accuracy")
    assert out.returncode == 0, out.stderr
    content = json.loads((both / "sweep.json").read_text())
    assert list(content["summary"]) == ["day1: base", "day1: wide", "day2: base", "day2: wide"]
    assert content["summary"]["day2: wide"]["test.accuracy"]["mean"] == pytest.approx(0.8)
    assert len(content["runs"]) == 12 and (both / "sweep.png").is_file()
    with pytest.raises(SystemExit, match=r"metrics \['test.top5'\] not in"):
        sweep.combined_records([f"a={root / 'sweep.json'}"], ["test.top5"])
    with pytest.raises(SystemExit, match="expected \\[LABEL=\\]PATH"):
        sweep.combined_records([f"={root / 'sweep.json'}"], ["test.accuracy"])
    # Without a label the arms keep their names; the same run in two files is an error.
    _, kept = sweep.combined_records([str(root / "sweep.json")], ["test.accuracy"])
    assert {r["arm"] for r in kept} == {"base", "wide"}
    with pytest.raises(SystemExit, match="run 'base' seed 0 fold None is in both"):
        sweep.combined_records([str(root / "sweep.json")] * 2, ["test.accuracy"])
    with pytest.raises(SystemExit, match="cannot read a sweep.json"):
        sweep.combined_records([f"a={tmp_path / 'none.json'}"], ["test.accuracy"])


def _record(arm, seed, fold, value):
    return {"arm": arm, "seed": seed, "fold": fold, "workdir": f"/r/{arm}/{seed}_{fold}",
            "metrics": {"acc": value}}


def test_fold_unit_and_paired_differences(tmp_path):
    """Two arms, 3 folds x 2 seeds. Fold means: a [0.7, 0.6, 0.9], b [0.5, 0.6, 0.7]. By fold:
    a's mean 0.7333, std 0.15275 (hand-computed); a - b = [0.2, 0.0, 0.2]: mean 0.1333, std
    0.11547, half-width t(0.975, 2) 4.3027 x 0.11547 / sqrt(3) = 0.28685, ahead in 2 of 3 (a
    tie is not ahead). By run, paired on (seed, fold): [0.1, 0.3, -0.2, 0.2, 0.3, 0.1]:
    mean 0.1333, ahead in 5 of 6."""
    values = {"a": [[0.6, 0.8], [0.5, 0.7], [0.9, 0.9]], "b": [[0.5, 0.5], [0.7, 0.5], [0.6, 0.8]]}
    records = [_record(arm, seed, fold, v[fold][seed]) for arm, v in values.items()
               for fold in range(3) for seed in range(2)]
    content = sweep.write_report(tmp_path, "c", records, ["acc"], unit="fold", paired_with="b")
    a = content["summary"]["a"]["acc"]
    assert (a["n"], a["mean"], a["std"]) == (3, pytest.approx(0.73333, abs=1e-5),
                                             pytest.approx(0.15275, abs=1e-5))
    d = content["paired"]["a"]["acc"]
    assert (d["n"], d["ahead"]) == (3, 2)
    assert d["mean"] == pytest.approx(0.13333, abs=1e-5)
    assert d["half_width"] == pytest.approx(0.28685, abs=1e-4)
    md = (tmp_path / "sweep.md").read_text()
    assert "folds (n; a fold's value is the mean of its seeds' runs)" in md
    assert "| a | 3 | +0.1333 | [-0.1535, +0.4202] | 2 of 3 |" in md
    by_run = sweep.paired(records, ["acc"], "b", unit="run")["a"]["acc"]
    assert (by_run["n"], by_run["ahead"]) == (6, 5)
    assert by_run["mean"] == pytest.approx(0.13333, abs=1e-5)
    assert (tmp_path / "sweep.png").is_file()
    with pytest.raises(SystemExit, match="--paired_with='c': no such arm"):
        sweep.paired(records, ["acc"], "c")
    with pytest.raises(SystemExit, match="arm 'x' has runs without a fold"):
        sweep.summary_by_arm([_record("x", 0, None, 0.5)], ["acc"], unit="fold")
