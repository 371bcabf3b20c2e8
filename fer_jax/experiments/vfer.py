"""VFER personalization + head-only FedAvg (configs/vfer.py; Salman & Busso, ICMI 2022).

Host-side driver, docs/papers.md#vfer:
  1. corpus: synthetic clips (default) or real videos (fer_jax.data.video: decode, MTCNN, align,
     sample, cache); subjects split into train / dev / test, disjoint;
  2. f = MobileNetV2 (frozen, random or converted weights) -> per-frame 1280-d features, cached;
  3. IFER g on still images (synthetic identities not in the corpus, or FER-2013 restricted to
     the corpus' classes), class-weighted CE, Adam with x0.5 reduce-on-plateau on the dev loss;
  4. VFER v on the train subjects' videos (zero pre-padded), same optimizer, dev = dev subjects;
  5. every FedAvg round: IFER pseudo labels per test subject (Eq. 1, top-P per class, p >
     p_threshold; a jitted vmap over subjects), then the engine fine-tunes v per subject (vmapped
     clients, 2 epochs, unweighted CE) and averages v only (PARAM_RULES in steps/vfer.py);
     per-subject adapted heads come back through the engine's LocalStore;
  6. evaluation: per-class P/R/F1 with macro / micro means, before vs after personalization
     (pooled and per subject), the per-subject micro-F1 difference plot (Fig. 3), the central
     model before and after each FedAvg round; bytes each client sends (v vs whole model).
Checkpoints: one after training (step 1) and one per FedAvg round (step 1 + r) holding g, v, the
server state and the adapted heads; a resumed run continues from the last one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from fer_jax import federated as fl
from fer_jax.data import video as video_lib
from fer_jax.evaluation import metrics as metrics_lib
from fer_jax.evaluation import plots
from fer_jax.federated import config as fed_config
from fer_jax.io import init as init_lib
from fer_jax.models import vfer as vfer_models
from fer_jax.steps import vfer as steps
from fer_jax.steps.supervised import preprocess
from fer_jax.train import Run, checks, loops, optim

DATA = ("synthetic", "ckplus")


def validate_config(config) -> None:
    """Raises ValueError naming the first bad field."""
    check = checks.checker(config)
    check(config.mode in checks.MODES, "mode", f"one of {checks.MODES}")
    d = config.data
    check(d.name in DATA, "data.name", f"one of {DATA}")
    check(d.image_size >= 32, "data.image_size", ">= 32")
    check(d.max_frames >= 2, "data.max_frames", ">= 2")
    check(d.sampling in video_lib.SAMPLING, "data.sampling", f"one of {video_lib.SAMPLING}")
    check(d.detect_every >= 1, "data.detect_every", ">= 1")
    check(d.test_subjects >= 1, "data.test_subjects", ">= 1")
    check(d.dev_subjects >= 1, "data.dev_subjects", ">= 1")
    check(d.name != "synthetic" or d.num_subjects >= d.test_subjects + d.dev_subjects + 1,
          "data.num_subjects", "> test_subjects + dev_subjects")
    check(2 <= d.min_frames <= d.max_frames, "data.min_frames", "in [2, max_frames]")
    check(config.model.width > 0, "model.width", "> 0")
    check(config.model.norm in ("batch", "none"), "model.norm", "batch or none")
    check(config.ifer.class_weights in ("balanced", "none"), "ifer.class_weights",
          "balanced or none")
    for block in ("ifer", "vfer"):
        check(config[block].epochs >= 1, f"{block}.epochs", ">= 1")
        check(config[block].batch_size >= 1, f"{block}.batch_size", ">= 1")
        check(config[block].learning_rate > 0, f"{block}.learning_rate", "> 0")
    p = config.personalize
    check(p.max_per_class >= 1, "personalize.max_per_class", ">= 1")
    check(0 <= p.threshold < 1, "personalize.threshold", "in [0, 1)")
    check(p.epochs >= 1 and p.batch_size >= 1, "personalize.epochs", ">= 1 (and batch_size)")
    check(p.get("min_subjects", 1) >= 1, "personalize.min_subjects", ">= 1")
    fed_config.validate(config, check, partitions=False)
    checks.init_block(config, check)
    check(not (config.model.weights and config.get("init") is not None and config.init.path),
          "model.weights", "'' when config.init.path is set (config.init is its general form)")


def _path(p: str) -> pathlib.Path:
    path = pathlib.Path(p)
    if not path.exists():
        raise FileNotFoundError(f"{path.absolute()} not found (set config.data.* to the shared "
                                "data folder, see ../shared/data/README.md)")
    return path


# ----------------------------------------------------------------------------- data


def split_subjects(subjects, *, test: int, dev: int, seed: int) -> dict[str, np.ndarray]:
    """Disjoint train / dev / test subject lists from a seeded permutation of the sorted ids."""
    unique = np.unique(subjects)
    if len(unique) < test + dev + 1:
        raise ValueError(f"{len(unique)} subjects cannot give {test} test + {dev} dev + >= 1 train")
    order = np.random.default_rng([seed, 5]).permutation(unique)
    return {"test": np.sort(order[:test]), "dev": np.sort(order[test:test + dev]),
            "train": np.sort(order[test + dev:])}


def load_corpus(config, cache_dir) -> video_lib.VideoCorpus:
    d = config.data
    if d.name == "synthetic":
        return video_lib.synthetic_corpus(
            num_subjects=d.num_subjects, clips_per_class=d.clips_per_class,
            min_frames=d.min_frames, max_frames=d.max_frames, image_size=d.image_size,
            seed=config.seed)
    settings = video_lib.FaceSettings(
        image_size=d.image_size, max_frames=d.max_frames, sampling=d.sampling,
        detect_every=d.detect_every, min_face_size=d.min_face_size)
    return video_lib.load_video_corpus(_path(d.video_dir), settings=settings,
                                       cache_dir=cache_dir, skip_unreadable=d.skip_unreadable)


def ifer_images(config, class_names) -> dict:
    """Still images for g: {'train': (images uint8, labels), 'dev': (...)} in corpus classes."""
    d = config.data
    if d.name == "synthetic":
        from fer_jax.data import synthetic

        # Identities from another seed: IFER never sees the corpus' subjects.
        ds = synthetic.make_dataset(num_subjects=d.ifer_subjects,
                                    images_per_class=d.ifer_images_per_class, test_subjects=0.2,
                                    image_size=d.image_size, channels=3, classes=class_names,
                                    seed=config.seed + 1000)
        return {"train": (ds["train"].images, ds["train"].labels),
                "dev": (ds["test"].images, ds["test"].labels)}
    from fer_jax.data import classes as classes_lib
    from fer_jax.data import fer2013

    images, codes, usage = fer2013.read_csv(_path(d.fer2013_csv))
    names = [classes_lib.canonical_name(c) for c in fer2013.FER2013_CODING]
    # FER-2013 code -> corpus class index, -1 for classes the videos do not have (neutral).
    mapping = np.array([class_names.index(n) if n in class_names else -1 for n in names])
    labels = mapping[codes]
    out = {}
    for split, use, cap in (("train", "Training", d.ifer_max_train),
                            ("dev", "PublicTest", d.ifer_max_dev)):
        idx = np.nonzero((usage == use) & (labels >= 0))[0]
        if cap:
            idx = np.sort(np.random.default_rng([config.seed, 9]).permutation(idx)[:cap])
        out[split] = (images[idx], labels[idx].astype(np.int32))
    return out


# ----------------------------------------------------------------------------- f


def calibrate_batch_stats(f, variables, images, *, image_size: int):
    """BatchNorm statistics of f measured on `images` (one train-mode pass, momentum 0).

    A randomly initialised MobileNetV2 with its initial statistics (mean 0, var 1) shrinks the
    signal ~1e4-fold over 52 layers (embedding std ~1e-4), so g and v would see constants.
    Without ImageNet weights (none can be downloaded here) f keeps its random convolutions but
    gets data-dependent statistics; converted pretrained weights keep their own.
    """
    calib = f.clone(bn_momentum=0.0)
    x = preprocess(jnp.asarray(images), image_size=image_size, channels=3)
    _, new = calib.apply(variables, x, train=True, mutable=["batch_stats"])
    return {**variables, "batch_stats": new["batch_stats"]}


def init_backbone(config, variables, *, writer=None):
    """(variables, digest): f from config.init, or from model.weights (a converted MobileNetV2
    .npz whose torchvision head, if any, is not read); digest names the weights in the feature
    cache's key (None: f keeps its random init). The init report goes to init.json (writer)."""
    spec = config.get("init")
    if config.model.weights:
        spec = {"path": str(_path(config.model.weights)), "skip": "^params/head/"}
    if spec is None or not spec["path"]:
        return variables, None
    from fer_jax.models import convert

    variables, report = init_lib.initialize(variables, spec)
    if writer is not None:
        writer.write_json("init.json", report.to_dict())
    if config.model.weights:
        return variables, convert.file_digest(config.model.weights)
    data = b"".join(np.asarray(x).tobytes() for x in jax.tree.leaves(variables))
    return variables, hashlib.sha256(data).hexdigest()[:16]


def build_backbone(config, calibration_images=None, *, writer=None):
    """(featurize uint8 (n, S, S, C) -> (n, 1280), model_key for the feature cache, variables).

    f starts from config.init or model.weights (`init_backbone`); else it keeps its random
    convolutions with BatchNorm statistics calibrated on `calibration_images`.
    """
    f = vfer_models.backbone(config.model.width)
    size = config.data.image_size
    variables, digest = init_backbone(
        config, f.init(jax.random.PRNGKey(config.seed), jnp.zeros((1, size, size, 3)),
                       train=False), writer=writer)
    key = f"mnv2-w{config.model.width}-s{size}-{digest or f'seed{config.seed}'}"
    if digest is None and calibration_images is not None:
        variables = calibrate_batch_stats(f, variables, calibration_images, image_size=size)
        digest = hashlib.sha256(np.ascontiguousarray(calibration_images).tobytes()).hexdigest()
        key += f"-calib{digest[:12]}"

    @jax.jit
    def featurize(images):
        x = preprocess(images, image_size=size, channels=3)
        return f.apply(variables, x, train=False)["embedding"]

    return featurize, key, variables


def image_features(featurize, images, batch_size: int) -> np.ndarray:
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        padded = np.zeros((batch_size, *chunk.shape[1:]), chunk.dtype)
        padded[: len(chunk)] = chunk
        out.append(np.asarray(featurize(padded))[: len(chunk)])
    return np.concatenate(out).astype(np.float32)


# ----------------------------------------------------------------------------- training


def _batches(n: int, batch_size: int, rng) -> list[np.ndarray]:
    order = rng.permutation(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def _pad_rows(index, batch_size):
    """Index padded to a full batch (row 0 repeated) and its mask: one compiled shape."""
    mask = np.zeros(batch_size, bool)
    mask[: len(index)] = True
    return np.concatenate([index, np.zeros(batch_size - len(index), np.int64)]), mask


def train_head(kind, head, variables, train, dev, tcfg, *, seed, class_weights, writer):
    """Adam + x0.5 reduce-on-plateau (dev loss, once per epoch) for g ('ifer') or v ('vfer').

    train / dev: tuples of arrays whose last element is the labels.
    """
    optimizer = optax.adam(tcfg.learning_rate)
    state = steps.init_head_state(variables, optimizer)
    plateau = steps.plateau_transform(patience=tcfg.get("plateau_patience", 2))
    plateau_state = plateau.init({})
    rng = np.random.default_rng([seed, 3 if kind == "ifer" else 4])
    bs = tcfg.batch_size
    cw = jnp.asarray(class_weights)

    def dev_loss(state):
        total, count = 0.0, 0
        for start in range(0, len(dev[-1]), bs):
            idx, mask = _pad_rows(np.arange(start, min(start + bs, len(dev[-1]))), bs)
            arrays = [a[idx] for a in dev]
            if kind == "ifer":
                loss, _ = steps.ifer_loss(state.params, state.batch_stats, arrays[0], arrays[1],
                                          mask, head=head, class_weights=cw, train=False)
            else:
                loss, _ = steps.vfer_loss(state.params, state.batch_stats, *arrays, mask,
                                          head=head, train=False)
            total, count = total + float(loss) * mask.sum(), count + int(mask.sum())
        return total / max(count, 1)

    for epoch in range(tcfg.epochs):
        losses = []
        for index in _batches(len(train[-1]), bs, rng):
            idx, mask = _pad_rows(index, bs)
            arrays = [a[idx] for a in train]
            if kind == "ifer":
                state, loss = steps.ifer_step(state, *arrays, mask, cw, head=head,
                                              optimizer=optimizer)
            else:
                state, loss = steps.vfer_step(state, *arrays, mask, head=head,
                                              optimizer=optimizer)
            losses.append(float(loss))
        dl = dev_loss(state)
        plateau_state, scale = steps.plateau_update(plateau, plateau_state, dl)
        state = state.replace(scale=jnp.asarray(scale, jnp.float32))
        writer.write(epoch + 1, {f"{kind}/train_loss": float(np.mean(losses)),
                                 f"{kind}/dev_loss": dl, f"{kind}/lr_scale": float(scale)})
        logging.info("%s epoch %d: train %.4f dev %.4f lr x%.3g", kind, epoch + 1,
                     np.mean(losses), dl, float(scale))
    return {"params": state.params, "batch_stats": state.batch_stats}


# ----------------------------------------------------------------------------- personalization


@functools.partial(jax.jit, static_argnames=("head", "max_per_class", "threshold"))
def pseudo_label_subjects(g_vars, features, frame_mask, valid, *, head, max_per_class,
                          threshold):
    """IFER pseudo labels for [S, V, T, D] features of S subjects (vmapped over subjects)."""
    s, v, t, d = features.shape
    logits = head.apply(g_vars, features.reshape(-1, d), train=False)
    probs = steps.video_probabilities(logits.reshape(s, v, t, -1), frame_mask)
    select = functools.partial(steps.select_pseudo_labels, max_per_class=max_per_class,
                               threshold=threshold)
    return jax.vmap(select)(probs, valid)


def _by_subject(subjects, order):
    return [np.nonzero(subjects == s)[0] for s in order]


def _stack_subjects(feats, fmask, groups):
    """[S, V, T, D] features, [S, V, T] frame masks and [S, V] validity of S subjects' videos
    (`groups`: one index array per subject; zero-padded to the largest)."""
    vmax = max(len(g) for g in groups)
    s, (_, t, d) = len(groups), feats.shape
    sf = np.zeros((s, vmax, t, d), np.float32)
    sm = np.zeros((s, vmax, t), bool)
    valid = np.zeros((s, vmax), bool)
    for i, g in enumerate(groups):
        sf[i, : len(g)], sm[i, : len(g)], valid[i, : len(g)] = feats[g], fmask[g], True
    return sf, sm, valid


def personalization_population(config, g_head, g_vars, feats, fmask, groups):
    """Pseudo-label every test subject; returns (population clients, per-subject report)."""
    sf, sm, valid = _stack_subjects(feats, fmask, groups)
    p = config.personalize
    labels, selected, conf = jax.device_get(pseudo_label_subjects(
        g_vars, sf, sm, valid, head=g_head, max_per_class=p.max_per_class,
        threshold=p.threshold))
    clients = []
    for i, g in enumerate(groups):
        sel = selected[i, : len(g)]
        clients.append({"features": feats[g][sel], "frame_mask": fmask[g][sel],
                        "label": labels[i, : len(g)][sel].astype(np.int32),
                        "video_index": g[sel]})
    return clients, {"pseudo_labels": labels, "selected": selected, "confidence": conf}


# Confidence thresholds of the pseudo-label curve (the configured one is added).
CURVE_THRESHOLDS = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def pseudo_label_curve(config, g_head, g_vars, feats, fmask, groups, labels) -> list[dict]:
    """Pseudo-label accuracy and coverage vs p_threshold over the videos of `groups` (one index
    array per subject): the same selection as a round (top-P per class, confidence above the
    threshold) at every threshold of CURVE_THRESHOLDS and the configured one."""
    if not groups:
        return []
    sf, sm, valid = _stack_subjects(feats, fmask, groups)
    s, vmax = valid.shape
    # Threshold -1 keeps the top-P per class; a threshold then only removes videos.
    pred, top, conf = jax.device_get(pseudo_label_subjects(
        g_vars, sf, sm, valid, head=g_head, max_per_class=config.personalize.max_per_class,
        threshold=-1.0))
    truth = np.zeros((s, vmax), np.int64)
    for i, g in enumerate(groups):
        truth[i, : len(g)] = labels[g]
    out = []
    for th in sorted({*CURVE_THRESHOLDS, float(config.personalize.threshold)}):
        sel = top & (conf > th)
        n = int(sel.sum())
        out.append({"threshold": th, "videos_selected": n, "videos": int(valid.sum()),
                    "coverage": n / max(int(valid.sum()), 1),
                    "subjects_with_a_video": int(sel.any(1).sum()),
                    "accuracy": float((pred[sel] == truth[sel]).mean()) if n else None})
    return out


def build_engine(config, v_head, max_selected: int):
    """Head-only FedAvg of v (PARAM_RULES): `personalize`'s batch, epochs and Adam."""
    p = config.personalize
    return fed_config.build_engine(
        config.fed, steps.PersonalizeClient(v_head, optax.adam(p.learning_rate)),
        max_client_size=max_selected, param_filter=fl.regex_filter(steps.PARAM_RULES, fl.FROZEN),
        batch_size=p.batch_size, local_epochs=p.epochs, tail_multiple=0)


# ----------------------------------------------------------------------------- evaluation


def make_predict(v_head):
    @jax.jit
    def predict(v_vars, feats, fmask):
        return jnp.argmax(v_head.apply(v_vars, feats, fmask, train=False), -1)

    return predict


def report_of(labels, preds, class_names):
    cm = metrics_lib.confusion_matrix(labels, preds, len(class_names))
    return metrics_lib.classification_report(cm, class_names)


def _v_vars(params, stats):
    return {"params": params, "batch_stats": stats}


# ----------------------------------------------------------------------------- run


def run(config, workdir: str) -> dict:
    t_start = time.perf_counter()
    run = Run(config, workdir, every=1)
    workdir, writer, checkpointer = run.workdir, run.writer, run.checkpointer
    pooled = config.mode == "centralized"
    cache_dir = config.data.cache_dir or str(workdir / "cache")

    t0 = time.perf_counter()
    corpus = load_corpus(config, cache_dir)
    t_corpus = time.perf_counter() - t0
    names = corpus.class_names
    k = len(names)
    split = split_subjects(corpus.subjects, test=config.data.test_subjects,
                           dev=config.data.dev_subjects, seed=config.seed)
    logging.info("corpus %s: %d videos, %d subjects, classes %s; split %s; report %s",
                 config.data.name, len(corpus), len(np.unique(corpus.subjects)), names,
                 {s: v.tolist() for s, v in split.items()}, corpus.report)

    # Calibration frames: evenly spaced frames of the training subjects' videos only.
    train_frames = np.concatenate([corpus.frames[i] for i in np.nonzero(
        np.isin(corpus.subjects, split["train"]))[0]])
    calib = train_frames[np.linspace(0, len(train_frames) - 1,
                                     min(config.model.calibration_frames, len(train_frames))
                                     ).astype(np.int64)]
    featurize, model_key, f_vars = build_backbone(config, calib, writer=writer)
    t0 = time.perf_counter()
    seq_feats = video_lib.cached_features(corpus, featurize, model_key=model_key,
                                          cache_dir=cache_dir if config.data.name != "synthetic"
                                          else None, batch_size=config.model.feature_batch)
    t_features = time.perf_counter() - t0
    feats, fmask = video_lib.pad_sequences(seq_feats, config.data.max_frames)
    frames_total = sum(len(x) for x in corpus.frames)

    g_head = vfer_models.IFERHead(k, hidden=tuple(config.model.g_hidden), norm=config.model.norm)
    v_head = vfer_models.VFERHead(k, norm=config.model.norm)
    key = jax.random.PRNGKey(config.seed)
    g_vars = g_head.init(jax.random.fold_in(key, 1), jnp.zeros((2, feats.shape[-1])), train=False)
    v_vars = v_head.init(jax.random.fold_in(key, 2), feats[:2], fmask[:2], train=False)
    counts = vfer_models.count_heads(k, width=config.model.width,
                                     g_kwargs=dict(hidden=tuple(config.model.g_hidden),
                                                   norm=config.model.norm),
                                     v_kwargs=dict(norm=config.model.norm))

    in_split = {s: np.isin(corpus.subjects, v) for s, v in split.items()}
    test_subjects = split["test"]
    groups = _by_subject(corpus.subjects, test_subjects)
    local_template = {"params": {"personal": v_vars["params"]}}
    # Centralized: one client holding every subject's selected clips (one adapted head).
    store = fl.LocalStore(local_template, 1 if pooled else len(test_subjects))
    state_like = {"g": g_vars, "v": v_vars, "server": None, "personal": store.values}

    # ---- 1. IFER and VFER (checkpoint step 1)
    t0 = time.perf_counter()
    run.truncate_metrics(checkpointer.latest_step() or 0)  # What a killed run logged past it.
    if checkpointer.latest_step() is None:
        imgs = ifer_images(config, names)
        ifer_feats = {s: (image_features(featurize, x, config.model.feature_batch), y)
                      for s, (x, y) in imgs.items()}
        cw = (optim.balanced_class_weights(ifer_feats["train"][1], k)
              if config.ifer.class_weights == "balanced" else np.ones(k, np.float32))
        g_vars = train_head("ifer", g_head, g_vars, ifer_feats["train"], ifer_feats["dev"],
                            config.ifer, seed=config.seed, class_weights=cw, writer=writer)
        dev_logits = g_head.apply(g_vars, ifer_feats["dev"][0], train=False)
        ifer_dev = report_of(ifer_feats["dev"][1], np.asarray(dev_logits.argmax(-1)), names)
        tr, dv = in_split["train"], in_split["dev"]
        v_vars = train_head("vfer", v_head, v_vars, (feats[tr], fmask[tr], corpus.labels[tr]),
                            (feats[dv], fmask[dv], corpus.labels[dv]), config.vfer,
                            seed=config.seed, class_weights=np.ones(k, np.float32),
                            writer=writer)
        writer.write_json("ifer_dev.json", {"report": ifer_dev,
                                            "train_images": len(ifer_feats["train"][1]),
                                            "class_weights": cw.tolist()})
        run.save(1, {**state_like, "g": g_vars, "v": v_vars, "server": {}})
    ifer_dev = json.loads((workdir / "ifer_dev.json").read_text())["report"]
    t_train = time.perf_counter() - t0
    # g never sees a video: its pseudo labels can be scored on every subject's videos, and on
    # the test subjects' (the ones personalization uses).
    all_groups = _by_subject(corpus.subjects, np.unique(corpus.subjects))
    curves = {"test_subjects": pseudo_label_curve(config, g_head, g_vars, feats, fmask, groups,
                                                  corpus.labels),
              "all_subjects": pseudo_label_curve(config, g_head, g_vars, feats, fmask,
                                                 all_groups, corpus.labels)}
    at = {c["threshold"]: c for c in curves["all_subjects"]}[float(config.personalize.threshold)]
    logging.info("IFER pseudo labels on all %d videos at p_threshold %g: %d selected, "
                 "accuracy %s", at["videos"], config.personalize.threshold,
                 at["videos_selected"], at["accuracy"])
    plots.save_threshold_curve(
        [c["threshold"] for c in curves["all_subjects"]],
        [c["accuracy"] for c in curves["all_subjects"]],
        [c["coverage"] for c in curves["all_subjects"]], workdir / "pseudo_labels.png",
        chance=1.0 / k, marked=float(config.personalize.threshold),
        counts=[c["videos_selected"] for c in curves["all_subjects"]],
        title=f"IFER pseudo labels on {config.data.name}: all {at['videos']} videos of "
              f"{len(all_groups)} subjects (top {config.personalize.max_per_class} per class "
              "per subject)")

    # ---- 2. personalization + head-only FedAvg rounds (checkpoint step 1 + r)
    start = checkpointer.latest_step()
    engine = None
    predict = make_predict(v_head)
    te = in_split["test"]
    labels_te = corpus.labels[te]
    rounds_path = workdir / "rounds.json"
    rounds = json.loads(rounds_path.read_text()) if rounds_path.exists() and start > 1 else []
    restored = None
    if start is not None:
        like = {**state_like, "server": {}} if start == 1 else None
        if like is not None:
            restored = checkpointer.restore(like, 1)
            g_vars, v_vars = restored["g"], restored["v"]
    central0 = v_vars
    before = report_of(labels_te, np.asarray(predict(v_vars, feats[te], fmask[te])), names)
    before_subject = {str(s): report_of(corpus.labels[g], np.asarray(
        predict(v_vars, feats[g], fmask[g])), names) for s, g in zip(test_subjects, groups,
                                                                     strict=True)}

    variables = {"params": {"v": v_vars["params"], "personal": v_vars["params"]},
                 "batch_stats": {"v": v_vars["batch_stats"]}}
    max_selected = max(1, max(len(g) for g in groups))
    engine = build_engine(config, v_head, max_selected)
    server = engine.init(variables)
    if start is not None and start > 1:
        restored = checkpointer.restore({**state_like, "server": server}, start)
        g_vars, server = restored["g"], engine.place(restored["server"])
        store.values = jax.tree.map(np.asarray, restored["personal"])
        store.seen[:] = True
        central0 = restored["v"]
        before = report_of(labels_te, np.asarray(predict(central0, feats[te], fmask[te])), names)
    fed_labels = fl.partial.label_tree(server.variables, engine.spec.param_filter)
    v_bytes = steps.payload_bytes(fl.partial.select(fl.mesh.to_host(server.variables),
                                                    fed_labels, fl.FEDERATED))
    whole_bytes = (steps.payload_bytes(f_vars["params"]) + steps.payload_bytes(g_vars["params"])
                   + steps.payload_bytes(v_vars["params"]))
    done = 0 if start is None else start - 1
    run_key = jax.random.PRNGKey(config.seed + 7)
    for r in range(done, config.fed.rounds):
        t0 = time.perf_counter()
        clients, pseudo = personalization_population(config, g_head, g_vars, feats, fmask, groups)
        sizes = np.array([len(c["label"]) for c in clients])
        adapted = np.nonzero(sizes > 0)[0]
        if pooled:
            clients = [{k_: np.concatenate([c[k_] for c in clients]) for k_ in clients[0]}]
        active = np.nonzero([len(c["label"]) for c in clients])[0]
        skipped = [str(test_subjects[i]) for i in np.nonzero(sizes == 0)[0]]
        pseudo_acc = [float(np.mean(c["label"] == corpus.labels[c["video_index"]]))
                      for c in clients if len(c["label"])]
        # The central v changes only in a round where enough subjects adapted (the paper: any
        # one); below that, subjects still adapt their own heads.
        update = len(adapted) >= config.personalize.get("min_subjects", 1)
        if len(active):
            population = fl.ArrayPopulation.from_clients(
                [{k_: v for k_, v in c.items() if k_ != "video_index"} for c in clients])
            plan = engine.plan(population, active)
            kept = None if update else fl.mesh.to_host(server)  # rounds donate the state
            server, result = engine.run_round(server, population, plan, run_key,
                                              seed=config.seed, local_store=store)
            if not update:
                logging.warning("round %d: %d subject(s) adapted, fewer than "
                                "personalize.min_subjects=%d: the central v is kept", r + 1,
                                len(adapted), config.personalize.get("min_subjects", 1))
                server = engine.place(kept).replace(round=server.round)
            tune_loss = result.totals["loss_sum"] / max(result.totals["count"], 1)
            # The layout the round ran and, with client-level DP (fed.dp), epsilon so far.
            dp_logged = {**loops.layout_metrics(result), **loops.dp_metrics(result)}
        else:
            # Every subject skipped (no video above p_threshold): nothing is sent, the central
            # model stays as it was and every subject keeps it (counted in the report).
            logging.warning("round %d: no test subject has a video with IFER confidence > %g",
                            r + 1, config.personalize.threshold)
            server = server.replace(round=server.round + 1)
            tune_loss = float("nan")
            dp_logged = {}
        seconds = time.perf_counter() - t0
        host = fl.mesh.to_host(server.variables)
        central = _v_vars(host["params"]["v"], host["batch_stats"]["v"])
        central_report = report_of(labels_te, np.asarray(predict(central, feats[te], fmask[te])),
                                   names)
        after_preds = np.zeros(len(corpus), np.int64)
        after_subject = {}
        for i, (s, g) in enumerate(zip(test_subjects, groups, strict=True)):
            # Skipped subjects keep the central model they were sent (no adaptation).
            row = 0 if pooled else i
            params = (jax.tree.map(lambda x, j=row: x[j], store.values["params"]["personal"])
                      if i in adapted else central0["params"])
            pv = _v_vars(params, central0["batch_stats"])
            after_preds[g] = np.asarray(predict(pv, feats[g], fmask[g]))
            after_subject[str(s)] = report_of(corpus.labels[g], after_preds[g], names)
        pseudo_acc_mean = float(np.mean(pseudo_acc)) if pseudo_acc else None
        rounds.append({
            "round": r + 1, "seconds": seconds, "subjects_adapted": len(adapted),
            "subjects_skipped_no_confident_video": skipped,
            "selected_videos": sizes.tolist(),
            "central_updated": bool(update and len(active)),
            "pseudo_label_accuracy_of_selected": pseudo_acc_mean,
            "max_ifer_confidence": float(np.max(pseudo["confidence"])),
            "fine_tune_loss": tune_loss,
            "after_personalization": report_of(labels_te, after_preds[te], names),
            "after_personalization_per_subject": after_subject,
            "central_after_fedavg": central_report,
            "bytes_sent_per_client": {"v_only": v_bytes, "whole_model": whole_bytes}})
        writer.write(r + 1, {"round/seconds": seconds, "round/subjects": len(adapted),
                             "round/fine_tune_loss": tune_loss,
                             "round/pseudo_label_accuracy": float("nan") if pseudo_acc_mean
                             is None else pseudo_acc_mean,
                             "before/macro_f1": before["macro"]["f1"],
                             "after/macro_f1": rounds[-1]["after_personalization"]["macro"]["f1"],
                             "after/micro_f1": rounds[-1]["after_personalization"]["micro"]["f1"],
                             "central/macro_f1": central_report["macro"]["f1"], **dp_logged})
        logging.info("round %d: %d subjects adapted (%d skipped), selected %s, %.2fs", r + 1,
                     len(adapted), len(skipped), sizes.tolist(), seconds)
        rounds_path.write_text(json.dumps(rounds))
        run.save(r + 2, {"g": g_vars, "v": central0, "server": server,
                         "personal": store.values})

    first = rounds[0]
    subj = [str(s) for s in test_subjects]
    diff = [first["after_personalization_per_subject"][s]["micro"]["f1"]
            - before_subject[s]["micro"]["f1"] for s in subj]
    plots.save_subject_differences(subj, diff, workdir / "figure3_subject_micro_f1.png",
                                   title=f"VFER on {config.data.name}: micro F1 after - before "
                                         "personalization",
                                   skipped=first["subjects_skipped_no_confident_video"])
    results = {
        "data": config.data.name, "class_names": list(names),
        "split": {s: v.tolist() for s, v in split.items()},
        "corpus_report": corpus.report, "videos": len(corpus), "frames": frames_total,
        "parameters": counts, "ifer_dev": ifer_dev, "pseudo_label_curve": curves,
        "before_personalization": before, "before_per_subject": before_subject,
        "after_personalization": first["after_personalization"],
        "after_per_subject": first["after_personalization_per_subject"],
        "subject_micro_f1_difference": dict(zip(subj, diff, strict=True)),
        "central_before_fedavg": before,
        "central_after_fedavg": [r_["central_after_fedavg"] for r_ in rounds],
        "rounds": rounds,
        "seconds": {"corpus": t_corpus, "features": t_features, "train": t_train,
                    "total": time.perf_counter() - t_start},
    }
    after = first["after_personalization"]
    logging.info("central model after %d rounds: macro F1 %.4f", len(rounds),
                 rounds[-1]["central_after_fedavg"]["macro"]["f1"])
    return run.finish(results, metric=f"VFER ({config.mode}) on {config.data.name}: macro F1 "
                      "after personalization", value=after["macro"]["f1"],
                      detail=f" vs {before['macro']['f1']:.4f} before (micro "
                             f"{after['micro']['f1']:.4f} vs {before['micro']['f1']:.4f}) on "
                             f"{len(test_subjects)} test subjects, "
                             f"{first['subjects_adapted']} adapted",
                      panels=[("IFER g on still images", "epoch",
                               ["ifer/train_loss", "ifer/dev_loss"], "loss"),
                              ("VFER v on the training subjects' videos", "epoch",
                               ["vfer/train_loss", "vfer/dev_loss"], "loss"),
                              ("personalization + head-only FedAvg", "round",
                               ["round/fine_tune_loss", "round/pseudo_label_accuracy",
                                "before/macro_f1", "after/macro_f1", "central/macro_f1"],
                               "loss / accuracy / F1")])
