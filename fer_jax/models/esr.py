"""ESR-B: Ensembles with Shared Representations (Siqueira et al. 2020, AAAI), CBAM optional.

Siqueira et al. Sec. 3: a shared *base* learns low/mid-level features once, and B independent
convolutional *branches* on top of it form the ensemble; the prediction is the plurality vote
of the branches (`fer_jax.losses.ensemble_vote`). Layer sizes are those of the authors' ESR-9:

  base    conv 5x5 64, conv 3x3 128 + pool, conv 3x3 128, conv 3x3 128 + pool
          (96x96 input -> 128 x 20 x 20 with padding='valid')
  branch  conv 3x3 128, conv 3x3 256 + pool, conv 3x3 256, conv 3x3 512 (padding 1),
          global average pool, FC 512 -> 8 (+ FC 8 -> 2 arousal/valence if ``dimensional``)

every conv with a bias and followed by BatchNorm + ReLU (+ 2x2 max pool). Trainable
parameters without CBAM: base 374,784 (3-channel input), one branch 2,219,418 with the
arousal/valence layer (2,219,400 without; tested).

Heidari & Iosifidis (Sec. 3, Fig. 2) add CBAM (Woo et al. 2018) after every layer of base and
branches; their loss (Eq. (4)) diversifies the channel vectors and spatial maps of the *last*
CBAM of each branch (their code takes ``cbam4``'s maps), which this module returns stacked
over branches as ``out['attention']``.

``padding='same'`` keeps the parameter counts but pads every conv, so 48x48 FER-2013 faces fit
(the 'valid' layout needs >= 54 pixels). ``width`` scales every conv's channels (CPU
ablations); ``num_active`` runs only the first b branches (progressive training adds branches
one at a time, early-exit evaluation reads prefixes of the vote).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from fer_jax.models import layers
from fer_jax.models.cbam import CBAM, NORMS

Array = jax.Array

# (features, kernel, pool after, padding-1 even in 'valid' mode), Siqueira et al.'s ESR-9.
BASE_LAYERS = ((64, 5, False, False), (128, 3, True, False), (128, 3, False, False),
               (128, 3, True, False))
BRANCH_LAYERS = ((128, 3, False, False), (256, 3, True, False), (256, 3, False, False),
                 (512, 3, False, True))
PADDINGS = ("valid", "same")


class ConvBlock(nn.Module):
    """conv (+bias) -> BatchNorm -> ReLU -> [2x2 max pool] -> [CBAM]; returns (y, maps)."""

    features: int
    kernel: int
    pool: bool
    pad: bool
    cbam: bool
    cbam_spatial: bool
    reduction: int
    norm: str
    bn_momentum: float

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> tuple[Array, dict | None]:
        k = self.kernel
        if not self.pad and min(x.shape[1:3]) < k:
            raise ValueError(f"ESR layer {self.name}: spatial size {x.shape[1:3]} is smaller than "
                             f"its {k}x{k} kernel; use a larger input (>= 54 for padding='valid') "
                             "or padding='same'")
        p = k // 2 if self.pad else 0
        # Torch's Conv2d has a bias even before BN; the published parameter counts include it.
        x = nn.Conv(self.features, (k, k), padding=((p, p), (p, p)), name="conv")(x)
        if self.norm == "group":
            x = nn.GroupNorm(num_groups=math.gcd(self.features, 8), name="gn")(x)
        else:
            norm = layers.make_norm(self.norm, train=train, momentum=self.bn_momentum,
                                    epsilon=1e-5)
            x = norm("bn")(x)
        x = nn.relu(x)
        if self.pool:
            if min(x.shape[1:3]) < 2:
                raise ValueError(f"ESR layer {self.name}: spatial size {x.shape[1:3]} is too small "
                                 "for its 2x2 pool; use a larger input or padding='same'")
            # Reshape pooling, fast on XLA:CPU (docs/performance.md#max-pool).
            x = layers.max_pool_reshape(x, 2)
        maps = None
        if self.cbam:
            x, maps = CBAM(self.reduction, spatial=self.cbam_spatial, norm=self.norm,
                           name="cbam")(x, train=train)
        return x, maps


def _scaled(features: int, width: float) -> int:
    return max(1, int(round(features * width)))


class ESRBase(nn.Module):
    """The shared layers (Siqueira et al. Fig. 1, 'shared representations')."""

    block_kw: dict
    width: float = 1.0
    padding: str = "valid"

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        for i, (f, k, pool, pad1) in enumerate(BASE_LAYERS):
            x, _ = ConvBlock(_scaled(f, self.width), k, pool, pad1 or self.padding == "same",
                             name=f"layer{i + 1}", **self.block_kw)(x, train=train)
        return x


class ESRBranch(nn.Module):
    """One ensemble member: four conv layers, global average pool, classifier."""

    num_classes: int
    block_kw: dict
    width: float = 1.0
    padding: str = "valid"
    dimensional: bool = False

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> dict[str, Array]:
        maps = None
        for i, (f, k, pool, pad1) in enumerate(BRANCH_LAYERS):
            x, maps = ConvBlock(_scaled(f, self.width), k, pool, pad1 or self.padding == "same",
                                name=f"layer{i + 1}", **self.block_kw)(x, train=train)
        embedding = layers.global_avg_pool(x)
        out = {"feature_map": x, "embedding": embedding,
               "logits": nn.Dense(self.num_classes, name="fc")(embedding)}
        if self.dimensional:
            # Arousal/valence from the ReLU of the emotion logits, as in the ESR code.
            out["affect"] = nn.Dense(2, name="fc_dimensional")(nn.relu(out["logits"]))
        if maps is not None:
            out["attention"] = maps  # The last layer's CBAM maps: what Eq. (4) diversifies.
        return out


class ESR(nn.Module):
    """ESR-B with per-branch logits; ``__call__(x, train=..., num_active=None)``.

    Attributes:
      num_classes: classes of every branch (8 for FER+ / AffectNet).
      num_branches: B (9 and 15 in the papers; 1 is allowed but has no diversity term).
      cbam: CBAM after every layer (Heidari & Iosifidis' ESR*); False is the original ESR.
      cbam_spatial: keep CBAM's spatial gate (False = channel attention only).
      reduction: CBAM channel-MLP reduction r.
      padding: 'valid' (the original 96x96 layout) or 'same' (any size >= 16, e.g. 48x48).
      width: multiplier of every conv's channels (1.0 = the paper's sizes).
      norm: 'batch', 'group' (GroupNorm with gcd(C, 8) groups: per example, for federated
        clients) or 'none'. Without any norm the 8 CBAM gates (each ~0.5 x 0.5 at init) shrink
        the signal ~4x per layer: at width 1/8 the attention maps are all 0.5 +- 2e-6, so
        det(S) = 0 and diversity is dead; use 'group' where BatchNorm is unwanted.
      dimensional: add the arousal/valence layer FC 8 -> 2 of the original ESR (output
        'affect'); FER datasets have no such labels, so configs leave it off.

    Returns a dict: 'feature_map' (shared base output), 'embedding' (its average pool),
    'branch_logits' (b, N, K) for the b active branches, 'logits' (N, K) their mean (for code
    that expects one classifier; the paper predicts by ``losses.ensemble_vote``),
    'branch_embeddings' (b, N, C), and with CBAM 'attention' = {'channel': (b, N, C),
    'spatial': (b, N, h, w)} from each branch's last layer; 'affect' (b, N, 2) if dimensional.
    """

    num_classes: int = 8
    _: dataclasses.KW_ONLY
    num_branches: int = 9
    cbam: bool = True
    cbam_spatial: bool = True
    reduction: int = 16
    padding: str = "valid"
    width: float = 1.0
    norm: str = "batch"
    dimensional: bool = False
    bn_momentum: float = 0.9

    def __post_init__(self):
        if self.num_classes is None:
            raise ValueError("ESR needs num_classes: every branch is a classifier")
        layers.check_num_classes(self.num_classes)
        if isinstance(self.num_branches, bool) or not isinstance(self.num_branches, int) \
                or self.num_branches < 1:
            raise ValueError(f"num_branches must be a positive int, got {self.num_branches!r}")
        layers.check_choice(self.padding, PADDINGS, name="padding")
        layers.check_choice(self.norm, NORMS, name="norm")
        if not self.width > 0:
            raise ValueError(f"width must be > 0, got {self.width!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, *, train: bool, num_active: int | None = None) -> dict:
        b = self.num_branches if num_active is None else num_active
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= self.num_branches:
            raise ValueError(f"num_active must be None or an int in [1, {self.num_branches}], "
                             f"got {num_active!r}")
        x = layers.check_images(x)
        block_kw = dict(cbam=self.cbam, cbam_spatial=self.cbam_spatial,
                        reduction=self.reduction, norm=self.norm, bn_momentum=self.bn_momentum)
        shared = ESRBase(block_kw, self.width, self.padding, name="base")(x, train=train)
        # A Python loop, not nn.vmap: vmapped convolutions become grouped convolutions, ~10x
        # slower on XLA:CPU (docs/performance.md#python-loops); inactive branches are not traced.
        outs = [ESRBranch(self.num_classes, block_kw, self.width, self.padding,
                          self.dimensional, name=f"branch_{i}")(shared, train=train)
                for i in range(b)]
        branch_logits = jnp.stack([o["logits"] for o in outs])
        result = {"feature_map": shared, "embedding": layers.global_avg_pool(shared),
                  "branch_logits": branch_logits, "logits": jnp.mean(branch_logits, axis=0),
                  "branch_embeddings": jnp.stack([o["embedding"] for o in outs])}
        if self.cbam:
            result["attention"] = {k: jnp.stack([o["attention"][k] for o in outs])
                                   for k in ("channel", "spatial")}
        if self.dimensional:
            result["affect"] = jnp.stack([o["affect"] for o in outs])
        return result


def esr(num_classes: int | None = 8, **kwargs) -> ESR:
    """ESR-B (default B = 9, CBAM on); the `get_model` factory signature."""
    return ESR(num_classes, **kwargs)
