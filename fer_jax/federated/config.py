"""The engine from a config's `fed` block: one validator, one builder, one rule for devices.

Every experiment builds its engines here, so every knob means the same thing everywhere:
  fed.server_optimizer / fed.server_learning_rate   the server's optax optimizer (0 = default)
  fed.client_optimizer / fed.client_learning_rate / fed.client_momentum
  fed.batch_size, fed.local_epochs | fed.local_steps, fed.tail_multiple, fed.drop_remainder
    packing (local_steps > 0: that many steps per client, whatever its size)
  fed.clients_per_call, fed.vmap_width, fed.unroll, fed.steps_per_call, fed.layout   the backend
    (layout 'auto', the default: the engine picks clients per call, vmap width, unrolling and,
    for convolutions on CPU, one step per call at the first round; 'fixed': the knobs as set)
  fed.num_devices                    devices of the 'clients' mesh (0 = all)
  fed.weighting, fed.prox_mu
  fed.dp.*                           client-level DP-FedAvg (fer_jax.federated.dp): enabled,
    clip_norm, noise_multiplier | target_epsilon (for fed.rounds), delta (None = 1 / N^1.1),
    target_quantile / clip_learning_rate / clip_count_stddev (adaptive clipping); needs
    fed.weighting = 'uniform'
The rule for devices: every device of the 'clients' mesh takes at least `vmap_width` clients per
call, so clients_per_call is rounded up to a multiple of devices x vmap_width (logged). A
config without a key gets the default of `fed_defaults()` (configs/common.py writes the same).
"""

from __future__ import annotations

import jax
import optax
from absl import logging

from fer_jax.federated import aggregate, packing, partial
from fer_jax.federated import dp as dp_lib
from fer_jax.federated import mesh as mesh_lib
from fer_jax.federated.client import ClientMethod
from fer_jax.federated.round import LAYOUTS, WEIGHTINGS, FederatedEngine, RoundBackend

PARTITIONS = ("subject", "iid", "dirichlet")
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi")
CLIENT_OPTIMIZERS = ("sgd", "adam")


def fed_defaults() -> dict:
    """Every key of a `fed` block and its default (configs/common.py:fed_config mirrors it)."""
    return dict(partition="subject", num_clients=100, dirichlet_alpha=0.5, rounds=100,
                cohort_size=10, server_optimizer="fedavg", server_learning_rate=0.0,
                client_optimizer="sgd", client_learning_rate=0.05, client_momentum=0.0,
                local_epochs=1, batch_size=16, weighting="num_examples", prox_mu=0.0,
                clients_per_call=1, tail_multiple=0, vmap_width=1, unroll=True,
                steps_per_call=0, num_devices=0, drop_remainder=False, local_steps=0,
                layout="auto",
                dp=dp_defaults())


def dp_defaults() -> dict:
    """The `fed.dp` block (None: unset). Exactly one of noise_multiplier and target_epsilon."""
    return dict(enabled=False, clip_norm=1.0, noise_multiplier=None, target_epsilon=None,
                delta=None, target_quantile=None, clip_learning_rate=0.2,
                clip_count_stddev=None)


def _get(fed, name):
    return fed.get(name, fed_defaults()[name])


def validate(config, check, *, partitions: bool = True) -> None:
    """Checks `config.fed` (check(ok, 'fed.x', expected) raises naming the field)."""
    fed = config.fed
    if partitions:
        check(_get(fed, "partition") in PARTITIONS, "fed.partition", f"one of {PARTITIONS}")
        check(_get(fed, "partition") != "subject" or config.data.name in ("synthetic", "ckplus48"),
              "fed.partition", "iid or dirichlet for datasets without subject ids (FER-2013)")
        check(_get(fed, "num_clients") >= 1, "fed.num_clients", ">= 1")
        check(_get(fed, "dirichlet_alpha") > 0, "fed.dirichlet_alpha", "> 0")
    for name in ("rounds", "cohort_size", "batch_size", "local_epochs", "clients_per_call",
                 "vmap_width"):
        if name in fed:
            check(fed[name] >= 1, f"fed.{name}", ">= 1")
    check(_get(fed, "server_optimizer") in SERVER_OPTIMIZERS, "fed.server_optimizer",
          f"one of {SERVER_OPTIMIZERS}")
    check(_get(fed, "server_learning_rate") >= 0, "fed.server_learning_rate",
          ">= 0 (0 = the server optimizer's default)")
    check(_get(fed, "client_optimizer") in CLIENT_OPTIMIZERS, "fed.client_optimizer",
          f"one of {CLIENT_OPTIMIZERS}")
    check(_get(fed, "client_learning_rate") > 0, "fed.client_learning_rate", "> 0")
    check(_get(fed, "weighting") in WEIGHTINGS, "fed.weighting", f"one of {WEIGHTINGS}")
    check(_get(fed, "prox_mu") >= 0, "fed.prox_mu", ">= 0")
    check(_get(fed, "steps_per_call") >= 0, "fed.steps_per_call", ">= 0 (0 = one call)")
    check(_get(fed, "num_devices") >= 0, "fed.num_devices", ">= 0 (0 = every device)")
    check(_get(fed, "layout") in LAYOUTS, "fed.layout", f"one of {LAYOUTS}")
    if _get(fed, "layout") == "auto":  # the engine chooses these: a set value would be ignored
        for name in ("clients_per_call", "vmap_width", "unroll"):
            check(_get(fed, name) == fed_defaults()[name], f"fed.{name}",
                  f"{fed_defaults()[name]} (its default) with fed.layout='auto', which chooses "
                  f"it; set fed.layout='fixed' to use {_get(fed, name)!r}")
    check(not (_get(fed, "drop_remainder") and _get(fed, "tail_multiple")), "fed.drop_remainder",
          "False with fed.tail_multiple > 0 (dropping the partial batch leaves no tail step)")
    steps = _get(fed, "local_steps")
    check(steps >= 0, "fed.local_steps", ">= 0 (0 = fed.local_epochs passes over the data)")
    check(not steps or (_get(fed, "local_epochs") == 1 and not _get(fed, "tail_multiple")),
          "fed.local_steps", "0 unless fed.local_epochs = 1 and fed.tail_multiple = 0 (a fixed "
          "number of steps per client replaces both)")
    batch = _get(fed, "batch_size")
    check(0 <= _get(fed, "tail_multiple") <= batch, "fed.tail_multiple",
          f"in [0, fed.batch_size={batch}] (0 = pad the last batch to the batch size)")
    validate_dp(config, check, partitions=partitions)


def _dp_get(fed, name):
    dp = fed.get("dp", None) or {}
    value = dp.get(name, None)
    return dp_defaults()[name] if value is None else value


def validate_dp(config, check, *, partitions: bool = True) -> None:
    """Checks `config.fed.dp` when enabled; with a target epsilon and a known population
    (iid / dirichlet partitions: fed.num_clients) also that the target can be reached."""
    fed = config.fed
    if not _dp_get(fed, "enabled"):
        return
    check(_get(fed, "weighting") == "uniform", "fed.weighting",
          "'uniform' with fed.dp.enabled (each client must move the sum by at most the clip norm)")
    check(_dp_get(fed, "clip_norm") > 0, "fed.dp.clip_norm", "> 0 (inf: no clipping)")
    z, eps = _dp_get(fed, "noise_multiplier"), _dp_get(fed, "target_epsilon")
    check((z is None) != (eps is None), "fed.dp.noise_multiplier",
          "exactly one of fed.dp.noise_multiplier and fed.dp.target_epsilon set")
    if z is not None:
        check(z >= 0, "fed.dp.noise_multiplier", ">= 0")
    if eps is not None:
        check(eps > 0, "fed.dp.target_epsilon", "> 0")
    delta = _dp_get(fed, "delta")
    if delta is not None:
        check(0 < delta < 1, "fed.dp.delta", "in (0, 1) (unset: 1 / N^1.1)")
    q = _dp_get(fed, "target_quantile")
    if q is not None:
        check(0 < q < 1, "fed.dp.target_quantile", "in (0, 1) (unset: a fixed clip norm)")
    check(_dp_get(fed, "clip_learning_rate") > 0, "fed.dp.clip_learning_rate", "> 0")
    sb = _dp_get(fed, "clip_count_stddev")
    if sb is not None:
        check(sb > 0, "fed.dp.clip_count_stddev", "> 0 (unset: cohort size / 20)")
    if eps is not None and partitions and _get(fed, "partition") in ("iid", "dirichlet"):
        n = _get(fed, "num_clients")
        m = min(_get(fed, "cohort_size"), n)
        rounds = _get(fed, "rounds")
        delta = delta if delta is not None else dp_lib.default_delta(n)
        floor = dp_lib.epsilon(n, m, dp_lib.MAX_NOISE_MULTIPLIER, rounds, delta)
        check(floor <= eps, "fed.dp.target_epsilon",
              f"reachable in fed.rounds={rounds} rounds of {m} of {n} clients at delta="
              f"{delta:.3g}: even noise_multiplier={dp_lib.MAX_NOISE_MULTIPLIER:g} gives epsilon="
              f"{floor:.4g}")


def dp_config(fed) -> dp_lib.DPConfig | None:
    """The engine's DPConfig from `fed.dp` (None when disabled); target_epsilon is planned
    for fed.rounds."""
    if not _dp_get(fed, "enabled"):
        return None
    return dp_lib.DPConfig(
        clip_norm=float(_dp_get(fed, "clip_norm")),
        noise_multiplier=_dp_get(fed, "noise_multiplier"),
        target_epsilon=_dp_get(fed, "target_epsilon"), delta=_dp_get(fed, "delta"),
        rounds=_get(fed, "rounds"), target_quantile=_dp_get(fed, "target_quantile"),
        clip_learning_rate=_dp_get(fed, "clip_learning_rate"),
        clip_count_stddev=_dp_get(fed, "clip_count_stddev"))


def client_optimizer(fed) -> optax.GradientTransformation:
    lr = _get(fed, "client_learning_rate")
    if _get(fed, "client_optimizer") == "adam":
        return optax.adam(lr)
    return optax.sgd(lr, momentum=_get(fed, "client_momentum") or None)


def server_optimizer(fed) -> optax.GradientTransformation:
    lr = _get(fed, "server_learning_rate")
    return aggregate.server_optimizer(_get(fed, "server_optimizer"),
                                      **({"learning_rate": lr} if lr > 0 else {}))


def clients_per_call(fed, devices: int | None = None) -> int:
    """fed.clients_per_call rounded up to a multiple of devices x vmap_width."""
    unit = (jax.device_count() if devices is None else devices) * _get(fed, "vmap_width")
    wanted = _get(fed, "clients_per_call")
    per_call = -(-wanted // unit) * unit
    if per_call != wanted:
        logging.info("fed.clients_per_call %d -> %d (a multiple of %d devices x vmap_width %d)",
                     wanted, per_call, unit // _get(fed, "vmap_width"), _get(fed, "vmap_width"))
    return per_call


def step_buckets(fed, max_client_size: int) -> tuple[int, ...]:
    """The default step buckets, grown to fit the largest client of the run."""
    batch, tail = _get(fed, "batch_size"), _get(fed, "tail_multiple")
    most = _get(fed, "local_epochs") * -(-max_client_size // batch)
    if _get(fed, "local_steps"):
        most = _get(fed, "local_steps")
    elif tail:  # buckets then bound the full steps of one epoch (0 always allowed)
        most = max(-(-max_client_size // batch) - 1, 1)
    return tuple(b for b in packing.DEFAULT_STEP_BUCKETS if b < most) + (most,)


def build_engine(fed, method: ClientMethod, *, max_client_size: int,
                 param_filter: partial.ParamFilter = partial.federate_all,
                 mesh=None, **overrides) -> FederatedEngine:
    """The engine of `method` with every knob of `fed` honoured (`mesh` overrides
    fed.num_devices). `overrides` replace keys of `fed` for this engine (e.g. FedAffect's
    SimCLR engine: batch_size=repr.batch_size)."""
    if overrides:
        fed = {**{k: _get(fed, k) for k in fed_defaults()}, **overrides}
    if mesh is None:
        n = _get(fed, "num_devices")
        mesh = mesh_lib.clients_mesh(jax.devices()[:n] if n else None)
    devices = mesh.devices.size
    return FederatedEngine(
        method, server_optimizer=server_optimizer(fed), param_filter=param_filter,
        packing=packing.PackingConfig(
            batch_size=_get(fed, "batch_size"), local_epochs=_get(fed, "local_epochs"),
            clients_per_call=clients_per_call(fed, devices),
            step_buckets=step_buckets(fed, max_client_size),
            tail_multiple=_get(fed, "tail_multiple"),
            drop_remainder=_get(fed, "drop_remainder"), local_steps=_get(fed, "local_steps")),
        backend=RoundBackend(vmap_width=_get(fed, "vmap_width"), step_unroll=_get(fed, "unroll"),
                             group_unroll=_get(fed, "unroll"),
                             steps_per_call=_get(fed, "steps_per_call"),
                             layout=_get(fed, "layout")),
        weighting=_get(fed, "weighting"), mesh=mesh, dp=dp_config(fed))
