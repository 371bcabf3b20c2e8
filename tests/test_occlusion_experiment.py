"""configs/occlusion.py end to end: reports, resume, federated clients, config errors."""

import json

import numpy as np
import pytest

from fer_jax.experiments import occlusion as experiment
from fer_jax.io.metrics import read_jsonl


def _small(make_config, arg="runlocal", **overrides):
    base = {"data.synthetic.num_subjects": 8, "data.synthetic.images_per_class": 2,
            "data.synthetic.test_subjects": 2, "eval_batch_size": 32}
    return make_config("occlusion", arg, **{**base, **overrides})


@pytest.mark.slow  # > 20 s on 2 cores: CI's slow step
def test_runlocal_end_to_end_writes_every_report(make_config, tmp_path):
    config = _small(make_config)
    experiment.validate_config(config)
    results = experiment.run(config, str(tmp_path))
    modes = ("clean", "synthetic", "R8", "R16", "R24", "eyes", "mouth")
    assert set(results["accuracy"]) == set(modes)
    assert set(results["mask_iou"]) == set(modes) - {"clean"}
    assert all(0.0 <= a <= 1.0 for a in results["accuracy"].values())
    assert results["variant"] == "M_ResAttAdv" and results["steps"] == 12
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["accuracy"] == results["accuracy"]
    assert (tmp_path / "occlusion_masks.png").stat().st_size > 1000
    assert (tmp_path / "confusion_matrix.png").is_file()
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert rows and {"train/d_loss", "train/l_noisy", "train/l_f", "train/kl"} <= set(rows[-1])
    assert all(np.isfinite(r["train/loss"]) for r in rows)


@pytest.mark.slow
def test_resume_is_exact(make_config, tmp_path):
    full = _small(make_config, **{"occlusion.eval_modes": "clean"})
    experiment.run(full, str(tmp_path / "a"))
    half = _small(make_config, **{"occlusion.eval_modes": "clean", "train.num_steps": 6})
    experiment.run(half, str(tmp_path / "b"))
    experiment.run(full, str(tmp_path / "b"))  # resumes from step 6
    last = [[r for r in read_jsonl(tmp_path / d / "metrics.jsonl") if r.get("step") == 12
             and "train/loss" in r][-1] for d in ("a", "b")]
    for key in ("train/loss", "train/d_loss", "train/l_f", "train/l_noisy"):
        assert last[0][key] == last[1][key], key


@pytest.mark.slow
def test_federated_min_max_clients(make_config, tmp_path):
    # One device of the 8 fake ones: one client per jitted chunk, as on the CPU machine.
    config = _small(make_config, "runlocal,mode=federated",
                    **{"occlusion.eval_modes": "clean,R16",
                       "fed.num_devices": 1})
    experiment.validate_config(config)
    results = experiment.run(config, str(tmp_path))
    assert set(results["accuracy"]) == {"clean", "R16"} and results["steps"] == 3
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/d_loss" in r]
    assert len(rows) == 3 and all(np.isfinite(r["train/loss"]) for r in rows)


@pytest.mark.parametrize("variant,att,adv", [("res", False, False), ("resatt", True, False),
                                             ("resadv", False, True),
                                             ("resattadv", True, True)])
def test_variants_and_sweep(make_config, variant, att, adv):
    config = make_config("occlusion", f"variant={variant}")
    assert (config.occlusion.attention, config.occlusion.adversarial) == (att, adv)
    assert experiment.variant_name(config) == "M_Res" + "Att" * att + "Adv" * adv
    import configs.occlusion as cfg_module

    assert {(s["occlusion.attention"], s["occlusion.adversarial"])
            for s in cfg_module.get_sweep()} == {(a, d) for a, d in cfg_module.VARIANTS.values()}


def test_bad_configs_name_the_field(make_config):
    with pytest.raises(ValueError, match="occlusion.eval_modes"):
        experiment.validate_config(make_config("occlusion", None,
                                               **{"occlusion.eval_modes": "clean,R32"}))
    with pytest.raises(ValueError, match="occlusion.rate"):
        experiment.validate_config(make_config("occlusion", None, **{"occlusion.rate": 2.0}))
    with pytest.raises(ValueError, match="model.name"):
        experiment.validate_config(make_config("occlusion", None, **{"model.name": "vgg"}))
    with pytest.raises(ValueError, match="min_frac"):
        experiment.validate_config(make_config("occlusion", None,
                                               **{"occlusion.min_frac": 0.9}))
    with pytest.raises(ValueError, match="variant"):
        make_config("occlusion", "variant=resnet")


def test_periodic_cosine_schedule():
    lr = experiment.periodic_cosine(1e-5, 1e-3, 10)
    values = np.array([float(lr(t)) for t in range(25)])
    np.testing.assert_allclose(values[[0, 10, 20]], 1e-3, rtol=1e-6)  # restarts every period
    np.testing.assert_allclose(values[5], 1e-5 + 0.5 * (1e-3 - 1e-5), rtol=1e-6)
    assert values[9] < values[8] and values[9] > 1e-5
    np.testing.assert_allclose(values[:10], values[10:20], rtol=1e-6)
