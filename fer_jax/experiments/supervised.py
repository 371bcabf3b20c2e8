"""Supervised FER, centralized or federated (configs/supervised.py, configs/fedavg.py).

The method is one client: `SupervisedClient` over a masked (optionally class-weighted) cross
entropy of any zoo model, images preprocessed and augmented on device. `mode=centralized` runs
it on the pooled training set (fer_jax.train.loops.centralized); `mode=federated` partitions
the training split into clients (by subject, IID, Dirichlet label skew) and runs FedAvg /
FedAvgM / FedAdam / FedYogi / FedProx rounds on the engine. Writes metrics.jsonl, TensorBoard
events, eval.json (accuracy, per-class P/R/F1), confusion_matrix.png, learning_curve.png.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from fer_jax import federated as fl
from fer_jax import models
from fer_jax.data.augment import AugmentConfig
from fer_jax.evaluation import metrics as metrics_lib
from fer_jax.evaluation import plots
from fer_jax.federated import config as fed_config
from fer_jax.io import init as init_lib
from fer_jax.steps import supervised as steps
from fer_jax.train import Run, checks, loops, optim

# fer_jax.main runs mode=federated on one CPU device per core: FedAvg of the MLP 2304-128-7
# over 100 clients ran 1.51x a plain loop on 2 host devices vs 1.05x on one
# (docs/results.md#engine-mlp-two-host-devices).
SPLIT_HOST_WHEN_FEDERATED = True

CLASS_WEIGHTS = ("none", "balanced")


def validate_config(config) -> None:
    """Raises ValueError naming the first bad field; called by main before any work."""
    check = checks.checker(config)
    checks.data_model(config, check)
    checks.mode(config, check)
    checks.init_block(config, check)
    if config.mode == "centralized":
        check(config.train.class_weights in CLASS_WEIGHTS, "train.class_weights",
              f"one of {CLASS_WEIGHTS}")


def init_variables(model, config):
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    return jax.jit(functools.partial(model.init, train=False))(
        jax.random.PRNGKey(config.seed), np.zeros((1, *shape), np.float32))


def client(config, model, optimizer, *, class_weights=None, prox_mu: float = 0.0):
    """The method: minibatch SGD/Adam on the masked cross entropy of uint8 images."""
    apply = steps.image_apply(model, image_size=config.data.image_size,
                              channels=config.data.channels,
                              augment=AugmentConfig(**config.augment))
    return fl.SupervisedClient(fl.classifier_loss(apply, class_weights=class_weights),
                               optimizer, prox_mu=prox_mu)


def train_centralized(config, run, model, train, num_classes, variables, evaluate):
    order = loops.PooledOrder(len(train), config.train.batch_size, config.seed)
    total = config.train.num_steps or int(config.train.num_epochs * order.steps_per_epoch)
    weights = (optim.balanced_class_weights(train.labels, num_classes)
               if config.train.class_weights == "balanced" else None)
    method = client(config, model, optim.make_optimizer(config.train, total,
                                                        order.steps_per_epoch),
                    class_weights=weights)
    variables = loops.centralized(
        run, method, variables, {"image": train.images, "label": train.labels.astype(np.int32)},
        batch_size=config.train.batch_size, total_steps=total, seed=config.seed,
        log_every=config.log_every_steps,
        eval_every=config.eval_every_steps or order.steps_per_epoch,
        evaluate=lambda v, step: evaluate(v, step))
    return variables, {"steps": total}


def train_federated(config, run, model, train, num_classes, variables, evaluate):
    fed = config.fed
    population, summary = run.population(train, num_classes)
    engine = fed_config.build_engine(
        fed, client(config, model, fed_config.client_optimizer(fed), prox_mu=fed.prox_mu),
        max_client_size=summary["sizes"]["max"])
    # Client-level DP: calibrate now (an unreachable target epsilon fails before any round).
    engine.setup_privacy(population.num_clients, min(fed.cohort_size, population.num_clients))
    state = loops.federated(
        run, engine, population, variables, num_rounds=fed.rounds,
        cohort_size=fed.cohort_size, seed=config.seed, eval_every=config.eval_every_rounds,
        evaluate=lambda s, r: evaluate(loops.server_variables(s), r))
    return loops.server_variables(state), {"rounds": fed.rounds, "partition": summary,
                                           "privacy": engine.privacy_report(fed.rounds)}


def run(config, workdir: str) -> dict:
    centralized = config.mode == "centralized"
    run = Run(config, workdir)
    dataset, train, test, val = run.load_data()
    model = models.get_model(config.model.name, num_classes=dataset.num_classes,
                             **config.model.kwargs)
    predict = jax.jit(functools.partial(
        steps.predict, model=model, image_size=config.data.image_size,
        channels=config.data.channels, flip_tta=config.get("eval_flip_tta", False)))

    def evaluate(variables, step, split=None):
        """Periodic evaluation uses the validation split when there is one; `val/*` metrics
        are the validation split's, `eval/*` the test split's (never mixed in one series)."""
        split = split if split is not None else (val if val is not None else test)
        tag = "eval" if split is test else "val"
        logits = loops.predict_batches(
            lambda x: predict(variables["params"], variables.get("batch_stats", {}), x),
            split.images, config.eval_batch_size)
        cm = metrics_lib.confusion_matrix(split.labels, logits.argmax(-1), dataset.num_classes)
        report = metrics_lib.classification_report(cm, dataset.class_names)
        run.writer.write(step, {f"{tag}/accuracy": report["accuracy"],
                                f"{tag}/macro_f1": report["macro"]["f1"]})
        return cm, report

    # config.init: from another run's checkpoint (federated: the server's initial model).
    variables = init_lib.from_config(config, init_variables(model, config), writer=run.writer)
    if centralized:
        variables, results = train_centralized(config, run, model, train, dataset.num_classes,
                                               variables, evaluate)
    else:
        variables, results = train_federated(config, run, model, train, dataset.num_classes,
                                             variables, evaluate)
    last = results.get("steps", results.get("rounds"))
    if val is not None:
        results["validation"] = evaluate(variables, last, val)[1]
    cm, results["test"] = evaluate(variables, last, test)
    name = f"{'FedAvg ' if not centralized else ''}{config.model.name}"
    plots.save_confusion_matrix(cm, dataset.class_names, run.workdir / "confusion_matrix.png",
                                title=f"{name} on {dataset.name} ({config.data.eval_split}): "
                                      f"acc {results['test']['accuracy']:.3f}")
    results.update(confusion_matrix=cm.tolist(), class_names=list(dataset.class_names))
    return run.finish(results, metric=f"{config.data.eval_split} accuracy",
                      value=results["test"]["accuracy"], chance=1 / dataset.num_classes,
                      detail=f", macro F1 {results['test']['macro']['f1']:.4f} on {len(test)} "
                             f"images after {last} {'steps' if centralized else 'rounds'}")
