"""benchmarks/occlusion_ablation.py: the paired analysis of an occlusion sweep, on made-up runs."""

import json

import pytest


def _sweep(tmp_path, runs):
    listed = []
    for arm, seed, acc, iou in runs:
        workdir = tmp_path / arm / f"seed{seed}"
        workdir.mkdir(parents=True)
        (workdir / "eval.json").write_text(json.dumps({"accuracy": acc, "mask_iou": iou}))
        listed.append({"arm": arm, "seed": seed, "fold": None, "workdir": str(workdir)})
    (tmp_path / "sweep.json").write_text(json.dumps({"runs": listed}))
    return tmp_path


def test_paired_gains_and_spread(tmp_path, load_script):
    bench = load_script("benchmarks/occlusion_ablation.py")
    root = _sweep(tmp_path, [
        ("res", 0, {"clean": 0.50, "R24": 0.30}, {}),
        ("res", 1, {"clean": 0.52, "R24": 0.34}, {}),
        ("resattadv", 0, {"clean": 0.49, "R24": 0.36}, {"R24": 0.1}),
        ("resattadv", 1, {"clean": 0.53, "R24": 0.38}, {"R24": 0.3}),
        ("resattadv", 2, {"clean": 0.90, "R24": 0.90}, {"R24": 0.5}),  # no baseline seed 2
    ])
    png = tmp_path / "out" / "fig.png"
    result = bench.main(["--sweep", str(root), "--png", str(png), "--chance", "0.143"])
    full = result["arms"]["resattadv"]
    # Pairs: seed 0 (-0.01, +0.06) and seed 1 (+0.01, +0.04); seed 2 has no baseline.
    assert full["paired"]["clean"]["mean"] == pytest.approx(0.0)
    assert full["paired"]["R24"]["mean"] == pytest.approx(0.05)
    assert full["paired"]["R24"]["n"] == 2
    assert full["accuracy"]["R24"]["n"] == 3
    assert full["mask_iou"]["R24"]["mean"] == pytest.approx(0.3)
    # Baseline std: clean 0.01414, R24 0.02828; +0.05 > 0.028 exceeds it, 0.0 does not.
    assert result["baseline_std"]["R24"] == pytest.approx(0.02828427, rel=1e-5)
    assert result["exceeds_spread"]["resattadv"] == {"clean": False, "R24": True}
    assert result["modes"] == ["clean", "R24"]  # modes the runs do not have are left out
    assert png.is_file() and png.stat().st_size > 10_000


def test_errors_name_the_problem(tmp_path, load_script):
    bench = load_script("benchmarks/occlusion_ablation.py")
    with pytest.raises(SystemExit, match="sweep.json: no such file"):
        bench.main(["--sweep", str(tmp_path)])
    root = _sweep(tmp_path, [("resatt", 0, {"clean": 0.5}, {})])
    with pytest.raises(SystemExit, match="baseline arm 'res' not in"):
        bench.main(["--sweep", str(root)])
