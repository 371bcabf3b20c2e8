"""fer_jax model zoo: Flax linen modules with one calling convention.

Every model maps float32 images (N, H, W, C) in [0, 1] (any C) to::

  {'feature_map': (N, h, w, c), 'embedding': (N, c), 'logits': (N, num_classes)}

where 'embedding' is the global average pool of 'feature_map' and 'logits' is present only
when ``num_classes`` is not None. BatchNorm state lives in the 'batch_stats' collection::

  model = get_model('resnet18', num_classes=7, stem='small')
  variables = model.init(key, x, train=False)                 # {'params', 'batch_stats'}
  out, new_state = model.apply(variables, x, train=True, mutable=['batch_stats'],
                               rngs={'dropout': key})         # rng only if dropout > 0
  out = model.apply(variables, x, train=False)

A model built with ``norm='none'`` has no 'batch_stats' in ``init``'s output; trainers pass
``variables.get('batch_stats', {})`` and the same calls work (the update comes back empty).
ResNets can also run part of the network (``start_stage`` / ``stop_stage``, see resnet.py).
"""

import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax

from fer_jax.models import layers
from fer_jax.models.mobilenet_v2 import InvertedResidual, MobileNetV2
from fer_jax.models.resnet import (
    BasicBlock,
    Bottleneck,
    PreActBottleneck,
    ResNet,
    resnet18,
    resnet50,
    resnet50v2,
)
from fer_jax.models.small_cnn import SmallCNN

__all__ = [
    "MODELS",
    "BasicBlock",
    "Bottleneck",
    "InvertedResidual",
    "MobileNetV2",
    "PreActBottleneck",
    "ResNet",
    "SmallCNN",
    "count_params",
    "get_model",
    "layers",
    "resnet18",
    "resnet50",
    "resnet50v2",
]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "resnet50v2": resnet50v2,
    "mobilenetv2": MobileNetV2,
}


def get_model(name: str, *, num_classes: int | None, **kwargs: Any) -> nn.Module:
    """Builds a model by name; ``kwargs`` are the model's keyword options (e.g. stem='small').

    Names: 'small_cnn', 'resnet18', 'resnet50', 'resnet50v2', 'mobilenetv2'.
    ``num_classes=None`` gives the backbone only (no 'logits').
    """
    if name not in MODELS:
        raise ValueError(f"name must be one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name](num_classes, **kwargs)


def count_params(variables: Mapping[str, Any]) -> dict[str, int]:
    """Counts scalars: 'params' are trainable, every other collection (BN statistics) is not.

    Works on arrays and on ``jax.ShapeDtypeStruct`` leaves (``jax.eval_shape(model.init,
    ...)``), so large models can be counted without allocating them. ``total`` matches
    Keras' ``count_params()``; ``trainable`` matches torch's ``sum(p.numel() for p in
    model.parameters())`` (BN running statistics are buffers there).
    """
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError("variables must be a mapping with a 'params' collection (the output "
                         f"of model.init), got {type(variables).__name__}")

    def size(tree: Any) -> int:
        return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))

    trainable = size(variables["params"])
    non_trainable = sum(size(v) for k, v in variables.items() if k != "params")
    return {"trainable": trainable, "non_trainable": non_trainable,
            "total": trainable + non_trainable}
