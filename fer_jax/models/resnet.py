"""ResNet v1 (He et al. 2016a, *Deep residual learning*) and v2 (He et al. 2016b, *Identity
mappings in deep residual networks*, pre-activation), in the style of flax examples/imagenet.

- v1 ``BasicBlock`` (ResNet-18/34) and ``Bottleneck`` (ResNet-50/101/152). The bottleneck
  puts its stride on the 3x3 conv ("v1.5", as torchvision and flax examples/imagenet do;
  the paper strides the first 1x1). Parameter counts do not depend on that choice.
- v2 ``PreActBottleneck``: BN-ReLU before every conv, the projection shortcut reads the
  pre-activated input, and the network ends with BN + ReLU before pooling (Sec. 4 of
  He et al. 2016b; stride on the 3x3 conv as in timm's ``resnetv2_50``, whereas Keras'
  ResNet50V2 strides the last block of each stage).
- ``stem='imagenet'``: 7x7/2 conv + 3x3/2 max pool (/4); ``stem='small'``: one 3x3/1 conv,
  no pool, for 48x48 faces (the four stages then give 48 -> 6).

Splitting the network (the occlusion model's ``Res_low`` / ``Res_up``)::

  low = model.apply(v, x, train=False, stop_stage=1)['feature_map']      # stem + stage 1
  out = model.apply(v, low * (1 - mask), train=False, start_stage=1)     # stages 2-4 + head
  # equals model.apply(v, x, train=False) when mask == 0; inside a parent module call the
  # same submodule twice (``self.backbone(x, ..., stop_stage=1)``): the weights are shared.

``return_stages=True`` adds ``'stages'``: the list of the outputs of the stages that ran
(for v2 before the final BN + ReLU).

Naming follows torchvision so a converter can map weights: ``conv1``/``bn1`` (stem),
``layer{s}_{b}`` for ``layer{s}.{b}``, inside a block ``conv1..3``/``bn1..3`` and
``downsample_conv``/``downsample_bn`` for ``downsample.0/1``; the classifier is ``head``
(torchvision ``fc``). BatchNorm: ``scale``/``bias`` (params) = ``weight``/``bias``,
``mean``/``var`` (batch_stats) = ``running_mean``/``running_var``; conv kernels are HWIO
(torchvision: OIHW). v2 blocks use ``bn1`` (pre-activation), ``conv1``, ``bn2``, ``conv2``,
``bn3``, ``conv3``, ``downsample_conv``; the final norm is ``post_bn`` (as in Keras).
Torch convs pad symmetrically (``padding=1`` for the strided 3x3), and so do these.
"""

import dataclasses
from collections.abc import Callable, Sequence
from functools import partial

import flax.linen as nn
import jax

from fer_jax.models import layers

Array = jax.Array

# ImageNet statistics (torchvision): converted torchvision weights expect this input.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

_PAD3 = ((1, 1), (1, 1))


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1 projection) shortcut (He et al. 2016a, Fig. 2)."""

    features: int
    strides: int
    conv: Callable
    norm: Callable
    zero_init_residual: bool = True

    expansion = 1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        s = (self.strides, self.strides)
        y = self.conv(self.features, (3, 3), s, padding=_PAD3, name="conv1")(x)
        y = nn.relu(self.norm("bn1")(y))
        y = self.conv(self.features, (3, 3), padding=_PAD3, name="conv2")(y)
        # Zero-init of the last BN scale makes each block start as the identity (Goyal et al.
        # 2017), which helps large-batch and from-scratch training.
        zero = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = self.norm("bn2", scale_init=zero)(y)
        if x.shape != y.shape:
            x = self.conv(self.features, (1, 1), s, name="downsample_conv")(x)
            x = self.norm("downsample_bn")(x)
        return nn.relu(x + y)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand x4 (He et al. 2016a, Fig. 5 right)."""

    features: int
    strides: int
    conv: Callable
    norm: Callable
    zero_init_residual: bool = True

    expansion = 4

    @nn.compact
    def __call__(self, x: Array) -> Array:
        s = (self.strides, self.strides)
        y = self.conv(self.features, (1, 1), name="conv1")(x)
        y = nn.relu(self.norm("bn1")(y))
        y = self.conv(self.features, (3, 3), s, padding=_PAD3, name="conv2")(y)
        y = nn.relu(self.norm("bn2")(y))
        y = self.conv(self.features * 4, (1, 1), name="conv3")(y)
        zero = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = self.norm("bn3", scale_init=zero)(y)
        if x.shape != y.shape:
            x = self.conv(self.features * 4, (1, 1), s, name="downsample_conv")(x)
            x = self.norm("downsample_bn")(x)
        return nn.relu(x + y)


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck: x + conv(relu(bn(...))) (He et al. 2016b, Fig. 1b / 4e).

    The shortcut is the raw input, or a 1x1 projection of the *pre-activated* input when the
    shape changes (the paper's Appendix, also Keras and timm).
    """

    features: int
    strides: int
    conv: Callable
    norm: Callable
    zero_init_residual: bool = True

    expansion = 4

    @nn.compact
    def __call__(self, x: Array) -> Array:
        s = (self.strides, self.strides)
        pre = nn.relu(self.norm("bn1")(x))
        y = self.conv(self.features, (1, 1), name="conv1")(pre)
        y = nn.relu(self.norm("bn2")(y))
        y = self.conv(self.features, (3, 3), s, padding=_PAD3, name="conv2")(y)
        y = nn.relu(self.norm("bn3")(y))
        # No BN ends a pre-activation branch, so zero-init its last conv instead.
        kinit = nn.initializers.zeros if self.zero_init_residual else nn.initializers.lecun_normal()
        y = self.conv(self.features * 4, (1, 1), kernel_init=kinit, name="conv3")(y)
        shortcut = x
        if x.shape != y.shape:
            shortcut = self.conv(self.features * 4, (1, 1), s, name="downsample_conv")(pre)
        return shortcut + y


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck, "preact_bottleneck": PreActBottleneck}
STEMS = ("imagenet", "small")


class ResNet(nn.Module):
    """ResNet v1 / v2 backbone with an optional linear head.

    Attributes:
      num_classes: classes of the linear head, or None for the backbone only (no 'logits').
      stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18, (3, 4, 6, 3) for 50.
      block: 'basic', 'bottleneck' (v1) or 'preact_bottleneck' (v2).
      width: channels of the stem and of the first stage (64 in the papers).
      stem: 'imagenet' (7x7/2 conv + 3x3/2 max pool) or 'small' (3x3/1 conv, no pool).
      norm: 'batch', 'group' (GroupNorm, per example) or 'none' (convs get a bias instead of BN).
      zero_init_residual: start every residual branch at zero (see the blocks).
      bn_momentum, bn_epsilon: torchvision's defaults (torch momentum 0.1 = flax 0.9).
      normalize_input: standardize [0, 1] inputs with the ImageNet mean/std (their channel
        average for grayscale), which converted torchvision weights expect.
    """

    num_classes: int | None = None
    _: dataclasses.KW_ONLY
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block: str = "basic"
    width: int = 64
    stem: str = "imagenet"
    norm: str = "batch"
    zero_init_residual: bool = True
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    normalize_input: bool = True

    def __post_init__(self):
        layers.check_num_classes(self.num_classes)
        if not self.stage_sizes or any(not isinstance(n, int) or n < 1 for n in self.stage_sizes):
            raise ValueError(f"stage_sizes must be a non-empty sequence of positive ints, got "
                             f"{self.stage_sizes!r}")
        layers.check_choice(self.block, tuple(BLOCKS), name="block")
        layers.check_choice(self.stem, STEMS, name="stem")
        layers.check_choice(self.norm, layers.NORMS, name="norm")
        if not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"width must be a positive int, got {self.width!r}")
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        x: Array,
        *,
        train: bool,
        return_stages: bool = False,
        start_stage: int = 0,
        stop_stage: int | None = None,
    ) -> dict[str, Array]:
        """Runs stages ``start_stage + 1 .. stop_stage`` (1-based; default: all).

        Args:
          x: images (N, H, W, C) in [0, 1] when ``start_stage == 0``; otherwise the output
            of stage ``start_stage`` (e.g. after an occlusion mask was applied to it).
          train: BatchNorm uses batch statistics and updates 'batch_stats' when True.
          return_stages: add ``'stages'``, the list of outputs of the stages that ran.
          start_stage, stop_stage: run part of the network. A run that stops early returns
            the stop stage's output as 'feature_map' (and its pooled 'embedding') and no
            'logits'; v2's final BN + ReLU belongs to the full run only.

        Returns:
          {'feature_map': (N, h, w, c), 'embedding': (N, c), 'logits': (N, num_classes)}.
        """
        n_stages = len(self.stage_sizes)
        stop = n_stages if stop_stage is None else stop_stage
        if not isinstance(start_stage, int) or not 0 <= start_stage < n_stages:
            raise ValueError(f"start_stage must be an int in [0, {n_stages}), got {start_stage!r}")
        if not isinstance(stop, int) or not start_stage < stop <= n_stages:
            raise ValueError(f"stop_stage must be None or an int in ({start_stage}, {n_stages}],"
                             f" got {stop_stage!r}")
        x = layers.check_images(x)
        preact = self.block == "preact_bottleneck"
        norm = layers.make_norm(self.norm, train=train, momentum=self.bn_momentum,
                                epsilon=self.bn_epsilon)
        conv = partial(nn.Conv, use_bias=self.norm == "none")

        if start_stage == 0:
            x = self._stem(x, conv, norm, preact)
        block_cls = BLOCKS[self.block]
        stages = []
        for i in range(start_stage, stop):
            for j in range(self.stage_sizes[i]):
                # Every stage but the first halves the resolution in its first block.
                strides = 2 if i > 0 and j == 0 else 1
                x = block_cls(
                    features=self.width * 2**i,
                    strides=strides,
                    conv=conv,
                    norm=norm,
                    zero_init_residual=self.zero_init_residual,
                    name=f"layer{i + 1}_{j}",
                )(x)
            stages.append(x)

        full = stop == n_stages
        if full and preact:
            # Pre-activation nets end un-normalized: one last BN + ReLU (He et al. 2016b).
            x = nn.relu(norm("post_bn")(x))
        out = {"feature_map": x, "embedding": layers.global_avg_pool(x)}
        if full and self.num_classes is not None:
            out["logits"] = nn.Dense(self.num_classes, name="head")(out["embedding"])
        if return_stages:
            out["stages"] = stages
        return out

    def _stem(self, x: Array, conv: Callable, norm: Callable, preact: bool) -> Array:
        if self.normalize_input:
            x = layers.standardize(x, _IMAGENET_MEAN, _IMAGENET_STD)
        if self.stem == "imagenet":
            x = conv(self.width, (7, 7), (2, 2), padding=((3, 3), (3, 3)), name="conv1")(x)
        else:
            x = conv(self.width, (3, 3), padding=_PAD3, name="conv1")(x)
        # v2 has no BN/ReLU here: the first block pre-activates its input.
        if not preact:
            x = nn.relu(norm("bn1")(x))
        if self.stem == "imagenet":
            x = layers.max_pool_3x3_s2(x)
        return x


def resnet18(num_classes: int | None = None, **kwargs) -> ResNet:
    """ResNet-18 v1 (He et al. 2016a): 11,689,512 trainable parameters with 1000 classes."""
    return ResNet(num_classes, stage_sizes=(2, 2, 2, 2), block="basic", **kwargs)


def resnet50(num_classes: int | None = None, **kwargs) -> ResNet:
    """ResNet-50 v1.5 (He et al. 2016a): 25,557,032 trainable parameters with 1000 classes."""
    return ResNet(num_classes, stage_sizes=(3, 4, 6, 3), block="bottleneck", **kwargs)


def resnet50v2(num_classes: int | None = None, **kwargs) -> ResNet:
    """ResNet-50 v2, pre-activation (He et al. 2016b): FedAffect's encoder f_psi."""
    return ResNet(num_classes, stage_sizes=(3, 4, 6, 3), block="preact_bottleneck", **kwargs)
