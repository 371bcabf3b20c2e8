"""FedAffect's two learners: encoder + SimCLR projector, and encoder + relation module.

FedAffect (Shome & Kar), Fig. 1-2 and Algorithm 1:
  * representation learner: z = P(E(x)), E the encoder (ResNet-50 V2 in the paper, any fer_jax
    backbone here, `num_classes=None`), P a small MLP projector on E's pooled embedding
    (SimCLR's g(.): Dense -> ReLU -> Dense, Chen et al. 2020 Sec. 2.1);
  * few-shot learner: the embedding module f_psi (the same encoder architecture) gives feature
    maps; a class's support feature is the **element-wise sum** of its K support maps
    (`losses.class_prototypes`), concatenated **depth-wise** with each query's map, and the
    relation module g_phi scores the pair in [0, 1].
`FewShotLearner.head='prototypical'` replaces the relation module by Snell et al. 2017's
prototypical head (a baseline arm, configs/fedaffect.py `fewshot.head`): prototype = mean support
map, logits = -squared Euclidean distance of the flattened maps; its parameters are the encoder's.
The relation module is Sung et al. 2018 (*Learning to Compare*, Fig. 2): two conv blocks (3x3
conv with `features` filters + ReLU + 2x2 max pool), then Dense(`hidden`) + ReLU, Dense(1) +
sigmoid. Sung et al. put BatchNorm in each block; FedAffect's federated clients pad partial
batches, whose statistics BN would mix in, so `norm` is 'group' (GroupNorm after each conv,
per pair, no batch statistics) or 'none' (bias only), as for the encoders of the federated runs
(configs/fedaffect.py).

Parameters: {'encoder': ..., 'projector': ...} and {'encoder': ..., 'relation': ...}, so the
server's hand-off (Algorithm 1: the few-shot learner's embedding module replaced by the
aggregated encoder) is a copy of the 'encoder' subtree.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from fer_jax import losses
from fer_jax.models import layers

NORMS = ("none", "group")  # Per-example norms only (BatchNorm would mix padded pairs in).
# The dense hidden layer's activation. Sung et al.: ReLU on 8 units, which can all die: on
# FER-2013 one seed of three ended with every unit negative on every pair from round 1, a
# constant score and no gradient to anything below it (docs/results.md#fedaffect-fer2013-fewshot).
HIDDEN_ACTIVATIONS = {"relu": jax.nn.relu, "leaky_relu": jax.nn.leaky_relu}


class RelationModule(nn.Module):
    """g_phi of Sung et al. 2018: (P, h, w, 2c) concatenated pair maps -> (P,) scores in [0, 1].

    Attributes: features (filters of both conv blocks, 64 in Sung et al.), hidden (width of the
    first dense layer, 8 in Sung et al.), norm ('none' or 'group': GroupNorm after each block's
    conv, in place of Sung et al.'s BatchNorm; per pair, so padding-safe). A 2x2 pool is
    skipped when the map is already 1 pixel wide, so any encoder resolution works.

    `factored(class_maps, query_maps)` gives the same scores for every (query, class) pair
    without building the pairs: the first convolution is linear in its input, so
    conv1([s, q]) = conv_s(s) + conv_q(q) + b with the kernel split along its input channels
    (zero SAME padding splits the same way). Each map is convolved once instead of once per
    pair: ~9x fewer FLOPs for 8 classes with the CPU encoder (exact up to float rounding).
    """

    features: int = 64
    hidden: int = 8
    norm: str = "none"
    # The output bias; False when the scores are trained as softmax logits over an episode's
    # classes (fewshot.loss='ce'), which cancels it: like a bias before GroupNorm, its gradient
    # would be float noise that Adam scales into full-size steps.
    output_bias: bool = True
    hidden_activation: str = "relu"  # relu (Sung et al.) | leaky_relu (slope 0.01: never dead)

    def setup(self):
        layers.check_choice(self.norm, NORMS, name="norm")
        layers.check_choice(self.hidden_activation, tuple(HIDDEN_ACTIVATIONS),
                            name="hidden_activation")
        # A bias before GroupNorm is cancelled by it: its gradient is zero up to float noise,
        # which Adam would scale into full-size steps. The convs carry one only without a norm.
        bias = self.norm == "none"
        self.conv1 = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=bias)
        self.conv2 = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=bias)
        if self.norm == "group":
            groups = math.gcd(layers.GROUPS, self.features)
            self.norm1 = nn.GroupNorm(num_groups=groups)
            self.norm2 = nn.GroupNorm(num_groups=groups)
        else:
            self.norm1 = self.norm2 = lambda y: y
        self.fc1 = nn.Dense(self.hidden)
        self.fc2 = nn.Dense(1, use_bias=self.output_bias)

    def __call__(self, pairs: jax.Array, *, logits: bool = False) -> jax.Array:
        pairs = layers.check_images(pairs, name="pairs")
        return self.head(self.conv1(pairs), logits=logits)

    def head(self, pre: jax.Array, *, logits: bool = False) -> jax.Array:
        """Everything after conv1's affine map: (P, h, w, features) -> (P,) scores (or, with
        `logits`, the pre-sigmoid outputs: the logits of `losses.episode_cross_entropy`)."""
        self._check_group_size(pre.shape[1:3], "first")
        x = _pool(nn.relu(self.norm1(pre)))
        self._check_group_size(x.shape[1:3], "second")
        x = _pool(nn.relu(self.norm2(self.conv2(x))))
        x = HIDDEN_ACTIVATIONS[self.hidden_activation](self.fc1(x.reshape(x.shape[0], -1)))
        out = self.fc2(x)[:, 0]
        return out if logits else nn.sigmoid(out)

    def _check_group_size(self, hw, block: str):
        """GroupNorm over 2 values keeps only their order (+-1): on a 1x1 map with 2 channels per
        group every pair gets the same features and the same score, and nothing learns (a
        four-stage encoder's 3x3 map, pooled to 1x1 before the second block, scored exactly
        1/C on every episode). Shapes are static, so this is a trace-time error."""
        if self.norm != "group":
            return
        groups = self.norm1.num_groups
        size = hw[0] * hw[1] * (self.features // groups)
        if size <= 2:
            raise ValueError(
                f"RelationModule: the {block} block's GroupNorm would normalize {size} values per "
                f"group ({hw[0]}x{hw[1]} map, {self.features} features in {groups} groups), "
                f"which leaves only +-1 (which of the two is larger), so every pair would score "
                f"the same; give the relation module a larger feature map (small_cnn without "
                f"its last pool: config model.kwargs.pool_last=False; larger data.image_size) or "
                f"no norm (model.relation_norm='none')")

    def factored(self, class_maps: jax.Array, query_maps: jax.Array, *,
                 logits: bool = False) -> jax.Array:
        """(C, h, w, c) and (Q, h, w, c) -> (Q, C) scores (or logits) of the pairs [class map,
        query map]."""
        if self.is_initializing():  # Create conv1's parameters with their pair-input shape.
            self.conv1(pair_maps(class_maps[:1], query_maps[:1]))
        kernel = self.conv1.variables["params"]["kernel"]
        bias = self.conv1.variables["params"].get("bias", 0.0)
        c = class_maps.shape[-1]
        conv = lambda x, k: jax.lax.conv_general_dilated(
            x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        s = conv(class_maps, kernel[:, :, :c])                       # (C, h, w, F)
        q = conv(query_maps, kernel[:, :, c:])                       # (Q, h, w, F)
        pre = q[:, None] + s[None] + bias                            # (Q, C, h, w, F)
        nq, nc = pre.shape[:2]
        return self.head(pre.reshape((nq * nc,) + pre.shape[2:]), logits=logits).reshape(nq, nc)


def _pool(x: jax.Array) -> jax.Array:
    # Reshape pooling: nn.max_pool's gradient is slow on XLA:CPU (docs/performance.md#max-pool).
    return layers.max_pool_reshape(x, 2) if x.shape[1] >= 2 and x.shape[2] >= 2 else x


class ProjectionHead(nn.Module):
    """SimCLR's projector g(.): Dense(hidden) -> ReLU -> Dense(out) (Chen et al. 2020)."""

    hidden: int = 256
    out: int = 128

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        h = nn.relu(nn.Dense(self.hidden, name="fc1")(h))
        return nn.Dense(self.out, name="fc2")(h)


class RepresentationLearner(nn.Module):
    """E + P: images (N, H, W, C) in [0, 1] -> {'embedding': E's pooled features, 'z': P(E(x))}."""

    encoder: nn.Module
    projector: ProjectionHead

    def __call__(self, x: jax.Array, *, train: bool) -> dict:
        h = self.encoder(x, train=train)["embedding"]
        return {"embedding": h, "z": self.projector(h)}


def pair_maps(prototypes: jax.Array, query_maps: jax.Array) -> jax.Array:
    """(C, h, w, c) class maps x (Q, h, w, c) query maps -> (Q * C, h, w, 2c), depth-wise
    concatenation [class map, query map]; pair (q, c) is row q * C + c."""
    nc, nq = prototypes.shape[0], query_maps.shape[0]
    s = jnp.broadcast_to(prototypes[None], (nq,) + prototypes.shape)
    q = jnp.broadcast_to(query_maps[:, None], (nq, nc) + query_maps.shape[1:])
    return jnp.concatenate([s, q], axis=-1).reshape((nq * nc,) + s.shape[2:-1] + (-1,))


HEADS = ("relation", "prototypical")


class FewShotLearner(nn.Module):
    """f_psi + a few-shot head: (Q, C) scores of query images against C support classes.

    head 'relation' (FedAffect / Sung et al.): class map = sum of the K support maps, scores in
    [0, 1] from the relation module; 'prototypical' (Snell et al.): class map = mean support
    map, scores = logits = -squared distance. argmax of scores = argmax of logits for both.
    """

    encoder: nn.Module
    relation: RelationModule
    num_classes: int
    head: str = "relation"

    def setup(self):
        layers.check_choice(self.head, HEADS, name="head")

    def features(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Encoder feature maps (N, h, w, c) (the embedding module f_psi)."""
        return self.encoder(x, train=train)["feature_map"]

    def class_maps(self, maps: jax.Array, labels: jax.Array) -> jax.Array:
        """(S, ...) support maps with labels (S,) -> (C, ...): the sum (relation) or mean."""
        reduce = losses.class_prototypes if self.head == "relation" else losses.class_means
        return reduce(maps, labels, self.num_classes)

    def scores(self, prototypes: jax.Array, query_maps: jax.Array, *,
               logits: bool = False) -> jax.Array:
        """(C, ...) class maps and (Q, ...) query maps -> (Q, C) scores: relation scores of the
        depth-wise concatenated pairs (`RelationModule.factored`; `logits`: before the sigmoid)
        or prototypical logits."""
        if self.head == "prototypical":
            return losses.prototypical_logits(prototypes, query_maps)
        return self.relation.factored(prototypes, query_maps, logits=logits)

    def __call__(self, support: jax.Array, support_labels: jax.Array, query: jax.Array, *,
                 train: bool, logits: bool = False) -> jax.Array:
        """support (S, H, W, C) with labels (S,) in [0, num_classes), query (Q, H, W, C)."""
        ns = support.shape[0]
        # One encoder pass over support and query together.
        maps = self.features(jnp.concatenate([support, query]), train=train)
        return self.scores(self.class_maps(maps[:ns], support_labels), maps[ns:], logits=logits)


def build_learners(encoder: nn.Module, *, num_classes: int, projector_hidden: int = 256,
                   projector_out: int = 128, relation_features: int = 64,
                   relation_hidden: int = 8, relation_norm: str = "none",
                   head: str = "relation", relation_output_bias: bool = True,
                   relation_hidden_activation: str = "relu",
                   ) -> tuple[RepresentationLearner, FewShotLearner]:
    """The two FedAffect models sharing one encoder architecture (separate parameters)."""
    rep = RepresentationLearner(encoder, ProjectionHead(projector_hidden, projector_out))
    few = FewShotLearner(encoder, RelationModule(relation_features, relation_hidden,
                                                 relation_norm, relation_output_bias,
                                                 relation_hidden_activation),
                         num_classes, head)
    return rep, few
