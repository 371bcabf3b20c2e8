"""The supervised method's pieces: image preprocessing, the `apply_fn` that the client's loss
(`fer_jax.federated.classifier_loss`) trains through, and eval-mode prediction with optional
flip test-time augmentation. The client itself is `fer_jax.federated.SupervisedClient`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fer_jax.data.augment import AugmentConfig, augment_batch


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
