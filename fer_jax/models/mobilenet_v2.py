"""MobileNetV2 (Sandler et al. 2018, *MobileNetV2: inverted residuals and linear bottlenecks*)
in the layout of ``keras.applications.MobileNetV2`` (include_top=False).

Table 2 of the paper: a 3x3/2 conv with 32 channels, 17 inverted residual blocks
(expansion t, output channels c, repeats n, first stride s), a 1x1 conv to 1280 channels;
BatchNorm (Keras: epsilon 1e-3, momentum 0.999) and ReLU6 after every conv except the
linear projections. With width 1.0 and no head it has exactly Keras' 2,257,984 variables,
2,223,872 of them trainable (the VFER feature extractor f; docs/papers.md#vfer-numbers).

Layer names are Keras' with the block prefix as a parent module, so a Keras layer name is
the flax path joined with '_' (``block_3/depthwise_BN`` <-> ``block_3_depthwise_BN``):
``Conv1``, ``bn_Conv1``; ``expanded_conv/{depthwise, depthwise_BN, project, project_BN}``;
``block_{1..16}/{expand, expand_BN, depthwise, depthwise_BN, project, project_BN}``;
``Conv_1``, ``Conv_1_bn``; the optional classifier is ``head`` (Keras ``predictions``).
Variables: conv ``kernel`` = Keras ``kernel`` (both HWIO); depthwise ``kernel`` (3, 3, 1, C)
= Keras ``depthwise_kernel`` (3, 3, C, 1) transposed on the last two axes; BN ``scale``,
``bias`` (params) = ``gamma``, ``beta``; ``mean``, ``var`` (batch_stats) = ``moving_mean``,
``moving_variance``. Padding is TF 'same' (stride-2 convs pad one pixel after, not before,
on even sizes), as Keras' ZeroPadding2D + 'valid' does. torchvision's ``mobilenet_v2`` pads
symmetrically and uses BN epsilon 1e-5, so its weights need those two changes to match.
Inputs in [0, 1] are mapped to [-1, 1], the range Keras' weights were trained on.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from fer_jax.models import layers

Array = jax.Array

# Table 2 of Sandler et al. 2018: (expansion t, channels c, repeats n, first stride s).
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(v: float, divisor: int = 8) -> int:
    """Keras/TF-slim channel rounding: nearest multiple of divisor, never below 90% of v."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _symmetric(conv, x: Array) -> Array:
    """A stride-2 3x3 'same' conv made to pad one pixel on every side (torchvision's padding=1).

    Pad one row/column before (and one after on even sizes) so that TF 'same' adds nothing
    before; output j then sees input rows 2j-1..2j+1, as torch's; extra outputs are dropped.
    """
    h, w = x.shape[1:3]
    x = jnp.pad(x, ((0, 0), (1, 1 - h % 2), (1, 1 - w % 2), (0, 0)))
    return conv(x)[:, : (h - 1) // 2 + 1, : (w - 1) // 2 + 1]


class InvertedResidual(nn.Module):
    """1x1 expand (ReLU6), 3x3 depthwise (ReLU6), linear 1x1 projection; residual when the
    shape is kept (Sandler et al. 2018, Fig. 3b and Table 1)."""

    features: int
    expansion: int
    strides: int
    depthwise: str
    momentum: float
    epsilon: float
    padding: str = "same"

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        bn = lambda name: nn.BatchNorm(use_running_average=not train, momentum=self.momentum,
                                       epsilon=self.epsilon, name=name)
        in_c = x.shape[-1]
        y = x
        if self.expansion != 1:
            y = nn.Conv(in_c * self.expansion, (1, 1), use_bias=False, name="expand")(y)
            y = nn.relu6(bn("expand_BN")(y))
        dw = layers.DepthwiseConv3x3(strides=self.strides, mode=self.depthwise, name="depthwise")
        y = _symmetric(dw, y) if self.padding == "symmetric" and self.strides == 2 else dw(y)
        y = nn.relu6(bn("depthwise_BN")(y))
        # Linear bottleneck: no non-linearity after the projection (Sec. 3.2).
        y = nn.Conv(self.features, (1, 1), use_bias=False, name="project")(y)
        y = bn("project_BN")(y)
        if self.strides == 1 and in_c == self.features:
            y = x + y
        return y


class MobileNetV2(nn.Module):
    """MobileNetV2 backbone (Keras layout) with an optional linear head.

    Attributes:
      num_classes: classes of the linear head on the pooled 1280-d embedding, or None.
      width: the width multiplier alpha (Keras ``alpha``); 1.0 gives 1280 final channels.
      depthwise: 'conv' (grouped convolution) or 'shifted' (9 shifted multiply-adds,
        ~30x faster forward on XLA:CPU); same parameters, same outputs.
      dropout: dropout before the head (torchvision uses 0.2, Keras none); train-mode apply
        needs ``rngs={'dropout': key}`` when it is > 0.
      bn_momentum, bn_epsilon: Keras' values (torchvision weights: bn_epsilon=1e-5).
      padding: 'same' (TF/Keras: stride-2 convs pad after on even sizes) or 'symmetric'
        (torchvision: one pixel on every side); with torchvision weights use 'symmetric'.
    """

    num_classes: int | None = None
    _: dataclasses.KW_ONLY
    width: float = 1.0
    depthwise: str = "conv"
    dropout: float = 0.0
    bn_momentum: float = 0.999
    bn_epsilon: float = 1e-3
    padding: str = "same"

    def __post_init__(self):
        layers.check_num_classes(self.num_classes)
        if not isinstance(self.width, int | float) or self.width <= 0:
            raise ValueError(f"width must be a positive number, got {self.width!r}")
        layers.check_choice(self.depthwise, ("conv", "shifted"), name="depthwise")
        layers.check_choice(self.padding, ("same", "symmetric"), name="padding")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> dict[str, Array]:
        x = layers.check_images(x)
        bn = lambda name: nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                                       epsilon=self.bn_epsilon, name=name)
        x = x * 2.0 - 1.0
        pad = "SAME" if self.padding == "same" else ((1, 1), (1, 1))
        x = nn.Conv(make_divisible(32 * self.width), (3, 3), (2, 2), padding=pad,
                    use_bias=False, name="Conv1")(x)
        x = nn.relu6(bn("bn_Conv1")(x))
        index = 0
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            for i in range(n):
                # Keras calls block 0 'expanded_conv' and numbers the rest from 1.
                name = "expanded_conv" if index == 0 else f"block_{index}"
                x = InvertedResidual(
                    features=make_divisible(c * self.width),
                    expansion=t,
                    strides=s if i == 0 else 1,
                    depthwise=self.depthwise,
                    momentum=self.bn_momentum,
                    epsilon=self.bn_epsilon,
                    padding=self.padding,
                    name=name,
                )(x, train=train)
                index += 1
        # Keras keeps 1280 channels for alpha <= 1 (the paper's Table 2 note).
        last = 1280 if self.width <= 1.0 else make_divisible(1280 * self.width)
        x = nn.Conv(last, (1, 1), use_bias=False, name="Conv_1")(x)
        x = nn.relu6(bn("Conv_1_bn")(x))
        out = {"feature_map": x, "embedding": layers.global_avg_pool(x)}
        if self.num_classes is not None:
            h = nn.Dropout(self.dropout, deterministic=not train)(out["embedding"])
            out["logits"] = nn.Dense(self.num_classes, name="head")(h)
        return out
