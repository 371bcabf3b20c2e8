"""Client populations: in-memory arrays or lazily generated, gathered a chunk at a time.

A population answers two vectorized questions, so packing needs no per-client Python loop:
  sizes(ids)                    -> [K] example counts of clients `ids`;
  gather(ids, example_index)    -> dict of [K, T, ...] arrays, example_index [K, T] (-1 = pad).
`SyntheticPopulation` stores nothing per client: sizes and examples are hashes of
(seed, client id, example index) into a fixed bank of images, so 100,000 clients cost as much
memory as 10 and a round's memory depends on its cohort only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

SIZE_DISTRIBUTIONS = ("uniform", "lognormal")


class Population(Protocol):
    """What packing needs from a population."""

    num_clients: int

    def sizes(self, client_ids: np.ndarray) -> np.ndarray: ...

    def gather(self, client_ids: np.ndarray, example_index: np.ndarray) -> dict[str, np.ndarray]:
        ...


def _check_ids(client_ids, num_clients: int) -> np.ndarray:
    ids = np.asarray(client_ids, dtype=np.int64)
    if ids.ndim != 1:
        raise ValueError(f"client ids must be 1-D, got shape {ids.shape}")
    bad = ids[(ids < -1) | (ids >= num_clients)]
    if bad.size:
        raise ValueError(f"client ids {bad[:5].tolist()} are outside [0, {num_clients})")
    return ids


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A vectorized 64-bit integer hash (SplitMix64 finalizer); wraps modulo 2**64 on purpose."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash_uniform(*parts) -> np.ndarray:
    """Uniform floats in [0, 1) from hashing broadcast integer arrays `parts` together."""
    h = np.uint64(0)
    for part in parts:
        with np.errstate(over="ignore"):
            h = splitmix64(h ^ np.asarray(part).astype(np.int64).astype(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class ArrayPopulation:
    """Clients whose examples live in host arrays: `data[k][offsets[c]:offsets[c+1]]`."""

    def __init__(self, data: Mapping[str, np.ndarray], client_sizes: Sequence[int]):
        sizes = np.asarray(client_sizes, dtype=np.int64)
        if sizes.ndim != 1 or sizes.size == 0 or np.any(sizes < 0):
            raise ValueError(
                f"client_sizes must be a non-empty 1-D array of counts >= 0, got {sizes}")
        total = int(sizes.sum())
        for key, value in data.items():
            if len(value) != total:
                raise ValueError(
                    f"data[{key!r}] has {len(value)} rows, client sizes sum to {total}")
        self.data = dict(data)
        self._sizes = sizes
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.num_clients = len(sizes)

    @classmethod
    def from_clients(cls, clients: Sequence[Mapping[str, np.ndarray]]) -> ArrayPopulation:
        """From one dict of arrays per client (same keys everywhere; a client may be empty)."""
        if not clients:
            raise ValueError("from_clients: no clients given")
        keys = sorted(clients[0])
        data = {k: np.concatenate([np.asarray(c[k]) for c in clients]) for k in keys}
        return cls(data, [len(c[keys[0]]) for c in clients])

    def sizes(self, client_ids) -> np.ndarray:
        ids = _check_ids(client_ids, self.num_clients)
        return np.where(ids >= 0, self._sizes[np.maximum(ids, 0)], 0)

    def gather(self, client_ids, example_index) -> dict[str, np.ndarray]:
        ids = _check_ids(client_ids, self.num_clients)
        index = np.asarray(example_index, dtype=np.int64)
        valid = (index >= 0) & (ids[:, None] >= 0)
        # One fancy-index gather per key for the whole chunk; padded slots read row 0, then zero.
        rows = np.where(valid, self.offsets[np.maximum(ids, 0)][:, None] + index, 0)
        out = {}
        for key, value in self.data.items():
            taken = value[rows]
            out[key] = np.where(valid.reshape(valid.shape + (1,) * (taken.ndim - 2)), taken, 0
                                ).astype(value.dtype)
        return out


class SyntheticPopulation:
    """A lazily generated population of FER-like clients (images + labels), O(1) memory in N.

    Client sizes follow `size_distribution` ('uniform' in [min_size, max_size], or 'lognormal'
    with median `median_size` and log-std `sigma`, clipped to [min_size, max_size]); example j of
    client c is bank image hash(seed, c, j) mod bank_size, a class prototype plus noise.
    """

    def __init__(self, num_clients: int, *, image_shape=(48, 48, 1), num_classes: int = 7,
                 size_distribution: str = "uniform", min_size: int = 16, max_size: int = 160,
                 median_size: float = 48.0, sigma: float = 0.8, bank_size: int = 2048,
                 seed: int = 0):
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        if size_distribution not in SIZE_DISTRIBUTIONS:
            raise ValueError(f"size_distribution {size_distribution!r} not in {SIZE_DISTRIBUTIONS}")
        if not 0 <= min_size <= max_size:
            raise ValueError(f"need 0 <= min_size <= max_size, got {min_size}, {max_size}")
        self.num_clients = num_clients
        self.size_distribution = size_distribution
        self.min_size, self.max_size = min_size, max_size
        self.median_size, self.sigma, self.seed = median_size, sigma, seed
        rng = np.random.default_rng([seed, 7])
        protos = rng.uniform(40, 215, size=(num_classes,) + tuple(image_shape))
        self.bank_labels = rng.integers(0, num_classes, size=bank_size).astype(np.int32)
        noise = rng.normal(0, 30, size=(bank_size,) + tuple(image_shape))
        self.bank_images = np.clip(protos[self.bank_labels] + noise, 0, 255).astype(np.uint8)

    def sizes(self, client_ids) -> np.ndarray:
        ids = _check_ids(client_ids, self.num_clients)
        u = hash_uniform(self.seed, 1, ids)
        if self.size_distribution == "uniform":
            n = self.min_size + np.floor(u * (self.max_size - self.min_size + 1))
        else:
            # Box-Muller on two hashed uniforms gives a standard normal per client.
            u2 = hash_uniform(self.seed, 2, ids)
            z = np.sqrt(-2 * np.log1p(-u)) * np.cos(2 * np.pi * u2)
            n = np.round(self.median_size * np.exp(self.sigma * z))
        n = np.clip(n, self.min_size, self.max_size).astype(np.int64)
        return np.where(ids >= 0, n, 0)

    def gather(self, client_ids, example_index) -> dict[str, np.ndarray]:
        ids = _check_ids(client_ids, self.num_clients)
        index = np.asarray(example_index, dtype=np.int64)
        valid = (index >= 0) & (ids[:, None] >= 0)
        pick = (hash_uniform(self.seed, 3, ids[:, None], index) * len(self.bank_labels)).astype(
            np.int64)
        images = self.bank_images[pick]
        images[~valid] = 0
        labels = np.where(valid, self.bank_labels[pick], 0).astype(np.int32)
        return {"image": images, "label": labels}
