"""The encoder diagnostics of benchmarks/fedaffect_encoders.py on features whose answers are
known: class-coded features give accuracy 1, features independent of the labels give chance."""

import importlib.util
import pathlib

import numpy as np
import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "fedaffect_encoders.py"
_spec = importlib.util.spec_from_file_location("fedaffect_encoders", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _coded(labels, num_classes, noise, seed):
    """Features = one-hot label (scaled) + Gaussian noise."""
    rng = np.random.default_rng(seed)
    return 3.0 * np.eye(num_classes)[labels] + noise * rng.normal(size=(len(labels),
                                                                          num_classes))


def test_parse_encoder():
    assert bench.parse_encoder("random") == ("random", "", "")
    assert bench.parse_encoder("simclr=/tmp/a@rep/encoder") == ("simclr", "/tmp/a",
                                                                "rep/encoder")
    assert bench.parse_encoder("sup=/tmp/b") == ("sup", "/tmp/b", "")
    with pytest.raises(ValueError, match="NAME=WORKDIR"):
        bench.parse_encoder("/tmp/b")


def test_nearest_centroid_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 90)
    x = _coded(y, 3, 1.5, 1)
    ty = rng.integers(0, 3, 40)
    tx = _coded(ty, 3, 1.5, 2)
    means = np.stack([x[y == c].mean(0) for c in range(3)])
    cos = (tx / np.linalg.norm(tx, axis=1, keepdims=True)) @ (
        means / np.linalg.norm(means, axis=1, keepdims=True)).T
    want = float((cos.argmax(1) == ty).mean())
    got = bench.nearest_centroid(x, y, tx, ty, 3)
    assert got["accuracy"] == pytest.approx(want)
    assert got["ci95"] == pytest.approx(1.96 * np.sqrt(want * (1 - want) / 40))


def test_linear_probe_separable_and_uninformative():
    rng = np.random.default_rng(0)
    y, vy, ty = (rng.integers(0, 4, n) for n in (400, 100, 200))
    sep = bench.linear_probe(_coded(y, 4, 0.1, 1), y, _coded(vy, 4, 0.1, 2), vy,
                             _coded(ty, 4, 0.1, 3), ty, 4, steps=200)
    assert sep["accuracy"] == 1.0 and sep["l2"] in bench.L2
    noise = rng.normal(size=(600, 4))
    flat = bench.linear_probe(noise[:400], y, noise[400:500], vy, rng.normal(size=(200, 4)), ty,
                              4, steps=200)
    prior = np.bincount(ty, minlength=4).max() / 200
    assert flat["accuracy"] < prior + 0.1


def test_episodes_perfect_and_chance():
    rng = np.random.default_rng(0)
    held = []
    for c in range(3):
        y = np.repeat(np.arange(5), 12)
        held.append((_coded(y, 5, 0.05, c), y))
    perfect = bench.episodes(held, 5, shots=5, num_episodes=30, seed=0)
    assert perfect["accuracy"] == 1.0 and perfect["chance"] == pytest.approx(0.2)
    assert perfect["episodes"] == 30
    noise = [(rng.normal(size=(60, 16)), y) for _, y in held]
    r = bench.episodes(noise, 5, shots=1, num_episodes=300, seed=0)
    assert abs(r["accuracy"] - 0.2) < 3 * r["ci95"] + 0.02
