"""Supervised federated averaging (configs/fedavg.py): FedAvg, FedAvgM, FedAdam, FedYogi, FedProx.

Host side only: the dataset's training split is partitioned into clients (by subject, IID, or
Dirichlet label skew), packed into an `ArrayPopulation`, and every round the engine's jitted
chunks train the sampled cohort (fer_jax.federated). The server state, including the round
number, is checkpointed with orbax; cohorts and keys depend on (seed, round) only, so a resumed run
equals an uninterrupted one. Writes metrics.jsonl (per round: train loss/accuracy, clients,
examples, padding efficiency, seconds), TensorBoard events, eval.json and confusion_matrix.png.
"""

from __future__ import annotations

import functools
import pathlib
import time

import jax
import numpy as np
import optax
from absl import logging

from fer_jax import data as data_lib
from fer_jax import federated as fl
from fer_jax import models
from fer_jax.data import partition as partition_lib
from fer_jax.data.augment import AugmentConfig, augment_batch
from fer_jax.evaluation import metrics as metrics_lib
from fer_jax.evaluation import plots
from fer_jax.experiments import supervised
from fer_jax.io.checkpoint import Checkpointer
from fer_jax.io.metrics import MetricWriter
from fer_jax.io.progress import Progress
from fer_jax.steps.supervised import predict, preprocess

PARTITIONS = ("subject", "iid", "dirichlet")
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi")
CLIENT_OPTIMIZERS = ("sgd", "adam")


def validate_config(config) -> None:
    """Raises ValueError naming the first bad field; called by main before any work."""
    check = supervised.config_checker(config)
    supervised.validate_data_model(config, check)
    fed = config.fed
    check(fed.partition in PARTITIONS, "fed.partition", f"one of {PARTITIONS}")
    check(fed.partition != "subject" or config.data.name in ("synthetic", "ckplus48"),
          "fed.partition", "iid or dirichlet for datasets without subject ids (FER-2013)")
    check(fed.num_clients >= 1, "fed.num_clients", ">= 1")
    check(fed.dirichlet_alpha > 0, "fed.dirichlet_alpha", "> 0")
    check(fed.rounds >= 1, "fed.rounds", ">= 1")
    check(fed.cohort_size >= 1, "fed.cohort_size", ">= 1")
    check(fed.server_optimizer in SERVER_OPTIMIZERS, "fed.server_optimizer",
          f"one of {SERVER_OPTIMIZERS}")
    check(fed.client_optimizer in CLIENT_OPTIMIZERS, "fed.client_optimizer",
          f"one of {CLIENT_OPTIMIZERS}")
    check(fed.client_learning_rate > 0, "fed.client_learning_rate", "> 0")
    check(fed.weighting in fl.round.WEIGHTINGS, "fed.weighting", f"one of {fl.round.WEIGHTINGS}")
    check(fed.prox_mu >= 0, "fed.prox_mu", ">= 0")
    check(fed.batch_size >= 1, "fed.batch_size", ">= 1")
    check(fed.local_epochs >= 1, "fed.local_epochs", ">= 1")
    check(fed.clients_per_call >= 1, "fed.clients_per_call", ">= 1")
    check(0 <= fed.tail_multiple <= fed.batch_size, "fed.tail_multiple",
          f"in [0, fed.batch_size={fed.batch_size}] (0 = pad the last batch to the batch size)")
    check(config.checkpoint_every_rounds >= 1, "checkpoint_every_rounds", ">= 1")


def partition(config, split: data_lib.Split, num_classes: int) -> partition_lib.Partition:
    fed = config.fed
    if fed.partition == "subject":
        if split.subjects is None:
            raise ValueError(f"config.fed.partition='subject' but dataset {config.data.name!r} "
                             "has no subject ids")
        return partition_lib.by_subject(split.subjects)
    if fed.partition == "iid":
        return partition_lib.iid(len(split), fed.num_clients, seed=config.seed)
    return partition_lib.dirichlet(split.labels, fed.num_clients, alpha=fed.dirichlet_alpha,
                                   seed=config.seed)


def _apply_fn(model, image_size: int, channels: int, augment: AugmentConfig | None):
    """A model.apply that takes uint8 images: resize/convert, then augment on device."""

    def apply(variables, images, *, rngs, **kwargs):
        x = preprocess(images, image_size=image_size, channels=channels)
        if augment is not None:
            x = augment_batch(jax.random.fold_in(rngs["dropout"], 1), x, augment)
        return model.apply(variables, x, rngs=rngs, **kwargs)

    return apply


def build_engine(config, model, *, max_client_size: int) -> fl.FederatedEngine:
    """The engine for this config; step buckets grow to fit the largest client of the run."""
    fed = config.fed
    most_steps = fed.local_epochs * -(-max_client_size // fed.batch_size)
    if fed.tail_multiple:  # buckets then bound the full steps of one epoch (0 always allowed)
        most_steps = max(-(-max_client_size // fed.batch_size) - 1, 1)
    buckets = tuple(b for b in fl.packing.DEFAULT_STEP_BUCKETS if b < most_steps) + (most_steps,)
    # Every device of the 'clients' mesh axis takes vmap_width clients per call at least.
    unit = jax.device_count() * fed.vmap_width
    per_call = -(-fed.clients_per_call // unit) * unit
    if per_call != fed.clients_per_call:
        logging.info("fed.clients_per_call %d -> %d (a multiple of %d devices x vmap_width %d)",
                     fed.clients_per_call, per_call, jax.device_count(), fed.vmap_width)
    loss_fn = fl.classifier_loss(_apply_fn(model, config.data.image_size, config.data.channels,
                                           AugmentConfig(**config.augment)))
    client_opt = (optax.sgd(fed.client_learning_rate, momentum=fed.client_momentum or None)
                  if fed.client_optimizer == "sgd" else optax.adam(fed.client_learning_rate))
    server_kwargs = {} if fed.server_learning_rate <= 0 else {
        "learning_rate": fed.server_learning_rate}
    return fl.FederatedEngine(
        fl.SupervisedClient(loss_fn, client_opt, prox_mu=fed.prox_mu),
        server_optimizer=fl.server_optimizer(fed.server_optimizer, **server_kwargs),
        packing=fl.PackingConfig(batch_size=fed.batch_size, local_epochs=fed.local_epochs,
                                 clients_per_call=per_call, step_buckets=buckets,
                                 tail_multiple=fed.tail_multiple),
        backend=fl.RoundBackend.from_config(fed),
        weighting=fed.weighting)


def run(config, workdir: str) -> dict:
    workdir = pathlib.Path(workdir)
    writer = MetricWriter(workdir)
    writer.write_json("config.json", config.to_dict())
    fed = config.fed

    dataset = data_lib.load(config.data)
    train, test = dataset[config.data.train_split], dataset[config.data.eval_split]
    parts = partition(config, train, dataset.num_classes)
    summary = parts.summary(train.labels, dataset.num_classes)
    writer.write_json("partition.json", summary)
    population = fl.ArrayPopulation.from_clients(
        [{"image": train.images[i], "label": train.labels[i].astype(np.int32)}
         for i in parts.client_indices])
    cohort = min(fed.cohort_size, population.num_clients)
    sampler = fl.CohortSampler(population.num_clients, cohort)
    logging.info("%s: %d clients (sizes %s), cohort %d", dataset.name, population.num_clients,
                 summary["sizes"], cohort)

    model = models.get_model(config.model.name, num_classes=dataset.num_classes,
                             **config.model.kwargs)
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    variables = model.init(jax.random.PRNGKey(config.seed), np.zeros((1, *shape), np.float32),
                           train=False)
    engine = build_engine(config, model, max_client_size=summary["sizes"]["max"])
    state = engine.init(variables)
    checkpointer = Checkpointer(workdir, every_steps=config.checkpoint_every_rounds)
    state, start = checkpointer.restore_or(state)
    if start:
        state = engine.place(state)
        logging.info("resumed from round %d in %s", start, checkpointer.directory)

    predict_fn = jax.jit(functools.partial(predict, model=model, image_size=shape[0],
                                           channels=shape[2]))

    def evaluate(step):
        v = engine_variables(state)
        cm = supervised.evaluate(lambda x: predict_fn(v["params"], v.get("batch_stats", {}), x),
                                 test, config.eval_batch_size, dataset.num_classes)
        report = metrics_lib.classification_report(cm, dataset.class_names)
        writer.write(step, {"eval/accuracy": report["accuracy"],
                            "eval/macro_f1": report["macro"]["f1"]})
        return cm, report

    key = jax.random.PRNGKey(config.seed + 1)
    progress = Progress(fed.rounds, desc="rounds", start=start)
    for r in range(start, fed.rounds):
        t0 = time.perf_counter()
        ids = sampler.sample(config.seed, r)
        plan = engine.plan(population, ids)
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
            "train/loss": result.totals["loss_sum"] / count,
            "train/accuracy": result.totals["correct"] / count,
            "round/clients": result.client_updates, "round/examples": result.useful_examples,
            "round/padding_efficiency": result.padding_efficiency, "round/seconds": seconds,
            "round/examples_per_s": result.useful_examples / seconds})
        progress.update(r + 1, loss=result.totals["loss_sum"] / count)
        if checkpointer.should_save(r + 1) or r + 1 == fed.rounds:
            checkpointer.save(r + 1, state)
        every = config.eval_every_rounds
        if every and (r + 1) % every == 0 and r + 1 < fed.rounds:
            evaluate(r + 1)

    cm, report = evaluate(fed.rounds)
    plots.save_confusion_matrix(cm, dataset.class_names, workdir / "confusion_matrix.png",
                                title=f"FedAvg {config.model.name} on {dataset.name}: "
                                      f"acc {report['accuracy']:.3f}")
    results = {"test": report, "confusion_matrix": cm.tolist(),
               "class_names": list(dataset.class_names), "rounds": fed.rounds,
               "partition": summary}
    writer.write_json("eval.json", results)
    logging.info("after %d rounds: %s accuracy %.4f", fed.rounds, config.data.eval_split,
                 report["accuracy"])
    checkpointer.close()
    writer.close()
    return results


def engine_variables(state):
    """Host copy of the server's model variables."""
    return fl.mesh.to_host(state.variables)
