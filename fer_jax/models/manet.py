"""MA-Net style global multi-scale + local attention network (Zhao et al. 2021, IEEE TIP).

Zhao et al., *Learning deep global multi-scale and local attention features for FER in the
wild*, Sec. III: a ResNet-18 backbone gives preliminary features (stages 1-2); a *global*
branch extracts multi-scale features from them, and a *local* branch divides them into
non-overlapping patches (2 x 2 = 4 here) and runs a separate attention network on each.
The two branches are classified separately and fused at decision level.

Heidari & Iosifidis (Sec. 3, Fig. 3, Eq. (5)) diversify (i) the four local patches' features
(spatial map = mean over channels, channel vector = mean over space) and (ii) the two
branches' globally average-pooled features; this module returns what those terms need:
'patch_features' (4, N, h, w, C), 'global_embedding' and 'local_embedding' (N, C).

What is "style" (a smaller reading of the paper, docs/papers.md#diversity-manet):
- global branch: ResNet-18 stages 3-4, then a multi-scale block (parallel 3x3 convs with
  dilation 1, 2, 3 -> concat -> 1x1 conv, residual) and CBAM (Woo et al. 2018);
- local branch, per patch: two ResNet basic blocks (stride 2, widths 4w and 8w like stages
  3-4) and CBAM; the four outputs are put back on their 2 x 2 grid;
- fused logits = mean of the global and local logits (MA-Net fuses at decision level).
The full MA-Net has 50.54 M parameters and is pretrained on MS-Celeb-1M; this one trains
from scratch (31,679,332 trainable parameters at width 64 with 8 classes).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from fer_jax.models import layers
from fer_jax.models.cbam import CBAM
from fer_jax.models.resnet import BasicBlock, resnet18

Array = jax.Array


class MultiScale(nn.Module):
    """Parallel 3x3 convs with dilations (1, 2, 3) -> concat -> 1x1 conv, added to the input.

    Different dilations see different receptive fields: the "multi-scale" of MA-Net's global
    branch, written with plain convolutions.
    """

    branch_features: int
    conv: object
    norm: object
    dilations: tuple[int, ...] = (1, 2, 3)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        outs = []
        for d in self.dilations:
            y = self.conv(self.branch_features, (3, 3), kernel_dilation=(d, d),
                          padding=((d, d), (d, d)), name=f"conv_d{d}")(x)
            outs.append(nn.relu(self.norm(f"bn_d{d}")(y)))
        y = self.conv(x.shape[-1], (1, 1), name="fuse")(jnp.concatenate(outs, axis=-1))
        # Zero-init scale: the block starts as the identity, like the ResNet blocks before it.
        y = self.norm("fuse_bn", scale_init=nn.initializers.zeros)(y)
        return nn.relu(x + y)


class LocalBranch(nn.Module):
    """One patch's attention network: two stride-2 basic blocks, then CBAM."""

    width: int
    conv: object
    norm: object
    cbam_norm: str

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        x = BasicBlock(self.width * 4, 2, self.conv, self.norm, name="block1")(x)
        x = BasicBlock(self.width * 8, 2, self.conv, self.norm, name="block2")(x)
        x, _ = CBAM(norm=self.cbam_norm, name="cbam")(x, train=train)
        return x


def split_patches(x: Array) -> Array:
    """(N, H, W, C) -> (4, N, H/2, W/2, C): top-left, top-right, bottom-left, bottom-right."""
    n, h, w, c = x.shape
    if h % 2 or w % 2 or h < 2 or w < 2:
        raise ValueError(f"MA-Net splits the backbone features into 2 x 2 patches; their size "
                         f"{(h, w)} must be even (use an input size divisible by 4 or 8)")
    x = x.reshape(n, 2, h // 2, 2, w // 2, c)
    return jnp.transpose(x, (1, 3, 0, 2, 4, 5)).reshape(4, n, h // 2, w // 2, c)


def merge_patches(p: Array) -> Array:
    """Inverse of `split_patches`: (4, N, h, w, C) -> (N, 2h, 2w, C)."""
    _, n, h, w, c = p.shape
    return jnp.transpose(p.reshape(2, 2, n, h, w, c), (2, 0, 3, 1, 4, 5)).reshape(
        n, 2 * h, 2 * w, c)


class MANet(nn.Module):
    """Global multi-scale + 4-patch local attention network on a ResNet-18 backbone.

    Attributes:
      num_classes: classes of both heads.
      width: ResNet width (64 = ResNet-18); the local blocks use 4w and 8w channels.
      stem: 'small' (3x3/1, for 48x48) or 'imagenet' (7x7/2 + pool, for 224x224).
      norm: 'batch' or 'none' (federated clients).
      normalize_input: ImageNet standardisation (for converted torchvision weights).

    Returns a dict: 'feature_map' / 'embedding' (global branch), 'global_logits',
    'local_logits', 'logits' (their mean), 'patch_features' (4, N, h, w, 8w),
    'global_embedding', 'local_embedding' (N, 8w).
    """

    num_classes: int = 8
    _: dataclasses.KW_ONLY
    width: int = 64
    stem: str = "small"
    norm: str = "batch"
    normalize_input: bool = True
    bn_momentum: float = 0.9

    def __post_init__(self):
        if self.num_classes is None:
            raise ValueError("MANet needs num_classes: both branches are classifiers")
        layers.check_num_classes(self.num_classes)
        layers.check_choice(self.norm, layers.NORMS, name="norm")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> dict[str, Array]:
        x = layers.check_images(x)
        backbone = resnet18(None, width=self.width, stem=self.stem, norm=self.norm,
                            normalize_input=self.normalize_input, bn_momentum=self.bn_momentum,
                            name="backbone")
        # Stages 1-2 are the shared "preliminary features"; stages 3-4 of the same ResNet
        # start the global branch (calling one submodule twice shares its weights).
        low = backbone(x, train=train, stop_stage=2)["feature_map"]
        g = backbone(low, train=train, start_stage=2)["feature_map"]
        norm = layers.make_norm(self.norm, train=train, momentum=self.bn_momentum, epsilon=1e-5)
        conv = partial(nn.Conv, use_bias=self.norm == "none")
        g = MultiScale(self.width * 2, conv, norm, name="multiscale")(g)
        g, _ = CBAM(norm=self.norm, name="global_cbam")(g, train=train)

        # Four separate local networks (own weights), a Python loop: vmapped convs are
        # grouped convs on XLA:CPU, ~10x slower (docs/performance.md#python-loops).
        patches = split_patches(low)
        local = jnp.stack([LocalBranch(self.width, conv, norm, self.norm, name=f"local_{i}")(
            patches[i], train=train) for i in range(4)])
        g_emb = layers.global_avg_pool(g)
        l_emb = layers.global_avg_pool(merge_patches(local))
        global_logits = nn.Dense(self.num_classes, name="global_head")(g_emb)
        local_logits = nn.Dense(self.num_classes, name="local_head")(l_emb)
        return {"feature_map": g, "embedding": g_emb, "global_logits": global_logits,
                "local_logits": local_logits, "logits": (global_logits + local_logits) / 2,
                "patch_features": local, "global_embedding": g_emb, "local_embedding": l_emb}


def manet(num_classes: int | None = 8, **kwargs) -> MANet:
    """The `get_model` factory signature."""
    return MANet(num_classes, **kwargs)
