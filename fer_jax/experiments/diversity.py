"""Diversified FER (Heidari & Iosifidis): ESR-B + CBAM (configs/esr.py) and the MA-Net style
network (configs/manet.py), `mode=centralized` or `mode=federated`.

The method is `SupervisedClient` over the paper's loss (`steps.diversity.federated_loss`: CE
minus the weighted determinant-of-RBF diversities, padded rows masked). Centralized ESR trains
progressively (Siqueira et al.): stage b of B runs the first b branches with per-group update
multipliers, one client method per stage; the stage is a function of the step, so a resumed run
replays an uninterrupted one. Federated runs train every branch from round 1.

Evaluation (eval.json): ESR reports the plurality vote of all branches (the paper's
prediction), the early-exit accuracy of the vote of the first b branches for every b, and each
branch's own accuracy; MA-Net reports the fused prediction and each branch's accuracy.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from fer_jax import federated as fl
from fer_jax import losses
from fer_jax.data.augment import AugmentConfig
from fer_jax.evaluation import metrics as metrics_lib
from fer_jax.evaluation import plots
from fer_jax.federated import config as fed_config
from fer_jax.models.esr import ESR
from fer_jax.models.manet import MANet
from fer_jax.steps import diversity as steps
from fer_jax.steps.supervised import preprocess
from fer_jax.train import Run, checks, loops, optim

DIVERSITY_MODELS = {"esr": ESR, "manet": MANet}
NEW_BRANCH_INITS = ("fresh", "copy")


def build_model(config, num_classes: int):
    return DIVERSITY_MODELS[config.model.name](num_classes, **config.model.kwargs)


def validate_config(config) -> None:
    """Raises ValueError naming the first bad field (warns for B = 1 and a batch of 1)."""
    check = checks.checker(config)
    checks.data_model(config, check, model_names=DIVERSITY_MODELS)
    checks.mode(config, check)
    try:
        model = build_model(config, 8)  # Dataclass checks only: nothing is traced.
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.model.kwargs={config.model.kwargs.to_dict()!r}: {e}") from e
    if config.model.name == "esr" and model.padding == "valid":
        check(config.data.image_size >= 54, "data.image_size",
              ">= 54 for ESR's unpadded layout (or model.kwargs.padding='same')")
    div = config.diversity
    check(div.gamma >= 0, "diversity.gamma", ">= 0")
    for name in ("spatial_weight", "channel_weight", "branch_weight"):
        if name in div:
            check(div[name] >= 0, f"diversity.{name}", ">= 0 (the loss subtracts w * det(S))")
    if "local_weight" in div:
        check(0 <= div.local_weight <= 1, "diversity.local_weight", "lambda in [0, 1]")
    if config.model.name == "esr":
        check(config.esr.new_branch_init in NEW_BRANCH_INITS, "esr.new_branch_init",
              f"one of {NEW_BRANCH_INITS}")
        check(config.esr.base_lr_scale >= 0, "esr.base_lr_scale", ">= 0")
        check(config.esr.old_branch_lr_scale >= 0, "esr.old_branch_lr_scale", ">= 0")
        if model.num_branches == 1:
            warnings.warn("ESR with num_branches=1: there is no diversity term (det of a 1x1 "
                          "similarity matrix is the constant 1), so diversity.* has no effect; "
                          "training plain cross entropy", stacklevel=2)
    federated = config.mode == "federated"
    if (config.fed.batch_size if federated else config.train.batch_size) == 1:
        warnings.warn("batch size 1: the diversity similarities S_lk average over one sample and "
                      "BatchNorm normalises over one image's pixels only", stacklevel=2)
    if federated:
        check(config.model.kwargs.get("norm", "batch") != "batch", "model.kwargs.norm",
              "'group' or 'none' for federated runs (BatchNorm would mix padded client examples)")


def active_branches(step: int, total_steps: int, num_branches: int, progressive: bool) -> int:
    """Progressive ESR: stage b (1-based) covers steps [(b-1) T / B, b T / B)."""
    if not progressive or num_branches == 1:
        return num_branches
    return min(num_branches, step * num_branches // max(total_steps, 1) + 1)


def client(config, model, optimizer, *, num_active: int | None = None,
           scales: dict | None = None) -> fl.SupervisedClient:
    """The method: the diversity loss of the first `num_active` ESR branches (None = all)."""
    return steps.client(
        model, optimizer, steps.make_loss(config.model.name, config.diversity),
        image_size=config.data.image_size, channels=config.data.channels,
        augment=AugmentConfig(**config.augment), num_active=num_active, scales=scales,
        prox_mu=config.fed.prox_mu if config.mode == "federated" else 0.0)


# ---------------------------------------------------------------------------------------------
# Evaluation


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


def _predict(variables, images, *, model, num_active, image_size, channels):
    """Eval-mode '*logits' outputs; ESR with its number of trained branches (static)."""
    x = preprocess(images, image_size=image_size, channels=channels)
    kwargs = {} if num_active is None else {"num_active": num_active}
    out = model.apply({"params": variables["params"],
                       "batch_stats": variables.get("batch_stats", {})}, x, train=False,
                      **kwargs)
    return {k: v for k, v in out.items() if k.endswith("logits")}


# ---------------------------------------------------------------------------------------------
# Run


def run(config, workdir: str) -> dict:
    centralized = config.mode == "centralized"
    run = Run(config, workdir)
    dataset, train, test, val = run.load_data()
    model = build_model(config, dataset.num_classes)
    is_esr = isinstance(model, ESR)
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    variables = jax.jit(functools.partial(model.init, train=False))(
        jax.random.PRNGKey(config.seed), np.zeros((1, *shape), np.float32))

    @functools.cache
    def predict_fn(b):
        # Evaluate the branches trained so far: later ones are still at their init.
        return jax.jit(functools.partial(_predict, model=model, num_active=b if is_esr else None,
                                         image_size=shape[0], channels=shape[2]))

    def evaluate(variables, step, split, tag, b=None):
        fn = predict_fn(b)
        logits = loops.predict_batches(lambda x: fn(variables, x), split.images,
                                       config.eval_batch_size)
        cm, rep = report(logits, split.labels, dataset.class_names)
        run.writer.write(step, {f"{tag}/accuracy": rep["accuracy"],
                                f"{tag}/macro_f1": rep["macro"]["f1"]})
        return cm, rep

    periodic = (val, "val") if val is not None else (test, "eval")
    b_final = model.num_branches if is_esr else None
    if centralized:
        order = loops.PooledOrder(len(train), config.train.batch_size, config.seed)
        total = config.train.num_steps or int(config.train.num_epochs * order.steps_per_epoch)
        tx = optim.make_optimizer(config.train, total, order.steps_per_epoch)
        progressive = is_esr and config.esr.progressive

        def stage(step):
            return active_branches(step, total, model.num_branches if is_esr else 1, progressive)

        @functools.cache
        def stage_client(b):
            if not progressive:
                return client(config, model, tx, num_active=b if is_esr else None)
            return client(config, model, tx, num_active=b, scales=steps.group_scales(
                model.num_branches, b, base=config.esr.base_lr_scale,
                old_branches=config.esr.old_branch_lr_scale))

        def on_switch(state, step):
            b = stage(step)
            logging.info("step %d: ESR stage %d of %d (branch %d added, %s init)", step, b,
                         model.num_branches, b, config.esr.new_branch_init)
            return (steps.copy_branch(state, b - 1) if config.esr.new_branch_init == "copy"
                    else state)

        variables = loops.centralized(
            run, stage_client(stage(0)), variables,
            {"image": train.images, "label": train.labels.astype(np.int32)},
            batch_size=config.train.batch_size, total_steps=total, seed=config.seed,
            log_every=config.log_every_steps,
            eval_every=config.eval_every_steps or order.steps_per_epoch,
            evaluate=lambda v, step: evaluate(v, step, *periodic, b=stage(step - 1)),
            method_at=lambda step: stage_client(stage(step)), on_switch=on_switch,
            log_extra=lambda step: {"train/active_branches": stage(step)} if is_esr else {})
        results, last = {"steps": total}, total
        b_final = stage(max(total - 1, 0)) if is_esr else None
    else:
        fed = config.fed
        population, summary = run.population(train, dataset.num_classes)
        engine = fed_config.build_engine(fed, client(config, model,
                                                     fed_config.client_optimizer(fed)),
                                         max_client_size=summary["sizes"]["max"])
        state = loops.federated(
            run, engine, population, variables, num_rounds=fed.rounds,
            cohort_size=fed.cohort_size, seed=config.seed, eval_every=config.eval_every_rounds,
            evaluate=lambda s, r: evaluate(loops.server_variables(s), r, test, "eval",
                                           b=b_final))
        variables = loops.server_variables(state)
        results, last = {"rounds": fed.rounds, "partition": summary}, fed.rounds

    for name, split, tag in (("validation", val, "val"), ("test", test, "eval")):
        if split is not None:
            cm, results[name] = evaluate(variables, last, split, tag, b=b_final)
    plots.save_confusion_matrix(cm, dataset.class_names, run.workdir / "confusion_matrix.png",
                                title=f"{config.model.name} on {dataset.name} "
                                      f"({config.data.eval_split}): "
                                      f"acc {results['test']['accuracy']:.3f}")
    results.update(confusion_matrix=cm.tolist(), class_names=list(dataset.class_names))
    branches = {k: v for k, v in results["test"].items() if k.endswith("accuracy")}
    logging.info("%s accuracies %s", config.data.eval_split, branches)
    return run.finish(results, metric=f"{config.data.eval_split} accuracy",
                      value=results["test"]["accuracy"], chance=1 / dataset.num_classes,
                      detail=f", macro F1 {results['test']['macro']['f1']:.4f} on {len(test)} "
                             f"images")
