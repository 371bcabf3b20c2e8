"""Few-shot evaluation on held-out clients: episodes, accuracy with a 95% interval, chance,
a confusion matrix, and a nearest-class-feature probe of the encoder (FedAffect).

The model comes in as two functions (feature maps of images, relation scores of prototypes
against maps), so this module knows nothing of Flax or of the training step.
"""

from __future__ import annotations

import math

import numpy as np
from absl import logging

from fer_jax.data import episodes as episodes_lib


def _batched_maps(feature_maps, images, batch_size: int) -> np.ndarray:
    bs = batch_size
    out = []
    for start in range(0, len(images), bs):
        chunk = images[start:start + bs]
        n = len(chunk)
        if n < bs:  # One compiled shape for every batch.
            chunk = np.concatenate([chunk, np.zeros((bs - n,) + chunk.shape[1:], chunk.dtype)])
        out.append(np.asarray(feature_maps(chunk))[:n])
    return np.concatenate(out)


def evaluate(feature_maps, episode_scores, clients, *, num_classes: int, shots: int,
             num_episodes: int, protocol: str, batch_size: int, seed: int) -> dict:
    """Episodes on held-out clients: accuracy mean and 95% interval, chance, confusion matrix.

    feature_maps(images[B]) -> [B, h, w, c] embedding maps; episode_scores(prototypes
    [E, C, h, w, c], maps [n, h, w, c]) -> [E, n, C] relation scores; clients: (images, labels)
    per held-out client.
    Per client: E = ceil(num_episodes / clients) episodes of K supports per class from that
    client, queries = all its other images (protocol='within_client'), or all the
    images of the next held-out client (c + 1 mod n: 'cross_client', supports and queries of
    different people, so never frames of one sequence); prediction = argmax relation score over
    the episode's classes. Also the nearest-class-map accuracy by cosine similarity of pooled
    encoder features (no relation module): a direct probe of the encoder.
    """
    accs, nn_accs, chance = [], [], []
    cm = np.zeros((num_classes, num_classes), np.int64)
    skipped_clients, skipped_images = 0, 0
    if protocol == "cross_client":
        if len(clients) < 2:
            raise ValueError("fedaffect.eval_protocol='cross_client' needs >= 2 held-out clients,"
                             f" got {len(clients)}")
        pairs = [clients[c] + clients[(c + 1) % len(clients)] for c in range(len(clients))]
        clients = [(np.concatenate([a_im, b_im]), np.concatenate([a_lab, b_lab]),
                    np.arange(len(a_lab) + len(b_lab)) < len(a_lab))
                   for a_im, a_lab, b_im, b_lab in pairs]
    else:
        clients = [(images, labels, None) for images, labels in clients]
    # Which clients support an episode with a query (independent of the draw), so that the
    # episodes are spread over the usable ones and their total reaches eval_episodes.
    usable = []
    for c, (_, labels, pool) in enumerate(clients):
        try:
            probe = episodes_lib.heldout_episodes(labels, num_classes=num_classes,
                                                  shots=shots, num_episodes=1, seed=0,
                                                  support_pool=pool)
            if not probe.query_mask.any():
                raise ValueError("no image is left as a query")
            usable.append(c)
        except ValueError as e:
            logging.warning("held-out client %d skipped: %s", c, e)
            skipped_clients += 1
    per_client = -(-num_episodes // max(len(usable), 1))
    for c in usable:
        images, labels, pool = clients[c]
        eps = episodes_lib.heldout_episodes(labels, num_classes=num_classes, shots=shots,
                                            num_episodes=per_client, seed=(seed, 77, c),
                                            support_pool=pool)
        skipped_images += eps.skipped_images * per_client
        maps = _batched_maps(feature_maps, images, batch_size)
        n = len(images)
        n_pad = -(-n // 16) * 16  # Bucketed query count: few compiled shapes.
        maps_p = np.concatenate([maps, np.zeros((n_pad - n,) + maps.shape[1:], maps.dtype)])
        sup = np.maximum(eps.support_index, 0)                           # (E, C, K)
        protos = maps[sup].sum(2) * eps.class_valid[None, :, None, None, None]
        chunk = max(1, 8192 // (n_pad * num_classes))
        scores = []
        for e0 in range(0, per_client, chunk):
            p = protos[e0:e0 + chunk]
            if len(p) < chunk:
                p = np.concatenate([p, np.zeros((chunk - len(p),) + p.shape[1:], p.dtype)])
            scores.append(np.asarray(episode_scores(p, maps_p))[:, :n])
        scores = np.concatenate(scores)[:per_client]                      # (E, n, C)
        valid = eps.class_valid[None, None, :]
        pred = np.where(valid, scores, -np.inf).argmax(-1)
        emb = maps.mean((1, 2))
        emb = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
        proto_emb = protos.mean((2, 3))
        proto_emb = proto_emb / np.maximum(np.linalg.norm(proto_emb, axis=-1, keepdims=True),
                                           1e-12)
        nn_pred = np.where(valid, np.einsum("nd,ecd->enc", emb, proto_emb), -np.inf).argmax(-1)
        q = eps.query_mask
        nq = q.sum(1)
        keep = nq > 0
        accs.extend(((pred == labels[None]) & q).sum(1)[keep] / nq[keep])
        nn_accs.extend(((nn_pred == labels[None]) & q).sum(1)[keep] / nq[keep])
        chance.extend([1.0 / eps.class_valid.sum()] * int(keep.sum()))
        rows = np.broadcast_to(labels[None], q.shape)[q]
        np.add.at(cm, (rows, pred[q]), 1)
    if not accs:
        raise ValueError("no held-out client supports an episode (each needs >= 2 classes with "
                         f">= {shots} images)")
    accs, nn_accs = np.asarray(accs), np.asarray(nn_accs)
    half = lambda a: float(1.96 * a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else 0.0
    return {"accuracy": float(accs.mean()), "ci95": half(accs), "episodes": int(len(accs)),
            "chance": float(np.mean(chance)), "nearest_class_accuracy": float(nn_accs.mean()),
            "nearest_class_ci95": half(nn_accs), "clients": len(clients),
            "protocol": protocol,
            "skipped_clients": skipped_clients, "skipped_query_images": int(skipped_images),
            "confusion_matrix": cm}
