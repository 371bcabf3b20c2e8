"""CBAM: Convolutional Block Attention Module (Woo et al. 2018, ECCV), returning its maps.

Sec. 3 of Woo et al.: a feature map F (N, H, W, C) is refined in two steps,

    Eq. (2)  M_c(F) = sigmoid(MLP(AvgPool(F)) + MLP(MaxPool(F)))        (N, C), shared MLP
             F'     = M_c(F) * F
    Eq. (3)  M_s(F') = sigmoid(conv7x7([MaxPool_c(F'); AvgPool_c(F')]))  (N, H, W)
             F''    = M_s(F') * F'

The MLP has one hidden layer of C / r units (r = 16, ReLU). As in the authors' code the 7x7
conv has no bias and is followed by BatchNorm (``norm='batch'``; ``'none'`` gives the conv a
bias instead; ``'group'`` a per-example GroupNorm, for federated clients). The attention maps are
returned because the diversity method (Heidari & Iosifidis, Eq. (4)) compares the channel
vectors M_c and the spatial maps M_s of different ESR branches.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fer_jax.models import layers

Array = jax.Array

# 'group' (GroupNorm, Wu & He 2018) normalises each example on its own: no batch statistics,
# so padded examples of federated clients cannot leak into real ones.
NORMS = ("batch", "group", "none")


class ChannelAttention(nn.Module):
    """Eq. (2): (N, H, W, C) -> (N, C) weights in (0, 1) from a shared two-layer MLP."""

    reduction: int = 16

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        hidden = max(c // self.reduction, 1)  # Woo et al. keep at least one hidden unit.
        fc1, fc2 = nn.Dense(hidden, name="fc1"), nn.Dense(c, name="fc2")

        def mlp(v):
            return fc2(nn.relu(fc1(v)))

        # The same MLP sees both descriptors: average- and max-pooled over space.
        return nn.sigmoid(mlp(jnp.mean(x, axis=(1, 2))) + mlp(jnp.max(x, axis=(1, 2))))


class SpatialAttention(nn.Module):
    """Eq. (3): (N, H, W, C) -> (N, H, W) weights in (0, 1) from a 7x7 conv over [max, mean]."""

    kernel_size: int = 7
    norm: str = "batch"
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        layers.check_choice(self.norm, NORMS, name="norm")
        # Max first, then mean: the channel order of the authors' ChannelPool.
        pooled = jnp.concatenate([jnp.max(x, axis=-1, keepdims=True),
                                  jnp.mean(x, axis=-1, keepdims=True)], axis=-1)
        k, p = self.kernel_size, self.kernel_size // 2
        y = nn.Conv(1, (k, k), padding=((p, p), (p, p)), use_bias=self.norm != "batch",
                    name="conv")(pooled)
        if self.norm == "group":
            # One group over the single-channel map: per-example, so padding-safe in FL.
            y = nn.GroupNorm(num_groups=1, name="gn")(y)
        else:
            norm = layers.make_norm(self.norm, train=train, momentum=self.bn_momentum,
                                    epsilon=1e-5)
            y = norm("bn")(y)
        return nn.sigmoid(y)[..., 0]


class CBAM(nn.Module):
    """Channel then spatial attention; ``__call__`` returns (refined x, maps).

    Attributes:
      reduction: r of the channel MLP (hidden width C // r, at least 1).
      kernel_size: of the spatial conv (7 in the paper).
      spatial: False keeps only the channel gate (the authors' ``no_spatial``); the returned
        spatial map is then all ones.
      norm: 'batch' (BN after the spatial conv, as Woo et al.'s code), 'group' (GroupNorm,
        per example) or 'none'.

    Returns from ``__call__(x, train=...)``: ``(y, {'channel': (N, C), 'spatial': (N, H, W)})``
    with y = x * M_c[:, None, None, :] * M_s[..., None].
    """

    reduction: int = 16
    kernel_size: int = 7
    spatial: bool = True
    norm: str = "batch"

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> tuple[Array, dict[str, Array]]:
        if x.ndim != 4:
            raise ValueError(f"CBAM input must be (N, H, W, C), got shape {x.shape}")
        channel = ChannelAttention(self.reduction, name="channel")(x)
        x = x * channel[:, None, None, :]
        if self.spatial:
            # The spatial gate looks at the channel-refined map (sequential, Sec. 3.3).
            spatial = SpatialAttention(self.kernel_size, self.norm, name="spatial")(x, train=train)
            x = x * spatial[..., None]
        else:
            spatial = jnp.ones(x.shape[:3], x.dtype)
        return x, {"channel": channel, "spatial": spatial}
