"""A trained workdir as a predictor: `load(workdir).predict(uint8 images) -> probabilities`.

The model is rebuilt from the workdir's config.json (`model.name`, `model.kwargs`, the input size
of `data`) with the run's class names (eval.json; a run stopped before its end has none, so they
come from loading the run's dataset). Only the model variables are read from the latest orbax
checkpoint (a partial restore: no optimizer is built and its state is never read), in any of
the layouts fer_jax runs save:

  centralized client state   {params, model_state: {batch_stats}, opt_state, initial}
  federated server state     {variables: {params, batch_stats}, opt_state, round, ...}
  earlier TrainState         {params, batch_stats, opt_state, step, rng}

Nothing is written into the workdir. The stored shapes are checked against the rebuilt model
first, so a checkpoint of another model fails naming the first parameter that differs.

`checkpoint_item`, `stored_models` and `read_subtrees` are the reading steps on their own
(fer_jax.io.init starts a model from any run's checkpoint with them). A state holding several
models (FedAffect's {rep, few}, VFER's {g, v, server, personal}) is read per model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from fer_jax import models
from fer_jax.steps import supervised as steps

# Default images per compiled call of `Trained.predict`; smaller inputs are padded to a power of
# two (>= 8), so varying numbers of faces reuse a handful of compilations.
MAX_BATCH = 256


@dataclasses.dataclass(frozen=True, eq=False)
class Trained:
    """A restored classifier. `predict(images)`: (N, H, W, 1|3) uint8 -> (N, K) float32
    probabilities over `class_names` (any H, W: images are resized on device, gray <-> RGB
    converted to the model's `channels`)."""

    workdir: pathlib.Path
    step: int
    config: ml_collections.ConfigDict
    model: object
    variables: dict
    class_names: tuple[str, ...]
    image_size: int
    channels: int
    flip_tta: bool = False

    @functools.cached_property
    def _apply(self):
        """Jitted (variables, uint8 images) -> probabilities."""
        logits = functools.partial(steps.predict, model=self.model, image_size=self.image_size,
                                   channels=self.channels, flip_tta=self.flip_tta)
        # With flip TTA, steps.predict returns log mean probabilities: softmax gives them back.
        return jax.jit(lambda v, x: jax.nn.softmax(
            logits(v["params"], v.get("batch_stats", {}), x), axis=-1))

    def predict(self, images, *, batch_size: int = MAX_BATCH) -> np.ndarray:
        """Class probabilities of uint8 images (N, H, W, C) or one image (H, W, C), computed in
        calls of at most `batch_size` images."""
        images = np.asarray(images)
        single = images.ndim == 3
        images = images[None] if single else images
        if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] not in (1, 3):
            raise ValueError(f"predict expects uint8 images (N, H, W, 1|3), got {images.shape} "
                             f"{images.dtype}")
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            n = len(chunk)
            size = min(batch_size, max(8, 1 << (n - 1).bit_length()))
            if size > n:
                chunk = np.concatenate([chunk, np.zeros((size - n, *chunk.shape[1:]), np.uint8)])
            out.append(np.asarray(self._apply(self.variables, chunk))[:n])
        probs = (np.concatenate(out) if out
                 else np.zeros((0, len(self.class_names)), np.float32))
        return probs[0] if single else probs


def _config(workdir: pathlib.Path) -> ml_collections.ConfigDict:
    path = workdir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{workdir} is not a training workdir: it has no config.json "
                                "(expected the --workdir of a fer_jax.main training run)")
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
    model = config.get("model")
    if model is None or model.get("name") not in models.MODELS:
        raise ValueError(
            f"{path}: model.name={None if model is None else model.get('name')!r} (experiment "
            f"{config.get('experiment')!r}) is not a zoo classifier; loadable runs train one of "
            f"{sorted(models.MODELS)}")
    return config


def _class_names(workdir: pathlib.Path, config) -> tuple[str, ...]:
    path = workdir / "eval.json"
    if path.is_file():
        names = json.loads(path.read_text()).get("class_names")
        if names:
            return tuple(names)
    # A run stopped before its end wrote no eval.json: its dataset says which classes it had.
    from fer_jax import data as data_lib

    return data_lib.load(config.data).class_names


def checkpoint_steps(workdir) -> list[int]:
    """Steps of the finished checkpoints under workdir/checkpoints (orbax's own listing)."""
    directory = pathlib.Path(workdir) / "checkpoints"
    return sorted(ocp.path.step.checkpoint_steps(directory)) if directory.is_dir() else []


def checkpoint_item(workdir, step: int | None = None) -> tuple[int, pathlib.Path]:
    """(step, orbax item folder) of the checkpoint at `step` of a workdir (None or 0: the
    latest); errors name the folder and the steps it has."""
    directory = pathlib.Path(workdir) / "checkpoints"
    saved = checkpoint_steps(workdir)
    if not saved:
        raise FileNotFoundError(f"{directory}: no finished checkpoint; the run saved none yet "
                                "(checkpoint_every_steps / _rounds, or its end)")
    if not step:
        step = saved[-1]
    elif step not in saved:
        raise ValueError(f"{directory} has no checkpoint of step {step}; it has {saved}")
    return step, directory / str(step) / "default"


def _layout(tree) -> dict[str, tuple[str, ...]] | None:
    """Collection name -> its path in a saved state of one model (the module docstring's
    layouts), or None."""
    if not isinstance(tree, dict):
        return None
    if "params" in tree:
        if isinstance(tree.get("model_state"), dict):
            return {"params": ("params",), **{k: ("model_state", k) for k in tree["model_state"]}}
        return {"params": ("params",), **({"batch_stats": ("batch_stats",)}
                                          if isinstance(tree.get("batch_stats"), dict) else {})}
    variables = tree.get("variables")
    if isinstance(variables, dict) and "params" in variables:
        return {k: ("variables", k) for k in variables}
    return None


def stored_models(tree: dict, where) -> dict[str, dict[str, tuple[str, ...]]]:
    """Model name -> {collection: path in the saved state}, from a checkpoint's metadata tree.

    A state of one model gives {'': layout}; a dict of states (FedAffect's {rep, few}, VFER's
    {g, v, server, personal}) one entry per key that holds a model.
    """
    layout = _layout(tree)
    if layout is not None:
        return {"": layout}
    found = {}
    for name, sub in tree.items() if isinstance(tree, dict) else ():
        sub_layout = _layout(sub)
        if sub_layout is not None:
            found[name] = {k: (name, *path) for k, path in sub_layout.items()}
    if not found:
        raise ValueError(f"{where}: the checkpoint holds {sorted(tree)}; expected model "
                         "parameters under 'params' or 'variables/params' (or one such state per "
                         "key)")
    return found


def read_subtrees(item, wanted: dict[tuple[str, ...], object]) -> dict[tuple[str, ...], object]:
    """A partial restore: path in the saved state -> its subtree, as host NumPy arrays.

    wanted: path -> a subtree of array shapes (ShapeDtypeStruct or orbax metadata); nothing
    else of the checkpoint (optimizer state, other models) is read.
    """
    target: dict = {}
    for path, shapes in wanted.items():
        node = target
        *parents, leaf = path
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), shapes)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
        restored = checkpointer.restore(item, args=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True))
    finally:
        checkpointer.close()
    return {path: _get(restored, path) for path in wanted}


def _get(tree, path):
    return functools.reduce(lambda node, key: node[key], path, tree)


def _flat(tree) -> dict[str, tuple]:
    """'params/head/kernel' -> shape, for arrays and orbax's array metadata alike."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
            for path, leaf in leaves if hasattr(leaf, "shape")}


def _check_shapes(expected: dict, stored: dict, what: str) -> None:
    """Raises ValueError naming the first parameter whose presence or shape differs."""
    # Parameters first: their names say most about which model a checkpoint holds.
    def flat(tree):
        return {f"{k}/{name}": shape for k in sorted(tree, key=lambda k: k != "params")
                for name, shape in _flat(tree[k]).items()}

    want, have = flat(expected), flat(stored)
    for name, shape in want.items():
        if name not in have:
            raise ValueError(f"{what}: the checkpoint has no {name} (the model expects shape "
                             f"{shape})")
        if have[name] != shape:
            raise ValueError(f"{what}: {name} has shape {have[name]} in the checkpoint but "
                             f"{shape} in the model")
    extra = [n for n in have if n not in want]
    if extra:
        raise ValueError(f"{what}: the checkpoint has {extra[0]} (shape {have[extra[0]]}), which "
                         "the model lacks")


def load(workdir, *, step: int | None = None, flip_tta: bool = False) -> Trained:
    """The model of a training workdir with the variables of its checkpoint at `step` (default:
    the latest). flip_tta: average each image's and its mirror's probabilities."""
    workdir = pathlib.Path(workdir).expanduser()
    if not workdir.is_dir():
        raise FileNotFoundError(f"trained workdir {workdir} does not exist")
    config = _config(workdir)
    step, item = checkpoint_item(workdir, step)
    class_names = _class_names(workdir, config)
    size, channels = int(config.data.image_size), int(config.data.channels)
    kwargs = _tuples(config.model.get("kwargs", {}).to_dict()
                     if config.model.get("kwargs") else {})
    model = models.get_model(config.model.name, num_classes=len(class_names), **kwargs)
    expected = jax.eval_shape(functools.partial(model.init, train=False),
                              jax.random.PRNGKey(0), jnp.zeros((1, size, size, channels)))
    tree = ocp.PyTreeCheckpointHandler().metadata(item).tree
    layout = _layout(tree)
    if layout is None:
        raise ValueError(f"{item}: the checkpoint holds {sorted(tree)}; expected model "
                         "parameters under 'params' or 'variables/params'")
    what = (f"{item} does not hold the model of {workdir / 'config.json'} ({config.model.name}, "
            f"{len(class_names)} classes, {size}x{size}x{channels} input)")
    _check_shapes({k: expected[k] for k in expected},
                  {k: _get(tree, p) for k, p in layout.items() if k in expected}, what)
    # Restore exactly the stored subtrees of the model's collections, as host arrays.
    restored = read_subtrees(item, {layout[name]: expected[name] for name in expected})
    variables = {name: jax.tree.map(jnp.asarray, restored[layout[name]]) for name in expected}
    return Trained(workdir=workdir, step=step, config=config, model=model, variables=variables,
                   class_names=class_names, image_size=size, channels=channels,
                   flip_tta=flip_tta)


def _tuples(value):
    """JSON lists back to the tuples model options were written from (hashable, as in configs)."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value
