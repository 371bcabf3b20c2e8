"""One-time converter: the `mtcnn==1.0.0` wheel's weights -> fer_jax/data/face/mtcnn_weights.npz.

Zhang, Zhang, Li, Qiao, "Joint Face Detection and Alignment using Multi-task Cascaded Convolutional
Networks", IEEE SPL 2016 (MTCNN). The wheel (MIT, (c) 2019-2024 Ivan de Paz Centeno) ships the
original P-Net / R-Net / O-Net weights as joblib+lz4 pickles
`mtcnn/assets/weights/{pnet,rnet,onet}.lz4`, each a flat list of float32 arrays in Keras
`get_weights()` order: per conv layer a kernel (h, w, in, out), a bias (out,) and a PReLU slope
(1, 1, out); per dense layer a kernel (in, out), a bias and (hidden layers only) a PReLU slope.

This script is the only place that unpickles them. fer_jax loads the resulting .npz with
`np.load(..., allow_pickle=False)`, so no pickle, joblib, lz4 or TensorFlow is needed at run time.

Needs (conversion only): `pip install --no-deps mtcnn==1.0.0 joblib lz4` (joblib 1.6.0 and lz4 4.4.5
were used; joblib imports cloudpickle, already present in this environment). The `mtcnn` package is
located with importlib and never imported, because importing it pulls TensorFlow.

Run: .venv/bin/python tools/convert_mtcnn_weights.py [--out fer_jax/data/face/mtcnn_weights.npz]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import pathlib

import numpy as np

# Keras get_weights() order of each network, as (layer name, parameter) pairs. Layer names follow
# the wheel's Keras models (conv4-1 -> conv4_1); fer_jax/data/face/mtcnn.py uses the same names.
LAYOUT = {
    "pnet": [
        ("conv1", "kernel"), ("conv1", "bias"), ("prelu1", "alpha"),
        ("conv2", "kernel"), ("conv2", "bias"), ("prelu2", "alpha"),
        ("conv3", "kernel"), ("conv3", "bias"), ("prelu3", "alpha"),
        ("conv4_1", "kernel"), ("conv4_1", "bias"),
        ("conv4_2", "kernel"), ("conv4_2", "bias"),
    ],
    "rnet": [
        ("conv1", "kernel"), ("conv1", "bias"), ("prelu1", "alpha"),
        ("conv2", "kernel"), ("conv2", "bias"), ("prelu2", "alpha"),
        ("conv3", "kernel"), ("conv3", "bias"), ("prelu3", "alpha"),
        ("fc4", "kernel"), ("fc4", "bias"), ("prelu4", "alpha"),
        ("fc5_1", "kernel"), ("fc5_1", "bias"),
        ("fc5_2", "kernel"), ("fc5_2", "bias"),
    ],
    "onet": [
        ("conv1", "kernel"), ("conv1", "bias"), ("prelu1", "alpha"),
        ("conv2", "kernel"), ("conv2", "bias"), ("prelu2", "alpha"),
        ("conv3", "kernel"), ("conv3", "bias"), ("prelu3", "alpha"),
        ("conv4", "kernel"), ("conv4", "bias"), ("prelu4", "alpha"),
        ("fc5", "kernel"), ("fc5", "bias"), ("prelu5", "alpha"),
        ("fc6_1", "kernel"), ("fc6_1", "bias"),
        ("fc6_2", "kernel"), ("fc6_2", "bias"),
        ("fc6_3", "kernel"), ("fc6_3", "bias"),
    ],
}


def find_weights_dir() -> pathlib.Path:
    """Return the wheel's weight folder without importing `mtcnn` (that would import TensorFlow)."""
    spec = importlib.util.find_spec("mtcnn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package 'mtcnn' not installed; run `pip install --no-deps mtcnn==1.0.0 joblib lz4`"
        )
    folder = pathlib.Path(spec.submodule_search_locations[0]) / "assets" / "weights"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} missing: expected the mtcnn==1.0.0 wheel layout")
    return folder


def convert(weights_dir: pathlib.Path) -> dict[str, np.ndarray]:
    """Unpickle the three weight lists and return flat `net/layer/param` float32 arrays."""
    import joblib  # conversion-only dependency, deliberately not imported at module level

    out: dict[str, np.ndarray] = {}
    for net, layout in LAYOUT.items():
        path = weights_dir / f"{net}.lz4"
        arrays = joblib.load(path)
        if len(arrays) != len(layout):
            raise ValueError(f"{path}: expected {len(layout)} arrays, found {len(arrays)}")
        for (layer, param), arr in zip(layout, arrays, strict=True):
            arr = np.asarray(arr)
            if arr.dtype != np.float32:
                raise ValueError(f"{path}: {layer}/{param} has dtype {arr.dtype}, expected float32")
            # Keras stores shared-axis PReLU slopes as (1, 1, C); keep one slope per channel.
            if param == "alpha":
                arr = arr.reshape(-1)
            out[f"{net}/{layer}/{param}"] = np.ascontiguousarray(arr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = pathlib.Path(__file__).resolve().parents[1] / "fer_jax/data/face/mtcnn_weights.npz"
    parser.add_argument("--out", type=pathlib.Path, default=default)
    args = parser.parse_args()
    arrays = convert(find_weights_dir())
    np.savez_compressed(args.out, **arrays)
    # Round trip without pickle: this is exactly how fer_jax reads the file.
    with np.load(args.out, allow_pickle=False) as loaded:
        for key, arr in arrays.items():
            np.testing.assert_array_equal(loaded[key], arr)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    total = sum(a.size for a in arrays.values())
    print(f"wrote {args.out} ({len(arrays)} arrays, {total} parameters, sha256 {digest})")


if __name__ == "__main__":
    main()
