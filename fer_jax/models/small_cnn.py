"""A small VGG-style CNN for 48x48 grayscale FER (FER-2013, CK+ crops).

Stages of two 3x3 convolutions (+ BatchNorm, ReLU) followed by a 2x2 max pool, the layout
of Simonyan & Zisserman 2015 scaled down as in the common FER-2013 baselines (e.g.
Goodfellow et al. 2013, *Challenges in representation learning*, ~60-66% test accuracy),
then a flatten -> dense -> dropout head. With the defaults it has ~0.9M parameters on
48x48x1 inputs.

Usage::

  model = SmallCNN(7)
  variables = model.init(key, x, train=False)                  # {'params', 'batch_stats'}
  out, updates = model.apply(variables, x, train=True, mutable=['batch_stats'],
                             rngs={'dropout': dropout_key})    # dropout needs an rng
  out = model.apply(variables, x, train=False)                 # no rng, no mutation
"""

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax

from fer_jax.models import layers

Array = jax.Array

# FER-2013 pixel statistics (mean ~0.51, std ~0.26 on [0, 1]); rounded, they only centre.
_FER_MEAN, _FER_STD = 0.5, 0.25


class SmallCNN(nn.Module):
    """VGG-style FER CNN; returns feature_map, embedding and (if num_classes) logits.

    Attributes:
      num_classes: number of classes, or None for the backbone only (no 'logits').
      widths: channels of each stage; every stage halves the resolution.
      convs_per_stage: 3x3 convs in each stage (one int for all stages, or one per stage);
        (1, 2, 2) drops the costliest conv, the second at full resolution.
      dense: width of the hidden dense layer of the head (on the flattened feature map:
        facial expressions depend on where a feature is, which global pooling discards).
      dropout: dropout rate after the hidden dense layer; train-mode apply needs
        ``rngs={'dropout': key}`` when it is > 0.
      norm: 'batch' (BatchNorm after every conv), 'group' (GroupNorm, per example: safe with
        padded federated batches) or 'none' (convs get a bias instead).
      bn_momentum, bn_epsilon: BatchNorm running-average momentum and epsilon.
      pool_last: False leaves out the last stage's pool: 'feature_map' at the last convs'
        resolution (6x6 instead of 3x3 for four stages on 48x48). For heads that need a spatial
        map from a deep encoder (FedAffect's relation module pools twice and GroupNorms a
        1x1 map otherwise); parameters are the same either way, so a classifier trained with
        the pool initialises an encoder without it.
    """

    num_classes: int | None = None
    _: dataclasses.KW_ONLY
    widths: Sequence[int] = (32, 64, 128)
    convs_per_stage: int | Sequence[int] = 2
    dense: int = 128
    dropout: float = 0.5
    norm: str = "batch"
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    pool_last: bool = True

    def __post_init__(self):
        layers.check_num_classes(self.num_classes)
        if not self.widths or any(not isinstance(w, int) or w < 1 for w in self.widths):
            raise ValueError(f"widths must be a non-empty sequence of positive ints, got "
                             f"{self.widths!r}")
        convs = self._convs()
        if len(convs) != len(self.widths) or any(not isinstance(c, int) or c < 1 for c in convs):
            raise ValueError(f"convs_per_stage must be a positive int or one per stage "
                             f"({len(self.widths)}), got {self.convs_per_stage!r}")
        if not isinstance(self.dense, int) or self.dense < 1:
            raise ValueError(f"dense must be a positive int, got {self.dense!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        layers.check_choice(self.norm, layers.NORMS, name="norm")
        super().__post_init__()

    def _convs(self) -> tuple:
        c = self.convs_per_stage
        return (c,) * len(self.widths) if isinstance(c, int) else tuple(c)

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> dict[str, Array]:
        x = layers.check_images(x)
        pools = len(self.widths) - (0 if self.pool_last else 1)
        min_size = 2 ** pools
        if x.shape[1] < min_size or x.shape[2] < min_size:
            raise ValueError(f"x spatial size {x.shape[1:3]} is too small for "
                             f"{pools} 2x2 pools (need >= {min_size})")
        norm = layers.make_norm(
            self.norm, train=train, momentum=self.bn_momentum, epsilon=self.bn_epsilon
        )
        # A conv followed by BatchNorm needs no bias: BN's shift replaces it.
        use_bias = self.norm == "none"
        x = layers.standardize(x, _FER_MEAN, _FER_STD)
        for i, (width, convs) in enumerate(zip(self.widths, self._convs(), strict=True)):
            for j in range(convs):
                x = nn.Conv(width, (3, 3), padding="SAME", use_bias=use_bias,
                            name=f"conv{i + 1}_{j + 1}")(x)
                x = nn.relu(norm(f"bn{i + 1}_{j + 1}")(x))
            # Pool by reshape: nn.max_pool's gradient is 8-15x slower on XLA:CPU.
            if self.pool_last or i + 1 < len(self.widths):
                x = layers.max_pool_reshape(x, 2)
        out = {"feature_map": x, "embedding": layers.global_avg_pool(x)}
        if self.num_classes is not None:
            h = x.reshape(x.shape[0], -1)
            h = nn.relu(nn.Dense(self.dense, name="dense")(h))
            h = nn.Dropout(self.dropout, deterministic=not train)(h)
            out["logits"] = nn.Dense(self.num_classes, name="head")(h)
        return out
