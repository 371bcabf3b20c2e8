"""Jitted supervised update and evaluation functions (any fer_jax model, class-weighted CE).

Module-level pure functions; the model, optimizer and options come in through
`functools.partial` and the state buffers are donated by the caller (scenic / big_vision style).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from fer_jax import losses
from fer_jax.data.augment import AugmentConfig, augment_batch


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly where it stopped (checkpointed as one pytree)."""

    step: jax.Array  # int32 scalar: number of updates applied.
    params: Any
    batch_stats: Any  # BatchNorm running statistics ({} for models without BN).
    opt_state: Any
    rng: jax.Array  # Raw uint32[2] key; step keys are fold_in(rng, step), so resume replays them.


def preprocess(images: jax.Array, *, image_size: int, channels: int) -> jax.Array:
    """uint8 (N, H, W, C) -> float32 (N, S, S, channels) in [0, 1] (resize, gray <-> RGB)."""
    x = images.astype(jnp.float32) / 255.0
    n, h, w, c = x.shape
    if (h, w) != (image_size, image_size):
        x = jax.image.resize(x, (n, image_size, image_size, c), method="bilinear")
    if c == channels:
        return x
    if c == 1:
        return jnp.repeat(x, channels, axis=-1)  # Gray sources for RGB models.
    if channels == 1:
        return x.mean(axis=-1, keepdims=True)
    raise ValueError(f"cannot convert {c}-channel images to {channels} channels")


def image_apply(model, *, image_size: int, channels: int, augment: AugmentConfig | None):
    """model.apply on uint8 images: preprocess, then (training only) augment on device with a
    key folded from the dropout key. The `apply_fn` of `fl.classifier_loss`."""

    def apply(variables, images, *, rngs, **kwargs):
        x = preprocess(images, image_size=image_size, channels=channels)
        if augment is not None:
            x = augment_batch(jax.random.fold_in(rngs["dropout"], 1), x, augment)
        return model.apply(variables, x, rngs=rngs, **kwargs)

    return apply


def init_state(model, tx: optax.GradientTransformation, *, seed: int,
               input_shape: tuple[int, int, int]) -> TrainState:
    rng = jax.random.PRNGKey(seed)
    variables = model.init(jax.random.fold_in(rng, 0xF00D), jnp.zeros((1, *input_shape)),
                           train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      rng=rng)


def train_step(state: TrainState, batch: dict, *, model, tx, augment: AugmentConfig | None,
               image_size: int, channels: int, class_weights: jax.Array | None):
    """One optimizer update on `batch` = {'image': uint8 (N,H,W,C), 'label': int (N,)}."""
    key = jax.random.fold_in(state.rng, state.step)
    k_aug, k_dropout = jax.random.split(key)
    images = preprocess(batch["image"], image_size=image_size, channels=channels)
    if augment is not None:
        images = augment_batch(k_aug, images, augment)
    labels = batch["label"]

    def loss_fn(params):
        out, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, images,
                                   train=True, mutable=["batch_stats"],
                                   rngs={"dropout": k_dropout})
        loss = losses.weighted_cross_entropy(out["logits"], labels, class_weights=class_weights)
        return loss, (out["logits"], updates.get("batch_stats", state.batch_stats))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
               "grad_norm": optax.global_norm(grads)}
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    return new_state, metrics


def predict(params, batch_stats, images: jax.Array, *, model, image_size: int,
            channels: int, flip_tta: bool = False) -> jax.Array:
    """Logits of uint8 images in eval mode (running BatchNorm statistics, no dropout).

    `flip_tta`: test-time augmentation with the horizontal mirror; returns the log of the mean
    of the two softmax outputs (a log-probability, so argmax and cross entropy still apply).
    """
    x = preprocess(images, image_size=image_size, channels=channels)
    variables = {"params": params, "batch_stats": batch_stats}
    logits = model.apply(variables, x, train=False)["logits"]
    if not flip_tta:
        return logits
    flipped = model.apply(variables, x[:, :, ::-1], train=False)["logits"]
    probs = (jax.nn.softmax(logits, -1) + jax.nn.softmax(flipped, -1)) / 2
    return jnp.log(probs)
