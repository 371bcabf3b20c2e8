"""configs/vfer.py:runlocal end to end on synthetic sequences (slow: ~2 min on 2 cores)."""

import json

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("threshold,min_subjects", [(0.5, 1), (1.1, 1), (0.3, 99)])
def test_runlocal_end_to_end(tmp_path, make_config, threshold, min_subjects):
    from fer_jax.experiments import vfer

    config = make_config("vfer", "runlocal", **{"personalize.threshold": threshold,
                                                 "personalize.min_subjects": min_subjects})
    vfer.run(config, str(tmp_path))
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["parameters"]["v"]["trainable"] > 0 < result["parameters"]["g"]["trainable"]
    for part in ("before_personalization", "after_personalization", "central_before_fedavg"):
        assert 0.0 <= result[part]["macro"]["f1"] <= 1.0
    rounds = json.loads((tmp_path / "rounds.json").read_text())
    assert len(rounds) == config.fed.rounds
    assert rounds[0]["bytes_sent_per_client"]["v_only"] < rounds[0]["bytes_sent_per_client"][
        "whole_model"]
    if threshold > 1:  # No probability exceeds 1: every subject skipped and counted, no update.
        assert all(r["subjects_adapted"] == 0 for r in rounds)
        assert (result["after_personalization"]["macro"]["f1"]
                == result["before_personalization"]["macro"]["f1"])
    if min_subjects > config.data.test_subjects:  # the guard: subjects adapt, v is kept
        assert rounds[0]["subjects_adapted"] > 0
        assert not any(r["central_updated"] for r in rounds)
        assert all(r["central_after_fedavg"] == result["central_before_fedavg"] for r in rounds)
    elif threshold < 1:
        assert rounds[0]["central_updated"]
    curve = {c["threshold"]: c for c in result["pseudo_label_curve"]["all_subjects"]}
    assert curve[0.0]["videos_selected"] >= curve[0.9]["videos_selected"]
    assert threshold > 1 or curve[threshold]["videos"] > 0
    for name in ("figure3_subject_micro_f1.png", "pseudo_labels.png", "learning_curve.png"):
        assert (tmp_path / name).stat().st_size > 0
