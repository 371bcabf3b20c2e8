"""The federated round: client chunks (vmap x unrolled groups x scan over local steps) + server.

One round = a host loop over the fixed-shape chunks of a `CohortPlan`, each a call of the jitted
`client_chunk` that adds its clients' weighted deltas into a donated on-device accumulator, then
one jitted `server_update`. The host never touches a single client and never waits on the device
inside the loop (it materializes the next chunk while the device computes). With
clients_per_call = cohort size and one step bucket the round is one client_chunk call.
Inside a chunk, each device of the 'clients' mesh axis (shard_map) takes its K/D clients in
groups of `vmap_width` computed together by vmap; groups follow each other in a lax.scan
(unroll it for convolutional models on CPU: rolled loops around convolution weight
gradients are ~100x slower on XLA:CPU, see PERF_NOTES.md); each client's local steps are a
lax.scan. The device partial sums are psum'ed over the axis (an all-reduce, across hosts too).
Padding: padded examples are masked in the method's loss; steps whose mask is all False are
skipped (state kept); padding clients and empty clients have weight 0. A client whose delta or
metrics are not finite gets weight 0; with on_nonfinite='raise' the server state is kept as it
was and `NonFiniteClientError` names the clients (and carries the intact state).
"""

from __future__ import annotations

import dataclasses
import functools
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
from fer_jax.federated import mesh as mesh_lib
from fer_jax.federated.client import ClientMethod
from fer_jax.federated.packing import CohortPlan, PackingConfig, materialize_chunk, plan_cohort
from fer_jax.federated.population import Population

WEIGHTINGS = ("num_examples", "uniform")
ON_NONFINITE = ("raise", "drop")


@flax.struct.dataclass
class ServerState:
    """What the server keeps between rounds (a pytree: checkpoint it with orbax as is).

    variables: the full model variables (federated + frozen; local leaves hold the template that
      a client starts from on its first visit). opt_state: server optimizer state over the
      federated subtree. round: int32 scalar, the number of completed rounds.
    """

    variables: Any
    opt_state: Any
    round: jax.Array


@flax.struct.dataclass
class Accumulator:
    """Running sums of one round on device: sum_c w_c delta_c, sum_c w_c, #non-finite clients."""

    delta_sum: Any
    weight_sum: jax.Array
    nonfinite: jax.Array


@dataclasses.dataclass(frozen=True)
class RoundBackend:
    """How clients are laid onto the hardware (results agree to float tolerance across choices).

    vmap_width: clients per device computed together with vmap (1 = one at a time).
    step_unroll / group_unroll: `unroll` of the local-step scan and of the scan over vmap groups
      (True = full). Rolled loops compile fastest (the default). Measured on the 2-core CPU
      (benchmarks/federated_throughput.py): small CNN
      wants vmap_width=1 with everything unrolled, and few clients per call; a small MLP wants a
      wide vmap. On GPU/TPU use vmap_width = clients_per_call / devices and rolled scans.
    """

    vmap_width: int = 1
    step_unroll: int | bool = 1
    group_unroll: int | bool = 1

    def __post_init__(self):
        if self.vmap_width < 1:
            raise ValueError(f"vmap_width must be >= 1, got {self.vmap_width}")


@dataclasses.dataclass(frozen=True)
class ClientSpec:
    """Static part of `client_chunk`; equal specs share compiled code (the method, filter and
    optimizer hash by identity, so reuse those objects across engines to reuse compilations)."""

    method: ClientMethod
    param_filter: partial.ParamFilter
    backend: RoundBackend
    mesh: Mesh
    weighting: str


@dataclasses.dataclass(frozen=True)
class ServerSpec:
    """Static part of `server_update`."""

    server_optimizer: optax.GradientTransformation
    param_filter: partial.ParamFilter
    on_nonfinite: str


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
    XLA:CPU's ~30-100x slower path (PERF_NOTES.md). Measured: a 4-client round of the small
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


def _client_update(spec: ClientSpec, variables, labels, local, c, rkey):
    """One client: init, scan over local steps (all-padding steps skipped), final, delta.

    c: this client's rows of the chunk ('data', 'mask', 'client_ids', 'num_examples', and with
    tail batches 'tail_data', 'tail_mask').
    """
    trainable = partial.trainable_mask(labels)
    ckey = sampling.client_key(rkey, c["client_ids"])
    init_key, step_key = jax.random.split(ckey)
    state = spec.method.init(partial.merge(variables, local), trainable, init_key)

    def body(carry, xs):
        batch, m, i = xs
        new, metrics = spec.method.step(carry, batch, m, jax.random.fold_in(step_key, i))
        live = jnp.any(m)
        # A step of pure padding must not move momentum or counters: keep the old state.
        metrics = jax.tree.map(lambda v: jnp.where(live, v, 0).astype(jnp.float32), metrics)
        return _tree_where(live, new, carry), metrics

    unroll = spec.backend.step_unroll
    if "tail_mask" not in c:
        steps = c["mask"].shape[0]
        state, step_metrics = _scan(body, state, (c["data"], c["mask"], jnp.arange(steps)),
                                    unroll)
        metrics = jax.tree.map(lambda v: v.sum(0), step_metrics)
    else:
        # Epoch e: its full steps, then its tail step. Step e * spe + j has the key of step
        # e * spe + j of the default layout (spe = ceil(n / B) steps per epoch).
        full = c["mask"].shape[1]
        spe = -(-c["num_examples"] // c["mask"].shape[-1])

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
    out = spec.method.final(state)
    server_fed = partial.select(variables, labels, partial.FEDERATED)
    delta = jax.tree.map(jnp.subtract, partial.select(out, labels, partial.FEDERATED), server_fed)
    new_local = partial.select(out, labels, partial.LOCAL)
    finite = _all_finite(delta) & _all_finite(metrics) & _all_finite(new_local)
    return delta, new_local, metrics, finite


def _weights(spec: ClientSpec, num_examples, client_ids):
    live = (num_examples > 0) & (client_ids >= 0)
    w = num_examples.astype(jnp.float32) if spec.weighting == "num_examples" else 1.0
    return jnp.where(live, w, 0.0)


def _device_chunk(spec: ClientSpec, accum, state, chunk, local, key):
    """This device's K/D clients of a chunk: groups of vmap_width, partial sums, psum."""
    variables = state.variables
    labels = partial.label_tree(variables, spec.param_filter)
    rkey = sampling.round_key(key, state.round)
    n = chunk["client_ids"].shape[0]
    width = min(spec.backend.vmap_width, n)
    if n % width:
        raise ValueError(f"{n} clients per device do not split into vmap groups of {width}")
    grouped = jax.tree.map(lambda x: x.reshape((n // width, width) + x.shape[1:]),
                           (chunk, local))

    def one(local_c, c):
        return _client_update(spec, variables, labels, local_c, c, rkey)

    def group(carry, xs):
        g, loc = xs
        if width == 1:
            # No vmap for one client: keeps plain (not grouped) convolutions on CPU.
            out = one(*jax.tree.map(lambda x: x[0], (loc, g)))
            out = jax.tree.map(lambda x: x[None], out)
        else:
            out = jax.vmap(one)(loc, g)
        delta, new_local, metrics, finite = out
        w = _weights(spec, g["num_examples"], g["client_ids"])
        use = jnp.where(finite, w, 0.0)
        d_sum, w_sum = aggregate.weighted_sum(delta, use)
        bad = jnp.sum((~finite) & (w > 0)).astype(jnp.int32)
        carry = Accumulator(jax.tree.map(jnp.add, carry.delta_sum, d_sum),
                            carry.weight_sum + w_sum, carry.nonfinite + bad)
        return carry, (new_local, metrics, finite)

    zero = Accumulator(jax.tree.map(jnp.zeros_like, accum.delta_sum), jnp.zeros((), jnp.float32),
                       jnp.zeros((), jnp.int32))
    part, outs = _scan(group, zero, grouped, spec.backend.group_unroll)
    total = jax.lax.psum(part, mesh_lib.CLIENTS)
    accum = Accumulator(jax.tree.map(jnp.add, accum.delta_sum, total.delta_sum),
                        accum.weight_sum + total.weight_sum, accum.nonfinite + total.nonfinite)
    outs = jax.tree.map(lambda x: x.reshape((n,) + x.shape[2:]), outs)
    return accum, outs


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("accum",))
def client_chunk(accum, state, chunk, local, key, *, spec: ClientSpec):
    """Adds one chunk's weighted client deltas into `accum` (donated).

    chunk: {'data': {k: [K, S, B, ...]}, 'mask': [K, S, B], 'client_ids': [K],
    'num_examples': [K]} (with tail batches [K, E, S, B, ...] data and mask plus 'tail_data' /
    'tail_mask' [K, E, T, ...]) sharded over 'clients'; local: the clients' LOCAL subtrees [K, ...].
    Returns (accum, (new_local [K, ...], metric sums {k: [K]}, finite [K])).
    """
    fn = jax.shard_map(functools.partial(_device_chunk, spec), mesh=spec.mesh,
                       in_specs=(P(), P(), P(mesh_lib.CLIENTS), P(mesh_lib.CLIENTS), P()),
                       out_specs=(P(), P(mesh_lib.CLIENTS)), check_vma=False)
    return fn(accum, state, chunk, local, key)


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("state",))
def server_update(state: ServerState, accum: Accumulator, *, spec: ServerSpec):
    """Applies the server optimizer to -mean(delta); keeps `state` when the round failed.

    Failed = total weight 0, or (on_nonfinite='raise') any weighted client non-finite.
    Returns (state, ok).
    """
    labels = partial.label_tree(state.variables, spec.param_filter)
    fed = partial.select(state.variables, labels, partial.FEDERATED)
    ok = accum.weight_sum > 0
    if spec.on_nonfinite == "raise":
        ok &= accum.nonfinite == 0
    total = jnp.where(ok, accum.weight_sum, 1.0)
    # Pseudo-gradient of Reddi et al. (2021): the negated weighted-mean client delta.
    grads = jax.tree.map(lambda s, p: (-s / total).astype(p.dtype), accum.delta_sum, fed)
    updates, opt_state = spec.server_optimizer.update(grads, state.opt_state, fed)
    new = ServerState(partial.merge(state.variables, optax.apply_updates(fed, updates)),
                      opt_state, state.round + 1)
    return _tree_where(ok, new, state), ok


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


class FederatedEngine:
    """Host-side owner of a run's static configuration and the round loop.

    Typical driver: engine = FederatedEngine(method, ...); state = engine.init(variables);
    for r: ids = sampler.sample(seed, r); plan = engine.plan(population, ids);
    state, result = engine.run_round(state, population, plan, key, seed=seed); log result.
    """

    def __init__(self, method: ClientMethod, *, server_optimizer=None,
                 param_filter: partial.ParamFilter = partial.federate_all,
                 packing: PackingConfig | None = None, backend: RoundBackend | None = None,
                 weighting: str = "num_examples", on_nonfinite: str = "raise",
                 mesh: Mesh | None = None):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting {weighting!r} is not one of {WEIGHTINGS}")
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite {on_nonfinite!r} is not one of {ON_NONFINITE}")
        packing = PackingConfig() if packing is None else packing
        backend = RoundBackend() if backend is None else backend
        mesh = mesh_lib.clients_mesh() if mesh is None else mesh
        per_call = mesh.devices.size * min(backend.vmap_width, packing.clients_per_call)
        if packing.clients_per_call % per_call:
            raise ValueError(f"clients_per_call={packing.clients_per_call} must be a multiple of "
                             f"devices ({mesh.devices.size}) x vmap_width ({backend.vmap_width})")
        self.packing = packing
        self.spec = ClientSpec(method, param_filter, backend, mesh, weighting)
        self.server_spec = ServerSpec(server_optimizer or aggregate.server_optimizer("fedavg"),
                                      param_filter, on_nonfinite)

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
        return mesh_lib.replicate(jax.tree.map(np.array, state), self.mesh)

    def place(self, state: ServerState) -> ServerState:
        """A (restored) server state copied onto this engine's mesh, replicated."""
        return mesh_lib.replicate(jax.tree.map(np.array, state), self.mesh)

    def local_template(self, variables):
        """The LOCAL subtree of `variables`: what a client starts from on its first round."""
        labels = partial.label_tree(variables, self.spec.param_filter)
        return partial.select(variables, labels, partial.LOCAL)

    def plan(self, population: Population, client_ids) -> CohortPlan:
        """The chunk plan of a cohort (depends on ids and sizes only; identical on every host)."""
        ids = np.asarray(client_ids, dtype=np.int64)
        if ids.size == 0:
            raise ValueError("empty cohort: no client ids given")
        return plan_cohort(ids, population.sizes(ids), self.packing)

    def run_round(self, state: ServerState, population: Population, plan: CohortPlan,
                  key: jax.Array, *, seed: int = 0, local_store=None):
        """Runs one round; `state` is donated. Returns (new state, RoundResult).

        key: the run's base key (the same every round; the round number is folded in on
        device). seed: shuffles client examples per (seed, round). local_store: a
        `LocalStore` for LOCAL leaves (required when the filter has any).
        """
        if not plan.chunks:
            raise ValueError("empty cohort: the plan has no chunk to compute")
        if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)
        round_index = int(mesh_lib.to_host(state.round))
        labels = partial.label_tree(state.variables, self.spec.param_filter)
        has_local = bool(jax.tree.leaves(partial.select(state.variables, labels, partial.LOCAL)))
        if has_local and local_store is None:
            raise ValueError("the parameter filter has LOCAL variables: pass a local_store")
        fed = partial.select(state.variables, labels, partial.FEDERATED)
        accum = mesh_lib.replicate(Accumulator(
            jax.tree.map(lambda x: np.zeros(x.shape, np.float32), fed), np.float32(0), np.int32(0)),
            self.mesh)
        key = mesh_lib.replicate(np.asarray(key), self.mesh)
        k = self.packing.clients_per_call
        rows = mesh_lib.process_rows(self.mesh, k)
        outputs = []
        for chunk_plan in plan.chunks:
            packed = materialize_chunk(population, chunk_plan, self.packing, seed=seed,
                                       round_index=round_index, rows=rows)
            local = local_store.gather(packed.client_ids) if has_local else {}
            chunk = {"data": packed.data, "mask": packed.mask,
                     "client_ids": packed.client_ids.astype(np.int32),
                     "num_examples": packed.num_examples.astype(np.int32)}
            if packed.tail_mask is not None:
                chunk.update(tail_data=packed.tail_data, tail_mask=packed.tail_mask)
            chunk, local = mesh_lib.shard_clients((chunk, local), self.mesh, k)
            accum, out = client_chunk(accum, state, chunk, local, key, spec=self.spec)
            outputs.append(out)
        state, ok = server_update(state, accum, spec=self.server_spec)
        result = self._report(plan, outputs, bool(mesh_lib.to_host(ok)))
        if has_local and result.ok:
            self._store_local(local_store, plan, outputs, result)
        if not result.ok:
            if result.nonfinite_client_ids:
                raise NonFiniteClientError(result.nonfinite_client_ids, state, result)
            raise ValueError("round failed: the total client weight is zero")
        return state, result

    def _report(self, plan, outputs, ok) -> RoundResult:
        ids = np.concatenate([c.client_ids for c in plan.chunks])
        n = np.concatenate([c.num_examples for c in plan.chunks])
        metrics, finite = mesh_lib.to_host(([o[1] for o in outputs], [o[2] for o in outputs]))
        real = ids >= 0
        per_client = {name: np.concatenate([m[name] for m in metrics])[real]
                      for name in (metrics[0] if metrics else {})}
        finite = np.concatenate(finite)[real]
        bad = ids[real][~finite].tolist()
        return RoundResult(ok=ok, client_ids=ids[real], num_examples=n[real], metrics=per_client,
                           totals={k: float(v[finite].sum()) for k, v in per_client.items()},
                           nonfinite_client_ids=bad, padding_efficiency=plan.padding_efficiency,
                           client_updates=plan.client_updates,
                           useful_examples=plan.useful_examples)

    def _store_local(self, store, plan, outputs, result):
        """Writes the trained LOCAL subtrees of this process's finite clients back."""
        rows = mesh_lib.process_rows(self.mesh, self.packing.clients_per_call)
        for chunk_plan, out in zip(plan.chunks, outputs, strict=True):
            ids = chunk_plan.client_ids[rows]
            keep = (ids >= 0) & np.isin(ids, result.nonfinite_client_ids, invert=True)
            new_local = jax.tree.map(lambda x, k=keep: mesh_lib.local_rows(x)[k], out[0])
            store.scatter(ids[keep], new_local)
