"""Client-local state kept across rounds (e.g. a personalized head), indexed by client id.

Host memory, one [num_clients, ...] NumPy array per LOCAL leaf, created with np.zeros so the
operating system maps pages only for clients that were written: memory grows with the clients
seen, not the population. A client never seen starts from the template (the server's initial
LOCAL values). gather/scatter are single fancy-index operations per leaf, no per-client loop.
Multi-host: each process keeps the clients it fed; a client fed by another process in a later
round starts from the template there (use one process or sticky client-to-process assignment).
"""

from __future__ import annotations

import jax
import numpy as np


class LocalStore:
    """LOCAL variables of every client of a population, gathered and scattered per chunk."""

    def __init__(self, template, num_clients: int):
        if num_clients < 1:
            raise ValueError(f"LocalStore: num_clients must be >= 1, got {num_clients}")
        self.template = jax.tree.map(np.asarray, template)
        self.num_clients = num_clients
        self.values = jax.tree.map(
            lambda t: np.zeros((num_clients,) + t.shape, t.dtype), self.template)
        self.seen = np.zeros(num_clients, bool)

    def _check(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 1 or np.any(ids >= self.num_clients) or np.any(ids < -1):
            raise ValueError(f"LocalStore: client ids must be 1-D in [-1, {self.num_clients}), "
                             f"got {ids[:8]}")
        return ids

    def gather(self, client_ids):
        """[K, ...] LOCAL subtrees of `client_ids` (-1 = padding client, gets the template)."""
        ids = self._check(client_ids)
        fresh = (ids < 0) | ~self.seen[np.maximum(ids, 0)]
        safe = np.maximum(ids, 0)

        def pick(values, t):
            rows = values[safe]
            rows[fresh] = t
            return rows

        return jax.tree.map(pick, self.values, self.template)

    def scatter(self, client_ids, new_values) -> None:
        """Stores [K, ...] LOCAL subtrees for `client_ids` (all >= 0)."""
        ids = self._check(client_ids)
        if np.any(ids < 0):
            raise ValueError("LocalStore.scatter: padding ids (-1) cannot be stored")

        def put(values, new):
            values[ids] = np.asarray(new)

        jax.tree.map(put, self.values, new_values)
        self.seen[ids] = True

    def state_dict(self) -> dict:
        """A checkpointable pytree of NumPy arrays."""
        return {"values": self.values, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.values = jax.tree.map(np.array, state["values"])
        self.seen = np.array(state["seen"], bool)
