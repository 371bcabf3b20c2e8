"""Client partitioners: exact coverage, determinism, Dirichlet skew, hand-computed summaries."""

import numpy as np
import pytest

from fer_jax.data import partition


def _assert_exact_cover(part, n):
    """Every index in range(n) appears in exactly one client."""
    flat = np.concatenate(part.client_indices)
    assert len(flat) == n
    np.testing.assert_array_equal(np.sort(flat), np.arange(n))


def _labels(num_classes=10, per_class=300, seed=0):
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


def test_by_subject_groups_and_summary_by_hand():
    subjects = np.array([7, 3, 7, 5, 3, 7])
    labels = np.array([0, 1, 1, 2, 1, 0])
    part = partition.by_subject(subjects)
    np.testing.assert_array_equal(part.client_ids, [3, 5, 7])
    assert [p.tolist() for p in part.client_indices] == [[1, 4], [3], [0, 2, 5]]
    s = part.summary(labels, num_classes=3)
    assert s["num_clients"] == 3
    assert s["sizes"] == {"min": 1, "median": 2.0, "max": 3, "total": 6}
    np.testing.assert_array_equal(s["label_histograms"], [[0, 2, 0], [0, 0, 1], [2, 1, 0]])
    # Pooled mix (1/3, 1/2, 1/6). TV of client 3: (1/3 + 1/2 + 1/6) / 2 = 1/2; client 5:
    # (1/3 + 1/2 + 5/6) / 2 = 5/6; client 7, mix (2/3, 1/3, 0): (1/3 + 1/6 + 1/6) / 2 = 1/3.
    assert s["mean_tv_from_global"] == pytest.approx((1 / 2 + 5 / 6 + 1 / 3) / 3)


@pytest.mark.parametrize("n,k", [(10, 3), (1000, 7), (5, 5)])
def test_iid_cover_sizes_determinism(n, k):
    part = partition.iid(n, k, seed=1)
    _assert_exact_cover(part, n)
    assert part.sizes.max() - part.sizes.min() <= 1
    again = partition.iid(n, k, seed=1)
    for a, b in zip(part.client_indices, again.client_indices, strict=True):
        np.testing.assert_array_equal(a, b)
    if n > k:
        other = partition.iid(n, k, seed=2)
        assert any(not np.array_equal(a, b)
                   for a, b in zip(part.client_indices, other.client_indices, strict=True))


def test_dirichlet_cover_min_size_determinism():
    labels = _labels()
    part = partition.dirichlet(labels, 20, alpha=0.3, seed=0, min_size=10)
    _assert_exact_cover(part, len(labels))
    assert part.sizes.min() >= 10
    again = partition.dirichlet(labels, 20, alpha=0.3, seed=0, min_size=10)
    for a, b in zip(part.client_indices, again.client_indices, strict=True):
        np.testing.assert_array_equal(a, b)
    other = partition.dirichlet(labels, 20, alpha=0.3, seed=1, min_size=10)
    assert not np.array_equal(part.sizes, other.sizes)


def test_dirichlet_skew_decreases_with_alpha():
    labels = _labels()
    tv = {a: partition.dirichlet(labels, 20, alpha=a, seed=0).summary(labels, 10)
          ["mean_tv_from_global"] for a in (0.1, 1.0, 100.0)}
    assert tv[0.1] > tv[1.0] > tv[100.0]
    # alpha=0.1 gives clients dominated by one or two classes; alpha=100 is nearly IID.
    assert tv[0.1] > 0.6 and tv[100.0] < 0.1, tv


def test_dirichlet_handles_missing_and_single_classes():
    labels = np.array([4] * 30 + [9] * 10)  # Classes 0..3 and 5..8 absent.
    part = partition.dirichlet(labels, 4, alpha=1.0, seed=0)
    _assert_exact_cover(part, 40)
    hist = part.summary(labels, 10)["label_histograms"]
    assert hist[:, [4, 9]].sum() == 40 and hist.sum() == 40


def test_errors():
    with pytest.raises(ValueError, match="num_clients=11 exceeds the 10 examples"):
        partition.iid(10, 11, seed=0)
    with pytest.raises(ValueError, match="num_clients=0"):
        partition.iid(10, 0, seed=0)
    with pytest.raises(ValueError, match="num_clients=5 exceeds the 3 examples"):
        partition.dirichlet(np.array([0, 1, 1]), 5, alpha=1.0, seed=0)
    for alpha in (0.0, -1.0):
        with pytest.raises(ValueError, match="must be > 0"):
            partition.dirichlet(np.array([0, 1, 1]), 2, alpha=alpha, seed=0)
    with pytest.raises(ValueError, match="non-negative ints"):
        partition.dirichlet(np.array([0.5, 1.0]), 2, alpha=1.0, seed=0)
    with pytest.raises(ValueError, match="min_size=3 x num_clients=4 exceeds"):
        partition.dirichlet(np.zeros(10, int), 4, alpha=1.0, seed=0, min_size=3)
    # A tiny alpha puts almost all of a single class on one client: min_size=5 cannot be met.
    with pytest.raises(ValueError, match="no draw in 5 tries"):
        partition.dirichlet(np.zeros(20, int), 4, alpha=1e-3, seed=0, min_size=5, max_tries=5)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        partition.by_subject(np.array([]))
