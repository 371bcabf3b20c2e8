"""Pretrained MobileNetV2 weights into fer_jax's Flax `MobileNetV2` (models/mobilenet_v2.py).

Keras (`keras.applications.MobileNetV2(include_top=False)`): layer names map one to one (the
flax path joined with '_', see mobilenet_v2.py); depthwise kernels (3, 3, C, 1) -> (3, 3, 1, C).
Sources: a Keras model object (`from_keras_model`), or an HDF5 file read with h5py only
(`read_keras_h5`): Keras' ImageNet file `mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_
224_no_top.h5` or any `model.save('x.h5')` / legacy `save_weights('x.h5')` of the model.
Use the flax model with its defaults (TF 'same' padding, BN epsilon 1e-3).

torchvision (`torchvision.models.mobilenet_v2().state_dict()`): `features.0` -> Conv1 / bn_Conv1,
`features.1` -> expanded_conv, `features.k` -> block_{k-1} (k = 2..17), `features.18` -> Conv_1 /
Conv_1_bn, `classifier.1` -> head; conv weights OIHW -> HWIO. Build the flax model with
`padding='symmetric', bn_epsilon=1e-5` (torchvision pads every side and uses BN eps 1e-5;
`TORCH_MODEL_KWARGS`). torch itself is not needed: `read_torch_state_dict` reads an .npz
(or .safetensors) export, made once on a machine with torch:
    python -c "import torch, torchvision, numpy as np; sd = torchvision.models.mobilenet_v2(
        weights='IMAGENET1K_V1').state_dict(); np.savez('mnv2_torch.npz', **{k: v.numpy()
        for k, v in sd.items()})"
A `.pt` / `.pth` file is read only where torch is installed, with
`torch.load(weights_only=True)`: tensors and containers, never pickled code.

Loading real ImageNet weights you have on disk:
    from fer_jax.models import convert
    convert.save_npz(convert.read_keras_h5('..._no_top.h5'), 'mnv2_keras.npz')
    python -m fer_jax.main --config=configs/vfer.py:weights=mnv2_keras.npz ...
`load_flax_variables` checks every shape against the model and names what is missing.
"""

from __future__ import annotations

import hashlib
import pathlib
import re

import numpy as np

TORCH_MODEL_KWARGS = {"padding": "symmetric", "bn_epsilon": 1e-5}

_BN = {"gamma": ("params", "scale"), "beta": ("params", "bias"),
       "moving_mean": ("batch_stats", "mean"), "moving_variance": ("batch_stats", "var")}


def _keras_module_path(layer: str) -> tuple[str, ...]:
    if layer.startswith("expanded_conv_"):
        return ("expanded_conv", layer[len("expanded_conv_"):])
    m = re.fullmatch(r"(block_\d+)_(.+)", layer)
    if m:
        return (m.group(1), m.group(2))
    if layer == "predictions":
        return ("head",)
    return (layer,)


def _put(flat: dict, collection: str, path: tuple[str, ...], name: str, value) -> None:
    flat["/".join((collection, *path, name))] = np.asarray(value, np.float32)


def from_keras_weights(layer_weights: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """{keras layer name: {weight name: array}} -> flat {'params/block_1/expand/kernel': ...}."""
    flat: dict[str, np.ndarray] = {}
    for layer, weights in layer_weights.items():
        path = _keras_module_path(layer)
        for wname, value in weights.items():
            short = wname.split("/")[-1].split(":")[0]
            if short in _BN:
                collection, name = _BN[short]
                _put(flat, collection, path, name, value)
            elif short == "depthwise_kernel" or (short == "kernel" and path[-1] == "depthwise"):
                # Keras 2 calls it depthwise_kernel, Keras 3 kernel; both (3, 3, C, 1).
                _put(flat, "params", path, "kernel", np.transpose(value, (0, 1, 3, 2)))
            elif short in ("kernel", "bias"):
                _put(flat, "params", path, short, value)
            else:
                raise ValueError(f"Keras layer {layer!r}: unknown weight {wname!r}")
    return flat


def from_keras_model(model) -> dict[str, np.ndarray]:
    """A built `keras.applications.MobileNetV2` -> flat flax variables."""
    layer_weights = {}
    for layer in model.layers:
        if layer.weights:
            layer_weights[layer.name] = {w.path if hasattr(w, "path") else w.name: np.asarray(w)
                                         for w in layer.weights}
    return from_keras_weights(layer_weights)


def _decode(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def read_keras_h5(path) -> dict[str, np.ndarray]:
    """Keras HDF5 weights (ImageNet '_no_top.h5', model.save('x.h5')) -> flat flax variables."""
    import h5py

    layer_weights = {}
    with h5py.File(path, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f
        if "layer_names" not in root.attrs:
            raise ValueError(f"{path}: not a Keras HDF5 weights file (no 'layer_names'); for the "
                             "Keras 3 '.weights.h5' format load it into keras and use "
                             "from_keras_model")
        for layer in map(_decode, root.attrs["layer_names"]):
            names = [_decode(n) for n in root[layer].attrs.get("weight_names", [])]
            if names:
                layer_weights[layer] = {n: np.asarray(root[layer][n]) for n in names}
    return from_keras_weights(layer_weights)


def _torch_module(index: int, last: int) -> tuple[str, ...]:
    if index == 0:
        return ("Conv1",)
    if index == last:
        return ("Conv_1",)
    return ("expanded_conv",) if index == 1 else (f"block_{index - 1}",)


def from_torch_state_dict(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """torchvision mobilenet_v2 state_dict (arrays) -> flat flax variables."""
    sd = {k: np.asarray(v) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    feats = {int(k.split(".")[1]) for k in sd if k.startswith("features.")}
    if not feats:
        raise ValueError("not a torchvision mobilenet_v2 state_dict (no 'features.*' keys)")
    last = max(feats)
    flat: dict[str, np.ndarray] = {}
    bn_names = {"weight": ("params", "scale"), "bias": ("params", "bias"),
                "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] == "classifier":
            name = "kernel" if parts[-1] == "weight" else "bias"
            _put(flat, "params", ("head",), name, value.T if name == "kernel" else value)
            continue
        index, rest, leaf = int(parts[1]), parts[2:-1], parts[-1]
        module = _torch_module(index, last)
        if index in (0, last):
            # features.0 / features.18 = Conv2dNormActivation: .0 conv, .1 BN.
            role = {"0": "conv", "1": "bn"}[rest[0]]
            names = {"conv": module[0],
                     "bn": "bn_Conv1" if index == 0 else "Conv_1_bn"}
            if role == "conv":
                _put(flat, "params", (names["conv"],), "kernel", value.transpose(2, 3, 1, 0))
            else:
                collection, name = bn_names[leaf]
                _put(flat, collection, (names["bn"],), name, value)
            continue
        # InvertedResidual: conv.{0: expand?, ...}; with expansion 1 there is no expand block.
        expanded = any(k.startswith(f"features.{index}.conv.3.") for k in sd)
        seq = (["expand", "depthwise", "project", "project_BN"] if expanded
               else ["depthwise", "project", "project_BN"])
        pos = int(rest[1])
        role = seq[pos]
        if role in ("expand", "depthwise") and len(rest) == 3:
            sub = rest[2]
            if sub == "0":
                _put(flat, "params", module + (role,), "kernel", value.transpose(2, 3, 1, 0))
            else:
                collection, name = bn_names[leaf]
                _put(flat, collection, module + (f"{role}_BN",), name, value)
        elif role == "project":
            _put(flat, "params", module + ("project",), "kernel", value.transpose(2, 3, 1, 0))
        elif role == "project_BN":
            collection, name = bn_names[leaf]
            _put(flat, collection, module + ("project_BN",), name, value)
        else:
            raise ValueError(f"unexpected torchvision key {key!r}")
    return flat


def read_torch_state_dict(path) -> dict[str, np.ndarray]:
    """A torchvision state_dict exported to .npz or .safetensors, or saved by torch (.pt /
    .pth, needs torch) -> flat flax variables."""
    path = pathlib.Path(path)
    if path.suffix == ".npz":
        with np.load(path) as z:
            return from_torch_state_dict(dict(z))
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return from_torch_state_dict(load_file(str(path)))
    if path.suffix in (".pt", ".pth"):
        try:
            import torch
        except ImportError:
            raise ImportError(f"{path}: reading a .pt / .pth file needs torch; or export the "
                              "state_dict to .npz where torch is installed (see "
                              "fer_jax/models/convert.py)") from None
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        if "state_dict" in state_dict:  # A training checkpoint {'state_dict': ..., ...}.
            state_dict = state_dict["state_dict"]
        return from_torch_state_dict({k: v.numpy() for k, v in state_dict.items()
                                      if hasattr(v, "numpy")})
    raise ValueError(f"{path}: expected a .npz, .safetensors, .pt or .pth torchvision "
                     "state_dict (see the module docstring)")


def save_npz(flat: dict[str, np.ndarray], path) -> None:
    np.savez(path, **flat)


def file_digest(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()[:16]


def load_flax_variables(path_or_flat, like) -> dict:
    """Fills the structure of `like` (model.init output) from a flat dict or a converted .npz.

    Every leaf of `like` must be present with the same shape (a 'head' is optional: a
    backbone-only model ignores it); errors list what is missing or mismatched.
    """
    import jax

    if isinstance(path_or_flat, dict):
        flat = path_or_flat
    else:
        with np.load(path_or_flat) as z:
            flat = dict(z)
    missing, wrong = [], []

    def fill(path, leaf):
        key = "/".join(str(p.key) for p in path)
        if key not in flat:
            missing.append(key)
            return leaf
        value = flat[key]
        if value.shape != leaf.shape:
            wrong.append(f"{key}: {value.shape} vs model {leaf.shape}")
            return leaf
        return np.asarray(value, leaf.dtype)

    out = jax.tree_util.tree_map_with_path(fill, like)
    if missing or wrong:
        raise ValueError(f"weights do not fit the model: {len(missing)} missing (e.g. "
                         f"{missing[:3]}), {len(wrong)} shape mismatches (e.g. {wrong[:3]}); "
                         "check the width and, for torchvision, TORCH_MODEL_KWARGS")
    return out
