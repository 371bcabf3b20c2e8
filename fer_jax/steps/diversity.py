"""Jitted steps of the diversified FER models: ESR-B + CBAM and the MA-Net style network.

Heidari & Iosifidis, *Learning diversified feature representations for FER in the wild*:

    Eq. (4)  L_esr = sum_b CE(f_b(X)) - (w_ch D_ch + w_sp D_sp)
             D_ch / D_sp = det(S) (Eq. (1)-(2)) over the branches' last CBAM channel vectors
             / spatial maps (`fer_jax.models.esr`)
    Eq. (5)  L = lam CE_local + (1 - lam) CE_global - (w_b D_b + w_sp D_sp + w_ch D_ch)
             D_sp / D_ch over the 4 local patches (mean over channels / over space), D_b over
             the pooled global and local features (`fer_jax.models.manet`); lam = 0.6.

The paper's weights are all 1. gamma of Eq. (1) follows `bandwidth`: 'median' (default: 1 / the
batch's median squared distance between learners, so the term cannot saturate), 'fixed' (the
paper's constant, 10 in the authors' code) or 'per_feature' (gamma / D); see `rbf_gamma` and
docs/papers.md#diversity-gamma. Each step also reports per term its gamma and the fractions of
off-diagonal S entries below 0.01 (S ~ I, det ~ 1) and above 0.99 (S ~ ones, det ~ 0), and
`div_grad_norm`, the norm of the diversity term's gradient with respect to the compared
features (0 when the term is dead). With one learner (ESR-1, or the first stage of progressive
training) there is no diversity term: det of a 1x1 similarity matrix is the constant 1.

The method is `client(...)`: a `SupervisedClient` over `federated_loss` (padded rows masked),
optionally limited to the first b ESR branches with per-group update multipliers (progressive
stages); the same client trains centralized (`fer_jax.train.loops`) and federated.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from fer_jax import federated as fl
from fer_jax import losses
from fer_jax.data.augment import AugmentConfig
from fer_jax.losses import diversity as div_losses
from fer_jax.steps.supervised import image_apply, preprocess

__all__ = ["BANDWIDTHS", "client", "copy_branch", "diversity_term", "esr_loss",
           "federated_loss", "group_scales", "make_loss", "manet_loss", "predict",
           "predicted_classes", "rbf_gamma", "scale_groups"]

LossFn = Callable[..., tuple[jax.Array, dict]]


BANDWIDTHS = ("median", "fixed", "per_feature")


def rbf_gamma(phi: jax.Array, mask: jax.Array | None, *, rule: str, gamma: float):
    """The RBF gamma of Eq. (1) for the (L, N, ...) features `phi` under `rule`.

    fixed: `gamma` as given (the paper: 10). per_feature: gamma / D for D features per learner
    (the RBF of the *mean* squared difference; not in the paper). median: 1 / the median
    squared distance between learners in this batch (`losses.diversity.median_heuristic_gamma`,
    no gradient), so S's off-diagonal entries sit around exp(-1) at any feature scale; `gamma`
    is not used. With Eq. (1)'s sum, a fixed gamma = 10 saturates det(S) at 1 (zero gradient)
    for 36-pixel maps or 128-channel vectors whose entries differ by ~0.2-0.4.
    """
    if rule == "fixed":
        return gamma
    if rule == "per_feature":
        return gamma / math.prod(phi.shape[2:])
    if rule == "median":
        return div_losses.median_heuristic_gamma(phi, mask=mask)
    raise ValueError(f"bandwidth must be one of {BANDWIDTHS}, got {rule!r}")


def diversity_term(phi: jax.Array, mask: jax.Array | None, *, name: str, weight: float,
                   rule: str, gamma: float) -> tuple[jax.Array, dict, jax.Array]:
    """D = det(S) (Eq. (1)-(2)) of one term with its monitoring scalars.

    Returns (D, metrics, g2): metrics are `gamma_<name>` (the width used) and `s_lo_<name>` /
    `s_hi_<name>` (fractions of off-diagonal S entries below 0.01 / above 0.99, see
    `losses.diversity.similarity_saturation`); g2 = ||d (weight D) / d phi||^2, the squared
    norm of the term's gradient with respect to the features it compares. Every path from the
    term to the parameters runs through phi, so g2 = 0 means the term cannot train anything.
    The metrics carry no gradient; the loss sees D only.
    """
    g = rbf_gamma(phi, mask, rule=rule, gamma=gamma)

    def weighted_det(p):
        return weight * jnp.linalg.det(div_losses.rbf_similarity(p, gamma=g, mask=mask))

    # det(rbf_similarity) is losses.det_diversity with eps = 0; S is kept for the metrics.
    s = div_losses.rbf_similarity(phi, gamma=g, mask=mask)
    d = jnp.linalg.det(s)
    grad = jax.grad(weighted_det)(jax.lax.stop_gradient(phi))
    lo, hi = div_losses.similarity_saturation(jax.lax.stop_gradient(s))
    metrics = {f"gamma_{name}": jax.lax.stop_gradient(jnp.asarray(g, jnp.float32)),
               f"s_lo_{name}": lo, f"s_hi_{name}": hi}
    return d, metrics, jnp.sum(jnp.square(grad))


def _absent(name: str) -> dict:
    zero = jnp.zeros((), jnp.float32)
    return {f"d_{name}": zero, f"gamma_{name}": zero, f"s_lo_{name}": zero, f"s_hi_{name}": zero}


def _diversities(terms: Mapping[str, tuple], mask, *, rule: str, gamma: float):
    """sum_t w_t D_t over `terms` = {name: (weight, phi or None)}, and the per-term metrics.

    A term with weight 0 or phi None is absent: D = 0 and all its metrics 0. `div_grad_norm`
    is the norm of the whole diversity term's gradient with respect to the compared features.
    """
    total = jnp.zeros((), jnp.float32)
    metrics, g2 = {}, jnp.zeros((), jnp.float32)
    for name, (weight, phi) in terms.items():
        metrics.update(_absent(name))
        if weight and phi is not None:
            d, m, g2_t = diversity_term(phi, mask, name=name, weight=weight, rule=rule,
                                        gamma=gamma)
            total = total + weight * d
            metrics.update(m, **{f"d_{name}": d})
            g2 = g2 + g2_t
    metrics["div_grad_norm"] = jnp.sqrt(g2)
    return total, metrics


def _ce(logits, labels, mask):
    return losses.weighted_cross_entropy(logits, labels, mask=mask)


def esr_loss(out: Mapping, labels: jax.Array, mask: jax.Array | None = None, *,
             gamma: float = 10.0, bandwidth: str = "median", spatial_weight: float = 1.0,
             channel_weight: float = 1.0):
    """Eq. (4): sum of the active branches' CE minus the weighted attention diversities.

    `out` is an `ESR` output. Diversity needs CBAM maps and >= 2 active branches; otherwise
    (and for zero weights) the term is absent and reported as 0. `bandwidth` picks gamma (see
    `rbf_gamma`); the parts add each term's monitoring scalars (see `diversity_term`).
    """
    branch_logits = out["branch_logits"]
    ce = sum(_ce(branch_logits[b], labels, mask) for b in range(branch_logits.shape[0]))
    att = out.get("attention")
    live = att is not None and branch_logits.shape[0] >= 2
    div, parts = _diversities(
        {"sp": (spatial_weight, att["spatial"] if live else None),
         "ch": (channel_weight, att["channel"] if live else None)},
        mask, rule=bandwidth, gamma=gamma)
    return ce - div, {"ce": ce, **parts}


def manet_loss(out: Mapping, labels: jax.Array, mask: jax.Array | None = None, *,
               gamma: float = 10.0, bandwidth: str = "median", local_weight: float = 0.6,
               branch_weight: float = 1.0, spatial_weight: float = 1.0,
               channel_weight: float = 1.0):
    """Eq. (5) for a `MANet` output: weighted local/global CE minus branch and patch diversity."""
    ce_local = _ce(out["local_logits"], labels, mask)
    ce_global = _ce(out["global_logits"], labels, mask)
    patches = out["patch_features"]  # (P, N, h, w, C)
    div, parts = _diversities(
        {"b": (branch_weight, jnp.stack([out["global_embedding"], out["local_embedding"]])),
         "sp": (spatial_weight, losses.spatial_pool(patches)),
         "ch": (channel_weight, losses.channel_pool(patches))},
        mask, rule=bandwidth, gamma=gamma)
    ce = local_weight * ce_local + (1.0 - local_weight) * ce_global
    return ce - div, {"ce": ce, "ce_local": ce_local, "ce_global": ce_global, **parts}


def make_loss(model_name: str, diversity) -> LossFn:
    """The loss of `model_name` ('esr' | 'manet') with the weights of a config's `diversity`."""
    if model_name == "esr":
        return functools.partial(esr_loss, gamma=diversity.gamma,
                                 bandwidth=diversity.bandwidth,
                                 spatial_weight=diversity.spatial_weight,
                                 channel_weight=diversity.channel_weight)
    if model_name == "manet":
        return functools.partial(manet_loss, gamma=diversity.gamma,
                                 bandwidth=diversity.bandwidth,
                                 local_weight=diversity.local_weight,
                                 branch_weight=diversity.branch_weight,
                                 spatial_weight=diversity.spatial_weight,
                                 channel_weight=diversity.channel_weight)
    raise ValueError(f"model_name must be 'esr' or 'manet', got {model_name!r}")


def predicted_classes(out: Mapping) -> jax.Array:
    """ESR: plurality vote of the branches (Siqueira et al.); otherwise argmax of 'logits'."""
    if "branch_logits" in out:
        return losses.ensemble_vote(out["branch_logits"])
    return jnp.argmax(out["logits"], axis=-1).astype(jnp.int32)


def group_scales(num_branches: int, num_active: int, *, base: float = 1.0,
                 old_branches: float = 1.0) -> dict[str, float]:
    """Update multipliers per top-level ESR parameter group for one progressive stage.

    The newest active branch gets 1, earlier branches `old_branches`, the base `base`, and
    inactive branches 0 (their parameters must not move, not even by weight decay).
    """
    scales = {"base": base}
    for i in range(num_branches):
        scales[f"branch_{i}"] = (1.0 if i == num_active - 1 else
                                 old_branches if i < num_active else 0.0)
    return scales


def scale_groups(scales: Mapping[str, float]) -> optax.GradientTransformation:
    """Multiplies the updates of each top-level parameter group (stateless, so the optimizer
    state keeps its structure from one progressive stage to the next)."""

    def update(updates, state, params=None):
        del params
        return {k: _scale(v, scales.get(k, 1.0)) for k, v in updates.items()}, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _scale(tree, factor: float):
    return jax.tree.map(lambda u: u * factor, tree)


def client(model, optimizer: optax.GradientTransformation, loss_fn: LossFn, *, image_size: int,
           channels: int, augment: AugmentConfig | None, num_active: int | None = None,
           scales: Mapping[str, float] | None = None,
           prox_mu: float = 0.0) -> fl.SupervisedClient:
    """The method: `loss_fn` of the model's output on uint8 images (preprocessed, augmented).

    `num_active` (ESR only) runs the first b branches; `scales` multiplies the optimizer's
    updates per top-level parameter group (progressive ESR stages, see `group_scales`).
    """
    apply = image_apply(model, image_size=image_size, channels=channels, augment=augment)
    if num_active is not None:
        apply = functools.partial(apply, num_active=num_active)
    if scales is not None:
        optimizer = optax.chain(optimizer, scale_groups(scales))
    return fl.SupervisedClient(federated_loss(apply, loss_fn), optimizer, prox_mu=prox_mu)


def copy_branch(state: fl.SupervisedState, index: int) -> fl.SupervisedState:
    """Branch `index` starts as a copy of branch `index - 1` (params and BN statistics).

    Used when progressive training activates a branch with ``new_branch_init='copy'``.
    """
    if index < 1:
        raise ValueError(f"copy_branch needs index >= 1 (a branch to copy), got {index}")
    src, dst = f"branch_{index - 1}", f"branch_{index}"
    # Real copies: the jitted step donates the state, and one buffer cannot be donated twice.
    params = {**state.params, dst: jax.tree.map(jnp.array, state.params[src])}
    model_state = dict(state.model_state)
    stats = model_state.get("batch_stats", {})
    if src in stats:
        model_state["batch_stats"] = {**stats, dst: jax.tree.map(jnp.array, stats[src])}
    return state.replace(params=params, model_state=model_state)


def predict(params, batch_stats, images: jax.Array, *, model, image_size: int,
            channels: int) -> dict[str, jax.Array]:
    """Eval-mode logits of uint8 images: every output whose name ends in 'logits'."""
    x = preprocess(images, image_size=image_size, channels=channels)
    out = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
    return {k: v for k, v in out.items() if k.endswith("logits")}


def federated_loss(apply_fn: Callable, loss_fn: LossFn) -> Callable:
    """The engine's `loss_fn(params, model_state, batch, mask, key)` for a diversity model.

    `apply_fn(variables, images, train=True, mutable=..., rngs=...)` takes uint8 images (see
    `fer_jax.steps.supervised.image_apply`). Padded examples are masked out of the CE and of
    the similarity averages; metric sums are loss_sum, correct, count and the diversities
    times count (so the engine's sums / count are means).
    """

    def engine_loss(params, model_state, batch, mask, key):
        variables = {"params": params, **model_state}
        live = [k for k in ("batch_stats",) if k in model_state]
        out = apply_fn(variables, batch["image"], train=True, mutable=live or False,
                       rngs={"dropout": key})
        out, new_state = out if live else (out, {})
        labels = batch["label"]
        loss, parts = loss_fn(out, labels, mask)
        m = mask.astype(jnp.float32)
        count = m.sum()
        correct = jnp.sum((predicted_classes(out) == labels) * m)
        sums = {"loss_sum": loss * count, "correct": correct, "count": count}
        sums.update({f"{k}_sum": v * count for k, v in parts.items()})
        return loss, ({**model_state, **new_state}, sums)

    return engine_loss
