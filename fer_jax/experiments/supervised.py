"""Centralized supervised training and evaluation (configs/supervised.py).

Host side: load the dataset, build the model and optax optimizer, restore the latest checkpoint if
the workdir has one, run the jitted step over a deterministic data order (the batch at step s is a
function of (seed, s) only, so a resumed run sees exactly the batches an uninterrupted one would),
evaluate, and write metrics.jsonl, TensorBoard events, eval.json and confusion_matrix.png.
"""

from __future__ import annotations

import functools
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from fer_jax import data as data_lib
from fer_jax import models
from fer_jax.data.augment import AugmentConfig
from fer_jax.evaluation import metrics as metrics_lib
from fer_jax.evaluation import plots
from fer_jax.io.checkpoint import Checkpointer
from fer_jax.io.metrics import MetricWriter
from fer_jax.io.progress import Progress
from fer_jax.steps import supervised as steps

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "constant")
CLASS_WEIGHTS = ("none", "balanced")


def config_checker(config):
    """check(ok, 'a.b', expected) raises ValueError("config.a.b=<value>: expected ...")."""
    def check(ok, field, expected):
        if not ok:
            value = functools.reduce(getattr, field.split("."), config)
            raise ValueError(f"config.{field}={value!r}: expected {expected}")

    return check


def validate_data_model(config, check) -> None:
    """The data, model and augment blocks every experiment shares."""
    check(config.data.name in data_lib.DATASETS, "data.name", f"one of {sorted(data_lib.DATASETS)}")
    check(config.data.image_size >= 16, "data.image_size", "an image size >= 16")
    check(config.data.channels in (1, 3), "data.channels", "1 or 3")
    check(config.model.name in models.MODELS, "model.name", f"one of {sorted(models.MODELS)}")
    AugmentConfig(**config.augment)  # Raises on bad ranges, naming the field.


def validate_config(config) -> None:
    """Raises ValueError naming the first bad field; called by main before any work."""
    check = config_checker(config)
    validate_data_model(config, check)
    check(config.train.batch_size >= 1, "train.batch_size", "a positive batch size")
    check(config.train.num_epochs > 0 or config.train.num_steps > 0, "train.num_epochs",
          "> 0 (or train.num_steps > 0)")
    check(config.train.learning_rate > 0, "train.learning_rate", "a positive learning rate")
    check(config.train.optimizer in OPTIMIZERS, "train.optimizer", f"one of {OPTIMIZERS}")
    check(config.train.schedule in SCHEDULES, "train.schedule", f"one of {SCHEDULES}")
    check(config.train.class_weights in CLASS_WEIGHTS, "train.class_weights",
          f"one of {CLASS_WEIGHTS}")
    check(config.checkpoint_every_steps >= 1, "checkpoint_every_steps", ">= 1")
    check(config.log_every_steps >= 1, "log_every_steps", ">= 1")


def make_optimizer(train, total_steps: int, steps_per_epoch: int):
    warmup = int(train.warmup_epochs * steps_per_epoch)
    if train.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, train.learning_rate, max(warmup, 1),
                                                max(total_steps, warmup + 1))
    else:
        lr = optax.linear_schedule(0.0, train.learning_rate, max(warmup, 1))
    if train.optimizer == "adam":
        return optax.adam(lr)
    if train.optimizer == "adamw":
        return optax.adamw(lr, weight_decay=train.weight_decay)
    return optax.chain(optax.add_decayed_weights(train.weight_decay),
                       optax.sgd(lr, momentum=0.9, nesterov=True))


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """n / (K * n_k) per class (scikit-learn's 'balanced'); absent classes get weight 0."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.divide(len(labels), num_classes * counts, out=np.zeros(num_classes),
                        where=counts > 0)
    return weights.astype(np.float32)


class EpochOrder:
    """Batch indices for step s: a permutation seeded by (seed, epoch), drop-remainder batches."""

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        if num_examples < batch_size:
            raise ValueError(f"training split has {num_examples} examples, fewer than "
                             f"train.batch_size={batch_size}")
        self.n, self.batch_size, self.seed = num_examples, batch_size, seed
        self.steps_per_epoch = num_examples // batch_size
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> np.ndarray:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perm[i * self.batch_size:(i + 1) * self.batch_size]


def evaluate(predict_fn, split: data_lib.Split, batch_size: int, num_classes: int) -> np.ndarray:
    """Confusion matrix of `split`; the last batch is padded to a fixed shape (one compile)."""
    preds = []
    for start in range(0, len(split), batch_size):
        images = split.images[start:start + batch_size]
        n = len(images)
        if n < batch_size:
            images = np.concatenate([images, np.zeros((batch_size - n, *images.shape[1:]),
                                                      images.dtype)])
        preds.append(np.asarray(jnp.argmax(predict_fn(images), -1))[:n])
    return metrics_lib.confusion_matrix(split.labels, np.concatenate(preds), num_classes)


def _check_finite(loss_sum, step: int, checkpointer: Checkpointer) -> None:
    if not np.isfinite(float(loss_sum)):
        last = checkpointer.latest_step()
        raise FloatingPointError(
            f"training loss became {float(loss_sum)} by step {step}; stopping. The last good "
            f"checkpoint (step {last}) is kept in {checkpointer.directory}: lower "
            f"train.learning_rate or check the data, then rerun to resume from it.")


def run(config, workdir: str) -> dict:
    workdir = pathlib.Path(workdir)
    writer = MetricWriter(workdir)
    writer.write_json("config.json", config.to_dict())

    dataset = data_lib.load(config.data)
    train, test = dataset[config.data.train_split], dataset[config.data.eval_split]
    val = dataset[config.data.val_split] if config.data.val_split else None
    logging.info("dataset %s: classes %s, train %d, eval %d", dataset.name, dataset.class_names,
                 len(train), len(test))

    model = models.get_model(config.model.name, num_classes=dataset.num_classes,
                             **config.model.kwargs)
    order = EpochOrder(len(train), config.train.batch_size, config.seed)
    total_steps = config.train.num_steps or int(config.train.num_epochs * order.steps_per_epoch)
    tx = make_optimizer(config.train, total_steps, order.steps_per_epoch)
    input_shape = (config.data.image_size, config.data.image_size, config.data.channels)
    state = steps.init_state(model, tx, seed=config.seed, input_shape=input_shape)

    checkpointer = Checkpointer(workdir, every_steps=config.checkpoint_every_steps)
    state, start = checkpointer.restore_or(state)
    if start:
        logging.info("resumed from the checkpoint of step %d in %s", start, checkpointer.directory)

    class_weights = (jnp.asarray(balanced_class_weights(train.labels, dataset.num_classes))
                     if config.train.class_weights == "balanced" else None)
    shape_kw = dict(image_size=config.data.image_size, channels=config.data.channels)
    train_step = jax.jit(functools.partial(
        steps.train_step, model=model, tx=tx, augment=AugmentConfig(**config.augment),
        class_weights=class_weights, **shape_kw), donate_argnums=0)
    predict = jax.jit(functools.partial(steps.predict, model=model,
                                        flip_tta=config.eval_flip_tta, **shape_kw))
    eval_every = config.eval_every_steps or order.steps_per_epoch

    def eval_split(split, name, step):
        cm = evaluate(lambda x: predict(state.params, state.batch_stats, x), split,
                      config.eval_batch_size, dataset.num_classes)
        report = metrics_lib.classification_report(cm, dataset.class_names)
        writer.write(step, {f"{name}/accuracy": report["accuracy"],
                            f"{name}/macro_f1": report["macro"]["f1"]})
        return cm, report

    progress = Progress(total_steps, desc="train", start=start)
    loss_sum, acc_sum, window, t0 = jnp.zeros(()), jnp.zeros(()), 0, time.perf_counter()
    for step in range(start, total_steps):
        # Sorted gathers are faster; the order within a batch does not matter.
        idx = np.sort(order.indices(step))
        state, m = train_step(state, {"image": train.images[idx], "label": train.labels[idx]})
        loss_sum, acc_sum, window = loss_sum + m["loss"], acc_sum + m["accuracy"], window + 1
        done = step + 1
        if done % config.log_every_steps == 0 or done == total_steps:
            _check_finite(loss_sum, done, checkpointer)
            seconds = time.perf_counter() - t0
            writer.write(done, {"train/loss": loss_sum / window, "train/accuracy": acc_sum / window,
                                "train/images_per_s": window * config.train.batch_size / seconds,
                                "train/epoch": done / order.steps_per_epoch})
            progress.update(done, loss=float(loss_sum / window))
            loss_sum, acc_sum, window, t0 = jnp.zeros(()), jnp.zeros(()), 0, time.perf_counter()
        if checkpointer.should_save(done) or done == total_steps:
            _check_finite(loss_sum, done, checkpointer)
            checkpointer.save(done, state)
        if done % eval_every == 0 and done != total_steps:
            eval_split(val if val is not None else test, "val" if val is not None else "eval", done)

    results = {}
    if val is not None:
        results["validation"] = eval_split(val, "val", total_steps)[1]
    cm, results["test"] = eval_split(test, "eval", total_steps)
    plots.save_confusion_matrix(cm, dataset.class_names, workdir / "confusion_matrix.png",
                                title=f"{config.model.name} on {dataset.name} "
                                      f"({config.data.eval_split}): "
                                      f"acc {results['test']['accuracy']:.3f}")
    results["confusion_matrix"] = cm.tolist()
    results["class_names"] = list(dataset.class_names)
    results["steps"] = total_steps
    writer.write_json("eval.json", results)
    logging.info("%s accuracy %.4f, macro F1 %.4f", config.data.eval_split,
                 results["test"]["accuracy"], results["test"]["macro"]["f1"])
    checkpointer.close()
    writer.close()
    return results
