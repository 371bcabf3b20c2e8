"""The federated round: client chunks (vmap x unrolled groups x scan over local steps) + server.

One round = a host loop over the fixed-shape chunks of a `CohortPlan`, each a call of the jitted
`client_chunk` that adds its clients' weighted deltas into a donated on-device accumulator, then
one jitted `server_update`. The host never touches a single client and never waits on the device
inside the loop: it gathers the next chunk while the device computes, chunk data goes to the
device within the jitted call's own dispatch (no per-array Python transfer), and the round's
metrics come back in one copy at its end. `FederatedEngine.compile` compiles every chunk shape up
front. With clients_per_call = cohort size and one step bucket the round is one client_chunk call.
Inside a chunk, each device of the 'clients' mesh axis (shard_map) takes its K/D clients in
groups of `vmap_width` computed together by vmap; groups follow each other in a lax.scan
(unroll it for convolutional models on CPU: rolled loops around convolution weight
gradients are ~100x slower on XLA:CPU, measured); each client's local steps are a
lax.scan. Each device keeps its own partial sums across the round's chunks; server_update adds
them up (one all-reduce per round, across hosts too).
With RoundBackend.steps_per_call = L > 0 a chunk is client_begin, then client_steps per run of at
most L local steps (client states carried on device), then client_end: the same round in
programs whose size no longer grows with a client's number of steps.
Padding: padded examples are masked in the method's loss; steps whose mask is all False are
skipped (state kept); padding clients and empty clients have weight 0. A client whose delta or
metrics are not finite gets weight 0; with on_nonfinite='raise' the server state is kept as it
was and `NonFiniteClientError` names the clients (and carries the intact state).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import pathlib
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from fer_jax.federated import aggregate, partial, sampling
from fer_jax.federated import dp as dp_lib
from fer_jax.federated import mesh as mesh_lib
from fer_jax.federated import packing as packing_lib
from fer_jax.federated.client import ClientMethod
from fer_jax.federated.packing import CohortPlan, PackingConfig, materialize_chunk, plan_cohort
from fer_jax.federated.population import Population

WEIGHTINGS = ("num_examples", "client_size", "uniform")
LAYOUTS = ("fixed", "auto")
ON_NONFINITE = ("raise", "drop")


@flax.struct.dataclass
class ServerState:
    """What the server keeps between rounds (a pytree: checkpoint it with orbax as is).

    variables: the full model variables (federated + frozen; local leaves hold the template that
      a client starts from on its first visit). opt_state: server optimizer state over the
      federated subtree. round: int32 scalar, the number of completed rounds. dp: None, or with
      client-level DP {'clip_norm': float32 scalar} (the clip norm of the next round; adaptive
      clipping moves it).
    """

    variables: Any
    opt_state: Any
    round: jax.Array
    dp: Any = None


@flax.struct.dataclass
class Accumulator:
    """Running sums of one round: sum_c w_c delta_c, sum_c w_c, #non-finite clients and (DP)
    #clients whose delta was clipped.

    Every leaf has a leading [devices] axis sharded over 'clients': each device adds its own
    clients into its own row, chunk after chunk, with no collective; `server_update` sums the
    rows (one all-reduce per round instead of one per chunk).
    """

    delta_sum: Any
    weight_sum: jax.Array
    nonfinite: jax.Array
    clipped: jax.Array


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


LAYOUT_CACHE_FILE = "layouts.json"


def _layout_cache_path() -> pathlib.Path | None:
    """`layouts.json` in JAX's persistent compilation cache directory (None when unset)."""
    directory = jax.config.jax_compilation_cache_dir
    return pathlib.Path(directory) / LAYOUT_CACHE_FILE if directory else None


def _layout_cache_key(*, jaxpr, population, probe_ids, shapes, cohort, packing, candidates,
                      unroll, steps_per_call, devices) -> str:
    """What a probe's timings depend on: the client program, the data's shapes, the cohort's
    chunk shapes, the candidates and the hardware (a hash; the entry also keeps a summary)."""
    row = population.gather(probe_ids[probe_ids >= 0][:1], np.zeros((1, 1), np.int64))
    parts = {
        "jax": jax.__version__, "platform": jax.default_backend(),
        "device_kind": devices.flat[0].device_kind, "devices": int(devices.size),
        "jaxpr": hashlib.sha256(jaxpr.encode()).hexdigest(),
        "data": {k: [list(np.shape(v)[2:]), str(np.asarray(v).dtype)] for k, v in
                 sorted(row.items())},
        "chunk_shapes": sorted(map(list, {*shapes})), "chunks": len(shapes), "cohort": cohort,
        "batch_size": packing.batch_size, "candidates": [list(c) for c in candidates],
        "unroll": unroll, "steps_per_call": steps_per_call,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _read_layout_cache(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # unreadable or corrupt: probe again, rewrite it
        logging.warning("layout probe cache %s unreadable (%s); probing again", path, e)
        return {}


def _write_layout_cache(path: pathlib.Path, key: str, estimates: dict) -> None:
    """Adds one entry (written to a temporary file, then renamed: never a half-written file)."""
    try:
        entries = _read_layout_cache(path)
        entries[key] = {"estimated_s_per_round": estimates, "written": time.time()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1))
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache directory only costs the next run a probe
        logging.warning("layout probe cache %s not written (%s)", path, e)


@dataclasses.dataclass(frozen=True)
class RoundBackend:
    """How clients are laid onto the hardware (results agree to float tolerance across choices).

    vmap_width: clients per device computed together with vmap (1 = one at a time).
    step_unroll / group_unroll: `unroll` of the local-step scan and of the scan over vmap groups
      (True = full). Default: True on CPU (convolution weight gradients inside XLA:CPU while
      loops are ~30-100x slower), 1 (rolled, fastest to compile) on GPU/TPU.
    layout: 'fixed' uses clients_per_call (PackingConfig) and vmap_width as given; 'auto' lets
      the engine choose both at the first plan() (see `FederatedEngine.layout`): on CPU a model
      with convolutions gets 1 client per call unvmapped (measured: vmap turns them into grouped
      convolutions, ~10x slower; 4 per call was 2.5x slower) and, unless steps_per_call is set,
      one local step per call (small CNN, 100 clients: a client's steps unrolled in one call ran
      1.5x slower per round and compiled 7x longer); other models a timed probe of
      1 / 4 / 16x16-vmapped clients per call and device; on GPU/TPU a probe of vmap widths
      8 / 32 / 128 per device.
    steps_per_call: 0 = a chunk's clients run all their local steps in one call; L > 0 = in
      calls of at most L steps (client_begin / client_steps / client_end), the client states
      carried between calls on device. Same result (to float tolerance). For clients with many
      local steps on CPU, where the unrolled one-call program is too large to compile (FedAffect
      on FER-2013: 81 SimCLR steps); compiled shapes then no longer grow with client size.
    probe_cache: with layout='auto', keep each timed probe's choice in `layouts.json` beside
      JAX's persistent compilation cache (when one is set, single-process runs only) and reuse
      it when the same client program (its jaxpr, constants such as the learning rate
      included), data shapes, cohort chunk shapes, candidates and devices come back: a second
      run of a config skips the probe's timing. A stale entry can only cost speed, never change
      a result; False (or no cache directory) always probes.
    """

    vmap_width: int = 1
    step_unroll: int | bool = dataclasses.field(default_factory=lambda: True if _on_cpu() else 1)
    group_unroll: int | bool = dataclasses.field(default_factory=lambda: True if _on_cpu() else 1)
    steps_per_call: int = 0
    layout: str = "fixed"
    probe_cache: bool = True

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout {self.layout!r} is not one of {LAYOUTS}")
        if self.vmap_width < 1:
            raise ValueError(f"vmap_width must be >= 1, got {self.vmap_width}")
        if self.steps_per_call < 0:
            raise ValueError(f"steps_per_call must be >= 0 (0 = all steps in one call), got "
                             f"{self.steps_per_call}")

    @classmethod
    def from_config(cls, fed) -> RoundBackend:
        """From a config's `fed` block: vmap_width, unroll (both scans), steps_per_call, layout."""
        return cls(vmap_width=fed.vmap_width, step_unroll=fed.unroll, group_unroll=fed.unroll,
                   steps_per_call=fed.get("steps_per_call", 0), layout=fed.get("layout", "fixed"))

    @classmethod
    def auto(cls, **kw) -> RoundBackend:
        """The engine picks clients per call and vmap width (see `layout`)."""
        return cls(layout="auto", **kw)


@dataclasses.dataclass(frozen=True)
class ClientSpec:
    """Static part of `client_chunk`; equal specs share compiled code (the method, filter and
    optimizer hash by identity, so reuse those objects across engines to reuse compilations).
    clip: clip each client's delta to the state's dp clip norm (client-level DP)."""

    method: ClientMethod
    param_filter: partial.ParamFilter
    backend: RoundBackend
    mesh: Mesh
    clip: bool = False


@dataclasses.dataclass(frozen=True)
class ServerSpec:
    """Static part of `server_update`."""

    server_optimizer: optax.GradientTransformation
    param_filter: partial.ParamFilter
    on_nonfinite: str
    dp: dp_lib.Mechanism | None = None


class NonFiniteClientError(FloatingPointError):
    """Some clients produced NaN/inf. `state` is the server state as before the round."""

    def __init__(self, client_ids, state, result):
        super().__init__(f"non-finite update or metrics from clients {list(client_ids)}; the server"
                         " state was left as before the round (see .state)")
        self.client_ids, self.state, self.result = list(client_ids), state, result


def _tree_where(cond, a, b):
    return jax.tree.map(lambda x, y: jnp.where(cond, x, y), a, b)


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _scan(body, carry, xs, unroll):
    """lax.scan, except that a full unroll is a Python loop: no XLA while loop at all.

    lax.scan(unroll=True) still emits a one-trip while loop when the length is 1 (and XLA:CPU
    kept it inside shard_map), and convolution weight gradients inside any while loop take
    XLA:CPU's ~30-100x slower path. Measured: a 4-client round of the small
    CNN went from 12.6 s to 0.3 s with this.
    """
    length = jax.tree.leaves(xs)[0].shape[0]
    if length == 0 or (unroll is not True and unroll < length):
        return lax.scan(body, carry, xs, unroll=max(int(unroll), 1))
    outs = []
    for i in range(length):
        carry, out = body(carry, jax.tree.map(lambda x, i=i: x[i], xs))
        outs.append(out)
    return carry, jax.tree.map(lambda *o: jnp.stack(o), *outs)


def _client_begin(spec: ClientSpec, variables, local, c, rkey):
    """A client's initial method state and the key its steps fold their index into."""
    trainable = partial.trainable_mask(partial.label_tree(variables, spec.param_filter))
    ckey = sampling.client_key(rkey, c["client_ids"])
    init_key, step_key = jax.random.split(ckey)
    return spec.method.init(partial.merge(variables, local), trainable, init_key), step_key


def _step_body(spec: ClientSpec, step_key):
    """The scan body of one local step: (state, (batch, mask, step index)) -> (state, metrics)."""

    def body(carry, xs):
        batch, m, i = xs
        new, metrics = spec.method.step(carry, batch, m, jax.random.fold_in(step_key, i))
        live = jnp.any(m)
        # A step of pure padding must not move momentum or counters: keep the old state.
        metrics = jax.tree.map(lambda v: jnp.where(live, v, 0).astype(jnp.float32), metrics)
        return _tree_where(live, new, carry), metrics

    return body


def _client_finish(spec: ClientSpec, variables, state, metrics):
    """A client's FEDERATED delta, its new LOCAL subtree, its metrics, and whether all is finite."""
    labels = partial.label_tree(variables, spec.param_filter)
    out = spec.method.final(state)
    server_fed = partial.select(variables, labels, partial.FEDERATED)
    delta = jax.tree.map(jnp.subtract, partial.select(out, labels, partial.FEDERATED), server_fed)
    new_local = partial.select(out, labels, partial.LOCAL)
    finite = _all_finite(delta) & _all_finite(metrics) & _all_finite(new_local)
    return delta, new_local, metrics, finite


def steps_per_epoch(num_examples, batch_size):
    """ceil(n / B): local steps of one epoch (NumPy or jnp). Step e * spe + j of any layout has
    the key of step e * spe + j of the padded default layout."""
    return -(-num_examples // batch_size)


def _client_update(spec: ClientSpec, variables, local, c, rkey):
    """One client: init, scan over local steps (all-padding steps skipped), final, delta.

    c: this client's rows of the chunk ('data', 'mask', 'client_ids', 'num_examples', and with
    tail batches 'tail_data', 'tail_mask').
    """
    state, step_key = _client_begin(spec, variables, local, c, rkey)
    body = _step_body(spec, step_key)
    unroll = spec.backend.step_unroll
    if "tail_mask" not in c:
        steps = c["mask"].shape[0]
        state, step_metrics = _scan(body, state, (c["data"], c["mask"], jnp.arange(steps)),
                                    unroll)
        metrics = jax.tree.map(lambda v: v.sum(0), step_metrics)
    else:
        # Epoch e: its full steps, then its tail step.
        full = c["mask"].shape[1]
        spe = steps_per_epoch(c["num_examples"], c["mask"].shape[-1])

        def epoch(carry, xs):
            data, mask, tail_data, tail_mask, e = xs
            step_metrics = None
            if full:  # static: a chunk of clients with less than one full batch has none
                carry, step_metrics = _scan(body, carry, (data, mask, e * spe + jnp.arange(full)),
                                            unroll)
            carry, metrics = body(carry, (tail_data, tail_mask, e * spe + spe - 1))
            if step_metrics is not None:
                metrics = jax.tree.map(lambda a, b: a.sum(0) + b, step_metrics, metrics)
            return carry, metrics

        epochs = c["mask"].shape[0]
        state, epoch_metrics = _scan(
            epoch, state, (c["data"], c["mask"], c["tail_data"], c["tail_mask"],
                           jnp.arange(epochs)), unroll)
        metrics = jax.tree.map(lambda v: v.sum(0), epoch_metrics)
    return _client_finish(spec, variables, state, metrics)


def _weights(ids):
    """The aggregation weights of a group of clients (chosen on the host; 0 for padding)."""
    return jnp.where(ids["client_ids"] >= 0, ids["weight"], 0.0)


def _over_clients(spec: ClientSpec, one, carry, xs, reduce=None):
    """Applies `one` to each of this device's clients (leading axis of `xs`): groups of
    vmap_width computed together by vmap, groups in a `_scan` (group_unroll).

    reduce(carry, group_xs, group_out) -> (carry, kept) folds each group's outputs into `carry`
    (e.g. weighted delta sums, so deltas are never stacked over clients); without it all outputs
    are kept. Returns (carry, kept outputs with a leading client axis).
    """
    n = jax.tree.leaves(xs)[0].shape[0]
    width = min(spec.backend.vmap_width, n)
    if n % width:
        raise ValueError(f"{n} clients per device do not split into vmap groups of {width}")
    grouped = jax.tree.map(lambda x: x.reshape((n // width, width) + x.shape[1:]), xs)

    def group(carry, g):
        if width == 1:
            # No vmap for one client: keeps plain (not grouped) convolutions on CPU.
            out = jax.tree.map(lambda x: x[None], one(*jax.tree.map(lambda x: x[0], g)))
        else:
            out = jax.vmap(one)(*g)
        return (carry, out) if reduce is None else reduce(carry, g, out)

    carry, outs = _scan(group, carry, grouped, spec.backend.group_unroll)
    return carry, jax.tree.map(lambda x: x.reshape((n,) + x.shape[2:]), outs)


def _accumulate(spec: ClientSpec, accum, clients, finished, clip_norm=None):
    """Runs `finished` on each of this device's clients and adds the results into its row of
    `accum` ([1, ...] here).

    clients: a tuple of per-client inputs with a leading [n] axis whose first element is
    {'client_ids', 'num_examples', 'weight'}; finished(*one_client) -> (delta, new_local, metrics,
    finite). clip_norm: with client-level DP, each delta is clipped to this L2 norm before it is
    added. Returns (accum, (new_local, metrics, finite) with a leading [n] axis)."""

    def reduce(carry, g, out):
        delta, new_local, metrics, finite = out
        w = _weights(g[0])
        use = jnp.where(finite, w, 0.0)
        clipped = jnp.zeros((), jnp.int32)
        if clip_norm is not None:
            delta, norms = dp_lib.clip_rows(delta, clip_norm)
            clipped = jnp.sum((norms > clip_norm) & (use > 0)).astype(jnp.int32)
        d_sum, w_sum = aggregate.weighted_sum(delta, use)
        bad = jnp.sum((~finite) & (w > 0)).astype(jnp.int32)
        carry = Accumulator(jax.tree.map(jnp.add, carry.delta_sum, d_sum),
                            carry.weight_sum + w_sum, carry.nonfinite + bad,
                            carry.clipped + clipped)
        return carry, (new_local, metrics, finite)

    mine = jax.tree.map(lambda x: x[0], accum)
    # No psum here: a per-chunk all-reduce made XLA:CPU's in-process rendezvous time out (40 s)
    # with 2 host devices and ~500 chunks in flight, and it costs an all-reduce per chunk on a pod.
    mine, outs = _over_clients(spec, finished, mine, clients, reduce)
    return jax.tree.map(lambda x: x[None], mine), outs


def _device_chunk(spec: ClientSpec, accum, state, chunk, local, key):
    """This device's K/D clients of a chunk: whole client updates into its partial sums."""
    rkey = sampling.round_key(key, state.round)
    ids = {n: chunk[n] for n in CLIENT_FIELDS}

    def one(_ids, c, local_c):
        return _client_update(spec, state.variables, local_c, c, rkey)

    return _accumulate(spec, accum, (ids, chunk, local), one, _clip_norm(spec, state))


def _clip_norm(spec: ClientSpec, state):
    """The clip norm of this round's deltas (client-level DP), or None."""
    if not spec.clip:
        return None
    if state.dp is None:
        raise ValueError("client-level DP: the server state has no clip norm (state.dp is None);"
                         " build it with the DP engine's init() or place()")
    return state.dp["clip_norm"]


def _clients_sharded(spec: ClientSpec, fn, in_specs, out_specs):
    """shard_map of a per-device function over the 'clients' mesh axis."""
    return jax.shard_map(functools.partial(fn, spec), mesh=spec.mesh, in_specs=in_specs,
                         out_specs=out_specs, check_vma=False)


_C = P(mesh_lib.CLIENTS)
CLIENT_FIELDS = ("client_ids", "num_examples", "weight")


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("accum",))
def client_chunk(accum, state, chunk, local, key, *, spec: ClientSpec):
    """Adds one chunk's weighted client deltas into `accum` (donated; each device its own row).

    chunk: {'data': {k: [K, S, B, ...]}, 'mask': [K, S, B], 'client_ids': [K],
    'num_examples': [K], 'weight': [K] float32 aggregation weights} (with tail batches
    [K, E, S, B, ...] data and mask plus 'tail_data' / 'tail_mask' [K, E, T, ...]) sharded over
    'clients'; local: the clients' LOCAL subtrees [K, ...].
    Returns (accum, (new_local [K, ...], metric sums {k: [K]}, finite [K])).
    """
    fn = _clients_sharded(spec, _device_chunk, (_C, P(), _C, _C, P()), (_C, _C))
    return fn(accum, state, chunk, local, key)


# Segmented rounds (RoundBackend.steps_per_call): a chunk's local steps in several calls.

def _device_begin(spec: ClientSpec, state, clients, local, key):
    rkey = sampling.round_key(key, state.round)
    _, out = _over_clients(
        spec, lambda c, loc: _client_begin(spec, state.variables, loc, c, rkey), None,
        (clients, local))
    return out


@functools.partial(jax.jit, static_argnames=("spec",))
def client_begin(state, clients, local, key, *, spec: ClientSpec):
    """Segmented rounds: each client's initial method state and step key, [K, ...] over
    'clients'. clients: {'client_ids', 'num_examples', 'weight'} [K]; local: LOCAL subtrees
    [K, ...]."""
    return _clients_sharded(spec, _device_begin, (P(), _C, _C, P()), _C)(state, clients, local,
                                                                          key)


def _device_steps(spec: ClientSpec, carry, segment):
    def one(c, seg):
        state, step_key = c
        state, metrics = _scan(_step_body(spec, step_key), state,
                               (seg["data"], seg["mask"], seg["step"]), spec.backend.step_unroll)
        return (state, step_key), jax.tree.map(lambda v: v.sum(0), metrics)

    _, out = _over_clients(spec, one, None, (carry, segment))
    return out


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("carry",))
def client_steps(carry, segment, *, spec: ClientSpec):
    """Segmented rounds: L local steps of every client of a chunk; `carry` (from client_begin or
    the previous call) is donated. segment: {'data': {k: [K, L, B, ...]}, 'mask': [K, L, B],
    'step': [K, L] int32 step indices (the keys of the one-call layout)}.
    Returns (carry, metric sums of these steps {k: [K]})."""
    return _clients_sharded(spec, _device_steps, (_C, _C), (_C, _C))(carry, segment)


def _device_end(spec: ClientSpec, accum, state, carry, clients, metrics):
    def one(_ids, c, m):
        return _client_finish(spec, state.variables, c[0], m)

    return _accumulate(spec, accum, (clients, carry, metrics), one, _clip_norm(spec, state))


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("accum",))
def client_end(accum, state, carry, clients, metrics, *, spec: ClientSpec):
    """Segmented rounds: the clients' deltas from their final states, added into `accum` as
    client_chunk does. Returns what client_chunk returns."""
    fn = _clients_sharded(spec, _device_end, (_C, P(), _C, _C, _C), (_C, _C))
    return fn(accum, state, carry, clients, metrics)


def segments(packed, steps_per_call: int):
    """The step segments of a materialized chunk, in training order: dicts of host arrays
    {'data', 'mask', 'step'} with at most `steps_per_call` steps each ([K, L, ...]).

    Default layout: S steps cut into runs of L. Tail layout: per epoch its full steps in runs of
    L, then its tail step alone. Step indices are those the one-call round folds into keys.
    """
    L = steps_per_call
    k = packed.mask.shape[0]
    if packed.tail_mask is None:
        total = packed.mask.shape[1]
        for s in range(0, total, L):
            e = min(s + L, total)
            yield {"data": {n: x[:, s:e] for n, x in packed.data.items()},
                   "mask": packed.mask[:, s:e],
                   "step": np.broadcast_to(np.arange(s, e, dtype=np.int32), (k, e - s))}
        return
    epochs, full, batch = packed.mask.shape[1:4]
    spe = steps_per_epoch(packed.num_examples.astype(np.int64), batch)[:, None]
    for ep in range(epochs):
        for s in range(0, full, L):
            e = min(s + L, full)
            yield {"data": {n: x[:, ep, s:e] for n, x in packed.data.items()},
                   "mask": packed.mask[:, ep, s:e],
                   "step": (ep * spe + np.arange(s, e)).astype(np.int32)}
        yield {"data": {n: x[:, ep, None] for n, x in packed.tail_data.items()},
               "mask": packed.tail_mask[:, ep, None],
               "step": (ep * spe + spe - 1).astype(np.int32)}


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("state",))
def server_update(state: ServerState, accum: Accumulator, key=None, cohort_size=None, *,
                  spec: ServerSpec):
    """Applies the server optimizer to -mean(delta); keeps `state` when the round failed.

    Failed = total weight 0, or (on_nonfinite='raise') any weighted client non-finite.
    With client-level DP (spec.dp) the mean is DP-FedAvg's (see fer_jax.federated.dp): the
    clipped deltas' sum plus Gaussian noise from the round key (`key`: the run's base key, as
    client_chunk's), over the fixed denominator `cohort_size` (the clients sampled), and the
    clip norm moves with adaptive clipping. Returns (state, ok, stats): stats is {} without DP,
    else this round's {'clip_norm', 'clipped', 'contributed', 'unclipped_fraction'} (the last the
    noised adaptive-clipping estimate, NaN with a fixed clip norm).
    """
    labels = partial.label_tree(state.variables, spec.param_filter)
    fed = partial.select(state.variables, labels, partial.FEDERATED)
    accum = jax.tree.map(lambda x: x.sum(0), accum)  # the devices' rows: the round's one all-reduce
    ok = accum.weight_sum > 0
    if spec.on_nonfinite == "raise":
        ok &= accum.nonfinite == 0
    dp_state, stats = state.dp, {}
    if spec.dp is None:
        total = jnp.where(ok, accum.weight_sum, 1.0)
        mean = jax.tree.map(lambda s: s / total, accum.delta_sum)
    else:
        clip = state.dp["clip_norm"]
        noise_key = dp_lib.noise_key(sampling.round_key(key, state.round))
        mean, next_clip, below = dp_lib.private_mean(
            spec.dp, accum.delta_sum, accum.weight_sum, accum.clipped, clip, noise_key,
            cohort_size)
        dp_state = {"clip_norm": next_clip.astype(clip.dtype)}
        stats = {"clip_norm": clip, "clipped": accum.clipped, "contributed": accum.weight_sum,
                 "unclipped_fraction": below}
    # Pseudo-gradient of Reddi et al. (2021): the negated (weighted or private) mean client delta.
    grads = jax.tree.map(lambda m, p: (-m).astype(p.dtype), mean, fed)
    updates, opt_state = spec.server_optimizer.update(grads, state.opt_state, fed)
    new = ServerState(partial.merge(state.variables, optax.apply_updates(fed, updates)),
                      opt_state, state.round + 1, dp_state)
    return _tree_where(ok, new, state), ok, stats


def _chunk_weights(chunk_plan, rows) -> np.ndarray:
    """This process's rows of a chunk's aggregation weights (a hand-built chunk without weights:
    its client sizes)."""
    w = chunk_plan.num_examples if chunk_plan.weights is None else chunk_plan.weights
    return w[rows].astype(np.float32)


@dataclasses.dataclass
class RoundResult:
    """Host-side report of one round (NumPy / Python values)."""

    ok: bool
    client_ids: np.ndarray       # computed clients (padding removed), plan order
    num_examples: np.ndarray
    metrics: dict                # per-client metric sums, [clients]
    totals: dict                 # cohort metric sums
    nonfinite_client_ids: list
    padding_efficiency: float
    client_updates: int
    useful_examples: int
    layout: dict | None = None   # the engine's client layout (FederatedEngine.layout)
    # Client-level DP (engine dp=...): epsilon (after this round, at delta), delta,
    # noise_multiplier, clip_norm (this round's), noise_std (on the sum), clipped_fraction (exact:
    # a diagnostic outside the guarantee), unclipped_fraction (adaptive clipping's noised
    # estimate), next_clip_norm. None without DP.
    dp: dict | None = None


class FederatedEngine:
    """Host-side owner of a run's static configuration and the round loop.

    Typical driver: engine = FederatedEngine(method, ...); state = engine.init(variables);
    engine.compile(population) (optional: compiles every chunk shape up front);
    for r: ids = sampler.sample(seed, r); plan = engine.plan(population, ids);
    state, result = engine.run_round(state, population, plan, key, seed=seed); log result.

    Without `backend` the engine picks its layout (RoundBackend.auto()) at the first plan() or
    compile(); `engine.layout` (also in every RoundResult) says what it chose and why.

    dp: a `dp.DPConfig` for client-level DP-FedAvg (fer_jax.federated.dp): deltas clipped on
    the clients, noise and the fixed denominator on the server, epsilon in every RoundResult.
    It needs weighting='uniform' (a client's weight bounds its share of the sum). The mechanism
    is resolved (noise multiplier calibrated, delta defaulted) for the population size and cohort
    size of the first plan() or compile(), or of an explicit `setup_privacy(N, m)`.
    """

    def __init__(self, method: ClientMethod, *, server_optimizer=None,
                 param_filter: partial.ParamFilter = partial.federate_all,
                 packing: PackingConfig | None = None, backend: RoundBackend | None = None,
                 weighting: str = "num_examples", on_nonfinite: str = "raise",
                 mesh: Mesh | None = None, dp: dp_lib.DPConfig | None = None):
        if not (callable(weighting) or weighting in WEIGHTINGS):
            raise ValueError(f"weighting {weighting!r} is not one of {WEIGHTINGS} or a function of"
                             " the client sizes")
        if dp is not None and weighting != "uniform":
            raise ValueError(f"client-level DP needs weighting='uniform', got {weighting!r}: the "
                             "noise is calibrated to each client moving the sum by at most the "
                             "clip norm, which larger weights would break")
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite {on_nonfinite!r} is not one of {ON_NONFINITE}")
        packing = PackingConfig() if packing is None else packing
        backend = RoundBackend.auto() if backend is None else backend
        mesh = mesh_lib.clients_mesh() if mesh is None else mesh
        per_call = mesh.devices.size * min(backend.vmap_width, packing.clients_per_call)
        if backend.layout == "fixed" and packing.clients_per_call % per_call:
            raise ValueError(f"clients_per_call={packing.clients_per_call} must be a multiple of "
                             f"devices ({mesh.devices.size}) x vmap_width ({backend.vmap_width})")
        self.packing = packing
        self.weighting = weighting
        self.spec = ClientSpec(method, param_filter, backend, mesh, clip=dp is not None)
        self.server_spec = ServerSpec(server_optimizer or aggregate.server_optimizer("fedavg"),
                                      param_filter, on_nonfinite)
        self.dp, self.ledger = dp, None
        self.layout = {"mode": backend.layout, "clients_per_call": packing.clients_per_call,
                       "vmap_width": backend.vmap_width, "unroll": backend.step_unroll,
                       "steps_per_call": backend.steps_per_call}
        if backend.layout == "fixed":
            self.layout["source"] = "given"

    @property
    def mesh(self) -> Mesh:
        return self.spec.mesh

    def init(self, variables) -> ServerState:
        """The round-0 server state, replicated over the mesh."""
        labels = partial.label_tree(variables, self.spec.param_filter)
        fed = partial.select(variables, labels, partial.FEDERATED)
        if not jax.tree.leaves(fed):
            raise ValueError("the parameter filter federates no variable")
        state = ServerState(variables, self.server_spec.server_optimizer.init(fed),
                            jnp.zeros((), jnp.int32))
        # Copy through the host: rounds donate the state, the caller's `variables` must survive.
        return self.place(state)

    def place(self, state: ServerState) -> ServerState:
        """A (restored) server state copied onto this engine's mesh, replicated (with DP, a
        state without a clip norm gets the configured one)."""
        if self.dp is not None and state.dp is None:
            state = state.replace(dp={"clip_norm": np.float32(self.dp.clip_norm)})
        state = mesh_lib.replicate(jax.tree.map(np.array, state), self.mesh)
        # Shapes and shardings only: what compile() and the layout probe run on.
        self._state_like = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        return state

    def local_template(self, variables):
        """The LOCAL subtree of `variables`: what a client starts from on its first round."""
        labels = partial.label_tree(variables, self.spec.param_filter)
        return partial.select(variables, labels, partial.LOCAL)

    def plan(self, population: Population, client_ids, *,
             population_size: int | None = None) -> CohortPlan:
        """The chunk plan of a cohort (depends on ids and sizes only; identical on every host).

        population_size: how many clients the cohort was drawn from, when the sampler draws from
        a subset of `population` (client-level DP accounts with it; default: all of them).
        """
        n = population.num_clients if population_size is None else int(population_size)
        ids = np.asarray(client_ids, dtype=np.int64)
        if ids.size == 0:
            raise ValueError("empty cohort: no client ids given")
        if self.dp is not None:
            if len(np.unique(ids)) != ids.size:
                raise ValueError("client-level DP: a cohort must hold distinct clients (sampled "
                                 "without replacement)")
            self.setup_privacy(n, ids.size)
        sizes = population.sizes(ids)
        self._choose_layout(population, ids)
        return dataclasses.replace(plan_cohort(ids, sizes, self.packing,
                                               self.client_weights(sizes)), population_size=n)

    def setup_privacy(self, population_size: int, cohort_size: int) -> dp_lib.Mechanism | None:
        """Resolves the DP mechanism (once) for cohorts of `cohort_size` out of
        `population_size` clients: calibrates the noise multiplier to dp.target_epsilon, defaults
        delta to 1 / N^1.1. plan() and compile() call it; call it first to fail before any work
        (an unreachable target raises ValueError). Returns the mechanism (None without DP)."""
        if self.dp is None:
            return None
        if self.ledger is None:
            mech, delta = dp_lib.resolve(self.dp, population_size, cohort_size)
            self.server_spec = dataclasses.replace(self.server_spec, dp=mech)
            self.ledger = dp_lib.Ledger(mech.noise_multiplier, delta,
                                        (population_size, cohort_size))
        return self.server_spec.dp

    def privacy_report(self, rounds: int | None = None) -> dict:
        """The DP guarantee after `rounds` (default: the rounds run so far) for a final report:
        epsilon, delta, noise multiplier, clip norm, the accounting's assumptions."""
        if self.dp is None:
            return {"enabled": False}
        if self.ledger is None:
            raise ValueError("no DP mechanism yet: plan(), compile() or setup_privacy() first")
        done = (max(self.ledger.rounds) + 1 if self.ledger.rounds else 0) if rounds is None \
            else rounds
        n, m = self.ledger.rounds.get(done - 1, self.ledger.default)
        mech = self.server_spec.dp
        return {"enabled": True, "epsilon": self.ledger.epsilon(done) if done else 0.0,
                "delta": self.ledger.delta, "rounds": done,
                "noise_multiplier": mech.noise_multiplier, "clip_norm": self.dp.clip_norm,
                "adaptive_clipping": mech.adaptive, "population_size": n, "cohort_size": m,
                "level": "client", "neighbouring": "replace one client",
                "sampling": "fixed-size cohorts without replacement",
                "accountant": "dp_accounting RDP (Wang et al. 2019 sampled-without-replacement "
                              "Gaussian)"}

    def client_weights(self, sizes) -> np.ndarray:
        """Aggregation weights of clients of `sizes` examples (0 for empty clients).

        'num_examples': the examples a client trains per epoch (its size, its full batches with
        drop_remainder); 'client_size': its size whatever it trains (fedjax's FedAvg weight); a
        client that trains nothing then adds weight but no delta; 'uniform': 1; a function:
        weighting(sizes) -> [C] weights >= 0.
        """
        sizes = np.asarray(sizes, dtype=np.int64)
        if callable(self.weighting):
            w = np.asarray(self.weighting(sizes), dtype=np.float64)
            if w.shape != sizes.shape or np.any(w < 0) or not np.all(np.isfinite(w)):
                raise ValueError(f"weighting function must return {sizes.shape[0]} finite weights "
                                 f">= 0, got shape {w.shape}: {w[:5]}")
        elif self.weighting == "num_examples":
            w = packing_lib.trained_examples(sizes, self.packing).astype(np.float64)
        elif self.weighting == "client_size":
            w = sizes.astype(np.float64)
        else:
            w = np.ones(sizes.shape)
        return np.where(sizes > 0, w, 0.0)

    def compile(self, population: Population, client_ids=None, *,
                state: ServerState | None = None, cohort_size: int = 100) -> float:
        """Compiles every program a round over clients `client_ids` (default: the whole
        population) can run: one chunk of every (step bucket, tail width) shape their sizes
        produce, run through the round's own code on padding clients, and the server update.
        A later round compiles nothing. Returns the seconds spent.

        state: a server state to compile for (default: zeros shaped like `init`'s or `place`'s
        last state; nothing is donated). cohort_size: with an automatic layout not chosen yet,
        it is chosen for cohorts of this many of `client_ids` (the probe's time is included).
        """
        t0 = time.perf_counter()
        ids = (np.arange(population.num_clients) if client_ids is None
               else np.asarray(client_ids, dtype=np.int64))
        self.setup_privacy(population.num_clients, min(cohort_size, population.num_clients))
        if "source" not in self.layout:  # auto layout: probe on a cohort-sized sample
            sample = np.random.default_rng(0).permutation(ids)[:cohort_size]
            self._choose_layout(population, sample)
        shapes = packing_lib.chunk_shapes(population.sizes(ids), self.packing)
        state = self._zeros_state() if state is None else state
        k = self.packing.clients_per_call
        chunks = [packing_lib.ChunkPlan(steps=steps, tail=tail, client_ids=np.full(k, -1),
                                        num_examples=np.zeros(k, np.int64), weights=np.zeros(k))
                  for steps, tail in shapes]
        key = np.zeros(2, np.uint32)
        accum, outputs = self._run_chunks(state, population, chunks, key, seed=0, round_index=0,
                                          local_store=None, idle_weight=0.0)
        # server_update donates its state: give it a copy (through the host: no copy program).
        copy = jax.tree.map(lambda x: jax.device_put(np.asarray(x), x.sharding), state)
        out = server_update(copy, accum, mesh_lib.replicate(key, self.mesh), np.float32(k),
                            spec=self.server_spec)
        jax.block_until_ready((out, outputs))
        return time.perf_counter() - t0

    def _choose_layout(self, population, ids):
        """Resolves layout='auto' once: sets clients_per_call and vmap_width, fills
        `self.layout` (candidates' estimated seconds per round, probe seconds)."""
        if "source" in self.layout:
            return
        t0 = time.perf_counter()
        devices = self.mesh.devices.size
        per_device = max(-(-len(ids) // devices), 1)
        state = self._zeros_state()
        base = dataclasses.replace(self.packing, clients_per_call=devices)
        one = plan_cohort(ids, population.sizes(ids), base)
        # The probe chunk: the cohort's most common chunk shape.
        shapes = [(c.steps, c.tail) for c in one.chunks]
        probe_shape = max(set(shapes), key=shapes.count)
        probe_ids = np.concatenate([c.client_ids for c in one.chunks
                                    if (c.steps, c.tail) == probe_shape])
        platform = jax.default_backend()
        unroll = self.spec.backend.step_unroll
        steps_per_call = self.spec.backend.steps_per_call
        jaxpr = self._client_jaxpr(population, state, one.chunks[shapes.index(probe_shape)])
        if platform == "cpu":
            has_conv = "conv_general_dilated" in jaxpr
            # Convolutions: unrolled, one client per call. Other models: rolled step loops,
            # which compile 3-4x faster than unrolled ones (tiny MLP, 10 steps: 25 vs 103 s on
            # the loaded 2-core machine) at the same speed for 1 client per call.
            # Convolutions also get one local step per call (segmented rounds) unless the user
            # set steps_per_call: small CNN, 100 clients, 5.72 s per round vs 8.61 s with all
            # steps unrolled in one call and 9.26 s with 2 per call (a plain loop of jitted
            # steps: 6.08 s), compile 3.0 vs 21.8 s (docs/performance.md#one-step-per-call).
            candidates = [(1, 1)] if has_conv else [(16, 16), (4, 1), (1, 1)]
            unroll = True if has_conv else 1
            if has_conv:
                steps_per_call = steps_per_call or 1
            source = "cost model (convolutions on CPU)" if has_conv else "probe"
        else:  # rolled step loops (one compiled step) and a probe of vmap widths
            candidates, source, unroll = [(32, 32), (8, 8), (128, 128)], "probe", 1
        capped = [(min(k, per_device), min(v, per_device)) for k, v in candidates]
        candidates = sorted(set(capped), key=capped.index)
        # The first two candidates are always timed, more only within a few seconds.
        estimates, budget = {}, 5.0
        bsz = self.packing.batch_size

        def cost(c):  # example slots a chunk computes per client and epoch
            return c.steps * bsz + c.tail

        cache = (_layout_cache_path() if self.spec.backend.probe_cache and len(candidates) > 1
                 and jax.process_count() == 1 else None)
        cache_key = cache and _layout_cache_key(
            jaxpr=jaxpr, population=population, probe_ids=probe_ids, shapes=shapes,
            cohort=len(ids), packing=self.packing, candidates=candidates, unroll=unroll,
            steps_per_call=steps_per_call, devices=self.mesh.devices)
        cached = _read_layout_cache(cache).get(cache_key) if cache else None
        if cached:
            estimates = dict(cached["estimated_s_per_round"])
            source += " (cached)"
        for i, (k, v) in enumerate(candidates if len(candidates) > 1 and not cached else []):
            if i >= 2 and time.perf_counter() - t0 > budget:
                break
            self._set_layout(k * devices, v, unroll, steps_per_call)
            part = probe_ids[probe_ids >= 0][:k * devices]
            pad = k * devices - len(part)
            chunk = packing_lib.ChunkPlan(
                steps=probe_shape[0], tail=probe_shape[1],
                client_ids=np.concatenate([part, np.full(pad, -1)]),
                num_examples=np.concatenate([population.sizes(part), np.zeros(pad, np.int64)]),
                weights=np.concatenate([np.ones(len(part)), np.zeros(pad)]))
            per_chunk = self._time_chunk(population, state, chunk)
            plan = plan_cohort(ids, population.sizes(ids), self.packing)
            estimates[f"{k * devices}x{v}"] = per_chunk * sum(
                cost(c) for c in plan.chunks) / cost(chunk)
        if cache and estimates and not cached:
            _write_layout_cache(cache, cache_key, estimates)
        best = min(estimates, key=estimates.get) if estimates else None
        k, v = (tuple(int(x) for x in best.split("x")) if best else
                (candidates[0][0] * devices, candidates[0][1]))
        if jax.process_count() > 1:  # every process must run the same layout
            from jax.experimental import multihost_utils
            k, v = (int(x) for x in multihost_utils.broadcast_one_to_all(np.array([k, v])))
        self._set_layout(k, v, unroll, steps_per_call)
        self.layout.update(source=source, estimated_s_per_round=estimates,
                           probe_s=time.perf_counter() - t0)

    def _set_layout(self, clients_per_call, vmap_width, unroll, steps_per_call):
        self.packing = dataclasses.replace(self.packing, clients_per_call=clients_per_call)
        backend = dataclasses.replace(self.spec.backend, vmap_width=vmap_width,
                                      step_unroll=unroll, group_unroll=unroll,
                                      steps_per_call=steps_per_call)
        self.spec = dataclasses.replace(self.spec, backend=backend)
        self.layout.update(clients_per_call=clients_per_call, vmap_width=vmap_width,
                           unroll=unroll, steps_per_call=steps_per_call)

    def _time_chunk(self, population, state, chunk) -> float:
        """Seconds per call of `chunk` in the current layout (compiled first; best of 2 x 3)."""
        key = np.zeros(2, np.uint32)

        def run(n):
            t0 = time.perf_counter()
            accum, outs = self._run_chunks(state, population, [chunk] * n, key, seed=0,
                                           round_index=0, local_store=None, idle_weight=0.0)
            jax.block_until_ready((accum, outs))
            return (time.perf_counter() - t0) / n

        run(1)
        return min(run(3), run(3))

    def _client_jaxpr(self, population, state, chunk_plan) -> str:
        """One client's update, traced (not compiled): the text of its jaxpr (what the layout
        looks for convolutions in, and the probe cache's key)."""
        packed = materialize_chunk(population, chunk_plan, self.packing)
        c = {"data": packed.data, "mask": packed.mask, "client_ids": packed.client_ids[:1],
             "num_examples": packed.num_examples[:1], "weight": np.ones(1, np.float32)}
        if packed.tail_mask is not None:
            c.update(tail_data=packed.tail_data, tail_mask=packed.tail_mask)
        c = jax.tree.map(lambda x: x[0], c)
        labels = partial.label_tree(state.variables, self.spec.param_filter)
        local = partial.select(state.variables, labels, partial.LOCAL)
        jaxpr = jax.make_jaxpr(functools.partial(_client_update, self.spec))(
            state.variables, local, c, jnp.zeros(2, jnp.uint32))
        return str(jaxpr)

    def _zeros_state(self) -> ServerState:
        like = getattr(self, "_state_like", None)
        if like is None:
            raise ValueError("call engine.init() or place() first: compile() and the automatic "
                             "layout's first plan() run on a state of that shape")
        return jax.tree.map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype), s.sharding), like)

    def run_round(self, state: ServerState, population: Population, plan: CohortPlan,
                  key: jax.Array, *, seed: int = 0, local_store=None):
        """Runs one round; `state` is donated. Returns (new state, RoundResult).

        key: the run's base key (the same every round; the round number is folded in on
        device). seed: shuffles client examples per (seed, round). local_store: a
        `LocalStore` for LOCAL leaves (required when the filter has any).
        """
        if not plan.chunks:
            raise ValueError("empty cohort: the plan has no chunk to compute")
        k = self.packing.clients_per_call
        if len(plan.chunks[0].client_ids) != k:
            raise ValueError(f"the plan has chunks of {len(plan.chunks[0].client_ids)} clients, "
                             f"this engine runs {k} per call: plan with engine.plan()")
        if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)
        round_index = self._round_index(state)
        if self._has_local(state) and local_store is None:
            raise ValueError("the parameter filter has LOCAL variables: pass a local_store")
        accum, outputs = self._run_chunks(
            state, population, plan.chunks, key, seed=seed, round_index=round_index,
            local_store=local_store, idle_weight=plan.idle_weight)
        cohort = sum(int((c.client_ids >= 0).sum()) for c in plan.chunks)
        if self.dp is not None:
            if self.ledger is None:
                raise ValueError("client-level DP: plan the cohort with engine.plan()")
            self.ledger.record(round_index, plan.population_size or population.num_clients,
                               cohort)
        state, ok, stats = server_update(state, accum, mesh_lib.replicate(np.asarray(key),
                                                                          self.mesh),
                                         np.float32(cohort), spec=self.server_spec)
        result = self._report(plan, outputs, ok, stats, round_index)
        self._known_round = (state.round, round_index + int(result.ok))
        if local_store is not None and result.ok and self._has_local(state):
            self._store_local(local_store, plan, outputs, result)
        if not result.ok:
            if result.nonfinite_client_ids:
                raise NonFiniteClientError(result.nonfinite_client_ids, state, result)
            raise ValueError("round failed: the total client weight is zero")
        return state, result

    def _round_index(self, state) -> int:
        """The state's round on the host; no device sync when `state` is the last round's."""
        known = getattr(self, "_known_round", None)
        if known is not None and known[0] is state.round:
            return known[1]
        return int(mesh_lib.to_host(state.round))

    def _has_local(self, state) -> bool:
        labels = partial.label_tree(state.variables, self.spec.param_filter)
        return bool(jax.tree.leaves(partial.select(state.variables, labels, partial.LOCAL)))

    def _run_chunks(self, state, population, chunks, key, *, seed, round_index, local_store,
                    idle_weight):
        """Dispatches every chunk of a round into a fresh accumulator (asynchronously).

        Chunks are gathered on the host in batches of 1, 2, 4, ... chunks (multi-process: one
        global-array transfer per batch) and dispatched without waiting: the device starts
        after the first chunk, the host gathers the next while it computes. Returns
        (accumulator, per-chunk outputs).
        """
        labels = partial.label_tree(state.variables, self.spec.param_filter)
        fed = partial.select(state.variables, labels, partial.FEDERATED)
        local_like = partial.select(state.variables, labels, partial.LOCAL)
        devices = self.mesh.devices.size
        mine = mesh_lib.process_rows(self.mesh, devices)
        weight0 = np.zeros(mine.stop - mine.start, np.float32)
        if mine.start == 0:  # clients that train nothing: weight, no delta (drop_remainder)
            weight0[0] = idle_weight
        accum = mesh_lib.shard_clients(Accumulator(
            jax.tree.map(lambda x: np.zeros((len(weight0),) + x.shape, np.float32), fed),
            weight0, np.zeros(len(weight0), np.int32), np.zeros(len(weight0), np.int32)),
            self.mesh, devices)
        key = mesh_lib.replicate(np.asarray(key), self.mesh)
        k = self.packing.clients_per_call
        rows = mesh_lib.process_rows(self.mesh, k)

        def local_of(ids):
            if local_store is not None:
                return local_store.gather(ids)
            # No store (compile()): every client starts from the state's LOCAL leaves.
            return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (len(ids),) + x.shape),
                                local_like)

        outputs, begin, size = [], 0, 1
        while begin < len(chunks):
            batch = chunks[begin:begin + size]
            begin, size = begin + size, 2 * size
            host = [self._host_chunk(population, c, local_of, seed=seed,
                                     round_index=round_index, rows=rows) for c in batch]
            if jax.process_count() > 1:  # global arrays from each process's rows
                host = mesh_lib.shard_clients(host, self.mesh, k)
            # One process: host arrays go to the jitted call as they are; its C++ dispatch puts
            # them on the devices by the compiled input sharding (measured, tiny MLP, 100
            # clients: 0.13 s CPU per round vs 0.25 s with a batched device_put per batch).
            for chunk in host:
                if self.spec.backend.steps_per_call:
                    accum, out = self._segmented_chunk(accum, state, chunk, key)
                else:
                    accum, out = client_chunk(accum, state, chunk["chunk"], chunk["local"], key,
                                              spec=self.spec)
                outputs.append(out)
        return accum, outputs

    def _host_chunk(self, population, chunk_plan, local_of, *, seed, round_index, rows):
        """One chunk's host arrays: {'chunk', 'local'} or, for segmented rounds, {'clients',
        'segments', 'local'}."""
        packed = materialize_chunk(population, chunk_plan, self.packing, seed=seed,
                                   round_index=round_index, rows=rows)
        clients = {"client_ids": packed.client_ids.astype(np.int32),
                   "num_examples": packed.num_examples.astype(np.int32),
                   "weight": _chunk_weights(chunk_plan, rows)}
        local = local_of(packed.client_ids)
        if self.spec.backend.steps_per_call:
            return {"clients": clients, "local": local,
                    "segments": list(segments(packed, self.spec.backend.steps_per_call))}
        chunk = {"data": packed.data, "mask": packed.mask, **clients}
        if packed.tail_mask is not None:
            chunk.update(tail_data=packed.tail_data, tail_mask=packed.tail_mask)
        return {"chunk": chunk, "local": local}

    def _segmented_chunk(self, accum, state, chunk, key):
        """One chunk as client_begin, client_steps per segment of steps, client_end."""
        carry = client_begin(state, chunk["clients"], chunk["local"], key, spec=self.spec)
        metrics = None
        for segment in chunk["segments"]:
            carry, m = client_steps(carry, segment, spec=self.spec)
            metrics = m if metrics is None else jax.tree.map(jnp.add, metrics, m)
        return client_end(accum, state, carry, chunk["clients"], metrics, spec=self.spec)

    def _report(self, plan, outputs, ok, stats, round_index) -> RoundResult:
        ids = np.concatenate([c.client_ids for c in plan.chunks])
        n = np.concatenate([c.num_examples for c in plan.chunks])
        # One device-to-host copy for the round's verdict, DP stats and every chunk's metrics.
        ok, stats, metrics, finite = mesh_lib.to_host((ok, stats, [o[1] for o in outputs],
                                                       [o[2] for o in outputs]))
        ok = bool(ok)
        dp = None
        if self.dp is not None:
            mech, clip = self.server_spec.dp, float(stats["clip_norm"])
            contributed = float(stats["contributed"])
            dp = {"epsilon": self.ledger.epsilon(round_index + 1), "delta": self.ledger.delta,
                  "noise_multiplier": mech.noise_multiplier, "clip_norm": clip,
                  "noise_std": mech.delta_noise * clip if mech.delta_noise else 0.0,
                  "clipped_fraction": int(stats["clipped"]) / max(contributed, 1.0),
                  "unclipped_fraction": float(stats["unclipped_fraction"])}
        real = ids >= 0
        per_client = {name: np.concatenate([m[name] for m in metrics])[real]
                      for name in (metrics[0] if metrics else {})}
        finite = np.concatenate(finite)[real]
        bad = ids[real][~finite].tolist()
        return RoundResult(ok=ok, client_ids=ids[real], num_examples=n[real], metrics=per_client,
                           totals={k: float(v[finite].sum()) for k, v in per_client.items()},
                           nonfinite_client_ids=bad, padding_efficiency=plan.padding_efficiency,
                           client_updates=plan.client_updates,
                           useful_examples=plan.useful_examples, layout=dict(self.layout),
                           dp=dp)

    def _store_local(self, store, plan, outputs, result):
        """Writes the trained LOCAL subtrees of this process's finite clients back."""
        rows = mesh_lib.process_rows(self.mesh, self.packing.clients_per_call)
        for chunk_plan, out in zip(plan.chunks, outputs, strict=True):
            ids = chunk_plan.client_ids[rows]
            keep = (ids >= 0) & np.isin(ids, result.nonfinite_client_ids, invert=True)
            new_local = jax.tree.map(lambda x, k=keep: mesh_lib.local_rows(x)[k], out[0])
            store.scatter(ids[keep], new_local)
