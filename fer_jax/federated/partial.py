"""Partial federation: which variables are federated, kept local per client, or frozen.

A parameter filter maps every leaf of the model variables (Flax's nested dict, e.g.
{'params': ..., 'batch_stats': ...}) to one of three labels:
  FEDERATED - trained (or updated, for batch statistics) on clients and averaged by the server;
  LOCAL     - trained on clients and kept per client across rounds (a personalized head);
  FROZEN    - never changed (a pretrained backbone, as VFER's frozen feature extractor).
BatchNorm statistics are labelled like any other leaf: federated by default, so they are
averaged with the same weights as the parameters (as in FedAvg on models with BatchNorm); label
them LOCAL for FedBN-style local statistics. Two models federated separately (FedAffect) are two
top-level subtrees with their own labels, or two engines.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import jax

FEDERATED = "federated"
LOCAL = "local"
FROZEN = "frozen"
LABELS = (FEDERATED, LOCAL, FROZEN)

ParamFilter = Callable[[tuple[str, ...], object], str]


def federate_all(path: tuple[str, ...], leaf) -> str:
    """The default filter: every variable is federated (plain FedAvg)."""
    del path, leaf
    return FEDERATED


def regex_filter(rules: Sequence[tuple[str, str]], default: str = FEDERATED) -> ParamFilter:
    """A filter from (regex, label) rules matched in order against the '/'-joined path.

    E.g. VFER (federate the head only): regex_filter([('params/head/.*', FEDERATED)], FROZEN).
    The first rule whose regex fully matches wins; unmatched leaves get `default`.
    """
    for pattern, label in rules:
        if label not in LABELS:
            raise ValueError(
                f"regex_filter: label {label!r} for {pattern!r} is not one of {LABELS}")
    if default not in LABELS:
        raise ValueError(f"regex_filter: default {default!r} is not one of {LABELS}")
    compiled = [(re.compile(p), label) for p, label in rules]

    def fn(path, leaf):
        del leaf
        name = "/".join(path)
        for regex, label in compiled:
            if regex.fullmatch(name):
                return label
        return default

    return fn


def _path_names(path) -> tuple[str, ...]:
    names = []
    for entry in path:
        if not isinstance(entry, jax.tree_util.DictKey):
            raise ValueError(f"partial federation needs nested dicts of variables, got {path}")
        names.append(str(entry.key))
    return tuple(names)


def label_tree(variables, param_filter: ParamFilter):
    """A pytree like `variables` holding each leaf's label (checked against LABELS)."""

    def label(path, leaf):
        value = param_filter(_path_names(path), leaf)
        if value not in LABELS:
            raise ValueError(f"parameter filter gave {value!r} for {'/'.join(_path_names(path))};"
                             f" expected one of {LABELS}")
        return value

    return jax.tree_util.tree_map_with_path(label, variables)


def select(tree, labels, wanted: str | tuple[str, ...]):
    """The nested-dict subtree of `tree` whose labels are in `wanted` (empty dicts dropped)."""
    wanted = (wanted,) if isinstance(wanted, str) else wanted
    if isinstance(tree, Mapping):
        out = {key: select(value, labels[key], wanted) for key, value in tree.items()}
        # Drop subtrees with nothing selected so the result holds only the wanted leaves.
        return {k: v for k, v in out.items() if not (isinstance(v, dict) and not v)}
    return tree if labels in wanted else {}


def merge(base, override):
    """`base` with the leaves present in the nested dict `override` replaced."""
    if not isinstance(override, Mapping):
        return override
    if not isinstance(base, Mapping):
        raise ValueError("merge: override has a subtree where base has a leaf")
    out = dict(base)
    for key, value in override.items():
        if key not in base:
            raise ValueError(f"merge: key {key!r} is not in the base variables")
        out[key] = merge(base[key], value)
    return out


def trainable_mask(labels) -> tuple[bool, ...]:
    """Per flattened leaf of the variables: may a client change it (i.e. not FROZEN)."""
    return tuple(label != FROZEN for label in jax.tree.leaves(labels))


def restore_frozen(variables, initial, trainable: tuple[bool, ...]):
    """`variables` with every leaf whose `trainable_mask` entry is False put back to `initial`.

    A client method calls it after each update so that FROZEN leaves keep the server's values
    (their gradients then become dead code for XLA). The choice is static, per flattened leaf;
    an empty `trainable` means every leaf is trainable.
    """
    if not trainable:
        return variables
    new, treedef = jax.tree.flatten(variables)
    old = jax.tree.leaves(initial)
    return jax.tree.unflatten(treedef, [n if t else o for n, o, t in zip(new, old, trainable,
                                                                          strict=True)])
