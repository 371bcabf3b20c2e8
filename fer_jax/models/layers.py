"""Pieces shared by the fer_jax models: pooling that is fast on XLA:CPU, depthwise 3x3, norms.

Why these exist (docs/performance.md#models): the gradient of ``nn.max_pool`` lowers to
select-and-scatter, a slow path on XLA:CPU (8-15x slower than a reshape + max), and a
grouped (depthwise) convolution runs at ~1 GFLOP/s there, while the same 3x3 depthwise
filter written as 9 shifted multiply-adds runs its forward ~30x faster. Every function
here returns exactly what the ``flax.linen`` / ``jax.lax`` primitive it replaces returns.
"""

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

NORMS = ("batch", "group", "none")
GROUPS = 32  # GroupNorm groups (Wu & He 2018), gcd with the channel count.


def check_images(x: Any, *, name: str = "x") -> Array:
    """Returns ``x`` as an array after checking it is a (N, H, W, C) image batch."""
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"{name} must be a (N, H, W, C) image batch, got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be floating point (images in [0, 1]), got {x.dtype}")
    return x


def check_choice(value: Any, choices: tuple, *, name: str) -> None:
    """Raises ValueError naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_num_classes(num_classes: Any) -> None:
    """``num_classes`` is None (backbone only) or a positive int."""
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise ValueError(f"num_classes must be None or a positive int, got {num_classes!r}")


def _tap(xp: Array, i: int, j: int, out_hw: tuple[int, int], s: int) -> Array:
    """The (out_h, out_w) grid of padded-input pixels that kernel tap (i, j) sees at stride s."""
    n, _, _, c = xp.shape
    oh, ow = out_hw
    return lax.slice(xp, (0, i, j, 0), (n, i + s * (oh - 1) + 1, j + s * (ow - 1) + 1, c),
                     (1, s, s, 1))


def _pool_by_reshape(x: Array, window: int, reduce: Callable) -> Array:
    if x.ndim != 4:
        raise ValueError(f"x must be (N, H, W, C), got shape {x.shape}")
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    n, h, w, c = x.shape
    oh, ow = h // window, w // window
    if oh == 0 or ow == 0:
        raise ValueError(f"x spatial size {(h, w)} is smaller than the window {window}")
    # Drop the trailing rows/columns a VALID pooling would drop, then pool by reshape.
    x = x[:, : oh * window, : ow * window, :]
    x = x.reshape(n, oh, window, ow, window, c)
    return reduce(x, axis=(2, 4))


def max_pool_reshape(x: Array, window: int = 2) -> Array:
    """Non-overlapping ``window`` x ``window`` max pooling (stride = window, VALID padding).

    Equals ``nn.max_pool(x, (window, window), strides=(window, window))`` in value; its
    gradient is a plain select instead of select-and-scatter (8-15x faster on XLA:CPU).
    On exact ties the gradient is split between the tied inputs (``jnp.max``'s rule)
    whereas ``nn.max_pool`` sends it all to the first one; for real-valued activations
    ties have probability zero.
    """
    return _pool_by_reshape(x, window, jnp.max)


def avg_pool_reshape(x: Array, window: int = 2) -> Array:
    """Non-overlapping average pooling, equal to ``nn.avg_pool(x, (w, w), strides=(w, w))``."""
    return _pool_by_reshape(x, window, jnp.mean)


def max_pool_3x3_s2(x: Array) -> Array:
    """3x3 max pool, stride 2, padding 1 on each side: the ResNet ImageNet stem pool.

    Equals ``nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))`` (and
    torchvision's ``MaxPool2d(3, 2, 1)``) but written as the maximum of 9 strided slices,
    so its gradient avoids XLA:CPU's slow select-and-scatter.
    """
    if x.ndim != 4:
        raise ValueError(f"x must be (N, H, W, C), got shape {x.shape}")
    h, w = x.shape[1:3]
    oh, ow = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    # -inf padding never wins a max, exactly like reduce_window's max padding.
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    out = None
    for i in range(3):
        for j in range(3):
            tap = _tap(xp, i, j, (oh, ow), 2)
            out = tap if out is None else jnp.maximum(out, tap)
    return out


def global_avg_pool(x: Array) -> Array:
    """(N, H, W, C) -> (N, C): the embedding every fer_jax model returns."""
    return jnp.mean(x, axis=(1, 2))


def standardize(x: Array, mean: float | tuple, std: float | tuple) -> Array:
    """(x - mean) / std with per-channel tuples for 3 channels, their mean for any other C."""
    c = x.shape[-1]
    mean, std = jnp.asarray(mean, x.dtype), jnp.asarray(std, x.dtype)
    if mean.ndim and mean.shape[0] != c:
        # A grayscale (or other) input gets the channel-averaged statistics.
        mean, std = mean.mean(), std.mean()
    return (x - mean) / std


def make_norm(kind: str, *, train: bool, momentum: float, epsilon: float,
              groups: int = GROUPS) -> Callable:
    """Returns ``norm(name, scale_init=ones) -> layer`` for 'batch', 'group' or 'none' (identity).

    BatchNorm uses the batch statistics and updates 'batch_stats' when ``train`` is True,
    and the running averages otherwise (Ioffe & Szegedy 2015). GroupNorm (Wu & He 2018)
    normalises each example over (H, W, channels of its group) with gcd(``groups``, C) groups
    and has no batch statistics: one example's output never depends on another's (padded rows
    of a federated client's minibatch change nothing; Hsieh et al. 2020 use it for FedAvg).
    ``train`` and ``momentum`` only concern 'batch'.
    """
    check_choice(kind, NORMS, name="norm")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")

    def norm(name: str, scale_init: Callable = nn.initializers.ones) -> Callable:
        if kind == "none":
            return lambda y: y
        if kind == "group":
            return lambda y: nn.GroupNorm(num_groups=math.gcd(groups, y.shape[-1]),
                                          epsilon=epsilon, scale_init=scale_init,
                                          name=name)(y)
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=momentum,
            epsilon=epsilon,
            scale_init=scale_init,
            name=name,
        )

    return norm


def _same_pads(h: int, w: int, strides: int) -> list[tuple[int, int]]:
    # TF/Keras 'same': for stride 2 on an even size the extra pixel goes after (bottom/right).
    return lax.padtype_to_pads((h, w), (3, 3), (strides, strides), "SAME")


class DepthwiseConv3x3(nn.Module):
    """3x3 depthwise convolution (one filter per channel, no bias), 'SAME' padding.

    Attributes:
      strides: 1 or 2.
      mode: 'conv' uses ``lax.conv_general_dilated`` with ``feature_group_count=C``;
        'shifted' computes the same sum as 9 shifted multiply-adds, ~30x faster forward
        and input-gradient on XLA:CPU (the weight gradient stays slow). Both modes hold
        one parameter, ``kernel`` of shape (3, 3, 1, C), like ``nn.Conv`` with
        ``feature_group_count=C``; Keras' ``depthwise_kernel`` is (3, 3, C, 1).
    """

    strides: int = 1
    mode: str = "conv"
    # fan_in of a depthwise filter is 9 (3x3x1), which lecun_normal computes from (3, 3, 1, C).
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        check_choice(self.mode, ("conv", "shifted"), name="depthwise")
        check_choice(self.strides, (1, 2), name="strides")
        n, h, w, c = x.shape
        kernel = self.param("kernel", self.kernel_init, (3, 3, 1, c), jnp.float32)
        pads = _same_pads(h, w, self.strides)
        s = self.strides
        if self.mode == "conv":
            return lax.conv_general_dilated(
                x,
                kernel.astype(x.dtype),
                (s, s),
                pads,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=c,
            )
        oh, ow = (h + sum(pads[0]) - 3) // s + 1, (w + sum(pads[1]) - 3) // s + 1
        xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
        out = jnp.zeros((n, oh, ow, c), x.dtype)
        for i in range(3):
            for j in range(3):
                out = out + _tap(xp, i, j, (oh, ow), s) * kernel[i, j, 0].astype(x.dtype)
        return out
