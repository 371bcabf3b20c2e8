"""Packing a ragged cohort into fixed-shape chunks [clients, steps, batch, ...] + example masks.

Packing has two halves so that every process of a multi-host run agrees on the shapes:
  plan_cohort: from client ids and sizes only (cheap, global, identical everywhere) choose each
    client's step bucket and cut the buckets into chunks of `clients_per_call` clients;
  materialize_chunk: gather one chunk's examples (or only this process's rows of it).
Each client runs `local_epochs` epochs of ceil(n / batch_size) steps; the last batch of an epoch
is partial and masked (with `drop_remainder`, floor(n / batch_size) steps: the partial batch is
neither trained nor computed, and a client with less than one batch trains nothing). With
`local_steps` = L > 0 every client that trains runs exactly L steps instead: the first L batches
of its reshuffled epochs, one after another (a client of one batch repeats it L times; a large
client sees part of one epoch), the "fixed local steps" protocol of e.g. FedAffect's episodes.
A client's step count is rounded up to the smallest of a fixed set of `step_buckets`, so the
round compiles once per bucket, never per cohort. Clients that train nothing are left out of
the chunks. Padding efficiency = useful example slots / computed example slots.

Tail batches (`tail_multiple` = g > 0): an epoch's last batch then gets its own step of
ceil(r / g) * g rows instead of batch_size rows (r = examples left for it), so small clients do
not compute a mostly-padded full batch. A chunk then holds clients with the same number of full
steps per epoch (bucketed over {0} + step_buckets) and a tail as wide as its widest client's
(clients sorted by tail width within a bucket, so chunks mix widths only at the boundaries);
its layout is
`data` [K, E, S, B, ...] for the full steps and `tail_data` [K, E, T, ...] for the tail steps,
which run after the full steps of their epoch. The batches (and the step keys) are exactly
those of the default layout: only the padding differs, so the round's result is the same.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fer_jax.federated.population import Population, hash_uniform

# Every step count up to 16 (a padded step is computed: 5 -> 6 or 9 -> 12 steps was 20-33% more
# work for those clients), then steps of at most 25% padding.
DEFAULT_STEP_BUCKETS = tuple(range(1, 17)) + (20, 24, 28, 32, 40, 48, 56, 64)


@dataclasses.dataclass(frozen=True)
class PackingConfig:
    """How a cohort is cut into chunks.

    batch_size: examples per local step. local_epochs: passes over each client's data.
    step_buckets: allowed per-client step counts (sorted ascending); a client needing more steps
      than the largest bucket is an error. clients_per_call: clients per chunk (a multiple of the
      number of devices times the vmap width; 1, the measured CPU default for convolutional
      models; an engine with an automatic layout chooses it). shuffle: reshuffle each client's
      examples every epoch, seeded by (seed, round, client id, epoch); False keeps the order.
    tail_multiple: 0 pads each epoch's last batch to batch_size (one batch shape); g > 0 gives it
      its own step of ceil(r / g) * g rows (at most batch_size / g more compiled shapes per step
      bucket; step_buckets then bound the full steps per epoch, 0 always allowed). The method's
      step must accept any batch size (a masked mean loss does).
    drop_remainder: each epoch trains floor(n / batch_size) full batches of a fresh shuffle and
      drops the rest (fedjax's and tf.data's option); the dropped step is not computed. Excludes
      tail batches (there is no partial batch left to shape).
    local_steps: 0 = `local_epochs` passes over the data; L > 0 = exactly L steps per client
      whatever its size, walking through its epochs in order (local_epochs must then be 1;
      excludes tail batches). The step buckets must hold L.
    """

    batch_size: int = 16
    local_epochs: int = 1
    step_buckets: tuple[int, ...] = DEFAULT_STEP_BUCKETS
    clients_per_call: int = 1
    shuffle: bool = True
    tail_multiple: int = 0
    drop_remainder: bool = False
    local_steps: int = 0

    def __post_init__(self):
        if self.batch_size < 1 or self.local_epochs < 1 or self.clients_per_call < 1:
            raise ValueError(f"batch_size, local_epochs and clients_per_call must be >= 1: {self}")
        buckets = tuple(self.step_buckets)
        if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
            raise ValueError(f"step_buckets must be distinct ascending ints >= 1, got {buckets}")
        if not 0 <= self.tail_multiple <= self.batch_size:
            raise ValueError(f"tail_multiple must be in [0, batch_size={self.batch_size}], got "
                             f"{self.tail_multiple}")
        if self.drop_remainder and self.tail_multiple:
            raise ValueError(f"drop_remainder leaves no partial batch for tail batches: set "
                             f"tail_multiple=0 (got {self.tail_multiple})")
        if self.local_steps < 0:
            raise ValueError(f"local_steps must be >= 0 (0: local_epochs passes), got "
                             f"{self.local_steps}")
        if self.local_steps and (self.local_epochs != 1 or self.tail_multiple):
            raise ValueError(f"local_steps={self.local_steps} fixes every client's steps: it "
                             f"takes local_epochs=1 and tail_multiple=0, got "
                             f"{self.local_epochs} and {self.tail_multiple}")
        if self.local_steps and buckets[-1] < self.local_steps:
            raise ValueError(f"local_steps={self.local_steps} exceeds the largest step bucket "
                             f"{buckets[-1]}: add a bucket >= {self.local_steps}")

    @property
    def max_examples(self) -> int:
        """The most examples a client may hold: the largest bucket, full batches (any number
        with local_steps)."""
        if self.local_steps:
            return np.iinfo(np.int64).max
        if self.tail_multiple:
            return (self.step_buckets[-1] + 1) * self.batch_size
        most = (self.step_buckets[-1] // self.local_epochs) * self.batch_size
        return most + self.batch_size - 1 if self.drop_remainder else most


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    """One chunk: `steps` local steps for clients `client_ids` ([K], -1 marks a padding client).

    With tail batches (`tail` > 0), `steps` counts the full steps of one epoch and every epoch
    ends with a step of `tail` rows.
    """

    steps: int
    client_ids: np.ndarray
    num_examples: np.ndarray
    tail: int = 0
    weights: np.ndarray | None = None  # [K] aggregation weights (None: examples trained)


@dataclasses.dataclass(frozen=True)
class CohortPlan:
    """The chunks of one cohort plus the bookkeeping reported per round.

    num_examples: client sizes; trained: examples each client trains per epoch (its size, or its
    full batches with drop_remainder); weights: aggregation weights. A client that trains nothing
    but has a weight (drop_remainder, weighting by client size) is in no chunk: its zero delta
    only adds `idle_weight` to the round's denominator.
    """

    chunks: tuple[ChunkPlan, ...]
    client_ids: np.ndarray
    num_examples: np.ndarray
    batch_size: int
    local_epochs: int
    trained: np.ndarray | None = None
    weights: np.ndarray | None = None
    population_size: int | None = None  # clients the cohort was sampled from (DP accounting)
    local_steps: int = 0  # PackingConfig.local_steps

    @property
    def trained_examples(self) -> np.ndarray:
        return self.num_examples if self.trained is None else self.trained

    @property
    def idle_weight(self) -> float:
        """The summed weight of clients that train nothing (their delta is zero)."""
        if self.weights is None:
            return 0.0
        return float(self.weights[self.trained_examples == 0].sum())

    @property
    def useful_examples(self) -> int:
        """Example slots that carry data: sum_c epochs * (examples c trains per epoch); with
        local_steps L, sum_c of the examples in c's L batches."""
        trained = self.trained_examples
        if not self.local_steps:
            return int(trained.sum()) * self.local_epochs
        per_epoch = -(-trained // self.batch_size)  # the steps of one epoch (0: trains nothing)
        live = per_epoch > 0
        epochs, rest = np.divmod(self.local_steps, np.maximum(per_epoch, 1))
        return int(np.where(live, epochs * trained + rest * self.batch_size, 0).sum())

    @property
    def computed_examples(self) -> int:
        """Example slots the round computes, padding included."""
        return sum(len(c.client_ids) * (c.steps * self.batch_size if not c.tail else
                                         self.local_epochs * (c.steps * self.batch_size + c.tail))
                   for c in self.chunks)

    @property
    def padding_efficiency(self) -> float:
        return self.useful_examples / max(self.computed_examples, 1)

    @property
    def client_updates(self) -> int:
        """Clients that train (at least one step) this round."""
        return int((self.trained_examples > 0).sum())


def steps_per_epoch(sizes, config: PackingConfig) -> np.ndarray:
    """ceil(n / batch_size) per client (floor with drop_remainder)."""
    sizes = np.asarray(sizes)
    if config.drop_remainder:
        return sizes // config.batch_size
    return -(-sizes // config.batch_size)


def client_steps(sizes: np.ndarray, config: PackingConfig) -> np.ndarray:
    """Local steps per client: epochs * ceil(n / batch_size) (floor with drop_remainder), or
    local_steps for every client that trains."""
    per_epoch = steps_per_epoch(sizes, config)
    if config.local_steps:
        return np.where(per_epoch > 0, config.local_steps, 0)
    return config.local_epochs * per_epoch


def trained_examples(sizes, config: PackingConfig) -> np.ndarray:
    """Examples each client trains per epoch: n, or its full batches with drop_remainder."""
    sizes = np.asarray(sizes, dtype=np.int64)
    return sizes // config.batch_size * config.batch_size if config.drop_remainder else sizes


def plan_cohort(client_ids, sizes, config: PackingConfig, weights=None) -> CohortPlan:
    """Bucket the cohort by step count and cut each bucket into chunks of clients_per_call.

    weights: [C] aggregation weights (default: the examples each client trains per epoch).
    """
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
    trained = trained_examples(sizes, config)
    if trained.sum() == 0:
        raise ValueError(f"no client of the cohort of {len(ids)} has a full batch of "
                         f"{config.batch_size} examples (drop_remainder): nothing to train")
    weights = trained.astype(np.float64) if weights is None else np.asarray(weights, np.float64)
    if weights.shape != ids.shape or np.any(weights < 0) or not np.all(np.isfinite(weights)):
        raise ValueError(f"aggregation weights must be [{len(ids)}] finite values >= 0, got "
                         f"{weights[:5].tolist()} of shape {weights.shape}")
    if config.tail_multiple:
        return _plan_with_tails(ids, sizes, config, weights)
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
    chunks, leftover = [], []
    live = steps > 0
    for b in np.unique(bucket_of[live]):
        members = np.flatnonzero((bucket_of == b) & live)
        full = len(members) // k * k
        for start in range(0, full, k):
            chunks.append(_chunk(ids, sizes, weights, members[start:start + k], k,
                                 steps=int(buckets[b])))
        leftover.extend(members[full:])
    # The buckets' partial chunks, in ascending step order, share chunks: a chunk costs its
    # largest bucket in every client slot, so a padding client (a whole device or vmap lane
    # computing nothing) costs more than a client of a smaller bucket masked for the last steps
    # (100 clients of 1-10 steps on 2 devices: ~4% of the round was empty slots). Never more
    # chunk-steps than a partial chunk per bucket, and no new chunk shape.
    for start in range(0, len(leftover), k):
        part = np.asarray(leftover[start:start + k])
        chunks.append(_chunk(ids, sizes, weights, part, k, steps=int(buckets[bucket_of[part[-1]]])))
    return CohortPlan(tuple(chunks), ids, sizes, config.batch_size, config.local_epochs,
                      trained, weights, local_steps=config.local_steps)


def _chunk(ids, sizes, weights, part, k, **shape) -> ChunkPlan:
    """The chunk of clients `part` (indices into the cohort), padded to k clients."""
    pad = k - len(part)
    return ChunkPlan(client_ids=np.concatenate([ids[part], np.full(pad, -1, np.int64)]),
                     num_examples=np.concatenate([sizes[part], np.zeros(pad, np.int64)]),
                     weights=np.concatenate([weights[part], np.zeros(pad)]), **shape)


def chunk_shapes(sizes, config: PackingConfig) -> list[tuple[int, int]]:
    """Every (steps, tail) chunk shape a cohort of clients with these `sizes` can produce: the
    step bucket of each client that trains (with tail batches: its full-step bucket and tail
    width; a chunk's tail is one of its clients')."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if config.tail_multiple:
        full, tail = tail_widths(sizes, config)
        buckets = np.asarray((0,) + tuple(config.step_buckets))
        steps, live = full, sizes > 0
    else:
        steps = client_steps(sizes, config)
        buckets, live = np.asarray(config.step_buckets), steps > 0
        tail = np.zeros_like(steps)
    if np.any(steps[live] > buckets[-1]):
        raise ValueError(f"clients of up to {int(sizes.max())} examples need more than the "
                         f"largest step bucket ({config.max_examples} examples); add a larger "
                         "step bucket")
    bucket = buckets[np.searchsorted(buckets, steps[live])]
    return sorted({(int(b), int(t)) for b, t in zip(bucket, tail[live], strict=True)})


def tail_widths(sizes, config: PackingConfig) -> tuple[np.ndarray, np.ndarray]:
    """(full steps per epoch, tail width) per client with tail batches; (0, 0) for n = 0."""
    sizes = np.asarray(sizes, dtype=np.int64)
    bsz, g = config.batch_size, config.tail_multiple
    full = np.maximum(-(-sizes // bsz) - 1, 0)
    rest = sizes - full * bsz
    return full, np.minimum(-(-rest // g) * g, bsz)


def _plan_with_tails(ids, sizes, config: PackingConfig, weights) -> CohortPlan:
    full, tail = tail_widths(sizes, config)
    buckets = np.asarray((0,) + tuple(config.step_buckets))
    too_big = full > buckets[-1]
    if np.any(too_big):
        bad = np.flatnonzero(too_big)[:5]
        raise ValueError(
            f"clients {ids[bad].tolist()} have {sizes[bad].tolist()} examples, more than the "
            f"largest step bucket holds ({config.max_examples} = {buckets[-1]} full steps + a "
            f"tail of at most {config.batch_size}); add a larger step bucket")
    bucket_of = np.searchsorted(buckets, full)
    k = config.clients_per_call
    chunks = []
    live = sizes > 0
    for b in np.unique(bucket_of[live]):
        # One bucket's clients by tail width, cut into chunks of k; a chunk's tail is its widest
        # member's (narrower tails are masked). ceil(n_b / k) chunks per bucket, not one partly
        # empty chunk per (bucket, tail width); the shapes are still those of single clients.
        members = np.flatnonzero((bucket_of == b) & live)
        members = members[np.argsort(tail[members], kind="stable")]
        for start in range(0, len(members), k):
            part = members[start:start + k]
            chunks.append(_chunk(ids, sizes, weights, part, k, steps=int(buckets[b]),
                                 tail=int(tail[part].max())))
    return CohortPlan(tuple(chunks), ids, sizes, config.batch_size, config.local_epochs,
                      sizes, weights)


@dataclasses.dataclass(frozen=True)
class PackedChunk:
    """Host arrays of one chunk (or of this process's rows of it).

    data: dict of [K, S, B, ...]; mask: [K, S, B] bool; client_ids, num_examples: [K].
    With tail batches: data [K, E, S, B, ...], mask [K, E, S, B], tail_data [K, E, T, ...],
    tail_mask [K, E, T].
    """

    data: dict
    mask: np.ndarray
    client_ids: np.ndarray
    num_examples: np.ndarray
    tail_data: dict | None = None
    tail_mask: np.ndarray | None = None


def _epoch_order(ids, sizes, config: PackingConfig, width: int, *, seed: int,
                 round_index: int, epochs: int | None = None) -> np.ndarray:
    """[K, E, width] example order of every epoch (-1 past a client's size); E = `epochs`
    (default local_epochs)."""
    epochs = config.local_epochs if epochs is None else epochs
    pos = np.arange(width)
    if config.shuffle:
        # Per (client, epoch) permutation: argsort of hashed keys, padding keys sorted last.
        keys = hash_uniform(seed, round_index, ids[:, None, None],
                            np.arange(epochs)[None, :, None], pos[None, None, :])
        keys = np.where(pos[None, None, :] < sizes[:, None, None], keys, np.inf)
        order = np.argsort(keys, axis=-1, kind="stable")
    else:
        order = np.broadcast_to(pos, (len(ids), epochs, width))
    return np.where(pos[None, None, :] < sizes[:, None, None], order, -1)


def example_index(chunk: ChunkPlan, config: PackingConfig, *, seed: int, round_index: int,
                  rows: slice = slice(None)) -> np.ndarray:
    """[K, S, B] index of the client example in every slot (-1 = padding), vectorized.

    A client's step t is batch j = t mod s of its epoch e = t // s (s = its steps per epoch);
    it runs epochs * s steps (or local_steps), the rest of the bucket's steps stay padding.
    """
    ids, sizes = chunk.client_ids[rows], chunk.num_examples[rows]
    bsz = config.batch_size
    per_epoch = steps_per_epoch(sizes, config)
    steps = np.minimum(client_steps(sizes, config), chunk.steps)
    epochs = int(np.max(-(-steps // np.maximum(per_epoch, 1)), initial=1))
    # Slots per epoch; with drop_remainder the shuffle still permutes all n examples.
    width = max(int(per_epoch.max(initial=0)) * bsz, int(sizes.max(initial=0)), 1)
    order = _epoch_order(ids, sizes, config, width, seed=seed, round_index=round_index,
                         epochs=epochs)
    index = np.full((len(ids), chunk.steps, bsz), -1, np.int64)
    for t in range(int(steps.max(initial=0))):
        r = np.flatnonzero(t < steps)
        e, j = np.divmod(t, per_epoch[r])
        cols = j[:, None] * bsz + np.arange(bsz)[None, :]
        index[r, t] = order[r[:, None], e[:, None], cols]
    return index


def tail_example_index(chunk: ChunkPlan, config: PackingConfig, *, seed: int, round_index: int,
                       rows: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
    """([K, E, S, B], [K, E, T]) example indices of the full and tail steps (-1 = padding).

    Epoch e's full step j takes the same examples as in `example_index`; the tail step takes the
    rest of the epoch (rows past them are padding).
    """
    ids, sizes = chunk.client_ids[rows], chunk.num_examples[rows]
    bsz, s, t = config.batch_size, chunk.steps, chunk.tail
    width = s * bsz + t
    order = _epoch_order(ids, sizes, config, width, seed=seed, round_index=round_index)
    full_per_client = np.maximum(-(-sizes // bsz) - 1, 0)[:, None, None]
    pos = np.arange(s * bsz)
    full = np.where(pos < full_per_client * bsz, order[..., :s * bsz], -1)
    start = full_per_client * bsz + np.arange(t)  # [K, 1, T]
    tail = np.take_along_axis(order, np.broadcast_to(np.minimum(start, width - 1),
                                                     order.shape[:2] + (t,)), axis=-1)
    tail = np.where(start < sizes[:, None, None], tail, -1)
    return full.reshape(len(ids), config.local_epochs, s, bsz), tail


def materialize_chunk(population: Population, chunk: ChunkPlan, config: PackingConfig, *,
                      seed: int = 0, round_index: int = 0,
                      rows: slice = slice(None)) -> PackedChunk:
    """Gathers the examples of `chunk` (rows `rows` only, for multi-host feeding)."""
    ids = chunk.client_ids[rows]
    if chunk.tail:
        full, tail = tail_example_index(chunk, config, seed=seed, round_index=round_index,
                                        rows=rows)
        k = len(ids)
        flat = population.gather(ids, np.concatenate([full.reshape(k, -1), tail.reshape(k, -1)],
                                                     axis=1))
        cut = full[0].size
        data = {key: v[:, :cut].reshape(full.shape + v.shape[2:]) for key, v in flat.items()}
        tail_data = {key: v[:, cut:].reshape(tail.shape + v.shape[2:])
                     for key, v in flat.items()}
        return PackedChunk(data, full >= 0, ids, chunk.num_examples[rows], tail_data, tail >= 0)
    index = example_index(chunk, config, seed=seed, round_index=round_index, rows=rows)
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
