"""The one centralized loop and the one federated loop, and batched prediction over a split.

Both loops are deterministic functions of (config, seed, step / round), so a run resumed from a
checkpoint replays exactly what an uninterrupted one would, and both log through the same
metric names: `train/<name>` = sum / count for a method's `<name>_sum` metrics, `train/accuracy`
= correct / count.

Centralized = the method's client on the pooled training set: `PooledOrder` is the engine's own
shuffle of one client holding every example (epoch e = that client's order in round e,
drop-remainder batches), and the keys are the engine's keys of client 0 in round 0. So
`mode=centralized` and a one-client federated round take the same first step (tested per method).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from fer_jax import federated as fl
from fer_jax.federated import population as population_lib
from fer_jax.federated import sampling
from fer_jax.io.progress import Progress

# ---------------------------------------------------------------------------------------------
# Prediction


def predict_batches(fn, images: np.ndarray, batch_size: int):
    """fn over `images` in batches of a fixed shape (the last one padded, one compile).

    fn(images[B]) returns logits-like arrays (or a dict of them) whose example axis is the
    second to last one ([B, K], ESR's [branches, B, K]); the result concatenates them.
    """
    parts = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        n = len(x)
        if n < batch_size:
            x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), x.dtype)])
        parts.append(jax.tree.map(lambda v, n=n: np.asarray(v)[..., :n, :], fn(x)))
    return jax.tree.map(lambda *v: np.concatenate(v, axis=-2), *parts)


def step_metrics(sums: dict, steps: int = 1) -> dict:
    """`train/*` means of summed metrics: x_sum / count, *correct / count (accuracies), others
    / steps."""
    count = max(float(sums.get("count", 0.0)), 1.0)
    out = {}
    for k, v in sums.items():
        if k.endswith("_sum"):
            out[f"train/{k[:-4]}"] = float(v) / count
        elif k.endswith("correct"):  # correct -> accuracy, d_correct -> d_accuracy
            out[f"train/{k[:-7]}accuracy"] = float(v) / count
        elif k != "count":
            out[f"train/{k}"] = float(v) / steps
    return out


# ---------------------------------------------------------------------------------------------
# Centralized


class PooledOrder:
    """Batches of the pooled training set: epoch e is the engine's shuffle of one client that
    holds all `num_examples` in round e (fer_jax.federated.packing), cut into drop-remainder
    batches of `batch_size`. A function of (seed, step) only."""

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        if batch_size < 1:
            raise ValueError(f"batch size {batch_size}: expected >= 1 (an empty training set "
                             f"of {num_examples} examples?)")
        if num_examples < batch_size:
            raise ValueError(f"training split has {num_examples} examples, fewer than the batch "
                             f"size {batch_size} (config.train.batch_size)")
        self.n, self.batch_size, self.seed = num_examples, batch_size, seed
        self.steps_per_epoch = num_examples // batch_size
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> np.ndarray:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            keys = population_lib.hash_uniform(self.seed, epoch, 0, 0, np.arange(self.n))
            self._epoch, self._perm = epoch, np.argsort(keys, kind="stable")
        return self._perm[i * self.batch_size:(i + 1) * self.batch_size]


def client_keys(key: jax.Array, client_id: int = 0, round_index: int = 0):
    """(init_key, step_key) of a client in a round, exactly as the engine derives them."""
    ckey = sampling.client_key(sampling.round_key(key, round_index), client_id)
    return tuple(jax.random.split(ckey))


def run_key(seed: int) -> jax.Array:
    """The base key of a run's training (the engine folds the round and client ids into it)."""
    return jax.random.PRNGKey(seed + 1)


class PooledLearner:
    """A method's client on pooled data: one client that holds every example and keeps its
    state (optimizer included) from step to step. `step(s)` runs global step s: the rows of
    `PooledOrder` (in the engine's order: augmentation and dropout draw per row) with the key
    the engine gives step s of client 0 in round 0."""

    def __init__(self, method, variables, data: dict, batch_size: int, *, seed: int,
                 trainable: tuple | None = None):
        n = len(next(iter(data.values())))
        self.method, self.data = method, data
        # A learner over no examples can be built (its state carried, e.g. FedAffect's
        # representation encoder when SimCLR is off); stepping it is the error.
        self.order = PooledOrder(n, batch_size, seed) if n else None
        init_key, self.step_key = client_keys(run_key(seed))
        if trainable is None:
            trainable = (True,) * len(jax.tree.leaves(variables))
        # Jitted: an eager init of a large model (ESR-9) dispatches hundreds of small ops; it
        # also copies every leaf, so the donated state never aliases the caller's variables.
        self.state = jax.jit(method.init, static_argnums=1)(variables, tuple(trainable),
                                                            init_key)
        self._mask = jnp.ones((batch_size,), bool)
        self._jitted = {}

    def step(self, step: int, method=None) -> dict:
        """Runs global step `step` (with `method`, default the learner's); its metric sums."""
        method = method or self.method
        if self.order is None:
            raise ValueError("this pooled learner holds no training examples: nothing to step on")
        if method not in self._jitted:
            self._jitted[method] = jax.jit(method.step, donate_argnums=0)
        idx = self.order.indices(step)
        batch = {k: v[idx] for k, v in self.data.items()}
        self.state, metrics = self._jitted[method](self.state, batch, self._mask,
                                                   jax.random.fold_in(self.step_key, step))
        return metrics

    def run(self, start: int, count: int) -> dict:
        """Steps start .. start + count - 1; their summed metrics (host floats)."""
        sums = {}
        for s in range(start, start + count):
            sums = {k: sums.get(k, 0.0) + v for k, v in self.step(s).items()}
        return {k: float(v) for k, v in jax.device_get(sums).items()}

    def variables(self, method=None):
        return (method or self.method).final(self.state)


def centralized(run, method, variables, train: dict, *, batch_size: int, total_steps: int,
                seed: int, log_every: int, eval_every: int = 0,
                evaluate: Callable | None = None,
                method_at: Callable[[int], fl.ClientMethod] | None = None,
                on_switch: Callable | None = None, log_extra: Callable | None = None):
    """Trains `method`'s client on the pooled `train` arrays; returns its final variables.

    train: dict of equally long arrays (e.g. {'image', 'label'}), see `PooledLearner`.
    evaluate(variables, step): called every `eval_every` steps (not at the end).
    method_at(step) -> method: for methods whose step changes during training (ESR's
    progressive stages); on_switch(state, step) -> state runs when it does.
    log_extra(step) -> dict: more scalars for each log line (e.g. the active ESR stage).
    """
    learner = PooledLearner(method, variables, train, batch_size, seed=seed)
    method_at = method_at or (lambda step: method)
    learner.state, start = run.restore(learner.state)
    progress = Progress(total_steps, desc="train", start=start)
    sums, window, t0 = {}, 0, time.perf_counter()
    current = method_at(max(start - 1, 0))  # The method of the last step run before.
    for step in range(start, total_steps):
        m = method_at(step)
        if m is not current:
            current = m
            if on_switch is not None:
                learner.state = on_switch(learner.state, step)
        metrics = learner.step(step, m)
        sums = {k: sums.get(k, 0.0) + v for k, v in metrics.items()}
        window += 1
        done = step + 1
        if done % log_every == 0 or done == total_steps:
            logged = step_metrics(jax.device_get(sums), window)
            if not np.isfinite(logged.get("train/loss", 0.0)):
                raise run.nonfinite(f"training loss became {logged['train/loss']} by step {done}")
            seconds = time.perf_counter() - t0
            run.writer.write(done, {**logged, "train/images_per_s": window * batch_size / seconds,
                                    "train/epoch": done / learner.order.steps_per_epoch,
                                    **(log_extra(step) if log_extra is not None else {})})
            progress.update(done, loss=logged.get("train/loss", float("nan")))
            sums, window, t0 = {}, 0, time.perf_counter()
        if run.checkpointer.should_save(done) or done == total_steps:
            if sums and not np.isfinite(step_metrics(jax.device_get(sums)).get("train/loss", 0)):
                raise run.nonfinite(f"training loss became non-finite by step {done}")
            run.save(done, learner.state, final=True)
        if evaluate is not None and eval_every and done % eval_every == 0 \
                and done != total_steps:
            evaluate(learner.variables(m), done)
    return learner.variables(method_at(max(total_steps - 1, 0)))


# ---------------------------------------------------------------------------------------------
# Federated


def round_metrics(result: fl.RoundResult) -> dict:
    """A round's `train/*` means, `round/*` counters (clients, examples, padding), the
    engine's layout (`layout/clients_per_call`, `vmap_width`, `steps_per_call`: what the
    automatic layout chose) and, with client-level DP, `dp/*` (epsilon so far, clip norm, noise
    std, clipped fraction)."""
    return {**step_metrics(result.totals), "round/clients": result.client_updates,
            "round/examples": result.useful_examples,
            "round/padding_efficiency": result.padding_efficiency, **layout_metrics(result),
            **dp_metrics(result)}


def layout_metrics(result: fl.RoundResult, prefix: str = "layout") -> dict:
    """`{prefix}/clients_per_call`, `vmap_width`, `steps_per_call` (0 = all in one call): the
    layout the round ran (chosen by the engine with layout 'auto')."""
    keys = ("clients_per_call", "vmap_width", "steps_per_call")
    return {f"{prefix}/{k}": int(result.layout[k]) for k in keys
            if result.layout and k in result.layout}


_LAYOUT_LOGGED = weakref.WeakSet()  # engines whose layout was logged


def log_layout(name: str, engine: fl.FederatedEngine) -> None:
    """Logs an engine's layout once per engine (call after a plan(): an automatic layout is
    chosen at the first and fixed from then on; later calls do nothing)."""
    if engine in _LAYOUT_LOGGED:
        return
    _LAYOUT_LOGGED.add(engine)
    layout = engine.layout
    steps = layout.get("steps_per_call") or "all"
    text = (f"{layout['clients_per_call']} clients per call, vmap width {layout['vmap_width']}, "
            f"{steps} local steps per call, unroll {layout['unroll']} ({layout['mode']}: "
            f"{layout.get('source', 'given')}")
    if layout.get("estimated_s_per_round"):
        est = ", ".join(f"{k} {v:.3g} s" for k, v in layout["estimated_s_per_round"].items())
        text += f"; probe's estimated seconds per round {est}"
    logging.info("%s layout: %s)", name, text)


def dp_metrics(result: fl.RoundResult, prefix: str = "dp") -> dict:
    """`{prefix}/epsilon`, clip_norm, noise_std, clipped_fraction (and adaptive clipping's
    unclipped_fraction) of a DP round; {} without DP."""
    if result.dp is None:
        return {}
    keys = ["epsilon", "clip_norm", "noise_std", "clipped_fraction"]
    if np.isfinite(result.dp["unclipped_fraction"]):
        keys.append("unclipped_fraction")
    return {f"{prefix}/{k}": result.dp[k] for k in keys}


def engine_round(run, engine: fl.FederatedEngine, population, *, cohort_size: int, seed: int,
                 local_store=None) -> Callable:
    """round_fn(state, r) -> (state, metrics): one engine round on cohort r (seeded)."""
    sampler = fl.CohortSampler(population.num_clients, min(cohort_size, population.num_clients))
    key = run_key(seed)

    def round_fn(state, r):
        plan = engine.plan(population, sampler.sample(seed, r))
        log_layout("engine", engine)
        try:
            state, result = engine.run_round(state, population, plan, key, seed=seed,
                                             local_store=local_store)
        except fl.NonFiniteClientError as e:
            raise run.nonfinite(f"round {r + 1}: non-finite updates from clients "
                                f"{e.client_ids}; the server state was not changed") from e
        return state, round_metrics(result)

    return round_fn


def _losses(metrics: dict) -> dict:
    """The round's losses for the progress line: train/loss as `loss`, others (FedAffect's
    repr/loss, fewshot/loss) as `repr_loss`, ...; a method without any shows none."""
    return {("loss" if k == "train/loss" else k.replace("/", "_")): v
            for k, v in metrics.items() if k.endswith("/loss")}


def rounds(run, state, round_fn: Callable, *, num_rounds: int, start: int,
           eval_every: int = 0, evaluate: Callable | None = None):
    """The federated loop: round_fn each round, metrics, checkpoints, periodic evaluation.

    evaluate(state, round): called every `eval_every` rounds (not after the last one).
    """
    progress = Progress(num_rounds, desc="rounds", start=start)
    for r in range(start, num_rounds):
        t0 = time.perf_counter()
        state, metrics = round_fn(state, r)
        seconds = time.perf_counter() - t0
        metrics["round/seconds"] = seconds
        if "round/examples" in metrics:
            metrics["round/examples_per_s"] = metrics["round/examples"] / seconds
        run.writer.write(r + 1, metrics)
        progress.update(r + 1, **_losses(metrics))
        run.save(r + 1, state, final=r + 1 == num_rounds)
        if evaluate is not None and eval_every and (r + 1) % eval_every == 0 \
                and r + 1 < num_rounds:
            evaluate(state, r + 1)
    return state


def federated(run, engine: fl.FederatedEngine, population, variables, *, num_rounds: int,
              cohort_size: int, seed: int, eval_every: int = 0,
              evaluate: Callable | None = None):
    """FedAvg-family training of `engine`'s method; returns the final server state."""
    state, start = run.restore(engine.init(variables), place=engine.place, unit="round")
    logging.info("%d clients, cohort %d, rounds %d..%d", population.num_clients,
                 min(cohort_size, population.num_clients), start + 1, num_rounds)
    round_fn = engine_round(run, engine, population, cohort_size=cohort_size, seed=seed)
    return rounds(run, state, round_fn, num_rounds=num_rounds, start=start,
                  eval_every=eval_every, evaluate=evaluate)


def server_variables(state: fl.ServerState):
    """Host copy of the server's model variables."""
    return fl.mesh.to_host(state.variables)
