"""Jitted min-max steps of occlusion-robust FER by adversarial learning.

Per batch (paper Sec. 3.4), alternating:
  D step, F and R fixed (Eq. 6):  L_D = BCE(y_occ, D(F(x)))                -> D's optimizer
  F+R step, D fixed (Eq. 8):      L = L_emp + lambda1 L_noisy + lambda2 L_F  -> F/R's optimizer
with L_noisy the mask BCE of phi (Eq. 2) against the synthesized occluder mask resized to
phi's resolution (zeros for clean images) and L_F the cross entropy of D's output against the
empirical occlusion prior P_E (Eq. 5). Both steps rebuild the same training batch from
fold_in(rng, step) (clean and occluded images mixed 1:1, occluders drawn on device), and the
step counter moves only in the F+R step, so a D step followed by an F+R step sees one batch.

Module-level pure functions; models, optimizers and settings come in through
`functools.partial` (static), the state is donated by the caller. `OcclusionClient` runs the
same two steps as a federated client method (fer_jax.federated.ClientMethod protocol).
Ablation switches (Sec. 4.3): attention (phi + L_noisy) and adversarial (D + L_F);
M_Res = neither, M_ResAtt, M_ResAdv, M_ResAttAdv = both.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from fer_jax import losses
from fer_jax.data import occluders
from fer_jax.data.augment import AugmentConfig, augment_batch
from fer_jax.federated.partial import restore_frozen
from fer_jax.models.occlusion import mask_probabilities
from fer_jax.steps.supervised import preprocess


@dataclasses.dataclass(frozen=True)
class OcclusionSettings:
    """Static options of the steps (hashable: part of the jit cache key).

    attention / adversarial: the ablation switches; they must match the model (phi present)
      and whether a discriminator is trained.
    lambda_noisy, lambda_adv: lambda1, lambda2 of Eq. (8) (paper: 0.1, 0.1).
    rate: fraction of each training batch that gets a synthetic occluder (1:1 mixing: 0.5).
    prior: P_E(y_occ = 1) of Eq. (5), the training set's empirical occlusion rate.
    """

    image_size: int
    channels: int
    attention: bool = True
    adversarial: bool = True
    lambda_noisy: float = 0.1
    lambda_adv: float = 0.1
    rate: float = 0.5
    prior: float = 0.5
    augment: AugmentConfig | None = None
    occluder: occluders.OccluderConfig = occluders.OccluderConfig()

    def __post_init__(self):
        if not 0.0 <= self.rate <= 1.0 or not 0.0 <= self.prior <= 1.0:
            raise ValueError(f"occlusion rate and prior must be in [0, 1], got rate={self.rate},"
                             f" prior={self.prior}")
        if self.lambda_noisy < 0 or self.lambda_adv < 0:
            raise ValueError("lambda_noisy and lambda_adv must be >= 0")


@flax.struct.dataclass
class OcclusionState:
    """F/R and D with their own optimizer states; checkpointed as one pytree."""

    step: jax.Array  # int32: F+R updates applied (the batch index).
    params: Any  # F (backbone + phi) and R (the backbone's head).
    batch_stats: Any
    opt_state: Any
    d_params: Any  # {} when the run is not adversarial.
    d_opt_state: Any
    rng: jax.Array


def empirical_prior(rate: float, batch_size: int) -> float:
    """P_E(y_occ = 1) of the mixed training set: each batch has round(rate * B) occluded images."""
    return round(rate * batch_size) / batch_size


def binary_entropy(p: float) -> float:
    """H(P_E) in nats (0 log 0 = 0): L_F's minimum, reached when D outputs the prior (Eq. 3)."""
    import math

    return -sum(q * math.log(q) for q in (p, 1.0 - p) if q > 0)


def init_state(net, disc, tx, d_tx, *, seed: int, input_shape, adversarial: bool):
    """Fresh state; D is initialised on F's pooled features (its input width)."""
    rng = jax.random.PRNGKey(seed)
    x = jnp.zeros((1, *input_shape), jnp.float32)
    variables = net.init(jax.random.fold_in(rng, 0xF00D), x, train=False)
    params = variables["params"]
    d_params = {}
    if adversarial:
        feats = net.apply(variables, x, train=False)["embedding"]
        d_params = disc.init(jax.random.fold_in(rng, 0xD15C), feats)["params"]
    return OcclusionState(step=jnp.zeros((), jnp.int32), params=params,
                          batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                          d_params=d_params, d_opt_state=d_tx.init(d_params), rng=rng)


def prepare_batch(key: jax.Array, batch: dict, settings: OcclusionSettings):
    """The training inputs of one step: (images float (N,H,W,C), masks (N,H,W), occluded (N,)).

    A batch of raw images ({'image', 'label'}) is preprocessed, augmented, and mixed: exactly
    round(rate * N) images get a random occluder (after augmentation, so masks stay aligned).
    A batch that is already occluded carries 'occluded' (N,) flags and, for the attention loss,
    pixel masks 'mask' (N, H, W); it is used as it is.
    """
    if "occluded" in batch:
        if "mask" not in batch and settings.attention and settings.lambda_noisy > 0:
            raise ValueError(
                "the training batch has 'occluded' flags but no pixel 'mask': the attention loss "
                "L_noisy (Eq. 2) needs occlusion masks. Give batch['mask'] (N, H, W), train "
                "without attention supervision (occlusion.lambda_noisy=0), or let the step "
                "synthesize occluders (pass only 'image' and 'label').")
        images = preprocess(batch["image"], image_size=settings.image_size,
                            channels=settings.channels)
        n, h, w = images.shape[:3]
        masks = batch.get("mask")
        masks = jnp.zeros((n, h, w), jnp.float32) if masks is None else jnp.asarray(
            masks, jnp.float32)
        if masks.shape != (n, h, w):
            raise ValueError(f"batch['mask'] must be (N, H, W) = {(n, h, w)} at the model's "
                             f"input size, got {masks.shape}")
        return images, masks, jnp.asarray(batch["occluded"]).astype(bool)
    k_aug, k_mix, k_occ = jax.random.split(key, 3)
    images = preprocess(batch["image"], image_size=settings.image_size, channels=settings.channels)
    if settings.augment is not None:
        images = augment_batch(k_aug, images, settings.augment)
    flags = occluders.mix_flags(k_mix, images.shape[0], settings.rate)
    images, masks, _ = occluders.occlude_batch(k_occ, images, flags, settings.occluder)
    return images, masks, flags


def resize_masks(masks: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Pixel masks (N, H, W) -> phi's resolution (N, h, w): area average (soft targets)."""
    n, h, w = masks.shape
    sh, sw = size
    if (h, w) == (sh, sw):
        return masks
    if h % sh == 0 and w % sw == 0:
        # Exact area average over each cell: the fraction of the cell that is occluded.
        return masks.reshape(n, sh, h // sh, sw, w // sw).mean(axis=(2, 4))
    return jax.image.resize(masks, (n, sh, sw), method="linear", antialias=True)


def discriminator_loss(d_params, features, occluded, weights, *, disc):
    """Eq. (6) over the valid examples; returns (L_D, (logits, correct count))."""
    logits = disc.apply({"params": d_params}, features)
    loss = losses.discriminator_bce(logits, occluded.astype(jnp.float32), mask=weights)
    correct = jnp.sum(((logits > 0) == occluded) * weights)
    return loss, (logits, correct)


def objective(out, d_params, labels, masks, weights, *, disc, settings: OcclusionSettings):
    """Eq. (8) L = L_emp + lambda1 L_noisy + lambda2 L_F from the network's outputs.

    Each term is a mean over valid examples (weights 1, padding 0). Returns (L, terms); terms
    hold each loss and the number of correct predictions.
    """
    logits = out["logits"]
    # Eq. (7): softmax cross entropy of R.
    l_emp = losses.weighted_cross_entropy(logits, labels, mask=weights)
    total, terms = l_emp, {"l_emp": l_emp}
    if settings.attention:
        target = resize_masks(masks, out["mask_logits"].shape[1:3])
        # Eq. (2), per image, then averaged; clean images have all-zero targets.
        l_noisy = losses.occlusion_mask_bce(out["mask_logits"], target, mask=weights)
        total, terms["l_noisy"] = total + settings.lambda_noisy * l_noisy, l_noisy
    if settings.adversarial:
        d_logits = disc.apply({"params": d_params}, out["embedding"])
        # Eq. (5): D is fixed here (its params are not differentiated), F moves toward P_E.
        l_f = losses.prior_cross_entropy(d_logits, settings.prior, mask=weights)
        total, terms["l_f"] = total + settings.lambda_adv * l_f, l_f
    terms["correct"] = jnp.sum((jnp.argmax(logits, -1) == labels) * weights)
    return total, terms


def _forward(params, batch_stats, images, *, net):
    """F and R in training mode: (outputs, updated BatchNorm statistics)."""
    out, updates = net.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                             mutable=["batch_stats"])
    return out, updates.get("batch_stats", batch_stats)


def fr_loss(params, batch_stats, d_params, images, labels, masks, weights, *, net, disc,
            settings: OcclusionSettings):
    """Eq. (8) as a function of F and R's params: (L, (new batch_stats, terms))."""
    out, new_stats = _forward(params, batch_stats, images, net=net)
    total, terms = objective(out, d_params, labels, masks, weights, disc=disc, settings=settings)
    return total, (new_stats, terms)


def d_step(state: OcclusionState, batch: dict, *, net, disc, d_tx, settings: OcclusionSettings):
    """Eq. (6): one update of D on F(x) with F and R fixed (their params and BN stats kept).

    F runs in training mode (batch statistics, as in the F+R step that follows) but its
    updated running statistics are dropped and its output is a constant for the gradient.
    """
    key = jax.random.fold_in(state.rng, state.step)
    images, _, occluded = prepare_batch(key, batch, settings)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    out, _ = net.apply(variables, images, train=True, mutable=["batch_stats"])
    features = jax.lax.stop_gradient(out["embedding"])
    weights = jnp.ones(occluded.shape, jnp.float32)
    (loss, (_, correct)), grads = jax.value_and_grad(
        discriminator_loss, has_aux=True)(state.d_params, features, occluded, weights, disc=disc)
    updates, d_opt_state = d_tx.update(grads, state.d_opt_state, state.d_params)
    d_params = optax.apply_updates(state.d_params, updates)
    metrics = {"d_loss": loss, "d_accuracy": correct / occluded.shape[0]}
    return state.replace(d_params=d_params, d_opt_state=d_opt_state), metrics


def f_step(state: OcclusionState, batch: dict, *, net, disc, tx, settings: OcclusionSettings):
    """Eq. (8): one update of F (backbone + phi) and R with D fixed; advances the step."""
    key = jax.random.fold_in(state.rng, state.step)
    images, masks, occluded = prepare_batch(key, batch, settings)
    labels = batch["label"]
    weights = jnp.ones(labels.shape, jnp.float32)
    grad_fn = jax.value_and_grad(fr_loss, has_aux=True)
    (loss, (batch_stats, terms)), grads = grad_fn(
        state.params, state.batch_stats, state.d_params, images, labels, masks, weights, net=net,
        disc=disc, settings=settings)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "accuracy": terms.pop("correct") / labels.shape[0],
               "occluded_fraction": occluded.mean(), "grad_norm": optax.global_norm(grads),
               **terms}
    if "l_f" in metrics:
        # KL(P_E || P(y_occ | F(x))) = L_F - H(P_E) (Eq. 3): 0 when F hides occlusion from D.
        metrics["kl"] = metrics["l_f"] - binary_entropy(settings.prior)
    new = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                        opt_state=opt_state)
    return new, metrics


def min_max_update(params, batch_stats, opt_state, d_params, d_opt_state, images, labels, masks,
                   occluded, weights, *, net, disc, tx, d_tx, settings: OcclusionSettings):
    """D step (if adversarial) then F+R step on one prepared batch, F run forward once.

    Both steps see the same F (D's update does not touch it), so the D step reads the features
    of one training-mode forward, and the F+R loss is differentiated against the updated D
    with respect to that forward's outputs, then pulled back through its VJP. Equal to
    `d_step` then `f_step` (tested) for one forward pass of F instead of two.

    Returns (params, batch_stats, opt_state, d_params, d_opt_state, scalars); scalars are
    weighted means ('loss', 'l_emp', ['l_noisy', 'l_f', 'd_loss']) and counts ('correct',
    ['d_correct']).
    """
    out, pullback, new_stats = jax.vjp(
        lambda p: _forward(p, batch_stats, images, net=net), params, has_aux=True)
    scalars = {}
    if settings.adversarial:
        # Eq. (6) with F fixed: its features are constants for D.
        (d_loss, (_, d_correct)), d_grads = jax.value_and_grad(discriminator_loss, has_aux=True)(
            d_params, jax.lax.stop_gradient(out["embedding"]), occluded, weights, disc=disc)
        d_updates, d_opt_state = d_tx.update(d_grads, d_opt_state, d_params)
        d_params = optax.apply_updates(d_params, d_updates)
        scalars.update(d_loss=d_loss, d_correct=d_correct)
    # Eq. (8) against the updated D, differentiated w.r.t. the outputs, then through F and R.
    (loss, terms), out_grads = jax.value_and_grad(objective, has_aux=True)(
        out, d_params, labels, masks, weights, disc=disc, settings=settings)
    (grads,) = pullback(out_grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    scalars.update(loss=loss, grad_norm=optax.global_norm(grads), **terms)
    return params, new_stats, opt_state, d_params, d_opt_state, scalars


def train_step(state: OcclusionState, batch: dict, *, net, disc, tx, d_tx,
               settings: OcclusionSettings):
    """The paper's alternation in one jitted call: D step (if adversarial), then F+R step."""
    key = jax.random.fold_in(state.rng, state.step)
    images, masks, occluded = prepare_batch(key, batch, settings)
    labels = batch["label"]
    n = labels.shape[0]
    params, batch_stats, opt_state, d_params, d_opt_state, m = min_max_update(
        state.params, state.batch_stats, state.opt_state, state.d_params, state.d_opt_state,
        images, labels, masks, occluded, jnp.ones((n,), jnp.float32), net=net, disc=disc, tx=tx,
        d_tx=d_tx, settings=settings)
    m["accuracy"] = m.pop("correct") / n
    m["occluded_fraction"] = occluded.mean()
    if settings.adversarial:
        m["d_accuracy"] = m.pop("d_correct") / n
        # KL(P_E || P(y_occ | F(x))) = L_F - H(P_E) (Eq. 3): 0 when F hides occlusion from D.
        m["kl"] = m["l_f"] - binary_entropy(settings.prior)
    new = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                        opt_state=opt_state, d_params=d_params, d_opt_state=d_opt_state)
    return new, m


def predict(params, batch_stats, images: jax.Array, *, net):
    """(logits, phi's mask probabilities (N, h, w)) of float images in eval mode."""
    out = net.apply({"params": params, "batch_stats": batch_stats}, images, train=False)
    return out["logits"], mask_probabilities(out)


def predict_occluded(params, batch_stats, images: jax.Array, key: jax.Array, *, net, mode: str,
                     image_size: int, channels: int, occluder=None):
    """Evaluation: uint8 images -> occluded by `mode` (occluders.EVAL_MODES) -> predictions.

    Returns (logits, mask probabilities, occluded float images, true masks).
    """
    x = preprocess(images, image_size=image_size, channels=channels)
    occluder = occluders.OccluderConfig() if occluder is None else occluder
    x, masks = occluders.eval_occlusion(mode, key, x, cfg=occluder)
    logits, probs = predict(params, batch_stats, x, net=net)
    return logits, probs, x, masks


# ---------------------------------------------------------------- federated client method


@flax.struct.dataclass
class OcclusionClientState:
    """A client's F/R and D with both optimizer states (the engine's per-client state)."""

    params: Any  # {'net': F and R, 'disc': D}
    batch_stats: Any
    opt_state: Any
    d_opt_state: Any
    initial: Any
    trainable: tuple = flax.struct.field(pytree_node=False, default=())


@dataclasses.dataclass(frozen=True, eq=False)
class OcclusionClient:
    """The min-max steps as a federated client (init / step / final, see federated/client.py).

    Server variables: {'params': {'net': ..., 'disc': ...}, 'batch_stats': {...}}: D is
    averaged with F and R. Each local step runs the D step then the F+R step on the same
    batch (occluders drawn from the step key); padded examples weigh 0 in every loss (their
    images still enter BatchNorm's batch statistics). Hashed by identity (a static argument).
    """

    net: Any
    disc: Any
    optimizer: optax.GradientTransformation
    d_optimizer: optax.GradientTransformation
    settings: OcclusionSettings

    def init(self, variables, trainable, key):
        del key
        params = variables["params"]
        if set(params) != {"net", "disc"}:
            raise ValueError("OcclusionClient needs variables['params'] = {'net', 'disc'}, got "
                             f"{sorted(params)}")
        return OcclusionClientState(
            params=params, batch_stats=variables.get("batch_stats", {}),
            opt_state=self.optimizer.init(params["net"]),
            d_opt_state=self.d_optimizer.init(params["disc"]), initial=variables,
            trainable=tuple(trainable))

    def step(self, state, batch, mask, key):
        images, masks, occluded = prepare_batch(key, batch, self.settings)
        weights = mask.astype(jnp.float32)
        params, batch_stats, opt_state, d_params, d_opt_state, m = min_max_update(
            state.params["net"], state.batch_stats, state.opt_state, state.params["disc"],
            state.d_opt_state, images, batch["label"], masks, occluded, weights, net=self.net,
            disc=self.disc, tx=self.optimizer, d_tx=self.d_optimizer, settings=self.settings)
        merged = restore_frozen(_variables(state.initial, {"net": params, "disc": d_params},
                                           batch_stats), state.initial, state.trainable)
        # The engine adds metric sums over steps and clients: means times the live count.
        count = weights.sum()
        m.pop("grad_norm")
        if self.settings.adversarial:
            # KL(P_E || P(y_occ | F(x))) = L_F - H(P_E) (Eq. 3): 0 when F hides occlusion from D.
            m["kl"] = m["l_f"] - binary_entropy(self.settings.prior)
        metrics = {"count": count, "correct": m.pop("correct"),
                   **({"d_correct": m.pop("d_correct")} if "d_correct" in m else {}),
                   **{f"{k}_sum": v * count for k, v in m.items()}}
        return state.replace(params=merged["params"], batch_stats=merged.get("batch_stats", {}),
                             opt_state=opt_state, d_opt_state=d_opt_state), metrics

    def final(self, state):
        return _variables(state.initial, state.params, state.batch_stats)


def _variables(like, params, batch_stats):
    """{'params', 'batch_stats'} with the collections of `like` (no BN: no 'batch_stats')."""
    return {"params": params, **({"batch_stats": batch_stats} if "batch_stats" in like else {})}
