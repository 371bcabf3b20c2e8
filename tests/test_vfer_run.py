"""configs/vfer.py:runlocal end to end on synthetic sequences (slow: ~2 min on 2 cores)."""

import json

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("threshold", [0.5, 1.1])
def test_runlocal_end_to_end(tmp_path, make_config, threshold):
    from fer_jax.experiments import vfer

    config = make_config("vfer", "runlocal", **{"personalize.threshold": threshold})
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
    assert (tmp_path / "figure3_subject_micro_f1.png").stat().st_size > 0
