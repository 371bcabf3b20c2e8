"""Evaluation of occlusion-robust FER: accuracy and phi's mask IoU under every occlusion mode,
eyes / mouth centres from MTCNN landmarks, and the paper's Figure 2 (occluded inputs, true
masks, learned masks)."""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from fer_jax import data as data_lib
from fer_jax.data import occluders
from fer_jax.evaluation import metrics as metrics_lib
from fer_jax.steps import occlusion as steps


def names(text: str) -> tuple[str, ...]:
    """'clean, R16' -> ('clean', 'R16')."""
    return tuple(s.strip() for s in text.split(",") if s.strip())


def occluder_config(config) -> occluders.OccluderConfig:
    occ = config.occlusion
    return occluders.OccluderConfig(min_frac=occ.min_frac, max_frac=occ.max_frac,
                                    shapes=names(occ.shapes), textures=names(occ.textures))


def region_centres(config, split: data_lib.Split) -> dict[str, np.ndarray | None]:
    """(N, 2) (row, col) centres of the eyes and mouth at the model's input size.

    'mtcnn': detected landmarks per test image (canonical positions where no face is found);
    'canonical': None (occluders.CANONICAL_CENTRES is applied on device).
    """
    if config.occlusion.landmarks == "canonical":
        return {"eyes": None, "mouth": None}
    from fer_jax.data.face import FaceDetector

    detector, size = FaceDetector(), config.data.image_size
    src_h, src_w = split.images.shape[1:3]
    out = {r: np.zeros((len(split), 2), np.float32) for r in ("eyes", "mouth")}
    missed = 0
    for i, image in enumerate(split.images):
        faces = detector(image)
        for region in out:
            if faces:
                c = np.asarray(occluders.landmark_centres(region, faces[0].landmarks[None]))[0]
                out[region][i] = c * np.array([size / src_h, size / src_w])
            else:
                out[region][i] = np.asarray(occluders.canonical_centres(region, 1, size, size))[0]
        missed += not faces
    logging.info("MTCNN landmarks: %d of %d test images without a face (canonical used)",
                 missed, len(split))
    return out


def evaluate_modes(config, params, batch_stats, net, split: data_lib.Split, num_classes: int,
                   class_names, centres=None):
    """Accuracy and phi's mask IoU on `split` for every evaluation mode (fixed eval keys)."""
    size, channels = config.data.image_size, config.data.channels
    modes = names(config.occlusion.eval_modes)
    occ_cfg = occluder_config(config)
    base = jax.random.PRNGKey(config.occlusion.eval_seed)
    centres = centres or {}
    results, reports = {"accuracy": {}, "mask_iou": {}}, {}

    @functools.partial(jax.jit, static_argnames=("mode",))
    def run(params, batch_stats, images, idx, cent, *, mode):
        # Keyed by (mode, first index of the batch): every model sees the same occlusions.
        key = jax.random.fold_in(jax.random.fold_in(base, occluders.EVAL_MODES.index(mode)),
                                 idx[0])
        x = steps.preprocess(images, image_size=size, channels=channels)
        if mode in ("eyes", "mouth") and cent is not None:
            x, masks = occluders.region_occlusion(
                x, cent, occluders.scaled_size(occluders.REGION_SIZE, size))
        else:
            x, masks = occluders.eval_occlusion(mode, key, x, cfg=occ_cfg)
        logits, probs = steps.predict(params, batch_stats, x, net=net)
        true = steps.resize_masks(masks, probs.shape[1:3]) > 0.5
        pred = probs > 0.5
        inter = jnp.sum(true & pred, axis=(1, 2))
        union = jnp.sum(true | pred, axis=(1, 2))
        return jnp.argmax(logits, -1), inter, union

    bs = config.eval_batch_size
    for mode in modes:
        preds, inter, union = [], 0, 0
        cent_all = centres.get(mode)
        for start in range(0, len(split), bs):
            images = split.images[start:start + bs]
            n = len(images)
            idx = np.arange(start, start + bs, dtype=np.int32)
            cent = None if cent_all is None else cent_all[start:start + bs]
            if n < bs:  # A fixed batch shape: one compile per mode.
                images = np.concatenate([images, np.zeros((bs - n, *images.shape[1:]),
                                                          images.dtype)])
                cent = None if cent is None else np.concatenate([cent, np.zeros((bs - n, 2),
                                                                                np.float32)])
            p, i, u = run(params, batch_stats, images, idx, cent, mode=mode)
            preds.append(np.asarray(p)[:n])
            inter += int(np.asarray(i)[:n].sum())
            union += int(np.asarray(u)[:n].sum())
        cm = metrics_lib.confusion_matrix(split.labels, np.concatenate(preds), num_classes)
        reports[mode] = (cm, metrics_lib.classification_report(cm, class_names))
        results["accuracy"][mode] = reports[mode][1]["accuracy"]
        # Pixel IoU over the whole split, for models with phi and modes that occlude.
        if mode != "clean" and config.occlusion.attention:
            results["mask_iou"][mode] = inter / union if union else 0.0
    return results, reports


def save_mask_figure(config, params, batch_stats, net, split: data_lib.Split, path, title: str):
    """The paper's Figure 2: synthetic occluded inputs, their true masks and phi's masks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = min(config.occlusion.figure_examples, len(split))
    size, channels = config.data.image_size, config.data.channels
    key = jax.random.PRNGKey(config.occlusion.eval_seed + 1)
    fn = jax.jit(functools.partial(steps.predict_occluded, net=net, mode="synthetic",
                                   image_size=size, channels=channels,
                                   occluder=occluder_config(config)))
    _, probs, x, masks = fn(params, batch_stats, split.images[:k], key)
    probs = np.asarray(jax.image.resize(probs, (k, size, size), "linear"))
    rows = [("occluded input", np.asarray(x).mean(-1)), ("true mask", np.asarray(masks)),
            ("learned mask (phi)" if config.occlusion.attention else "no phi (M_Res/M_ResAdv)",
             probs)]
    fig, axes = plt.subplots(3, k, figsize=(1.4 * k + 1.0, 4.6), squeeze=False)
    for r, (name, images) in enumerate(rows):
        for c in range(k):
            # Masks in a colour map with a scale: 1 = occluded (true) / P(occluded) (phi).
            shown = axes[r, c].imshow(images[c], cmap="gray" if r == 0 else "viridis",
                                      vmin=0.0, vmax=1.0)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(name, fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    bar = fig.colorbar(shown, ax=axes[1:, :].ravel().tolist(), fraction=0.03, pad=0.02)
    bar.set_label("mask: 1 = occluded", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return pathlib.Path(path)
