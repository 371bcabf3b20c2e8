"""Few-shot episodes: C-way K-shot support sets + queries, on device (training) or NumPy (test).

FedAffect (Shome & Kar), Sec. 3.2 / 4.2 and Algorithm 1 line 33 ("sample support set S and query
Q"): with K = 1 and C = 7 an episode holds 8 images, 7 supports (one per class) and one query
(Q = 1 per episode). Here Q is a parameter, per episode (`queries`) or per class
(`queries_per_class`, class-balanced, as Sung et al. 2018 train with 15 per class).

Training episodes are drawn **on device** inside the client step, from the per-client key the
engine derives from (seed, round, client id) (`sample_episode`): the engine's packing hands the
step a pool of the client's labeled images (its whole labeled set when it fits `pool_size`) with
a padding mask, and the step picks the episode by random scores + argsort, branch-free. Why on
device: the engine's `Population.gather` does not see the round number (host-side episodes
would need hidden per-round state), the FedAvg weight stays exactly the client's labeled count
D_i, and no per-client Python runs in the round.

Bad inputs are handled, never silently: a class with fewer than K images in the pool is left out
of the episode (its column masked from loss and argmax) and counted (`short_classes`); an
episode with fewer than 2 usable classes or no query is skipped (no update) and counted.

Test episodes (`heldout_episodes`, NumPy, seeded) follow docs/papers.md#fedaffect-eval:
K labeled support images per class from that client, queries = all its remaining images.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Episode(NamedTuple):
    """Indices into a pool of P images (a NamedTuple: a pytree, so vmap/jit can return it).

    support_index: (C, K) pool rows of each class's supports (meaningless where ~class_valid).
    class_valid: (C,) the class has >= K images in the pool and takes part in the episode.
    query_index: (Q,) pool rows of the queries; query_valid: (Q,) False for unused query slots.
    ok: scalar bool, the episode has >= 2 valid classes and >= 1 valid query.
    """

    support_index: jax.Array
    class_valid: jax.Array
    query_index: jax.Array
    query_valid: jax.Array
    ok: jax.Array


def sample_episode(key: jax.Array, labels: jax.Array, mask: jax.Array, *, num_classes: int,
                   shots: int = 1, queries: int = 1, queries_per_class: int = 0) -> Episode:
    """A C-way K-shot episode from a pool (labels (P,), mask (P,) bool).

    Supports: K distinct images of each class drawn uniformly among its valid pool images.
    Queries, with queries_per_class = 0: Q = `queries` distinct images per **episode** drawn
    uniformly among the valid, non-support images of the valid classes (FedAffect: Q = 1).
    With queries_per_class = Q_c > 0 (Sung et al. 2018: 15): Q_c distinct non-support images
    of **each** valid class (query slots c * Q_c .. (c + 1) * Q_c - 1, class c), so Q = C * Q_c
    and the queries are class-balanced; a class with fewer than K + Q_c images fills the slots
    it can and the rest are invalid (`query_valid`). jit- and vmap-compatible (static C, K, Q).
    """
    if shots < 1 or queries < 1 or num_classes < 2 or queries_per_class < 0:
        raise ValueError(f"need shots >= 1, queries >= 1, queries_per_class >= 0, "
                         f"num_classes >= 2; got {shots}, {queries}, {queries_per_class}, "
                         f"{num_classes}")
    pool = labels.shape[0]
    if shots > pool or queries > pool or shots + queries_per_class > pool:
        raise ValueError(f"pool of {pool} images is smaller than shots={shots} or "
                         f"queries={queries} or shots + queries_per_class="
                         f"{shots + queries_per_class}")
    k_support, k_query = jax.random.split(key)
    member = (labels[None, :] == jnp.arange(num_classes)[:, None]) & mask[None, :]
    counts = member.sum(1)
    class_valid = counts >= shots
    # Uniform draws without replacement: the smallest random scores among the members.
    u = jax.random.uniform(k_support, (pool,))
    order = jnp.argsort(jnp.where(member, u[None, :], 2.0), axis=1)
    support_index = order[:, :shots]
    if queries_per_class:
        # The next Q_c of the same random order: distinct from the supports, of class c.
        query_index = order[:, shots:shots + queries_per_class].reshape(-1)
        slot = jnp.arange(queries_per_class)[None, :]
        query_valid = (class_valid[:, None] & (slot < counts[:, None] - shots)).reshape(-1)
    else:
        picked = jnp.zeros(pool, bool).at[support_index.ravel()].max(
            jnp.repeat(class_valid, shots))
        candidate = mask & ~picked & class_valid[jnp.clip(labels, 0, num_classes - 1)]
        candidate &= (labels >= 0) & (labels < num_classes)
        v = jax.random.uniform(k_query, (pool,))
        query_index = jnp.argsort(jnp.where(candidate, v, 2.0))[:queries]
        query_valid = candidate[query_index]
    ok = (class_valid.sum() >= 2) & query_valid.any()
    return Episode(support_index, class_valid, query_index, query_valid, ok)


@dataclasses.dataclass(frozen=True)
class HeldoutEpisodes:
    """NumPy test episodes of one client with n images.

    support_index: (E, C, K) rows of the supports; class_valid: (C,) classes in the episodes
    (>= K images in the client); query_mask: (E, n) the images that are queries (not a support,
    of a valid class); skipped_images: images of classes with too few images (never queries).
    """

    support_index: np.ndarray
    class_valid: np.ndarray
    query_mask: np.ndarray
    skipped_images: int


def heldout_episodes(labels: np.ndarray, *, num_classes: int, shots: int = 1, num_episodes: int,
                     seed, support_pool: np.ndarray | None = None) -> HeldoutEpisodes:
    """Episodes on a held-out client: K supports per class, queries = every remaining image.

    A class with fewer than K images (or, for K = 1, none) cannot be supported: it is left out
    of every episode and its images are counted in `skipped_images`. Raises ValueError when
    fewer than 2 classes can be supported (no episode is possible). `seed` may be a sequence,
    e.g. (seed, client id).
    support_pool: optional (n,) bool; supports are drawn only from these images and the queries
    are all the others (e.g. supports from one subject, queries from another). Then a class is
    valid when the pool holds >= K of its images.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and (labels.min() < 0 or labels.max() >= num_classes)):
        raise ValueError(f"labels must be 1-D in [0, {num_classes}), got shape {labels.shape}")
    if num_episodes < 1 or shots < 1:
        raise ValueError(f"need num_episodes >= 1 and shots >= 1, got {num_episodes}, {shots}")
    n = len(labels)
    pool = np.ones(n, bool) if support_pool is None else np.asarray(support_pool, bool)
    if pool.shape != (n,):
        raise ValueError(f"support_pool must be ({n},) bool, got shape {pool.shape}")
    counts = np.bincount(labels[pool], minlength=num_classes)
    class_valid = counts >= shots
    if class_valid.sum() < 2:
        raise ValueError(f"a test client with class counts {counts.tolist()} supports fewer "
                         f"than 2 classes with {shots} shot(s): no episode is possible")
    rng = np.random.default_rng(seed)
    # Vectorized draw: random keys, members of class c sorted first by key, K smallest win.
    keys = rng.random((num_episodes, n))
    member = (labels[None, :] == np.arange(num_classes)[:, None]) & pool[None, :]  # (C, n)
    scores = np.where(member[None], keys[:, None, :], 2.0)                       # (E, C, n)
    support = np.argsort(scores, axis=-1, kind="stable")[..., :shots]            # (E, C, K)
    support = np.where(class_valid[None, :, None], support, -1)
    query_mask = np.broadcast_to(class_valid[labels] & (~pool if support_pool is not None
                                                        else pool), (num_episodes, n)).copy()
    rows = np.repeat(np.arange(num_episodes), num_classes * shots)
    flat = support.reshape(-1)
    query_mask[rows[flat >= 0], flat[flat >= 0]] = False
    candidates = ~pool if support_pool is not None else pool
    return HeldoutEpisodes(support, class_valid, query_mask,
                           int((candidates & ~class_valid[labels]).sum()))


def fewshot_eligible(labeled_counts, num_classes: int) -> np.ndarray:
    """Algorithm 1 line 4: a client joins the few-shot round iff it has more than C labels."""
    return np.asarray(labeled_counts) > num_classes
