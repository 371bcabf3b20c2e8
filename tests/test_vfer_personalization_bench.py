"""benchmarks/vfer_personalization.py's summary of finished VFER runs, on hand-made run files."""

import json

import pytest


@pytest.fixture
def bench(load_script):
    return load_script("benchmarks/vfer_personalization.py")


def _report(macro, micro, n=4):
    return {"num_examples": n, "accuracy": micro, "macro": {"f1": macro},
            "micro": {"f1": micro}}


def _fake_run(root, seed, subjects, curve, central):
    """subjects: {id: (before macro, after macro, before micro, after micro, adapted)}."""
    workdir = root / f"seed{seed}"
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(
        {"seed": seed, "personalize": {"threshold": 0.5}, "init": {"path": "/x"}}))
    ev = {
        "class_names": list("abcdef"), "split": {"test": list(subjects)},
        "ifer_dev": _report(0.4, 0.5),
        "pseudo_label_curve": {"all_subjects": curve, "test_subjects": curve},
        "before_personalization": _report(0.3, 0.4), "after_personalization": _report(0.35, 0.5),
        "before_per_subject": {s: _report(v[0], v[2]) for s, v in subjects.items()},
        "after_per_subject": {s: _report(v[1], v[3]) for s, v in subjects.items()},
        "central_before_fedavg": _report(central[0], 0.0),
        "central_after_fedavg": [_report(c, 0.0) for c in central[1:]],
        "rounds": [{"subjects_skipped_no_confident_video":
                    [s for s, v in subjects.items() if not v[4]], "central_updated": True}],
        "seconds": {"total": 1.0}}
    (workdir / "eval.json").write_text(json.dumps(ev))
    return workdir


def test_summary_pools_seeds_and_counts_only_adapted_subjects(bench, tmp_path):
    c0 = [{"threshold": 0.0, "videos_selected": 10, "videos": 10, "accuracy": 0.5},
          {"threshold": 0.5, "videos_selected": 4, "videos": 10, "accuracy": 0.75}]
    c1 = [{"threshold": 0.0, "videos_selected": 6, "videos": 6, "accuracy": 1 / 3},
          {"threshold": 0.5, "videos_selected": 0, "videos": 6, "accuracy": None}]
    d0 = _fake_run(tmp_path, 0, {"S1": (0.2, 0.3, 0.4, 0.6, True),
                                 "S2": (0.5, 0.5, 0.5, 0.5, False)}, c0, (0.3, 0.32))
    d1 = _fake_run(tmp_path, 1, {"S3": (0.1, 0.0, 0.2, 0.1, True)}, c1, (0.2, 0.1))
    out = tmp_path / "out.json"
    bench.main(["--runs", f"{d0},{d1}", "--out", str(out)])
    summary = json.loads(out.read_text())["summary"]
    assert summary["subjects_tested"] == 3 and summary["subjects_adapted"] == 2
    micro = summary["change_over_adapted_subjects"]["micro_f1"]
    assert micro["n"] == 2 and micro["mean"] == pytest.approx((0.2 - 0.1) / 2)
    assert summary["change_over_adapted_subjects"]["macro_f1"]["mean"] == pytest.approx(0.0)
    pooled = summary["pseudo_label_curve_pooled"]
    assert pooled[0] == {"threshold": 0.0, "videos_selected": 16, "videos": 16,
                         "accuracy": pytest.approx((5 + 2) / 16)}
    assert pooled[1]["videos_selected"] == 4 and pooled[1]["accuracy"] == pytest.approx(0.75)
    assert summary["central_macro_f1_change_last_round"]["mean"] == pytest.approx(
        (0.02 - 0.1) / 2)
    assert out.with_suffix(".png").stat().st_size > 0


def test_an_unfinished_run_is_named(bench, tmp_path):
    with pytest.raises(FileNotFoundError, match="eval.json"):
        bench.summarize_run(tmp_path)
