"""The 'clients' mesh axis and feeding it, on one host or many.

Chunks are laid out [K clients, ...] with NamedSharding(mesh, P('clients')): device i of the
mesh computes rows [i*K/D, (i+1)*K/D) of every chunk, and the weighted sum of client deltas is a
psum over the axis. Multi-host: call `initialize_distributed` (jax.distributed.initialize) in
every process; every process runs the same host loop over the same plan (plans depend on client
ids and sizes only), materializes just the rows its devices compute (`process_rows`) and builds
global arrays with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

CLIENTS = "clients"


def clients_mesh(devices=None) -> Mesh:
    """A 1-D mesh over `devices` (default: all devices of all processes) named 'clients'."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("clients_mesh: no devices given")
    return Mesh(np.asarray(devices), (CLIENTS,))


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           *, cpu_collectives: str = "gloo") -> None:
    """jax.distributed.initialize, with CPU collectives enabled (for CPU-only multi-process).

    The one path of `fer_jax.main --distributed` and the multi-process test. Arguments left
    None come from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID when set, else
    from JAX's own discovery (Cloud TPU, SLURM, ...).
    """
    env = os.environ
    if coordinator_address is None and "JAX_COORDINATOR_ADDRESS" in env:
        coordinator_address = env["JAX_COORDINATOR_ADDRESS"]
        num_processes = int(env["JAX_NUM_PROCESSES"]) if num_processes is None else num_processes
        process_id = int(env["JAX_PROCESS_ID"]) if process_id is None else process_id
    if jax.config.jax_platforms in (None, "", "cpu"):
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)


def process_rows(mesh: Mesh, num_clients: int) -> slice:
    """The contiguous rows of a [num_clients] chunk that this process's devices compute."""
    devices = list(mesh.devices.flat)
    if num_clients % len(devices):
        raise ValueError(f"chunk of {num_clients} clients does not split over {len(devices)} "
                         "devices of the 'clients' axis")
    per = num_clients // len(devices)
    mine = [i for i, d in enumerate(devices) if d.process_index == jax.process_index()]
    if not mine or mine != list(range(mine[0], mine[-1] + 1)):
        raise ValueError("this process's devices must be contiguous on the 'clients' axis")
    return slice(mine[0] * per, (mine[-1] + 1) * per)


def shard_clients(tree, mesh: Mesh, num_clients: int):
    """Global arrays [num_clients, ...] sharded over 'clients' from this process's rows.

    One process: a single batched `device_put` of the whole tree (one transfer; the per-array
    `make_array_from_process_local_data` it replaces was most of a small model's round).
    """
    sharding = NamedSharding(mesh, P(CLIENTS))
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x, (num_clients,) + x.shape[1:])

    return jax.tree.map(put, tree)


def replicate(tree, mesh: Mesh):
    """Every leaf replicated on all devices of the mesh (the server state, keys, accumulators)."""
    sharding = NamedSharding(mesh, P())
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def to_host(tree):
    """NumPy copies of (possibly multi-host sharded) global arrays, gathered to every process.
    One process: one batched `jax.device_get` of the whole tree."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, jax.device_get(tree))

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.sharding.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(get, tree)


def local_rows(x) -> np.ndarray:
    """This process's rows of an array sharded over 'clients' (all rows on one process)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    seen, parts = set(), []
    for shard in shards:
        start = shard.index[0].start or 0
        if start not in seen:  # replicas of the same rows on several local devices
            seen.add(start)
            parts.append(np.asarray(shard.data))
    return np.concatenate(parts)
