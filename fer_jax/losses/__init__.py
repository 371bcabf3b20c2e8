"""The five papers' losses as pure, jittable functions of jax.numpy arrays.

Importable on its own (jax only: no flax, data or config). Each module cites its paper and
equations and states its decision where a paper is ambiguous. Every loss that averages over
examples takes `mask=` (N,): padded rows of a fixed-shape batch drop out of the value and the
gradient, so the masked loss equals the loss of the valid rows alone.

  contrastive     nt_xent                                   FedAffect Alg. 1 / SimCLR
  fewshot         class_prototypes, relation_mse            FedAffect 3.2 / Sung et al. 2018
                  episode_cross_entropy, class_means,       FedAffect option / Snell et al.
                  prototypical_logits                       2017
  diversity       rbf_similarity, det_diversity,            Heidari & Iosifidis Eq. (1)-(3)
                  spatial_pool, channel_pool
  classification  weighted_cross_entropy                    VFER (Salman & Busso) IFER
  occlusion       occlusion_mask_bce, discriminator_bce,    occlusion adversarial Eq. (2)-(8)
                  prior_cross_entropy
  ensemble        ensemble_vote                             ESR plurality vote
"""

from fer_jax.losses.classification import weighted_cross_entropy
from fer_jax.losses.contrastive import nt_xent
from fer_jax.losses.diversity import channel_pool, det_diversity, rbf_similarity, spatial_pool
from fer_jax.losses.ensemble import ensemble_vote
from fer_jax.losses.fewshot import (
    class_means,
    class_prototypes,
    episode_cross_entropy,
    prototypical_logits,
    relation_mse,
)
from fer_jax.losses.occlusion import discriminator_bce, occlusion_mask_bce, prior_cross_entropy

__all__ = [
    "channel_pool",
    "class_means",
    "class_prototypes",
    "det_diversity",
    "discriminator_bce",
    "ensemble_vote",
    "episode_cross_entropy",
    "nt_xent",
    "occlusion_mask_bce",
    "prior_cross_entropy",
    "prototypical_logits",
    "rbf_similarity",
    "relation_mse",
    "spatial_pool",
    "weighted_cross_entropy",
]
