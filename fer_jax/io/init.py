"""Start a model, or a subtree of it, from another run's checkpoint or from converted weights.

big_vision's `model_init` + `load_params` for fer_jax; the drivers apply the config block
`init` (configs/common.py) with `from_config`:

  variables, report = initialize(model.init(key, x), {"path": "/tmp/pretrain", "skip": "head"})

Sources (`path`): a fer_jax run's --workdir, whose orbax checkpoint at `step` (0: the latest) is
read partially, model variables only, in every layout listed in fer_jax/io/trained.py (a state
of several models, FedAffect's {rep, few} or VFER's {g, v, server, personal}, by model name);
or weights converted by fer_jax/models/convert.py: `.npz` (`convert.save_npz` output, or a
torchvision state_dict export), Keras `.h5`, PyTorch `.pt` / `.pth` (needs torch) and
`.safetensors`.

Leaves are named by their path, 'params/conv1/kernel', 'batch_stats/bn1/mean'; in a checkpoint
of several models, or a model given as {part: variables}, behind the model's name
('rep/params/encoder/conv1/kernel').
  src   the checkpoint's subtree to read: '' (everything), 'encoder' (that module in every
        collection), 'params/backbone' (in one collection), 'rep/encoder' (of model rep);
  dst   the subtree of the model it fills, same syntax. A leaf keeps its collection.
        Comma-separated src and dst give several pairs (a single path on one side serves
        every pair): the occlusion net keeps its ResNet under 'params/net/backbone' but its
        statistics under 'batch_stats/backbone', so a plain ResNet goes in with
        src='' and dst='params/net/backbone,batch_stats/backbone';
  skip  regex (or a list of them), searched in each leaf's name in the model and in the
        checkpoint: those model leaves keep their init, those checkpoint leaves are not read.
Inside dst every model leaf must come from the checkpoint with its shape, and every checkpoint
leaf inside src must have its place in the model, unless skipped; anything else is a ValueError
naming the first parameter (both shapes for a mismatch). Model leaves outside dst keep their
init. The report says what was loaded, skipped and left at init.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from fer_jax.io import trained
from fer_jax.models import convert

WEIGHT_SUFFIXES = (".npz", ".h5", ".pt", ".pth", ".safetensors")
COLLECTIONS = ("params", "batch_stats")  # Always read as collections in src / dst paths.

Name = tuple[str, ...]  # (model or '', collection, *path inside the collection)


@dataclasses.dataclass(frozen=True)
class Report:
    """What `initialize` did, by leaf name (see the module docstring)."""

    source: str
    step: int | None  # The checkpoint step read (None for a weights file).
    loaded: tuple[str, ...]  # Model leaves read from the source.
    loaded_parameters: int
    skipped: tuple[str, ...]  # Model leaves inside dst kept at their init by `skip`.
    not_read: tuple[str, ...]  # Source leaves inside src that `skip` left out.
    random_init: tuple[str, ...]  # Every model leaf left at its init (outside dst, or skipped).
    random_parameters: int

    def to_dict(self) -> dict:
        """JSON values (names as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    def summary(self) -> str:
        def few(names):
            return f" ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})" if names else ""

        step = f" step {self.step}" if self.step is not None else ""
        return (f"init from {self.source}{step}: loaded {len(self.loaded)} leaves "
                f"({self.loaded_parameters:,} parameters); skipped {len(self.skipped)}"
                f"{few(self.skipped)}; not read from the source {len(self.not_read)}"
                f"{few(self.not_read)}; left at random init {len(self.random_init)} "
                f"({self.random_parameters:,} parameters){few(self.random_init)}")


def pairs(src: str, dst: str) -> list[tuple[str, str]]:
    """The (src, dst) path pairs of comma-separated `src` and `dst` (one path serves all)."""
    srcs, dsts = ([p.strip().strip("/") for p in s.split(",")] for s in (src or "", dst or ""))
    if len(srcs) != len(dsts) and 1 not in (len(srcs), len(dsts)):
        raise ValueError(f"src {src!r} and dst {dst!r} list {len(srcs)} and {len(dsts)} paths; "
                         "give as many of each, or one on either side")
    n = max(len(srcs), len(dsts))
    return list(zip(srcs * n if len(srcs) == 1 else srcs, dsts * n if len(dsts) == 1 else dsts,
                    strict=True))


def skip_patterns(skip) -> list[re.Pattern]:
    """A regex string ('' = none) or a sequence of them, compiled."""
    if isinstance(skip, str):
        skip = [skip] if skip else []
    return [re.compile(s) for s in skip]


def initialize(variables: Mapping, spec: Mapping) -> tuple[dict, Report]:
    """`variables` (model.init output, or {part: variables}) with the leaves inside `dst` read
    from `spec['path']`; spec keys: path, step (0), src (''), dst (''), skip ('').

    Returns (variables, report); leaves left at their init are the very objects passed in.
    Raises FileNotFoundError naming the path (missing source, no checkpoint) and ValueError
    naming the first parameter that does not fit.
    """
    path = pathlib.Path(str(spec["path"])).expanduser()
    step = int(spec.get("step", 0) or 0)
    skip = skip_patterns(spec.get("skip", ""))
    source, step, where = _open(path, step)
    model = _named(variables)
    plan, skipped, not_read = _plan(model, source.tree,
                                    pairs(spec.get("src", ""), spec.get("dst", "")), skip, where)
    arrays = source.read(sorted(set(plan.values())))

    def fill(key_path, leaf):
        name = _split(_keys(key_path), multi=model.multi)
        if name not in plan:
            return leaf
        return jnp.asarray(arrays[plan[name]], dtype=leaf.dtype)

    out = jax.tree_util.tree_map_with_path(fill, variables)
    left = [n for n in model.ordered if n not in plan]
    report = Report(
        source=str(path), step=step, loaded=tuple(_show(n) for n in plan),
        loaded_parameters=sum(math.prod(model.shapes[n]) for n in plan),
        skipped=tuple(_show(n) for n in skipped), not_read=tuple(_show(n) for n in not_read),
        random_init=tuple(_show(n) for n in left),
        random_parameters=sum(math.prod(model.shapes[n]) for n in left))
    for pattern in skip:
        if not any(pattern.search(n) for n in (*report.skipped, *report.not_read)):
            logging.warning("init: skip %r matched no parameter inside src / dst", pattern.pattern)
    logging.info("%s", report.summary())
    return out, report


def from_config(config, variables, *, writer=None):
    """`variables` with `config.init` applied (unchanged when the block is absent or its path is
    ''); with a MetricWriter the report goes to the workdir's init.json."""
    spec = config.get("init")
    if spec is None or not spec.get("path"):
        return variables
    variables, report = initialize(variables, spec)
    if writer is not None:
        writer.write_json("init.json", report.to_dict())
    return variables


# ---------------------------------------------------------------------------------------------
# Names


@dataclasses.dataclass(frozen=True)
class _Tree:
    shapes: dict[Name, tuple]  # In tree order.
    multi: bool  # Named by model part first.

    @functools.cached_property
    def parts(self) -> list[str]:
        return sorted({n[0] for n in self.shapes})

    @functools.cached_property
    def collections(self) -> set[str]:
        return {n[1] for n in self.shapes} | set(COLLECTIONS)

    @functools.cached_property
    def ordered(self) -> list[Name]:
        """Parameters first (their names say most about a model), then the statistics."""
        return sorted(self.shapes, key=lambda n: n[1] != "params")


def _keys(key_path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in key_path)


def _split(keys: tuple[str, ...], *, multi: bool) -> Name:
    return keys if multi else ("", *keys)


def _show(name: Name) -> str:
    return "/".join(name if name[0] else name[1:])


def _named(variables: Mapping) -> _Tree:
    """A model's leaves by name; a tree without 'params' is {part: variables}."""
    multi = "params" not in variables
    leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
    shapes = {_split(_keys(p), multi=multi): tuple(x.shape) for p, x in leaves}
    if multi and any(len(n) < 3 for n in shapes):
        raise ValueError(f"init: expected model variables {{'params': ...}} or {{part: variables}}"
                         f", got keys {sorted(variables)}")
    return _Tree(shapes, multi)


@dataclasses.dataclass(frozen=True)
class _Pair:
    """One src -> dst mapping, parsed against the source's and the model's names."""

    model: str | None  # None: every part (names carried over) or the single model ''.
    collection: str | None
    path: tuple[str, ...]

    @classmethod
    def parse(cls, text: str, tree: _Tree, field: str, where: str) -> _Pair:
        parts = tuple(p for p in text.split("/") if p)
        model = None
        if tree.multi and parts:
            if parts[0] not in tree.parts:
                raise ValueError(f"{where}: {field}={text!r} must start with one of the "
                                 f"models {tree.parts} of the {_side(field)}")
            model, parts = parts[0], parts[1:]
        collection = None
        if parts and parts[0] in tree.collections:
            collection, parts = parts[0], parts[1:]
        return cls(model, collection, parts)

    def matches(self, name: Name, collection: str | None) -> bool:
        return ((self.model is None or name[0] == self.model)
                and (collection is None or name[1] == collection)
                and name[2:2 + len(self.path)] == self.path)


def _side(field: str) -> str:
    return "checkpoint" if field == "src" else "model"


def _plan(model: _Tree, source: _Tree, path_pairs, skip, where):
    """({model leaf: source leaf} to load, skipped model leaves, source leaves not read)."""

    def skipped_name(*names):
        return any(p.search(_show(n)) for p in skip for n in names)

    def parts_error(field, tree):
        return ValueError(f"{where}: the {_side(field)} holds the models {tree.parts}: "
                          f"{field} must start with one of them")

    plan, covered, not_read = {}, {}, []
    for src_text, dst_text in path_pairs:
        src = _Pair.parse(src_text, source, "src", where)
        dst = _Pair.parse(dst_text, model, "dst", where)
        if src.collection and dst.collection and src.collection != dst.collection:
            raise ValueError(f"{where}: src {src_text!r} -> dst {dst_text!r} changes the "
                             "collection; a leaf keeps its collection")
        carry = src.model is None and dst.model is None and source.multi and model.multi
        if source.multi and src.model is None and not carry:
            raise parts_error("src", source)
        if model.multi and dst.model is None and not carry:
            raise parts_error("dst", model)
        collection = src.collection or dst.collection

        def to_model(name, src=src, dst=dst, carry=carry):
            return (name[0] if carry else dst.model or "", name[1],
                    *dst.path, *name[2 + len(src.path):])

        def to_source(name, src=src, dst=dst, carry=carry):
            return (name[0] if carry else src.model or "", name[1],
                    *src.path, *name[2 + len(dst.path):])

        sources = [n for n in source.ordered if src.matches(n, collection)]
        targets = [n for n in model.ordered if dst.matches(n, collection)]
        if not sources:
            raise ValueError(f"{where}: src={src_text!r} matches nothing in the checkpoint; it "
                             f"has {_tops(source)}")
        if not targets:
            raise ValueError(f"{where}: dst={dst_text!r} matches nothing in the model; it has "
                             f"{_tops(model)}")
        for name in targets:
            if name in covered:
                raise ValueError(f"{where}: {_show(name)} lies in dst {covered[name]!r} and "
                                 f"{dst_text!r}")
            covered[name] = dst_text
            stored = to_source(name)
            if skipped_name(name, stored):
                continue
            if stored not in source.shapes:
                whose = ("" if stored[1:] == name[1:] else f"the model's {_show(name)} has ")
                raise ValueError(f"{where}: the checkpoint has no {_show(stored)} ({whose}shape "
                                 f"{model.shapes[name]} in the model)")
            if source.shapes[stored] != model.shapes[name]:
                also = "" if stored[1:] == name[1:] else f" (for the model's {_show(name)})"
                raise ValueError(f"{where}: {_show(stored)} has shape {source.shapes[stored]} in "
                                 f"the checkpoint but {model.shapes[name]} in the model{also}; "
                                 "a checkpoint of another model? (skip= leaves it out)")
            plan[name] = stored
        for name in sources:
            target = to_model(name)
            if target in model.shapes:
                continue
            if skipped_name(name, target):
                not_read.append(name)
                continue
            also = "" if target[1:] == name[1:] else f" (no {_show(target)})"
            raise ValueError(f"{where}: the checkpoint has {_show(name)} (shape "
                             f"{source.shapes[name]}), which the model lacks{also}; a "
                             "checkpoint of another model? (skip= leaves it out)")
    plan = {n: plan[n] for n in model.ordered if n in plan}
    skipped = [n for n in model.ordered if n in covered and n not in plan]
    return plan, skipped, not_read


def _tops(tree: _Tree, limit: int = 12) -> str:
    """The first levels of a tree's names, for errors ('params/conv1, params/head, ...')."""
    tops = list(dict.fromkeys(_show(n[:3]) for n in tree.shapes))
    return ", ".join(tops[:limit]) + (", ..." if len(tops) > limit else "")


# ---------------------------------------------------------------------------------------------
# Sources


@dataclasses.dataclass(frozen=True)
class _Source:
    tree: _Tree
    read: object  # [name] -> {name: np.ndarray}


def _open(path: pathlib.Path, step: int) -> tuple[_Source, int | None, str]:
    if not path.exists():
        raise FileNotFoundError(f"init source {path} does not exist (expected a fer_jax run's "
                                f"--workdir or a weights file: {', '.join(WEIGHT_SUFFIXES)})")
    if path.is_dir():
        if not (path / "checkpoints").is_dir():
            raise FileNotFoundError(f"init source {path} has no checkpoints/ folder: expected "
                                    "the --workdir of a fer_jax training run")
        step, item = trained.checkpoint_item(path, step)
        where = f"init from {path} step {step}"
        return _checkpoint(item, where), step, where
    if step:
        raise ValueError(f"init step={step} applies to a run's checkpoints, not to the weights "
                         f"file {path}")
    arrays = _weights_file(path)
    multi = not any(k.split("/")[0] in COLLECTIONS for k in arrays)
    by_name = {_split(tuple(k.split("/")), multi=multi): v for k, v in sorted(arrays.items())}
    tree = _Tree({n: tuple(v.shape) for n, v in by_name.items()}, multi)
    return _Source(tree, lambda names: {n: by_name[n] for n in names}), None, f"init from {path}"


def _checkpoint(item: pathlib.Path, where: str) -> _Source:
    """The model leaves of an orbax checkpoint (metadata only until `read`)."""
    tree = ocp.PyTreeCheckpointHandler().metadata(item).tree
    layouts = trained.stored_models(tree, item)
    shapes, paths = {}, {}
    for model, layout in layouts.items():
        for collection, state_path in layout.items():
            sub = functools.reduce(lambda node, key: node[key], state_path, tree)
            leaves = jax.tree_util.tree_flatten_with_path(
                sub, is_leaf=lambda x: hasattr(x, "shape"))[0]
            for key_path, meta in leaves:
                if hasattr(meta, "shape"):
                    name = (model, collection, *_keys(key_path))
                    shapes[name] = tuple(meta.shape)
                    paths[name] = (state_path + _keys(key_path), meta)
    if not shapes:
        raise ValueError(f"{where}: the checkpoint {item} holds no model parameters")

    def read(names):
        got = trained.read_subtrees(item, dict(paths[n] for n in names))
        return {n: got[paths[n][0]] for n in names}

    return _Source(_Tree(shapes, multi="" not in layouts), read)


def _weights_file(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Flat {'params/...': array} of a converted-weights file (fer_jax/models/convert.py)."""
    suffix = path.suffix.lower()
    if suffix == ".h5":
        return convert.read_keras_h5(path)
    if suffix in (".pt", ".pth", ".safetensors"):
        return convert.read_torch_state_dict(path)
    if suffix != ".npz":
        raise ValueError(f"init source {path}: unknown weights format {suffix!r}; expected a "
                         f"run's --workdir or one of {', '.join(WEIGHT_SUFFIXES)}")
    with np.load(path) as z:
        arrays = dict(z)
    if any(k.startswith("features.") for k in arrays):  # A torchvision state_dict export.
        return convert.from_torch_state_dict(arrays)
    bad = [k for k in arrays if "/" not in k]
    if bad:
        raise ValueError(f"{path}: key {bad[0]!r} is not a variable path such as "
                         "'params/conv1/kernel' (convert.save_npz) nor a torchvision "
                         "'features.*' key")
    return arrays

