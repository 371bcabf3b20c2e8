"""Diversified FER (Heidari & Iosifidis): ESR-B + CBAM (configs/esr.py) and the MA-Net style
network (configs/manet.py), centralized or federated (`config.fed.enabled`).

Centralized runs reuse the supervised driver's pieces (config checks, EpochOrder, optimizer,
checkpoint/resume, NaN stop): the batch at step s depends on (seed, s) only and the
progressive ESR stage (number of active branches) on s only, so a resumed run replays an
uninterrupted one. Federated runs train the same model and loss with fer_jax.federated
(clients = subjects or K splits, see `fedavg.partition`) and checkpoint the server state.

Evaluation (eval.json): ESR reports the plurality vote of all branches (the paper's
prediction), the early-exit accuracy of the vote of the first b branches for every b, and each
branch's own accuracy; MA-Net reports the fused prediction and each branch's accuracy.
"""

from __future__ import annotations

import functools
import pathlib
import time
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from fer_jax import data as data_lib
from fer_jax import federated as fl
from fer_jax import losses, models
from fer_jax.data.augment import AugmentConfig
from fer_jax.evaluation import metrics as metrics_lib
from fer_jax.evaluation import plots
from fer_jax.experiments import fedavg, supervised
from fer_jax.io.checkpoint import Checkpointer
from fer_jax.io.metrics import MetricWriter
from fer_jax.io.progress import Progress
from fer_jax.models.esr import ESR
from fer_jax.models.manet import MANet
from fer_jax.steps import diversity as steps

DIVERSITY_MODELS = {"esr": ESR, "manet": MANet}
NEW_BRANCH_INITS = ("fresh", "copy")


def _zoo_view(config):
    """`validate_data_model` also checks model.name against the plain zoo (get_model names);
    the diversity models are checked here, so it sees the data and augment blocks only."""
    return types.SimpleNamespace(data=config.data, augment=config.augment,
                                 model=types.SimpleNamespace(name=next(iter(models.MODELS))))


def build_model(config, num_classes: int):
    return DIVERSITY_MODELS[config.model.name](num_classes, **config.model.kwargs)


def validate_config(config) -> None:
    """Raises ValueError naming the first bad field (warns for B = 1 and a batch of 1)."""
    check = supervised.config_checker(config)
    check(config.model.name in DIVERSITY_MODELS, "model.name", f"one of {sorted(DIVERSITY_MODELS)}")
    supervised.validate_data_model(_zoo_view(config), check)
    try:
        model = build_model(config, 8)  # Dataclass checks only: nothing is traced.
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.model.kwargs={config.model.kwargs.to_dict()!r}: {e}") from e
    if config.model.name == "esr" and model.padding == "valid":
        check(config.data.image_size >= 54, "data.image_size",
              ">= 54 for ESR's unpadded layout (or model.kwargs.padding='same')")

    train, div = config.train, config.diversity
    check(train.batch_size >= 1, "train.batch_size", "a positive batch size")
    check(train.num_epochs > 0 or train.num_steps > 0, "train.num_epochs",
          "> 0 (or train.num_steps > 0)")
    check(train.learning_rate > 0, "train.learning_rate", "a positive learning rate")
    check(train.optimizer in supervised.OPTIMIZERS, "train.optimizer",
          f"one of {supervised.OPTIMIZERS}")
    check(train.schedule in supervised.SCHEDULES, "train.schedule",
          f"one of {supervised.SCHEDULES}")
    check(div.gamma >= 0, "diversity.gamma", ">= 0")
    for name in ("spatial_weight", "channel_weight", "branch_weight"):
        if name in div:
            check(div[name] >= 0, f"diversity.{name}", ">= 0 (the loss subtracts w * det(S))")
    if "local_weight" in div:
        check(0 <= div.local_weight <= 1, "diversity.local_weight", "lambda in [0, 1]")
    check(config.checkpoint_every_steps >= 1, "checkpoint_every_steps", ">= 1")
    check(config.log_every_steps >= 1, "log_every_steps", ">= 1")

    if config.model.name == "esr":
        check(config.esr.new_branch_init in NEW_BRANCH_INITS, "esr.new_branch_init",
              f"one of {NEW_BRANCH_INITS}")
        check(config.esr.base_lr_scale >= 0, "esr.base_lr_scale", ">= 0")
        check(config.esr.old_branch_lr_scale >= 0, "esr.old_branch_lr_scale", ">= 0")
        if model.num_branches == 1:
            warnings.warn("ESR with num_branches=1: there is no diversity term (det of a 1x1 "
                          "similarity matrix is the constant 1), so diversity.* has no effect; "
                          "training plain cross entropy", stacklevel=2)
    batch = config.fed.batch_size if config.fed.enabled else train.batch_size
    if batch == 1:
        warnings.warn("batch size 1: the diversity similarities S_lk average over one sample and "
                      "BatchNorm normalises over one image's pixels only", stacklevel=2)
    if config.fed.enabled:
        _validate_fed(config, check)


def _validate_fed(config, check) -> None:
    fed = config.fed
    check(fed.partition in fedavg.PARTITIONS, "fed.partition", f"one of {fedavg.PARTITIONS}")
    check(fed.partition != "subject" or config.data.name in ("synthetic", "ckplus48"),
          "fed.partition", "iid or dirichlet for datasets without subject ids (FER-2013)")
    for name in ("num_clients", "rounds", "cohort_size", "batch_size", "local_epochs",
                 "clients_per_call"):
        check(fed[name] >= 1, f"fed.{name}", ">= 1")
    check(fed.server_optimizer in fedavg.SERVER_OPTIMIZERS, "fed.server_optimizer",
          f"one of {fedavg.SERVER_OPTIMIZERS}")
    check(fed.client_optimizer in fedavg.CLIENT_OPTIMIZERS, "fed.client_optimizer",
          f"one of {fedavg.CLIENT_OPTIMIZERS}")
    check(fed.client_learning_rate > 0, "fed.client_learning_rate", "> 0")
    check(fed.weighting in fl.round.WEIGHTINGS, "fed.weighting", f"one of {fl.round.WEIGHTINGS}")
    check(fed.prox_mu >= 0, "fed.prox_mu", ">= 0")
    check(config.checkpoint_every_rounds >= 1, "checkpoint_every_rounds", ">= 1")
    check(config.model.kwargs.get("norm", "batch") != "batch", "model.kwargs.norm",
          "'group' or 'none' for federated runs (BatchNorm would mix padded client examples)")


def active_branches(step: int, total_steps: int, num_branches: int, progressive: bool) -> int:
    """Progressive ESR: stage b (1-based) covers steps [(b-1) T / B, b T / B)."""
    if not progressive or num_branches == 1:
        return num_branches
    return min(num_branches, step * num_branches // max(total_steps, 1) + 1)


# ---------------------------------------------------------------------------------------------
# Evaluation


def collect_logits(predict_fn, split: data_lib.Split, batch_size: int) -> dict[str, np.ndarray]:
    """All '*logits' outputs over `split`; the last batch is padded to a fixed shape."""
    parts: dict[str, list] = {}
    for start in range(0, len(split), batch_size):
        images = split.images[start:start + batch_size]
        n = len(images)
        if n < batch_size:
            images = np.concatenate([images, np.zeros((batch_size - n, *images.shape[1:]),
                                                      images.dtype)])
        for k, v in predict_fn(images).items():
            # Branch logits are (B, N, K): the example axis is the second to last one.
            parts.setdefault(k, []).append(np.asarray(v)[..., :n, :])
    return {k: np.concatenate(v, axis=-2) for k, v in parts.items()}


def _accuracy(pred, labels) -> float:
    return float(np.mean(np.asarray(pred) == labels))


def report(logits: dict[str, np.ndarray], labels: np.ndarray, class_names) -> tuple:
    """(confusion matrix of the model's prediction, its report + per-branch / early-exit)."""
    k = len(class_names)
    extra = {}
    if "branch_logits" in logits:
        bl = jnp.asarray(logits["branch_logits"])
        pred = np.asarray(losses.ensemble_vote(bl))
        extra["early_exit_accuracy"] = [_accuracy(losses.ensemble_vote(bl[:b]), labels)
                                        for b in range(1, bl.shape[0] + 1)]
        extra["branch_accuracy"] = [_accuracy(np.argmax(logits["branch_logits"][b], -1), labels)
                                    for b in range(bl.shape[0])]
    else:
        pred = np.argmax(logits["logits"], -1)
        for name in ("global", "local"):
            if f"{name}_logits" in logits:
                extra[f"{name}_accuracy"] = _accuracy(np.argmax(logits[f"{name}_logits"], -1),
                                                      labels)
    cm = metrics_lib.confusion_matrix(labels, pred, k)
    return cm, {**metrics_lib.classification_report(cm, class_names), **extra}


def _finish(config, workdir, writer, dataset, test, val, predict_fn, step, extra) -> dict:
    results = dict(extra)
    for name, split in (("validation", val), ("test", test)):
        if split is None:
            continue
        cm, rep = report(collect_logits(predict_fn, split, config.eval_batch_size),
                         split.labels, dataset.class_names)
        results[name] = rep
        tag = "val" if name == "validation" else "eval"
        writer.write(step, {f"{tag}/accuracy": rep["accuracy"], f"{tag}/macro_f1":
                            rep["macro"]["f1"]})
    plots.save_confusion_matrix(cm, dataset.class_names, workdir / "confusion_matrix.png",
                                title=f"{config.model.name} on {dataset.name} "
                                      f"({config.data.eval_split}): "
                                      f"acc {results['test']['accuracy']:.3f}")
    results.update(confusion_matrix=cm.tolist(), class_names=list(dataset.class_names))
    writer.write_json("eval.json", results)
    logging.info("%s accuracy %.4f (%s)", config.data.eval_split, results["test"]["accuracy"],
                 {k: v for k, v in results["test"].items() if k.endswith("accuracy")})
    return results


# ---------------------------------------------------------------------------------------------
# Centralized


def run(config, workdir: str) -> dict:
    if config.fed.enabled:
        return run_federated(config, workdir)
    workdir = pathlib.Path(workdir)
    writer = MetricWriter(workdir)
    writer.write_json("config.json", config.to_dict())

    dataset = data_lib.load(config.data)
    train, test = dataset[config.data.train_split], dataset[config.data.eval_split]
    val = dataset[config.data.val_split] if config.data.val_split else None
    logging.info("dataset %s: classes %s, train %d, eval %d", dataset.name, dataset.class_names,
                 len(train), len(test))

    model = build_model(config, dataset.num_classes)
    is_esr = isinstance(model, ESR)
    order = supervised.EpochOrder(len(train), config.train.batch_size, config.seed)
    total_steps = config.train.num_steps or int(config.train.num_epochs * order.steps_per_epoch)
    tx = supervised.make_optimizer(config.train, total_steps, order.steps_per_epoch)
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    # Jitted: an eager init of ESR-9 with CBAM dispatches (and compiles) hundreds of small ops.
    state = jax.jit(lambda: steps.init_state(model, tx, seed=config.seed, input_shape=shape))()

    checkpointer = Checkpointer(workdir, every_steps=config.checkpoint_every_steps)
    state, start = checkpointer.restore_or(state)
    if start:
        logging.info("resumed from the checkpoint of step %d in %s", start, checkpointer.directory)

    num_branches = model.num_branches if is_esr else 1
    progressive = is_esr and config.esr.progressive

    def stage(step):
        return active_branches(step, total_steps, num_branches, progressive)

    shape_kw = dict(image_size=shape[0], channels=shape[2])
    loss_fn = steps.make_loss(config.model.name, config.diversity)
    augment = AugmentConfig(**config.augment)

    @functools.cache
    def step_fn(b):
        # One compile per progressive stage (B at most); the update multipliers are static.
        scales = (steps.group_scales(num_branches, b, base=config.esr.base_lr_scale,
                                     old_branches=config.esr.old_branch_lr_scale)
                  if progressive else None)
        return jax.jit(functools.partial(
            steps.train_step, model=model, tx=tx, loss_fn=loss_fn, augment=augment,
            num_active=b if is_esr else None, scales=scales, **shape_kw), donate_argnums=0)

    @functools.cache
    def predict_fn(b):
        # Evaluate the branches trained so far: later ones are still at their init.
        return jax.jit(functools.partial(_predict, model=model, num_active=b if is_esr else None,
                                         **shape_kw))

    def evaluate(split, tag, step):
        fn = predict_fn(stage(max(step - 1, 0)))
        cm, rep = report(collect_logits(lambda x: fn(state.params, state.batch_stats, x), split,
                                        config.eval_batch_size), split.labels,
                         dataset.class_names)
        writer.write(step, {f"{tag}/accuracy": rep["accuracy"],
                            f"{tag}/macro_f1": rep["macro"]["f1"]})

    eval_every = config.eval_every_steps or order.steps_per_epoch
    progress = Progress(total_steps, desc="train", start=start)
    sums, window, t0, t_start = {}, 0, time.perf_counter(), time.perf_counter()
    for step in range(start, total_steps):
        b = stage(step)
        if progressive and step > 0 and b > stage(step - 1):
            logging.info("step %d: ESR stage %d of %d (branch %d added, %s init)", step, b,
                         num_branches, b, config.esr.new_branch_init)
            if config.esr.new_branch_init == "copy":
                state = steps.add_branch(state, b - 1)
        idx = np.sort(order.indices(step))  # Sorted gathers are faster; order is irrelevant.
        state, m = step_fn(b)(state, {"image": train.images[idx], "label": train.labels[idx]})
        sums = {k: sums.get(k, 0.0) + v for k, v in m.items()}
        window += 1
        done = step + 1
        if done % config.log_every_steps == 0 or done == total_steps:
            supervised._check_finite(sums["loss"], done, checkpointer)
            seconds = time.perf_counter() - t0
            writer.write(done, {**{f"train/{k}": v / window for k, v in sums.items()},
                                "train/active_branches": b,
                                "train/images_per_s": window * config.train.batch_size / seconds,
                                "train/epoch": done / order.steps_per_epoch})
            progress.update(done, loss=float(sums["loss"] / window))
            sums, window, t0 = {}, 0, time.perf_counter()
        if checkpointer.should_save(done) or done == total_steps:
            if sums:
                supervised._check_finite(sums["loss"], done, checkpointer)
            checkpointer.save(done, state)
        if done % eval_every == 0 and done != total_steps:
            evaluate(val if val is not None else test, "val" if val is not None else "eval", done)
    train_seconds = time.perf_counter() - t_start

    fn = predict_fn(stage(max(total_steps - 1, 0)))
    results = _finish(config, workdir, writer, dataset, test, val,
                      lambda x: fn(state.params, state.batch_stats, x), total_steps,
                      {"steps": total_steps, "train_seconds_this_process": train_seconds})
    checkpointer.close()
    writer.close()
    return results


def _predict(params, batch_stats, images, *, model, num_active, image_size, channels):
    """`steps.predict` with ESR's number of active branches (a static keyword)."""
    if num_active is None:
        return steps.predict(params, batch_stats, images, model=model, image_size=image_size,
                             channels=channels)
    x = steps.preprocess(images, image_size=image_size, channels=channels)
    out = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False,
                      num_active=num_active)
    return {k: v for k, v in out.items() if k.endswith("logits")}


# ---------------------------------------------------------------------------------------------
# Federated


def build_engine(config, model, *, max_client_size: int) -> fl.FederatedEngine:
    """fedavg.build_engine's engine with the diversity loss instead of plain cross entropy."""
    fed = config.fed
    most_steps = fed.local_epochs * -(-max_client_size // fed.batch_size)
    buckets = tuple(b for b in fl.packing.DEFAULT_STEP_BUCKETS if b < most_steps) + (most_steps,)
    apply_fn = fedavg._apply_fn(model, config.data.image_size, config.data.channels,
                                AugmentConfig(**config.augment))
    loss_fn = steps.federated_loss(apply_fn, steps.make_loss(config.model.name, config.diversity))
    client_opt = (optax.sgd(fed.client_learning_rate, momentum=fed.client_momentum or None)
                  if fed.client_optimizer == "sgd" else optax.adam(fed.client_learning_rate))
    server_kwargs = {} if fed.server_learning_rate <= 0 else {
        "learning_rate": fed.server_learning_rate}
    return fl.FederatedEngine(
        fl.SupervisedClient(loss_fn, client_opt, prox_mu=fed.prox_mu),
        server_optimizer=fl.server_optimizer(fed.server_optimizer, **server_kwargs),
        packing=fl.PackingConfig(batch_size=fed.batch_size, local_epochs=fed.local_epochs,
                                 clients_per_call=fed.clients_per_call, step_buckets=buckets),
        backend=fl.RoundBackend.from_config(fed),
        weighting=fed.weighting)


def run_federated(config, workdir: str) -> dict:
    workdir = pathlib.Path(workdir)
    writer = MetricWriter(workdir)
    writer.write_json("config.json", config.to_dict())
    fed = config.fed

    dataset = data_lib.load(config.data)
    train, test = dataset[config.data.train_split], dataset[config.data.eval_split]
    parts = fedavg.partition(config, train, dataset.num_classes)
    summary = parts.summary(train.labels, dataset.num_classes)
    writer.write_json("partition.json", summary)
    population = fl.ArrayPopulation.from_clients(
        [{"image": train.images[i], "label": train.labels[i].astype(np.int32)}
         for i in parts.client_indices])
    sampler = fl.CohortSampler(population.num_clients, min(fed.cohort_size,
                                                           population.num_clients))
    logging.info("%s: %d clients (sizes %s)", dataset.name, population.num_clients,
                 summary["sizes"])

    model = build_model(config, dataset.num_classes)
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    variables = jax.jit(functools.partial(model.init, train=False))(
        jax.random.PRNGKey(config.seed), np.zeros((1, *shape), np.float32))
    engine = build_engine(config, model, max_client_size=summary["sizes"]["max"])
    state = engine.init(variables)
    checkpointer = Checkpointer(workdir, every_steps=config.checkpoint_every_rounds)
    state, start = checkpointer.restore_or(state)
    if start:
        state = engine.place(state)
        logging.info("resumed from round %d in %s", start, checkpointer.directory)
    predict = jax.jit(functools.partial(steps.predict, model=model, image_size=shape[0],
                                        channels=shape[2]))

    def predict_fn(x):
        v = fedavg.engine_variables(state)
        return predict(v["params"], v.get("batch_stats", {}), x)

    key = jax.random.PRNGKey(config.seed + 1)
    progress = Progress(fed.rounds, desc="rounds", start=start)
    t_start = time.perf_counter()
    for r in range(start, fed.rounds):
        t0 = time.perf_counter()
        plan = engine.plan(population, sampler.sample(config.seed, r))
        try:
            state, result = engine.run_round(state, population, plan, key, seed=config.seed)
        except fl.NonFiniteClientError as e:
            raise FloatingPointError(
                f"round {r + 1}: non-finite updates from clients {e.client_ids}; the server "
                f"state was not changed and the last good checkpoint (round "
                f"{checkpointer.latest_step()}) is kept in {checkpointer.directory}") from e
        count = max(result.totals["count"], 1.0)
        seconds = time.perf_counter() - t0
        writer.write(r + 1, {
            **{f"train/{k[:-4]}": v / count for k, v in result.totals.items()
               if k.endswith("_sum")},
            "train/accuracy": result.totals["correct"] / count,
            "round/clients": result.client_updates, "round/examples": result.useful_examples,
            "round/padding_efficiency": result.padding_efficiency, "round/seconds": seconds})
        progress.update(r + 1, loss=result.totals["loss_sum"] / count)
        if checkpointer.should_save(r + 1) or r + 1 == fed.rounds:
            checkpointer.save(r + 1, state)
        if config.eval_every_rounds and (r + 1) % config.eval_every_rounds == 0 \
                and r + 1 < fed.rounds:
            _, rep = report(collect_logits(predict_fn, test, config.eval_batch_size),
                            test.labels, dataset.class_names)
            writer.write(r + 1, {"eval/accuracy": rep["accuracy"],
                                 "eval/macro_f1": rep["macro"]["f1"]})

    results = _finish(config, workdir, writer, dataset, test, None, predict_fn, fed.rounds,
                      {"rounds": fed.rounds, "partition": summary,
                       "train_seconds_this_process": time.perf_counter() - t_start})
    checkpointer.close()
    writer.close()
    return results
