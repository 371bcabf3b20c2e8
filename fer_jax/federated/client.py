"""What a method plugs into the engine: the client's init / step / final (fedjax style).

The engine calls, per client and inside one jit (vmapped or unrolled, see `round.py`):
  state = method.init(variables, trainable, key)        # variables: server + client-local
  state, metrics = method.step(state, batch, mask, key)  # once per local step, under lax.scan
  variables = method.final(state)                        # the client's trained variables
`batch` is a dict of [B, ...] arrays, `mask` is [B] bool (False = padding example), and metrics
are dicts of scalar *sums* over valid examples (the engine adds them over steps and clients, so
means are sum / count). A step whose mask is all False is skipped by the engine (state and
metrics unchanged), so optimizers with momentum never move on padding. `trainable` is a static
tuple of bools per flattened leaf of `variables` (False = frozen by the parameter filter).
The engine computes deltas from the returned variables, so a method never sees aggregation.
SimCLR-style steps take two views from `batch` and per-example keys from `key`; adversarial
two-optimizer steps keep both optimizer states in their own state pytree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import optax

from fer_jax.federated.partial import restore_frozen

# (params, model_state, batch, mask, key) -> (loss, (new_model_state, metric_sums))
LossFn = Callable[..., tuple[jax.Array, tuple[Any, dict]]]


class ClientMethod(Protocol):
    """The client side of a federated method. Must be hashable (it is a static jit argument)."""

    def init(self, variables, trainable: tuple[bool, ...], key: jax.Array): ...

    def step(self, state, batch: dict, mask: jax.Array, key: jax.Array) -> tuple[Any, dict]: ...

    def final(self, state): ...


@flax.struct.dataclass
class SupervisedState:
    """Client state of `SupervisedClient`; `trainable` is static (part of the tree structure)."""

    params: Any
    model_state: Any
    opt_state: Any
    initial: Any  # the variables received from the server: FedProx anchor and frozen values
    trainable: tuple = flax.struct.field(pytree_node=False, default=())


def _split(variables):
    if "params" not in variables:
        raise ValueError(f"SupervisedClient needs a 'params' collection, got {list(variables)}")
    return variables["params"], {k: v for k, v in variables.items() if k != "params"}


@dataclasses.dataclass(frozen=True, eq=False)
class SupervisedClient:
    """Minibatch training of `loss_fn` with a client optax optimizer (FedAvg's ClientUpdate).

    loss_fn(params, model_state, batch, mask, key) -> (loss, (new_model_state, metric_sums)):
      loss is the masked mean over valid examples; model_state holds non-'params' collections
      (batch_stats); metric_sums are sums over valid examples (see `classifier_loss`).
    prox_mu > 0 adds FedProx's proximal term mu/2 ||w - w_server||^2 (Li et al., MLSys 2020,
    Eq. 2) to the gradient. Hashed by identity: build one per experiment, reuse it every round.
    """

    loss_fn: LossFn
    optimizer: optax.GradientTransformation
    prox_mu: float = 0.0

    def init(self, variables, trainable, key):
        del key
        params, model_state = _split(variables)
        return SupervisedState(params=params, model_state=model_state,
                               opt_state=self.optimizer.init(params), initial=variables,
                               trainable=tuple(trainable))

    def step(self, state, batch, mask, key):
        grad_fn = jax.value_and_grad(self.loss_fn, has_aux=True)
        (loss, (model_state, metrics)), grads = grad_fn(state.params, state.model_state, batch,
                                                        mask, key)
        if self.prox_mu:
            anchor = state.initial["params"]
            grads = jax.tree.map(lambda g, w, w0: g + self.prox_mu * (w - w0), grads,
                                 state.params, anchor)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # Frozen leaves keep the server's values; their gradients are dead code for XLA.
        merged = restore_frozen({"params": params, **model_state}, state.initial, state.trainable)
        params, model_state = _split(merged)
        metrics = dict(metrics)
        metrics.setdefault("loss_sum", loss * mask.sum())
        return state.replace(params=params, model_state=model_state, opt_state=opt_state), metrics

    def final(self, state):
        return {"params": state.params, **state.model_state}


def classifier_loss(apply_fn: Callable, *, image_key: str = "image", label_key: str = "label",
                    mutable: tuple[str, ...] = ("batch_stats",),
                    class_weights: jax.Array | None = None) -> LossFn:
    """A masked softmax cross-entropy `loss_fn` for a Flax classifier.

    apply_fn(variables, images, train=True, mutable=..., rngs={'dropout': key}) may return
    logits or a dict with 'logits' (fer_jax.models). Metric sums: loss_sum, correct, count.
    Models with BatchNorm should take the mask themselves to keep padding out of batch
    statistics; this helper only keeps it out of the loss and metrics. class_weights [K]:
    each example's loss is weighted by its class's weight, divided by the number of valid
    examples (as losses.weighted_cross_entropy); `loss_sum` stays the unweighted sum.
    """

    def loss_fn(params, model_state, batch, mask, key):
        variables = {"params": params, **model_state}
        live = tuple(m for m in mutable if m in model_state)
        out = apply_fn(variables, batch[image_key], train=True,
                       mutable=list(live) if live else False, rngs={"dropout": key})
        out, new_state = out if live else (out, {})
        logits = out["logits"] if isinstance(out, dict) else out
        labels = batch[label_key]
        m = mask.astype(jnp.float32)
        per_example = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), labels)
        count = m.sum()
        if class_weights is None:
            loss = (per_example * m).sum() / jnp.maximum(count, 1.0)
        else:
            w = jnp.asarray(class_weights, jnp.float32)[labels] * m
            loss = (per_example * w).sum() / jnp.maximum(count, 1.0)
        correct = ((logits.argmax(-1) == labels) * m).sum()
        model_state = {**model_state, **new_state}
        return loss, (model_state, {"loss_sum": (per_example * m).sum(), "correct": correct,
                                    "count": count})

    return loss_fn
