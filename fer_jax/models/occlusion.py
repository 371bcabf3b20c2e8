"""The occlusion-robust FER network (docs/papers.md#occlusion; paper Fig. 1, Eq. 1).

  F(x) = Res_up(Res_low(x) * (1 - phi(Res_low(x))))          Eq. (1)
  R    = the linear expression classifier on the pooled F(x)
  D    = the feature discriminator: P(y_occ = 1 | F(x)) = sigmoid(D(F(x)))

Res_low is the stem + first stage of a fer_jax ResNet (``stop_stage=1``) and Res_up the
remaining stages + head (``start_stage=1``): one ResNet submodule called twice, so the
weights are those of a plain ResNet and the model equals it when phi is switched off.

The paper's Fig. 1 draws phi as a few convolutions and D as fully connected layers without
giving widths; **Decision**: phi = [3x3 conv (hidden) + norm + ReLU] x num_convs + 1x1 conv to
one channel, its bias started at -2 (sigmoid 0.12: most features pass at the start, as most
pixels are not occluded); D = [Dense(hidden) + ReLU] x 2 + Dense(1) on the pooled F(x).
D has its own variables (its own optimizer in the min-max steps, fer_jax.steps.occlusion).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fer_jax.models import layers
from fer_jax.models.resnet import ResNet

Array = jax.Array


class OcclusionAttention(nn.Module):
    """phi: Res_low feature map (N, h, w, c) -> occlusion-mask logits (N, h, w)."""

    hidden: int = 64
    num_convs: int = 2
    norm: str = "batch"
    bias_init: float = -2.0

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        norm = layers.make_norm(self.norm, train=train, momentum=0.9, epsilon=1e-5)
        for i in range(self.num_convs):
            x = nn.Conv(self.hidden, (3, 3), padding=((1, 1), (1, 1)),
                        use_bias=self.norm == "none", name=f"conv{i + 1}")(x)
            x = nn.relu(norm(f"bn{i + 1}")(x))
        logits = nn.Conv(1, (1, 1), bias_init=nn.initializers.constant(self.bias_init),
                         name="mask")(x)
        return logits[..., 0]


class FeatureDiscriminator(nn.Module):
    """D: pooled features F(x) (N, c) -> one occlusion logit per example (N,)."""

    hidden: int = 256

    @nn.compact
    def __call__(self, features: Array) -> Array:
        if features.ndim != 2:
            raise ValueError(f"D takes pooled features (N, c), got shape {features.shape}")
        x = nn.relu(nn.Dense(self.hidden, name="fc1")(features))
        x = nn.relu(nn.Dense(self.hidden, name="fc2")(x))
        return nn.Dense(1, name="out")(x)[:, 0]


class OcclusionNet(nn.Module):
    """F and R of the paper around a fer_jax ResNet (``backbone``, with ``num_classes`` set).

    Attributes:
      backbone: a ``ResNet`` (resnet18 / resnet50) with a classification head.
      attention: use phi (M_ResAtt, M_ResAttAdv); False gives the plain ResNet (M_Res, M_ResAdv).
      attention_hidden, attention_convs: phi's width and depth.

    Returns {'logits': (N, K), 'embedding': F(x) pooled (N, c), 'feature_map': F(x),
    'low': Res_low(x)} and, with attention, 'mask_logits' (N, h, w) at Res_low's resolution.
    """

    backbone: ResNet
    attention: bool = True
    attention_hidden: int = 64
    attention_convs: int = 2

    def __post_init__(self):
        if not isinstance(self.backbone, ResNet) or self.backbone.num_classes is None:
            raise ValueError("OcclusionNet needs a fer_jax ResNet with num_classes set (its head "
                             f"is the classifier R), got {self.backbone!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> dict[str, Array]:
        low = self.backbone(x, train=train, stop_stage=1)["feature_map"]
        out = {"low": low}
        kept = low
        if self.attention:
            logits = OcclusionAttention(self.attention_hidden, self.attention_convs,
                                        norm=self.backbone.norm, name="phi")(low, train=train)
            out["mask_logits"] = logits
            # Eq. (1): features of pixels phi believes occluded are suppressed before Res_up.
            kept = low * (1.0 - jax.nn.sigmoid(logits))[..., None]
        up = self.backbone(kept, train=train, start_stage=1)
        out.update(logits=up["logits"], embedding=up["embedding"], feature_map=up["feature_map"])
        return out


def occlusion_net(name: str, num_classes: int, *, attention: bool = True,
                  attention_hidden: int = 64, attention_convs: int = 2,
                  **backbone_kwargs) -> OcclusionNet:
    """OcclusionNet around ``resnet18`` or ``resnet50`` (paper: ResNet-50; 18 for CPU runs)."""
    from fer_jax.models.resnet import resnet18, resnet50

    makers = {"resnet18": resnet18, "resnet50": resnet50}
    layers.check_choice(name, tuple(makers), name="backbone")
    return OcclusionNet(makers[name](num_classes, **backbone_kwargs), attention=attention,
                        attention_hidden=attention_hidden, attention_convs=attention_convs)


def mask_probabilities(out: dict[str, Array]) -> Array:
    """phi's mask sigmoid(logits) (N, h, w); zeros when the model has no attention."""
    if "mask_logits" in out:
        return jax.nn.sigmoid(out["mask_logits"])
    low = out["low"]
    return jnp.zeros(low.shape[:3], low.dtype)
