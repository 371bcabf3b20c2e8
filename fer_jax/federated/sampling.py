"""Cohort sampling and per-client randomness, reproducible from (seed, round) alone.

The sampler is stateless given the round number: cohort r is drawn from
`np.random.default_rng([seed, r])` (or, in 'epoch' mode, is slice r of a permutation seeded by
(seed, pass)), so a run resumed at round k draws exactly what an uninterrupted run would. Its
checkpointable state is `SamplerState` (plain ints). Device randomness follows the same rule:
`round_key(key, r) = fold_in(key, r)`, then `fold_in(round_key, client_id)` per client, so a
client's randomness depends on neither its position in the cohort nor the device that runs it.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

SAMPLING_MODES = ("round", "epoch")


@dataclasses.dataclass(frozen=True)
class SamplerState:
    """Checkpointable sampler state: plain ints (save with `dataclasses.asdict`)."""

    seed: int
    next_round: int = 0


@dataclasses.dataclass(frozen=True)
class CohortSampler:
    """Samples `cohort_size` distinct client ids out of `population_size` per round.

    mode='round': every round is an independent draw without replacement.
    mode='epoch': rounds walk through a permutation of the population (new permutation every
    pass), so every client is seen once per pass; a cohort never straddles two passes.
    """

    population_size: int
    cohort_size: int
    mode: str = "round"

    def __post_init__(self):
        if self.population_size < 1:
            raise ValueError(f"population_size must be >= 1, got {self.population_size}")
        if not 1 <= self.cohort_size <= self.population_size:
            raise ValueError(f"cohort_size must be in [1, population_size={self.population_size}],"
                             f" got {self.cohort_size}")
        if self.mode not in SAMPLING_MODES:
            raise ValueError(f"sampling mode {self.mode!r} is not one of {SAMPLING_MODES}")

    def sample(self, seed: int, round_index: int) -> np.ndarray:
        """The sorted-free int64 client ids of round `round_index` (deterministic)."""
        if round_index < 0:
            raise ValueError(f"round_index must be >= 0, got {round_index}")
        if self.mode == "round":
            rng = np.random.default_rng([seed, round_index])
            return rng.choice(self.population_size, size=self.cohort_size, replace=False)
        per_pass = self.population_size // self.cohort_size
        pass_index, slot = divmod(round_index, per_pass)
        perm = np.random.default_rng([seed, 1 << 31, pass_index]).permutation(self.population_size)
        return perm[slot * self.cohort_size:(slot + 1) * self.cohort_size]

    def next(self, state: SamplerState) -> tuple[np.ndarray, SamplerState]:
        """(cohort of `state.next_round`, the state after it)."""
        ids = self.sample(state.seed, state.next_round)
        return ids, dataclasses.replace(state, next_round=state.next_round + 1)


def round_key(key: jax.Array, round_index) -> jax.Array:
    """The key of one round: fold_in(key, round)."""
    return jax.random.fold_in(key, round_index)


def client_key(rkey: jax.Array, client_id) -> jax.Array:
    """The key of one client in a round: fold_in(round_key, client_id)."""
    return jax.random.fold_in(rkey, client_id)
