"""Few-shot evaluation on held-out clients: episodes, accuracy with a 95% interval, chance,
a confusion matrix, and a nearest-class-feature probe of the encoder (FedAffect); and the
overall accuracy of the paper's tables (class maps from every labelled training image, a test
split classified).

The model comes in as two functions (feature maps of images, relation scores of prototypes
against maps), so this module knows nothing of Flax or of the training step.
"""

from __future__ import annotations

import math

import numpy as np
from absl import logging

from fer_jax.data import episodes as episodes_lib


def batched_maps(feature_maps, images, batch_size: int) -> np.ndarray:
    """feature_maps over `images` in calls of exactly batch_size (the last one zero-padded)."""
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
             num_episodes: int, protocol: str, batch_size: int, seed: int,
             support_scale: float | None = None) -> dict:
    """Episodes on held-out clients: accuracy mean and 95% interval, chance, confusion matrix.

    feature_maps(images[B]) -> [B, h, w, c] embedding maps; episode_scores(prototypes
    [E, C, h, w, c], maps [n, h, w, c]) -> [E, n, C] relation scores; clients: (images, labels)
    per held-out client.
    Per client: E = ceil(num_episodes / clients) episodes of K supports per class from that
    client, queries = all its other images (protocol='within_client'), or all the
    images of the next held-out client (c + 1 mod n: 'cross_client', supports and queries of
    different people, so never frames of one sequence); prediction = argmax relation score over
    the episode's classes. Class map = the sum of the K support maps (support_scale None, the
    relation network's), or support_scale x their mean (1: a prototypical network's mean; the
    training K: a relation module trained with K shots tested at another K). Also the
    nearest-class-map accuracy by cosine similarity of pooled encoder features (no relation
    module): a direct probe of the encoder.
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
        maps = batched_maps(feature_maps, images, batch_size)
        n = len(images)
        n_pad = -(-n // 16) * 16  # Bucketed query count: few compiled shapes.
        maps_p = np.concatenate([maps, np.zeros((n_pad - n,) + maps.shape[1:], maps.dtype)])
        sup = np.maximum(eps.support_index, 0)                           # (E, C, K)
        protos = maps[sup].sum(2) if support_scale is None else \
            maps[sup].mean(2) * np.float32(support_scale)
        protos = protos * eps.class_valid[None, :, None, None, None]
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
    return {"accuracy": float(accs.mean()), "ci95": _half(accs), "episodes": int(len(accs)),
            "chance": float(np.mean(chance)), "nearest_class_accuracy": float(nn_accs.mean()),
            "nearest_class_ci95": _half(nn_accs), "clients": len(clients),
            "protocol": protocol,
            "skipped_clients": skipped_clients, "skipped_query_images": int(skipped_images),
            "confusion_matrix": cm}


def _half(a: np.ndarray) -> float:
    """Half-width of the 95% normal interval of the mean of `a` (0 for fewer than 2 values)."""
    return float(1.96 * a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else 0.0


def overall_accuracy(feature_maps, class_scores, support, test, *, num_classes: int,
                     support_scale: float, batch_size: int) -> dict:
    """The paper's "overall accuracy": class maps from all labelled training images, every
    test image classified (argmax score over the classes that have a labelled image).

    feature_maps(images[B]) -> [B, h, w, c]; class_scores(class_maps [C, h, w, c], maps
    [B, h, w, c]) -> [B, C]; support, test: (images, labels). Class map of class c =
    support_scale x the mean of its N_c labelled maps: 1 for a prototypical network, the
    training K for a relation network (the expected sum of K supports, the scale its module
    learned). Maps are summed batch by batch (memory independent of N). A class without labelled
    images cannot be predicted: it is left out of the argmax, named in
    `classes_without_support`, and its test images count as errors. Returns accuracy, ci95
    (binomial normal interval), chance (1 / classes that can be predicted), majority (the
    most frequent test class's share), the nearest-class probe (cosine of pooled features to
    the pooled class means), the confusion matrix and counts.
    """
    (sup_images, sup_labels), (test_images, test_labels) = support, test
    sup_labels, test_labels = np.asarray(sup_labels), np.asarray(test_labels)
    if len(test_labels) == 0:
        raise ValueError("overall accuracy: the test split is empty")
    sums, counts = None, np.bincount(sup_labels, minlength=num_classes)[:num_classes]
    for start in range(0, len(sup_labels), batch_size):
        maps = batched_maps(feature_maps, sup_images[start:start + batch_size], batch_size)
        if sums is None:
            sums = np.zeros((num_classes,) + maps.shape[1:], np.float64)
        np.add.at(sums, sup_labels[start:start + batch_size], maps)
    valid = counts > 0
    if valid.sum() < 2:
        raise ValueError(f"overall accuracy: labelled training images of fewer than 2 classes "
                         f"(counts {counts.tolist()})")
    means = sums / np.maximum(counts, 1).reshape((-1,) + (1,) * (sums.ndim - 1))
    protos = (means * support_scale).astype(np.float32)
    pooled = means.mean((1, 2))
    pooled /= np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    preds, nn_preds = [], []
    for start in range(0, len(test_labels), batch_size):
        chunk = test_images[start:start + batch_size]
        maps = batched_maps(feature_maps, chunk, batch_size)
        padded = np.concatenate([maps, np.zeros((batch_size - len(maps),) + maps.shape[1:],
                                                maps.dtype)])
        scores = np.asarray(class_scores(protos, padded))[:len(maps)]
        preds.append(np.where(valid[None], scores, -np.inf).argmax(-1))
        emb = maps.mean((1, 2))
        emb = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
        nn_preds.append(np.where(valid[None], emb @ pooled.T, -np.inf).argmax(-1))
    pred, nn_pred = np.concatenate(preds), np.concatenate(nn_preds)
    correct = (pred == test_labels).astype(np.float64)
    n = len(test_labels)
    acc = float(correct.mean())
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (test_labels, pred), 1)
    return {"accuracy": acc, "ci95": float(1.96 * math.sqrt(acc * (1 - acc) / n)),
            "chance": float(1.0 / valid.sum()),
            "majority": float(np.bincount(test_labels, minlength=num_classes).max() / n),
            "nearest_class_accuracy": float((nn_pred == test_labels).mean()),
            "test_images": int(n), "support_images": int(len(sup_labels)),
            "support_per_class": counts.tolist(), "support_scale": float(support_scale),
            "classes_without_support": np.flatnonzero(~valid).tolist(),
            "confusion_matrix": cm}
