"""FedAffect's local updates as engine client methods, plus centralized and evaluation steps.

FedAffect (Shome & Kar), Algorithm 1:
  * `SimCLRClient` = LocalReprLearn (lines 17-30): per minibatch of M images, two views per
    image (`data.simclr_augment`, on device, per-example keys), z = P(E(view)), loss NT-Xent
    (Eq. 1, the mean over the 2M anchors, line 26) at temperature tau, one optimizer update.
    The engine pads a client's last minibatch: `losses.nt_xent(mask=)` keeps the padded views
    out of the softmax, so the loss is exactly NT-Xent of the valid views.
  * `FewShotClient` = LocalFewShot (lines 31-35): per local step one C-way K-shot episode drawn
    on device from the client's labeled pool (`data.episodes.sample_episode`; Q queries per
    episode, or Q_c per class), class maps = element-wise sum of K support maps, depth-wise
    concatenation with each query map, relation scores, loss = relation MSE (Sung et al. 2018
    Eq. 2; `losses.relation_mse` on the valid (query, class) pairs; loss='ce': softmax
    cross-entropy over each query's class slots, `losses.episode_cross_entropy`, on the
    pre-sigmoid relation outputs), embedding f and relation g trained jointly (unless the
    encoder is FROZEN by the engine's parameter filter). A model with head='prototypical'
    (Snell et al. 2017) gives -squared distances to mean support maps, trained by the CE.
Both follow the engine's ClientMethod protocol (init / step / final, metric *sums*), so FedAvg
weighted by D_i / D and the per-client keys come from `fer_jax.federated`. The same `step` is
the centralized learner's update (`centralized_step`: one jitted step, host loop over batches).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from fer_jax import losses
from fer_jax.data.episodes import sample_episode
from fer_jax.data.simclr_augment import SimCLRAugmentConfig, simclr_views
from fer_jax.federated.partial import restore_frozen
from fer_jax.steps.supervised import preprocess

LOSSES = ("mse", "ce")


@flax.struct.dataclass
class LearnerState:
    """Client (or centralized) state: params, optimizer state, the received variables."""

    params: Any
    opt_state: Any
    initial: Any
    trainable: tuple = flax.struct.field(pytree_node=False, default=())


def _init_state(variables, trainable, optimizer) -> LearnerState:
    if set(variables) != {"params"}:
        raise ValueError("FedAffect learners take variables {'params': ...} only (models built "
                         f"with norm='none' or 'group'); got collections {sorted(variables)}")
    params = variables["params"]
    trainable = tuple(trainable) or (True,) * len(jax.tree.leaves(variables))
    return LearnerState(params, optimizer.init(params), variables, trainable)


def _update(state: LearnerState, grads, optimizer, ok) -> LearnerState:
    """One optimizer update; frozen leaves keep the server's values; `ok` False keeps all."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params = restore_frozen({"params": params}, state.initial, state.trainable)["params"]
    keep = lambda a, b: jax.tree.map(lambda x, y: jnp.where(ok, x, y), a, b)
    return state.replace(params=keep(params, state.params), opt_state=keep(opt_state,
                                                                           state.opt_state))


@dataclasses.dataclass(frozen=True, eq=False)
class SimCLRClient:
    """LocalReprLearn: SimCLR steps of `model` (a RepresentationLearner) on batches of M images.

    batch: {'image': uint8 (M, H, W, C)}; mask (M,) bool. Metric sums: loss_sum (loss x valid
    images), count (valid images). Hashed by identity (a static jit argument).
    """

    model: Any
    optimizer: optax.GradientTransformation
    augment: SimCLRAugmentConfig
    temperature: float
    image_size: int
    channels: int

    def init(self, variables, trainable, key):
        del key
        return _init_state(variables, trainable, self.optimizer)

    def step(self, state, batch, mask, key):
        x = preprocess(batch["image"], image_size=self.image_size, channels=self.channels)
        view_a, view_b = simclr_views(key, x, self.augment)
        n = x.shape[0]

        def loss_fn(params):
            z = self.model.apply({"params": params}, jnp.concatenate([view_a, view_b]),
                                 train=True)["z"]
            return losses.nt_xent(z[:n], z[n:], temperature=self.temperature, mask=mask)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        count = mask.sum().astype(jnp.float32)
        state = _update(state, grads, self.optimizer, count > 0)
        return state, {"loss_sum": loss * count, "count": count}

    def final(self, state):
        return {"params": state.params}


@dataclasses.dataclass(frozen=True, eq=False)
class FewShotClient:
    """LocalFewShot: one C-way K-shot episode per step from the client's labeled pool.

    batch: {'image': uint8 (P, H, W, C), 'label': int (P,)}, mask (P,) bool: the pool the
    episode is drawn from (the engine's minibatch). `model` is a FewShotLearner. queries: Q
    per episode, used when queries_per_class = 0; loss: 'mse' (relation head only) or 'ce'.
    Metric sums: loss_sum (over episodes), episodes, skipped_episodes, queries, correct,
    short_classes.
    """

    model: Any
    optimizer: optax.GradientTransformation
    num_classes: int
    shots: int
    queries: int
    image_size: int
    channels: int
    queries_per_class: int = 0
    loss: str = "mse"

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.loss == "mse" and self.model.head != "relation":
            raise ValueError("loss='mse' regresses relation scores in [0, 1]: it needs the "
                             f"relation head, got head={self.model.head!r} (use loss='ce')")

    def init(self, variables, trainable, key):
        del key
        return _init_state(variables, trainable, self.optimizer)

    def step(self, state, batch, mask, key):
        c, k = self.num_classes, self.shots
        labels = batch["label"].astype(jnp.int32)
        ep = sample_episode(key, labels, mask, num_classes=c, shots=k, queries=self.queries,
                            queries_per_class=self.queries_per_class)
        prep = functools.partial(preprocess, image_size=self.image_size, channels=self.channels)
        support = prep(batch["image"][ep.support_index.reshape(-1)])
        query = prep(batch["image"][ep.query_index])
        support_labels = jnp.repeat(jnp.arange(c), k)
        query_labels = labels[ep.query_index]

        ce = self.loss == "ce"

        def loss_fn(params):
            scores = self.model.apply({"params": params}, support, support_labels, query,
                                      train=True, logits=ce)
            pairs = ep.query_valid[:, None] & ep.class_valid[None, :]
            fn = losses.episode_cross_entropy if ce else losses.relation_mse
            return fn(scores, query_labels, jnp.arange(c), mask=pairs), scores

        (loss, scores), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state = _update(state, grads, self.optimizer, ep.ok)
        pred = jnp.argmax(jnp.where(ep.class_valid[None, :], scores, -jnp.inf), axis=-1)
        ok = ep.ok.astype(jnp.float32)
        valid_q = ep.query_valid.astype(jnp.float32) * ok
        correct = ((pred == query_labels) * valid_q).sum()
        return state, {"loss_sum": loss * ok, "episodes": ok, "skipped_episodes": 1.0 - ok,
                       "queries": valid_q.sum(), "correct": correct,
                       "short_classes": (c - ep.class_valid.sum()).astype(jnp.float32)}

    def final(self, state):
        return {"params": state.params}


@functools.partial(jax.jit, static_argnames=("model", "image_size", "channels"))
def feature_maps(params, images, *, model, image_size: int, channels: int) -> jax.Array:
    """Embedding-module maps (N, h, w, c) of uint8 images (FewShotLearner.features, eval mode)."""
    x = preprocess(images, image_size=image_size, channels=channels)
    return model.apply({"params": params}, x, train=False, method="features")


@functools.partial(jax.jit, static_argnames=("model",))
def episode_scores(params, prototypes, query_maps, *, model) -> jax.Array:
    """Relation scores (E, n, C) of E episodes' class maps (E, C, ...) vs n query maps."""
    one = lambda p: model.apply({"params": params}, p, query_maps, method="scores")
    return jax.vmap(one)(prototypes)
