"""IFER head g and VFER head v of Salman & Busso (ICMI 2022), docs/papers.md#vfer-heads.

The frozen feature extractor f is `MobileNetV2(None)` (Keras layout, 2,223,872 trainable
parameters at width 1.0); both heads read its 1280-d pooled embedding:

  IFER(x_i) = g(f(x_i))                   per frame (image) expression probabilities;
  VFER(x)   = v(f(x_1), ..., f(x_T))      Dense(128) -> Dense(64) per frame -> LSTM(64), the
                                          output at the last step -> Dense(K) -> softmax.

Parameter counts (Sec. 5.4 of the paper: f 2,223,872, g 662,534, v 208,582 trainable). The text
gives g as "fully connected layers + softmax" and v as FC(128)-FC(64)-LSTM(64)-softmax; the plain
layers alone give v = 205,638 (K = 6). The paper's numbers are met exactly, for K = 6 (its
CREMA-D six-class problem), with BatchNorm layers (trainable gamma and beta) in the places
below, which is also what "just over 211k parameters, from which 208K are trainable" implies:
BatchNorm's moving mean / variance are the ~3k non-trainable ones (211,526 - 208,582 = 2,944):

  g: BN(1280) -> Dense(512) -> BN(512) -> ReLU -> Dense(K)
     2,560 + 655,872 + 1,024 + 3,078 = 662,534                                      (K = 6)
  v: BN(1280) -> Dense(128) -> BN(128) -> ReLU -> Dense(64) -> BN(64) -> ReLU -> LSTM(64)
     -> Dense(K):  2,560 + 163,968 + 256 + 8,256 + 128 + 33,024 + 390 = 208,582      (K = 6)

This decomposition is our reading, docs/papers.md#vfer-heads (`norm='none'` gives the plain
layers; `count_heads` reports both). The LSTM is Keras' (input, forget, cell, output gates,
sigmoid recurrent activation, 4 x (64 x 64 + 64 x 64 + 64) = 33,024 parameters).

Zero pre-padding (Sec. 4.2): sequences are padded at the front, so the last step is always a
real frame. The padded steps are masked: BatchNorm statistics skip them and the LSTM carries its
zero initial state through them, so a padded sequence gives exactly the output of the unpadded
one (tests check it). `skip_padding=False` feeds the padded zeros through the LSTM instead
(Keras without a Masking layer).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fer_jax.models import layers
from fer_jax.models.mobilenet_v2 import MobileNetV2

Array = jax.Array

PAPER_COUNTS = {"f": 2_223_872, "g": 662_534, "v": 208_582}
FEATURE_DIM = 1280


def _bn(train: bool, name: str, momentum: float):
    # Keras' epsilon 1e-3. Momentum 0.9, not Keras' 0.99: the running statistics must converge
    # within the few dozen steps a small video corpus gives (CK+: ~40 VFER steps in all).
    return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=1e-3, name=name)


class IFERHead(nn.Module):
    """g: pooled MobileNetV2 features (N, D) -> logits (N, K) (softmax applied by the loss)."""

    num_classes: int
    hidden: tuple[int, ...] = (512,)
    norm: str = "batch"
    dropout: float = 0.0
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, features: Array, *, train: bool) -> Array:
        layers.check_choice(self.norm, ("batch", "none"), name="norm")
        if features.ndim != 2:
            raise ValueError(f"features must be (N, D), got shape {features.shape}")
        x = features
        if self.norm == "batch":
            x = _bn(train, "input_bn", self.bn_momentum)(x)
        for i, width in enumerate(self.hidden):
            x = nn.Dense(width, name=f"dense_{i}")(x)
            if self.norm == "batch":
                x = _bn(train, f"bn_{i}", self.bn_momentum)(x)
            x = nn.relu(x)
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="classifier")(x)


class _MaskedLSTMStep(nn.Module):
    """One LSTM step that keeps the carry where the step is padding (mask False)."""

    features: int
    skip_padding: bool

    @nn.compact
    def __call__(self, carry, xs):
        x, m = xs
        new_carry, _ = nn.OptimizedLSTMCell(self.features, name="cell")(carry, x)
        if self.skip_padding:
            keep = m[:, None]
            new_carry = jax.tree.map(lambda n, o: jnp.where(keep, n, o), new_carry, carry)
        return new_carry, None


class VFERHead(nn.Module):
    """v: per-frame features (N, T, D) + frame mask (N, T) -> logits (N, K).

    The output is the LSTM's hidden state after the last step (the last real frame under
    zero pre-padding). `norm='batch'` gives the paper's parameter count (module docstring).
    """

    num_classes: int
    dense: tuple[int, ...] = (128, 64)
    lstm: int = 64
    norm: str = "batch"
    skip_padding: bool = True
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, features: Array, mask: Array, *, train: bool) -> Array:
        layers.check_choice(self.norm, ("batch", "none"), name="norm")
        if features.ndim != 3 or mask.shape != features.shape[:2]:
            raise ValueError(f"features must be (N, T, D) and mask (N, T), got {features.shape} "
                             f"and {mask.shape}")
        mask = mask.astype(bool)
        bn_mask = mask[..., None]
        x = features
        if self.norm == "batch":
            x = _bn(train, "input_bn", self.bn_momentum)(x, mask=bn_mask)
        for i, width in enumerate(self.dense):
            x = nn.Dense(width, name=f"dense_{i}")(x)
            if self.norm == "batch":
                x = _bn(train, f"bn_{i}", self.bn_momentum)(x, mask=bn_mask)
            x = nn.relu(x)
        scan = nn.scan(_MaskedLSTMStep, variable_broadcast="params", split_rngs={"params": False},
                       in_axes=1, out_axes=1)
        zeros = jnp.zeros((x.shape[0], self.lstm), x.dtype)
        (_, h), _ = scan(self.lstm, self.skip_padding, name="lstm")((zeros, zeros), (x, mask))
        return nn.Dense(self.num_classes, name="classifier")(h)


def backbone(width: float = 1.0, *, depthwise: str = "shifted", **kwargs) -> MobileNetV2:
    """f: MobileNetV2 without head ('embedding' is the 1280-d pooled feature)."""
    return MobileNetV2(None, width=width, depthwise=depthwise, **kwargs)


def count_heads(num_classes: int, *, width: float = 1.0, feature_dim: int = FEATURE_DIM,
                g_kwargs: dict | None = None, v_kwargs: dict | None = None) -> dict:
    """Trainable / total parameter counts of f, g and v next to the paper's, without allocating.

    Uses `jax.eval_shape`, so the full 224x224 MobileNetV2 is counted in milliseconds.
    """
    from fer_jax.models import count_params

    key = jax.random.PRNGKey(0)
    f = backbone(width)
    fv = jax.eval_shape(lambda: f.init(key, jnp.zeros((1, 32, 32, 3)), train=False))
    g = IFERHead(num_classes, **(g_kwargs or {}))
    gv = jax.eval_shape(lambda: g.init(key, jnp.zeros((2, feature_dim)), train=False))
    v = VFERHead(num_classes, **(v_kwargs or {}))
    vv = jax.eval_shape(lambda: v.init(key, jnp.zeros((2, 3, feature_dim)),
                                       jnp.ones((2, 3), bool), train=False))
    out = {name: count_params(var) for name, var in (("f", fv), ("g", gv), ("v", vv))}
    for name in out:
        out[name]["paper_trainable"] = PAPER_COUNTS[name]
    return out
