"""Packing a ragged cohort into fixed-shape chunks [clients, steps, batch, ...] + example masks.

Packing has two halves so that every process of a multi-host run agrees on the shapes:
  plan_cohort: from client ids and sizes only (cheap, global, identical everywhere) choose each
    client's step bucket and cut the buckets into chunks of `clients_per_call` clients;
  materialize_chunk: gather one chunk's examples (or only this process's rows of it).
Each client runs `local_epochs` epochs of ceil(n / batch_size) steps; the last batch of an epoch
is partial and masked. A client's step count is rounded up to the smallest of a fixed set of
`step_buckets`, so the round compiles once per bucket, never per cohort. Clients with no
examples are left out of the chunks (they would contribute nothing). Padding efficiency =
useful example slots / computed example slots.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fer_jax.federated.population import Population, hash_uniform

DEFAULT_STEP_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


@dataclasses.dataclass(frozen=True)
class PackingConfig:
    """How a cohort is cut into chunks.

    batch_size: examples per local step. local_epochs: passes over each client's data.
    step_buckets: allowed per-client step counts (sorted ascending); a client needing more steps
      than the largest bucket is an error. clients_per_call: clients per chunk (a multiple of the
      number of devices times the vmap width). shuffle: reshuffle each client's examples every
      epoch, seeded by (seed, round, client id, epoch); False keeps the stored order.
    """

    batch_size: int = 16
    local_epochs: int = 1
    step_buckets: tuple[int, ...] = DEFAULT_STEP_BUCKETS
    clients_per_call: int = 8
    shuffle: bool = True

    def __post_init__(self):
        if self.batch_size < 1 or self.local_epochs < 1 or self.clients_per_call < 1:
            raise ValueError(f"batch_size, local_epochs and clients_per_call must be >= 1: {self}")
        buckets = tuple(self.step_buckets)
        if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
            raise ValueError(f"step_buckets must be distinct ascending ints >= 1, got {buckets}")

    @property
    def max_examples(self) -> int:
        """The most examples a client may hold: the largest bucket, full batches."""
        return (self.step_buckets[-1] // self.local_epochs) * self.batch_size


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    """One chunk: `steps` local steps for clients `client_ids` ([K], -1 marks a padding client)."""

    steps: int
    client_ids: np.ndarray
    num_examples: np.ndarray


@dataclasses.dataclass(frozen=True)
class CohortPlan:
    """The chunks of one cohort plus the bookkeeping reported per round."""

    chunks: tuple[ChunkPlan, ...]
    client_ids: np.ndarray
    num_examples: np.ndarray
    batch_size: int
    local_epochs: int

    @property
    def useful_examples(self) -> int:
        """Example slots that carry data: sum_c epochs * n_c."""
        return int(self.num_examples.sum()) * self.local_epochs

    @property
    def computed_examples(self) -> int:
        """Example slots the round computes, padding included."""
        return sum(len(c.client_ids) * c.steps * self.batch_size for c in self.chunks)

    @property
    def padding_efficiency(self) -> float:
        return self.useful_examples / max(self.computed_examples, 1)

    @property
    def client_updates(self) -> int:
        """Clients that train (non-empty) this round."""
        return int((self.num_examples > 0).sum())


def client_steps(sizes: np.ndarray, config: PackingConfig) -> np.ndarray:
    """Local steps per client: epochs * ceil(n / batch_size)."""
    return config.local_epochs * (-(-np.asarray(sizes) // config.batch_size))


def plan_cohort(client_ids, sizes, config: PackingConfig) -> CohortPlan:
    """Bucket the cohort by step count and cut each bucket into chunks of clients_per_call."""
    ids = np.asarray(client_ids, dtype=np.int64)
    sizes = np.asarray(sizes, dtype=np.int64)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"empty cohort: got client ids of shape {ids.shape}")
    if sizes.shape != ids.shape:
        raise ValueError(f"sizes shape {sizes.shape} != client ids shape {ids.shape}")
    if len(np.unique(ids)) != len(ids) or np.any(ids < 0):
        raise ValueError("cohort client ids must be distinct and >= 0")
    if np.any(sizes < 0):
        raise ValueError(f"negative client sizes for clients {ids[sizes < 0][:5].tolist()}")
    if sizes.sum() == 0:
        raise ValueError(f"all {len(ids)} clients of the cohort have zero examples: the aggregation"
                         " weights are all zero")
    steps = client_steps(sizes, config)
    buckets = np.asarray(config.step_buckets)
    too_big = steps > buckets[-1]
    if np.any(too_big):
        bad = np.flatnonzero(too_big)[:5]
        raise ValueError(
            f"clients {ids[bad].tolist()} have {sizes[bad].tolist()} examples, more than the "
            f"largest step bucket holds ({config.max_examples} = {buckets[-1]} steps x batch "
            f"{config.batch_size} / {config.local_epochs} epochs); add a larger step bucket")
    bucket_of = np.searchsorted(buckets, steps)  # index of the smallest bucket >= steps
    k = config.clients_per_call
    chunks = []
    for b in np.unique(bucket_of[sizes > 0]):
        members = np.flatnonzero((bucket_of == b) & (sizes > 0))
        for start in range(0, len(members), k):
            part = members[start:start + k]
            pad = k - len(part)
            chunks.append(ChunkPlan(
                steps=int(buckets[b]),
                client_ids=np.concatenate([ids[part], np.full(pad, -1, np.int64)]),
                num_examples=np.concatenate([sizes[part], np.zeros(pad, np.int64)])))
    return CohortPlan(tuple(chunks), ids, sizes, config.batch_size, config.local_epochs)


@dataclasses.dataclass(frozen=True)
class PackedChunk:
    """Host arrays of one chunk (or of this process's rows of it).

    data: dict of [K, S, B, ...]; mask: [K, S, B] bool; client_ids, num_examples: [K].
    """

    data: dict
    mask: np.ndarray
    client_ids: np.ndarray
    num_examples: np.ndarray


def example_index(chunk: ChunkPlan, config: PackingConfig, *, seed: int, round_index: int,
                  rows: slice = slice(None)) -> np.ndarray:
    """[K, S, B] index of the client example in every slot (-1 = padding), vectorized."""
    ids, sizes = chunk.client_ids[rows], chunk.num_examples[rows]
    bsz, epochs = config.batch_size, config.local_epochs
    per_epoch = chunk.steps // epochs if chunk.steps % epochs == 0 else -(-chunk.steps // epochs)
    width = per_epoch * bsz  # slots per epoch
    pos = np.arange(width)
    if config.shuffle:
        # Per (client, epoch) permutation: argsort of hashed keys, padding keys sorted last.
        keys = hash_uniform(seed, round_index, ids[:, None, None],
                            np.arange(epochs)[None, :, None], pos[None, None, :])
        keys = np.where(pos[None, None, :] < sizes[:, None, None], keys, np.inf)
        order = np.argsort(keys, axis=-1, kind="stable")
    else:
        order = np.broadcast_to(pos, (len(ids), epochs, width))
    order = np.where(pos[None, None, :] < sizes[:, None, None], order, -1)
    index = np.full((len(ids), chunk.steps * bsz), -1, np.int64)
    # Each epoch fills ceil(n / B) steps; the rest of the bucket's steps stay padding.
    spe = -(-sizes // bsz)
    for e in range(epochs):
        for j in range(width // bsz):
            step = e * spe + j
            ok = (j < spe) & (step < chunk.steps)
            r = np.flatnonzero(ok)
            cols = step[r, None] * bsz + np.arange(bsz)[None, :]
            index[r[:, None], cols] = order[r, e, j * bsz:(j + 1) * bsz]
    return index.reshape(len(ids), chunk.steps, bsz)


def materialize_chunk(population: Population, chunk: ChunkPlan, config: PackingConfig, *,
                      seed: int = 0, round_index: int = 0,
                      rows: slice = slice(None)) -> PackedChunk:
    """Gathers the examples of `chunk` (rows `rows` only, for multi-host feeding)."""
    index = example_index(chunk, config, seed=seed, round_index=round_index, rows=rows)
    ids = chunk.client_ids[rows]
    k, s, b = index.shape
    flat = population.gather(ids, index.reshape(k, s * b))
    data = {key: v.reshape((k, s, b) + v.shape[2:]) for key, v in flat.items()}
    return PackedChunk(data, index >= 0, ids, chunk.num_examples[rows])


def pack_cohort(population: Population, client_ids, config: PackingConfig, *, seed: int = 0,
                round_index: int = 0) -> tuple[CohortPlan, list[PackedChunk]]:
    """Plan and materialize a whole cohort at once (single process convenience)."""
    plan = plan_cohort(client_ids, population.sizes(np.asarray(client_ids)), config)
    return plan, [materialize_chunk(population, c, config, seed=seed, round_index=round_index)
                  for c in plan.chunks]
