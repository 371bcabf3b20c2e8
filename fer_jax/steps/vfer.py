"""Jitted steps of VFER personalization (Salman & Busso, ICMI 2022; docs/papers.md#vfer).

* `ifer_step`: one Adam step of g on frozen MobileNetV2 features with class-weighted cross
  entropy (Sec. 3.1); `vfer_step`: one Adam step of v on feature sequences (Sec. 3.2). The
  learning rate is Adam's times `scale`, the factor of a reduce-on-plateau schedule that the
  driver updates once per epoch from the dev loss (`plateau_update`).
* `video_probabilities`: Eq. 1, IFER probabilities averaged over a video's real frames.
* `select_pseudo_labels`: Sec. 3.3, argmax pseudo label, at most P videos per class (the most
  confident), drop a video whose confidence is not above p_threshold.
* `PersonalizeClient`: the engine's client method (fer_jax.federated): fine-tunes v on the
  selected videos with unweighted cross entropy (lr 1e-3, 2 epochs, Sec. 4.3). The variables are
  {'params': {'v': ..., 'personal': ...}, 'batch_stats': {'v': ...}}: 'v' is the central head
  (FEDERATED: FedAvg of v only, Sec. 3.4), 'personal' a LOCAL copy that keeps each subject's
  adapted head in the engine's LocalStore for the per-subject evaluation; the client always
  starts from the central v and returns its adapted v in both places.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from fer_jax.losses import weighted_cross_entropy

# Head-only FedAvg: the central v's trainable parameters are averaged, the personal copy stays on
# the client, BatchNorm statistics are frozen (v runs BN in inference mode while adapting).
PARAM_RULES = (("params/v/.*", "federated"), ("params/personal/.*", "local"))


@flax.struct.dataclass
class HeadState:
    """params, batch_stats, Adam state and the reduce-on-plateau factor of one head."""

    params: Any
    batch_stats: Any
    opt_state: Any
    scale: jax.Array


def init_head_state(variables, optimizer: optax.GradientTransformation) -> HeadState:
    return HeadState(variables["params"], variables.get("batch_stats", {}),
                     optimizer.init(variables["params"]), jnp.ones((), jnp.float32))


def _apply_update(state: HeadState, grads, new_stats, optimizer):
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: u * state.scale, updates)
    return state.replace(params=optax.apply_updates(state.params, updates),
                         batch_stats=new_stats, opt_state=opt_state)


def ifer_loss(params, batch_stats, features, labels, mask, *, head, class_weights, train):
    """Class-weighted CE of g (Sec. 3.1) and the new batch statistics."""
    variables = {"params": params, "batch_stats": batch_stats}
    if train:
        logits, new = head.apply(variables, features, train=True, mutable=["batch_stats"])
        new_stats = new["batch_stats"]
    else:
        logits, new_stats = head.apply(variables, features, train=False), batch_stats
    loss = weighted_cross_entropy(logits, labels, class_weights=class_weights, mask=mask)
    return loss, (new_stats, logits)


@functools.partial(jax.jit, static_argnames=("head", "optimizer"), donate_argnames=("state",))
def ifer_step(state: HeadState, features, labels, mask, class_weights, *, head, optimizer):
    """One step of g: features (B, D), labels (B,), mask (B,), class_weights (K,)."""
    grad_fn = jax.value_and_grad(ifer_loss, has_aux=True)
    (loss, (stats, _)), grads = grad_fn(state.params, state.batch_stats, features, labels, mask,
                                        head=head, class_weights=class_weights, train=True)
    return _apply_update(state, grads, stats, optimizer), loss


def vfer_loss(params, batch_stats, features, frame_mask, labels, mask, *, head, train,
              class_weights=None):
    """CE of v on sequences (B, T, D) with frame_mask (B, T); unweighted unless class_weights."""
    variables = {"params": params, "batch_stats": batch_stats}
    if train:
        logits, new = head.apply(variables, features, frame_mask, train=True,
                                 mutable=["batch_stats"])
        new_stats = new["batch_stats"]
    else:
        logits, new_stats = head.apply(variables, features, frame_mask, train=False), batch_stats
    loss = weighted_cross_entropy(logits, labels, class_weights=class_weights, mask=mask)
    return loss, (new_stats, logits)


@functools.partial(jax.jit, static_argnames=("head", "optimizer"), donate_argnames=("state",))
def vfer_step(state: HeadState, features, frame_mask, labels, mask, *, head, optimizer):
    """One step of v on labeled videos (unweighted CE)."""
    grad_fn = jax.value_and_grad(vfer_loss, has_aux=True)
    (loss, (stats, _)), grads = grad_fn(state.params, state.batch_stats, features, frame_mask,
                                        labels, mask, head=head, train=True)
    return _apply_update(state, grads, stats, optimizer), loss


def plateau_transform(*, factor: float = 0.5, patience: int = 2, min_scale: float = 1e-3):
    """optax's reduce-on-plateau, fed one dev loss per epoch (accumulation_size=1)."""
    return optax.contrib.reduce_on_plateau(factor=factor, patience=patience, rtol=1e-4,
                                           accumulation_size=1, min_scale=min_scale)


def plateau_update(plateau, plateau_state, dev_loss: float):
    """Feeds one dev loss to the schedule; returns (new plateau state, its LR factor)."""
    _, plateau_state = plateau.update(updates={}, state=plateau_state, value=dev_loss)
    return plateau_state, float(plateau_state.scale)


def video_probabilities(logits, frame_mask):
    """Eq. 1: the mean of softmax(logits) over a video's real frames.

    logits (..., T, K), frame_mask (..., T) -> (..., K); an all-padding video gives zeros.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    m = frame_mask.astype(jnp.float32)[..., None]
    return (probs * m).sum(-2) / jnp.maximum(m.sum(-2), 1.0)


def select_pseudo_labels(probs, valid, *, max_per_class: int, threshold: float):
    """Sec. 3.3 for one subject: pseudo labels and which videos fine-tune v.

    probs (N, K) video probabilities (Eq. 1), valid (N,) bool (False = padding). Pseudo label
    = argmax; per class, the `max_per_class` (P) most confident videos are kept (ties: lower
    index first), then videos whose confidence is not above `threshold` are dropped ("more than
    50% probability"). Returns (labels (N,) int32, selected (N,) bool, confidence (N,)).
    vmap it over subjects.
    """
    labels = jnp.argmax(probs, axis=-1).astype(jnp.int32)
    conf = jnp.max(probs, axis=-1)
    n = probs.shape[0]
    idx = jnp.arange(n)
    same = (labels[:, None] == labels[None, :]) & valid[None, :]
    ahead = (conf[None, :] > conf[:, None]) | ((conf[None, :] == conf[:, None])
                                               & (idx[None, :] < idx[:, None]))
    rank = jnp.sum(same & ahead, axis=1)
    selected = valid & (rank < max_per_class) & (conf > threshold)
    return labels, selected, conf


@dataclasses.dataclass(frozen=True, eq=False)
class PersonalizeClient:
    """Fine-tunes v on a subject's pseudo-labeled videos (engine ClientMethod, hashed by id).

    batch: {'features': (B, T, D), 'frame_mask': (B, T), 'label': (B,) pseudo labels}.
    v runs with BatchNorm in inference mode (the few videos of one subject would give useless
    batch statistics); its gamma / beta and all dense / LSTM weights adapt.
    """

    head: Any
    optimizer: optax.GradientTransformation

    def init(self, variables, trainable, key):
        del trainable, key
        params = variables["params"]["v"]
        return {"params": params, "opt_state": self.optimizer.init(params),
                "initial": variables}

    def step(self, state, batch, mask, key):
        del key
        stats = state["initial"]["batch_stats"]["v"]

        def loss_fn(params):
            loss, (_, logits) = vfer_loss(params, stats, batch["features"], batch["frame_mask"],
                                          batch["label"], mask, head=self.head, train=False)
            return loss, logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = self.optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        m = mask.astype(jnp.float32)
        agree = ((jnp.argmax(logits, -1) == batch["label"]) * m).sum()
        return ({**state, "params": params, "opt_state": opt_state},
                {"loss_sum": loss * m.sum(), "agree": agree, "count": m.sum()})

    def final(self, state):
        out = dict(state["initial"])
        out["params"] = {**out["params"], "v": state["params"]}
        if "personal" in out["params"]:  # absent when only FedAvg is wanted (benchmarks)
            out["params"]["personal"] = state["params"]
        return out


def payload_bytes(tree) -> int:
    """Bytes of a pytree's arrays as sent over the wire (their dtype sizes)."""
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))
