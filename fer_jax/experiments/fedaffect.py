"""FedAffect (configs/fedaffect.py): federated SimCLR + federated few-shot relation network.

Algorithm 1 of Shome & Kar, on the engine (fer_jax.federated), host side only:
  * two global models on the server, each its own `FederatedEngine` and `ServerState`: the
    representation learner (encoder E + projector P) and the few-shot learner (embedding module
    = the same encoder architecture + relation module);
  * every round: the clients with unlabeled images (a cohort of them) run LocalReprLearn
    (`steps.fedaffect.SimCLRClient`), aggregated by FedAvg weighted by D_i / D (the engine's
    'num_examples' weighting, vmapped/unrolled over clients as the backend knobs say); then the
    few-shot learner's embedding module is **replaced by the aggregated encoder**; then the
    clients with more than C labeled images run LocalFewShot (`FewShotClient`), aggregated the
    same way. Clients with no unlabeled data or with <= C labels are skipped and counted.
  * `fedaffect.encoder_sharing`: 'handoff' is the above (Algorithm 1 read literally: what
    LocalFewShot did to the encoder is overwritten next round); 'shared' also hands the
    aggregated few-shot encoder back to the representation learner after the few-shot round,
    so one encoder w_f is updated by both local procedures in turn (each FedAvg-aggregated)
    and nothing either learns is discarded (docs/papers.md#fedaffect-handoff).
    (Algorithm 1 sends both models out at once and hands the encoder over after aggregation;
    running the representation round first lets the relation module train on the encoder it is
    evaluated with: docs/papers.md#fedaffect-round-order.)
  * config.mode='centralized' trains the same two methods on the pooled data (one
    `loops.PooledLearner` each) with the same batch sizes
    and the same expected number of images (SimCLR) and episodes (few-shot) per round: the
    paper's "Centralized (ours)" row. representation='none' skips SimCLR (random encoder).
Evaluation (docs/papers.md#fedaffect-eval): held-out clients' episodes, K labeled support images per
class from that client and every remaining image as a query; mean accuracy and 95% interval over
>= `eval_episodes` episodes for each K in `eval_shots` (1 and 5), confusion matrix; the overall
accuracy (class maps from every labelled training image, the eval split classified); a t-SNE
of encoder features coloured by class with a marker per held-out subject / client.
Writes metrics.jsonl, eval.json, confusion_matrix.png, embedding_tsne.png, checkpoints/.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from fer_jax import data as data_lib
from fer_jax import federated as fl
from fer_jax import models
from fer_jax.data import episodes as episodes_lib
from fer_jax.data import partition as partition_lib
from fer_jax.data.simclr_augment import SimCLRAugmentConfig
from fer_jax.evaluation import embedding, plots
from fer_jax.evaluation import fewshot as fewshot_eval
from fer_jax.evaluation import metrics as metrics_lib
from fer_jax.federated import config as fed_config
from fer_jax.federated.population import hash_uniform
from fer_jax.io import init as init_lib
from fer_jax.models import relation
from fer_jax.steps import fedaffect as steps
from fer_jax.steps.supervised import preprocess
from fer_jax.train import Run, checks, loops

# fer_jax.main runs mode=federated on one CPU device per core: the default command trained
# 1.30x faster on 2 host devices at the same accuracy
# (docs/results.md#engine-mlp-two-host-devices).
SPLIT_HOST_WHEN_FEDERATED = True


def max_cohort(config) -> int:
    """The most clients one round computes (fer_jax.main splits the host into at most this many
    devices): the larger of the SimCLR and few-shot cohorts."""
    return max(config.repr.cohort_size, config.fewshot.cohort_size)


REPRESENTATIONS = ("simclr", "none")
ENCODER_SHARING = ("handoff", "shared")
UNLABELED = ("rest", "all")
DATASETS = ("synthetic", "ckplus48", "fer2013", "prepared")
PARTITIONS = ("subject", "iid", "auto")
EVAL_PROTOCOLS = ("within_client", "cross_client")
ENCODERS = ("small_cnn", "resnet18", "resnet50", "resnet50v2")


def validate_config(config) -> None:
    """Raises ValueError naming the first bad field; called by main before any work."""
    check = checks.checker(config)
    check(config.data.name in DATASETS, "data.name", f"one of {DATASETS}")
    check(config.data.image_size >= 16, "data.image_size", "an image size >= 16")
    check(config.data.channels in (1, 3), "data.channels", "1 or 3")
    check(config.model.name in ENCODERS, "model.name", f"one of {ENCODERS}")
    check(config.model.kwargs.get("norm") in relation.NORMS, "model.kwargs",
          f"norm in {relation.NORMS} (clients pad partial batches; BatchNorm would mix padding "
          "into its statistics)")
    check(config.model.get("relation_norm", "none") in relation.NORMS, "model.relation_norm",
          f"one of {relation.NORMS}")
    check(config.model.get("relation_hidden_activation", "relu") in relation.HIDDEN_ACTIVATIONS,
          "model.relation_hidden_activation", f"one of {tuple(relation.HIDDEN_ACTIVATIONS)}")
    fa, rep, few, fed = config.fedaffect, config.repr, config.fewshot, config.fed
    check(config.mode in checks.MODES, "mode", f"one of {checks.MODES}")
    check(fa.representation in REPRESENTATIONS, "fedaffect.representation",
          f"one of {REPRESENTATIONS}")
    check(0.0 < fa.labeled_fraction <= 1.0, "fedaffect.labeled_fraction", "in (0, 1]")
    check(fa.unlabeled in UNLABELED, "fedaffect.unlabeled", f"one of {UNLABELED}")
    check(fa.shots >= 1, "fedaffect.shots", ">= 1")
    check(fa.queries >= 1, "fedaffect.queries", ">= 1")
    check(fa.get("queries_per_class", 0) >= 0, "fedaffect.queries_per_class",
          ">= 0 (0 = fedaffect.queries per episode)")
    check(fa.get("encoder_sharing", "handoff") in ENCODER_SHARING, "fedaffect.encoder_sharing",
          f"one of {ENCODER_SHARING}")
    eval_shots = tuple(fa.get("eval_shots", (fa.shots,)))
    check(len(eval_shots) >= 1 and all(isinstance(k, int) and k >= 1 for k in eval_shots),
          "fedaffect.eval_shots", "a non-empty tuple of ints >= 1")
    check(fa.pool_size >= 2, "fedaffect.pool_size", ">= 2")
    check(fa.eval_episodes >= 1, "fedaffect.eval_episodes", ">= 1")
    check(fa.get("curve_every_rounds", 0) >= 0, "fedaffect.curve_every_rounds",
          ">= 0 (0 = only the final evaluation)")
    check(fa.get("curve_episodes", 1) >= 1, "fedaffect.curve_episodes", ">= 1")
    check(fa.num_heldout_clients >= 0, "fedaffect.num_heldout_clients", ">= 0")
    check(fa.eval_protocol in EVAL_PROTOCOLS, "fedaffect.eval_protocol",
          f"one of {EVAL_PROTOCOLS}")
    check(rep.batch_size >= 2, "repr.batch_size", ">= 2 (NT-Xent needs negatives)")
    check(rep.temperature > 0, "repr.temperature", "> 0")
    check(rep.local_epochs >= 1, "repr.local_epochs", ">= 1")
    check(rep.learning_rate > 0, "repr.learning_rate", "> 0")
    check(rep.cohort_size >= 1, "repr.cohort_size", ">= 1")
    SimCLRAugmentConfig(**rep.augment)  # Raises naming the bad field.
    check(few.episodes_per_round >= 1, "fewshot.episodes_per_round", ">= 1")
    check(few.get("head", "relation") in relation.HEADS, "fewshot.head",
          f"one of {relation.HEADS}")
    check(few.get("loss", "mse") in steps.LOSSES, "fewshot.loss", f"one of {steps.LOSSES}")
    check(few.get("head", "relation") == "relation" or few.get("loss", "mse") == "ce",
          "fewshot.loss", "'ce' with fewshot.head='prototypical' (the MSE regresses relation "
          "scores in [0, 1])")
    check(few.learning_rate > 0, "fewshot.learning_rate", "> 0")
    check(few.cohort_size >= 1, "fewshot.cohort_size", ">= 1")
    check(fed.partition in PARTITIONS, "fed.partition", f"one of {PARTITIONS}")
    check(fed.partition != "subject" or config.data.name != "fer2013", "fed.partition",
          "iid for FER-2013 (no subject ids)")
    check(fed.num_clients >= 1, "fed.num_clients", ">= 1")
    fed_config.validate(config, check, partitions=False)
    check(config.checkpoint_every_rounds >= 1, "checkpoint_every_rounds", ">= 1")
    checks.init_block(config, check)


# ----------------------------------------------------------------------------------------------
# Data: clients, labeled / unlabeled shares, held-out clients.


def split_labeled(indices: np.ndarray, fraction: float, unlabeled: str, *, seed: int,
                  client: int) -> tuple[np.ndarray, np.ndarray]:
    """(labeled, unlabeled) example indices of one client: round(fraction * n) labeled images
    picked by a hash of (seed, client, index); unlabeled = the rest, or all images."""
    n = len(indices)
    order = np.argsort(hash_uniform(seed, 0xFA, client, indices), kind="stable")
    take = int(round(fraction * n))
    labeled = np.sort(indices[order[:take]])
    rest = np.sort(indices[order[take:]]) if unlabeled == "rest" else indices
    return labeled, rest


def build_clients(config, train: data_lib.Split, num_classes: int) -> dict:
    """Per-client labeled / unlabeled arrays, the two populations and the skip counts."""
    fa, fed = config.fedaffect, config.fed
    # auto (a prepared dataset's default): one client per subject where the images carry
    # subject ids (FERG's characters, CK+ subjects), else fed.num_clients random clients.
    by_subject = fed.partition == "subject" or (fed.partition == "auto"
                                                and train.subjects is not None)
    if by_subject:
        if train.subjects is None:
            raise ValueError(f"dataset {config.data.name!r} has no subject ids for "
                             "fed.partition='subject'")
        parts = partition_lib.by_subject(train.subjects)
    else:
        parts = partition_lib.iid(len(train), fed.num_clients, seed=config.seed)
    labeled, unlabeled = zip(*[split_labeled(idx, fa.labeled_fraction, fa.unlabeled,
                                             seed=config.seed, client=c)
                               for c, idx in enumerate(parts.client_indices)], strict=True)
    rep_pop = fl.ArrayPopulation.from_clients([{"image": train.images[u]} for u in unlabeled])
    few_pop = fl.ArrayPopulation.from_clients(
        [{"image": train.images[i], "label": train.labels[i].astype(np.int32)} for i in labeled])
    n_lab = np.array([len(i) for i in labeled])
    n_unl = np.array([len(u) for u in unlabeled])
    few_ok = episodes_lib.fewshot_eligible(n_lab, num_classes)
    return {
        "rep_population": rep_pop, "few_population": few_pop,
        "rep_clients": np.flatnonzero(n_unl > 0), "few_clients": np.flatnonzero(few_ok),
        "labeled": np.concatenate(labeled), "unlabeled": np.concatenate(unlabeled),
        "summary": {
            "num_clients": parts.num_clients, "labeled_sizes": n_lab.tolist(),
            "unlabeled_sizes": n_unl.tolist(),
            # Bad inputs of Algorithm 1, skipped from the round they cannot join and counted.
            "skipped_no_unlabeled": int((n_unl == 0).sum()),
            "skipped_too_few_labeled": int((~few_ok).sum()),
        },
    }


def heldout_clients(config, test: data_lib.Split) -> list[tuple[np.ndarray, np.ndarray]]:
    """(images, labels) per held-out client: test subjects, or random cuts of the eval split."""
    if test.subjects is not None and config.fedaffect.num_heldout_clients == 0:
        return [(test.images[test.subjects == s], test.labels[test.subjects == s])
                for s in np.unique(test.subjects)]
    k = max(config.fedaffect.num_heldout_clients, 1)
    parts = partition_lib.iid(len(test), k, seed=config.seed)
    return [(test.images[i], test.labels[i]) for i in parts.client_indices]


# ----------------------------------------------------------------------------------------------
# Models and engines.


def build_models(config, num_classes: int):
    encoder = models.get_model(config.model.name, num_classes=None, **config.model.kwargs)
    m = config.model
    return relation.build_learners(
        encoder, num_classes=num_classes, projector_hidden=m.projector_hidden,
        projector_out=m.projector_out, relation_features=m.relation_features,
        relation_hidden=m.relation_hidden, relation_norm=m.get("relation_norm", "none"),
        head=config.fewshot.get("head", "relation"),
        relation_output_bias=config.fewshot.get("loss", "mse") != "ce",
        relation_hidden_activation=m.get("relation_hidden_activation", "relu"))


def init_variables(config, rep_model, few_model, num_classes: int):
    """Both models' variables; the few-shot encoder starts as the representation encoder."""
    shape = (1, config.data.image_size, config.data.image_size, config.data.channels)
    key = jax.random.PRNGKey(config.seed)
    x = jnp.zeros(shape, jnp.float32)
    rep_vars = rep_model.init(jax.random.fold_in(key, 1), x, train=False)
    few_vars = few_model.init(jax.random.fold_in(key, 2), jnp.zeros((num_classes,) + shape[1:]),
                              jnp.arange(num_classes), x, train=False)
    return rep_vars, hand_off_variables(few_vars, rep_vars)


def apply_init(config, rep_vars, few_vars, *, writer=None):
    """config.init on the model {'rep': rep_vars, 'few': few_vars}, then the hand-off again: the
    few-shot encoder is the representation encoder (Algorithm 1 hands it over every round), so
    an encoder from a checkpoint goes in as dst='rep/encoder'. The report goes to init.json."""
    if config.get("init") is None or not config.init.path:
        return rep_vars, few_vars
    both, report = init_lib.initialize({"rep": rep_vars, "few": few_vars}, config.init)
    if writer is not None:
        writer.write_json("init.json", report.to_dict())
    loaded = {n.split("/")[0] for n in report.loaded if n.split("/")[2:3] == ["encoder"]}
    if loaded == {"few"}:
        logging.warning("init: few/params/encoder was loaded but is replaced by the "
                        "representation encoder (Algorithm 1's hand-off); start the encoder "
                        "with config.init.dst='rep/encoder'")
    return both["rep"], hand_off_variables(both["few"], both["rep"])


def hand_off_variables(few_vars, rep_vars):
    """Algorithm 1: the few-shot learner's embedding module := the representation encoder.
    With the arguments swapped it is the hand-back of encoder_sharing='shared'."""
    params = dict(few_vars["params"])
    params["encoder"] = rep_vars["params"]["encoder"]
    return {"params": params}


def few_filter(config):
    """The encoder is FROZEN in LocalFewShot when fewshot training may not change it."""
    if config.fedaffect.train_encoder:
        return fl.federate_all
    return fl.regex_filter([("params/encoder/.*", fl.FROZEN)], fl.FEDERATED)


def build_methods(config, rep_model, few_model, num_classes: int, *,
                  max_labeled: int | None = None):
    """The two client methods; the episode's queries per class are clipped to clients of at
    most `max_labeled` labeled images (`episode_sizes`)."""
    fa, rep, few = config.fedaffect, config.repr, config.fewshot
    shape_kw = dict(image_size=config.data.image_size, channels=config.data.channels)
    augment = SimCLRAugmentConfig(**{k: tuple(v) if isinstance(v, list | tuple) else v
                                     for k, v in rep.augment.items()})
    rep_method = steps.SimCLRClient(rep_model, optax.adam(rep.learning_rate), augment,
                                    rep.temperature, **shape_kw)
    _, qpc = episode_sizes(config, num_classes, max_labeled)
    few_method = steps.FewShotClient(few_model, optax.adam(few.learning_rate), num_classes,
                                     fa.shots, fa.queries, **shape_kw, queries_per_class=qpc,
                                     loss=few.get("loss", "mse"))
    return rep_method, few_method


def build_engines(config, rep_method, few_method, *, max_unlabeled: int, max_labeled: int,
                  num_classes: int):
    """The two engines (one per global model): the `fed` block's server and layout knobs, the
    batch sizes and local steps of `repr` (SimCLR) and `fewshot` (episodes of `pool` images)."""
    fed, rep, few = config.fed, config.repr, config.fewshot
    rep_engine = fed_config.build_engine(
        fed, rep_method, max_client_size=max(max_unlabeled, 1), batch_size=rep.batch_size,
        local_epochs=rep.local_epochs, tail_multiple=0)
    few_engine = fed_config.build_engine(
        fed, few_method, max_client_size=max(max_labeled, 1), param_filter=few_filter(config),
        batch_size=episode_sizes(config, num_classes, max_labeled)[0],
        local_epochs=1, local_steps=few.episodes_per_round, tail_multiple=0)
    return rep_engine, few_engine


def episode_sizes(config, num_classes: int, max_labeled: int | None,
                  queries_per_class: int | None = None) -> tuple[int, int]:
    """(pool, Q_c): labeled images per few-shot step and queries per class of its episode.

    The pool is `fedaffect.pool_size`, raised to C (K + Q_c) so a class-balanced pool holds the
    requested episode, and at most the largest client (`max_labeled`; None: no bound). Q_c =
    `fedaffect.queries_per_class` (0: `fedaffect.queries` per episode) clipped to what such a
    pool holds per class, pool // C - K, and at least 1; a class that still falls short fills
    the query slots it can (the rest are masked). `queries_per_class` given: use it as is (the
    centralized learner takes the federated clients' Q_c).
    """
    fa = config.fedaffect
    c, k = num_classes, fa.shots
    qpc = fa.get("queries_per_class", 0) if queries_per_class is None else queries_per_class
    pool = max(fa.pool_size, c * (k + qpc))
    if max_labeled is not None:
        pool = min(pool, max(max_labeled, 1))
    if qpc and queries_per_class is None:
        qpc = min(qpc, max(1, pool // c - k))
    return max(pool, k + qpc, 1 if qpc else fa.queries), qpc


def sample_cohort(eligible: np.ndarray, cohort: int, seed: int, round_index: int) -> np.ndarray:
    """A cohort of the eligible client ids, deterministic in (seed, round)."""
    sampler = fl.CohortSampler(len(eligible), min(cohort, len(eligible)))
    return eligible[sampler.sample(seed, round_index)]


def hand_off_state(state, encoder_params):
    """The hand-off inside a client state: `initial` too, so a FROZEN encoder stays the
    handed-over one (centralized mode, where the learners' states persist). Either learner's
    state: the few-shot one (hand-off) or the representation one (encoder_sharing='shared')."""
    encoder_params = jax.tree.map(jnp.array, encoder_params)
    params = {**state.params, "encoder": encoder_params}
    initial = {"params": {**state.initial["params"], "encoder": encoder_params}}
    return state.replace(params=params, initial=initial)


def fewshot_record(totals: dict) -> dict:
    return {"fewshot/loss": totals["loss_sum"] / max(totals["episodes"], 1.0),
            "fewshot/train_accuracy": totals["correct"] / max(totals["queries"], 1.0),
            "fewshot/skipped_episodes": totals["skipped_episodes"],
            "fewshot/short_classes": totals["short_classes"]}


# ----------------------------------------------------------------------------------------------
# Evaluation.


def support_scale(config) -> float | None:
    """Class map = this x the mean of its support maps: the training K for the relation head
    (the sum of K maps, the scale its module learned, at any test K or from all labelled
    images), 1 for the prototypical head (the mean)."""
    return 1.0 if config.fewshot.get("head", "relation") == "prototypical" \
        else float(config.fedaffect.shots)


def evaluate_fewshot(few_params, few_model, clients, *, num_classes: int, config, seed: int,
                     shots: int | None = None, num_episodes: int | None = None) -> dict:
    """`fer_jax.evaluation.fewshot.evaluate` with the few-shot learner's feature maps and
    scores (see there); `config.fedaffect` gives the episodes (`num_episodes` overrides
    their number) and the protocol; K = `shots` (default the training K)."""
    kw = dict(model=few_model, image_size=config.data.image_size, channels=config.data.channels)
    fa = config.fedaffect
    return fewshot_eval.evaluate(
        lambda x: steps.feature_maps(few_params, x, **kw),
        lambda protos, maps: steps.episode_scores(few_params, protos, maps, model=few_model),
        clients, num_classes=num_classes, shots=shots or fa.shots,
        num_episodes=num_episodes or fa.eval_episodes, protocol=fa.eval_protocol,
        batch_size=config.eval_batch_size, seed=seed, support_scale=support_scale(config))


def evaluate_overall(few_params, few_model, support, test, *, num_classes: int,
                     config) -> dict:
    """`fer_jax.evaluation.fewshot.overall_accuracy`: class maps from the labelled training
    images `support`, the eval split `test` classified (the paper's overall accuracy)."""
    kw = dict(model=few_model, image_size=config.data.image_size, channels=config.data.channels)
    return fewshot_eval.overall_accuracy(
        lambda x: steps.feature_maps(few_params, x, **kw),
        lambda protos, maps: steps.episode_scores(few_params, protos[None], maps,
                                                  model=few_model)[0],
        support, test, num_classes=num_classes, support_scale=support_scale(config),
        batch_size=config.eval_batch_size)


def evaluate_all(few_params, few_model, held, support, test, *, num_classes: int,
                 config) -> dict:
    """Episodes for each K of `fedaffect.eval_shots` (a K no held-out client supports is
    recorded with its reason, not dropped) and the overall accuracy."""
    fa = config.fedaffect
    by_shots = {}
    for k in sorted({fa.shots, *fa.get("eval_shots", (fa.shots,))}):
        try:
            by_shots[k] = evaluate_fewshot(few_params, few_model, held, num_classes=num_classes,
                                           config=config, seed=config.seed, shots=k)
        except ValueError as e:
            logging.warning("%d-shot episodes skipped: %s", k, e)
            by_shots[k] = {"skipped": str(e)}
    try:
        overall = evaluate_overall(few_params, few_model, support, test,
                                   num_classes=num_classes, config=config)
    except ValueError as e:
        logging.warning("overall accuracy skipped: %s", e)
        overall = {"skipped": str(e)}
    return {"by_shots": by_shots, "overall": overall}


@functools.partial(jax.jit, static_argnames=("model", "image_size", "channels"))
def _rep_embed(params, images, *, model, image_size, channels):
    x = preprocess(images, image_size=image_size, channels=channels)
    return model.apply({"params": params}, x, train=False)["embedding"]


def _tsne_plot(config, rep_params, rep_model, held, class_names, path, *, title: str,
               group_ids, group_name: str) -> None:
    """t-SNE of the representation encoder's features of held-out images: colour = class,
    marker = held-out client `group_ids[i]` (a subject id where clients are subjects)."""
    images = np.concatenate([h[0] for h in held])
    labels = np.concatenate([h[1] for h in held])
    groups = np.concatenate([np.full(len(h[1]), g) for g, h in zip(group_ids, held,
                                                                   strict=True)])
    pick = np.random.default_rng(config.seed).permutation(len(images))[
        :config.fedaffect.plot_points]
    emb = np.concatenate([np.asarray(_rep_embed(
        rep_params, images[pick[i:i + config.eval_batch_size]], model=rep_model,
        image_size=config.data.image_size, channels=config.data.channels))
        for i in range(0, len(pick), config.eval_batch_size)])
    embedding.save_embedding_plot(embedding.tsne_2d(emb, seed=config.seed), labels[pick],
                                  class_names, path, title=title, groups=groups[pick],
                                  group_name=group_name)


# ----------------------------------------------------------------------------------------------
# The run.


def run(config, workdir: str) -> dict:
    fa, fed = config.fedaffect, config.fed
    federated = config.mode == "federated"
    run = Run(config, workdir, every=config.checkpoint_every_rounds)
    t_start = time.perf_counter()

    dataset = data_lib.load(config.data)
    num_classes = dataset.num_classes
    train, test = dataset[config.data.train_split], dataset[config.data.eval_split]
    clients = build_clients(config, train, num_classes)
    held = heldout_clients(config, test)
    summary = clients["summary"]
    pool, qpc = episode_sizes(config, num_classes, max(summary["labeled_sizes"]))
    summary["episode"] = {"pool": pool, "shots": fa.shots, "queries_per_class": qpc,
                          "queries": qpc * num_classes if qpc else fa.queries}
    run.writer.write_json("partition.json", summary)
    logging.info("%s: %d training clients (%d without unlabeled data, %d with <= C=%d labels "
                 "skipped from the few-shot round), %d held-out clients; episodes of %s from "
                 "pools of %d", dataset.name, summary["num_clients"],
                 summary["skipped_no_unlabeled"], summary["skipped_too_few_labeled"],
                 num_classes, len(held), f"{qpc} queries per class" if qpc else
                 f"{fa.queries} queries", pool)
    if len(clients["few_clients"]) == 0:
        raise ValueError(f"no client has more than C={num_classes} labeled images: the few-shot "
                         "round has no participant (raise fedaffect.labeled_fraction)")
    use_simclr = fa.representation == "simclr"
    if use_simclr and len(clients["rep_clients"]) == 0:
        raise ValueError("no client has unlabeled images: the SimCLR round has no participant "
                         "(lower fedaffect.labeled_fraction or set fedaffect.unlabeled='all')")

    rep_model, few_model = build_models(config, num_classes)
    rep_vars, few_vars = apply_init(config, *init_variables(config, rep_model, few_model,
                                                        num_classes), writer=run.writer)
    rep_method, few_method = build_methods(config, rep_model, few_model, num_classes,
                                           max_labeled=max(summary["labeled_sizes"]))
    round_fn, state, place = (_federated_rounds if federated else _centralized_rounds)(
        config, clients, train, rep_method, few_method, rep_vars, few_vars, use_simclr)
    state, start = run.restore(state, place=place, unit="round")

    def curve(state, r):
        """The learning curve's held-out point: K-shot accuracy on the same
        `fedaffect.curve_episodes` episodes every time (the final evaluation draws more)."""
        few_params = jax.device_get(round_fn.variables(state))[1]["params"]
        res = evaluate_fewshot(few_params, few_model, held, num_classes=num_classes,
                               config=config, seed=config.seed, num_episodes=fa.curve_episodes)
        run.writer.write(r, {f"eval/{fa.shots}shot_accuracy": res["accuracy"],
                             f"eval/{fa.shots}shot_ci95": res["ci95"]})
        logging.info("round %d: held-out %d-shot accuracy %.3f +- %.3f (%d episodes)", r,
                     fa.shots, res["accuracy"], res["ci95"], res["episodes"])

    state = loops.rounds(run, state, round_fn, num_rounds=fed.rounds, start=start,
                         eval_every=fa.get("curve_every_rounds", 0), evaluate=curve)
    train_seconds = time.perf_counter() - t_start
    rep_final, few_final = (jax.device_get(round_fn.variables(state)))

    t_eval = time.perf_counter()
    support = (train.images[clients["labeled"]], train.labels[clients["labeled"]])
    evals = evaluate_all(few_final["params"], few_model, held, support,
                         (test.images, test.labels), num_classes=num_classes, config=config)
    result, overall = dict(evals["by_shots"][fa.shots]), evals["overall"]
    if "skipped" in result:
        raise ValueError(f"{fa.shots}-shot evaluation impossible: {result['skipped']}")
    cm = result.pop("confusion_matrix")
    by_shots = {str(k): {n: v for n, v in r.items() if n != "confusion_matrix"}
                for k, r in evals["by_shots"].items()}
    if "confusion_matrix" in overall:
        overall = {**overall, "confusion_matrix": overall["confusion_matrix"].tolist()}
    few = config.fewshot
    init = config.get("init")
    origin = f"init {config.init.path.rstrip('/').split('/')[-1]}" if init and init.path \
        else "random init"
    frozen = "" if fa.train_encoder else ", frozen in few-shot"
    tag = (f"{config.mode}, encoder {origin}{' + SimCLR' if use_simclr else ''}{frozen}, "
           f"{few.get('head', 'relation')}/{few.get('loss', 'mse')}, "
           f"{fa.get('encoder_sharing', 'handoff')}")
    plots.save_confusion_matrix(
        cm, dataset.class_names, run.workdir / "confusion_matrix.png",
        title=f"FedAffect ({tag}) {dataset.name}: {fa.shots}-shot acc {result['accuracy']:.3f}")
    subjects = test.subjects is not None and fa.num_heldout_clients == 0
    _tsne_plot(config, rep_final["params"], rep_model, held, dataset.class_names,
               run.workdir / "embedding_tsne.png",
               title=f"t-SNE of encoder features, held-out {dataset.name} ({tag})",
               group_ids=np.unique(test.subjects) if subjects else np.arange(len(held)),
               group_name="subject" if subjects else "held-out client")
    eval_seconds = time.perf_counter() - t_eval
    report = metrics_lib.classification_report(cm, dataset.class_names)
    results = {"fewshot": result, "fewshot_by_shots": by_shots, "overall": overall,
               "report": report, "confusion_matrix": cm.tolist(),
               "class_names": list(dataset.class_names), "mode": config.mode,
               "representation": fa.representation,
               "head": few.get("head", "relation"), "loss": few.get("loss", "mse"),
               "encoder_sharing": fa.get("encoder_sharing", "handoff"),
               "episode": summary["episode"], "rounds": fed.rounds,
               "clients": summary | {"labeled_sizes": None, "unlabeled_sizes": None},
               "seconds": {"train": train_seconds, "eval": eval_seconds}}
    results["clients"] = {k: v for k, v in results["clients"].items() if v is not None}
    # The curve's series by name: eval/{K}shot_accuracy (the held-out points of every
    # curve_every_rounds rounds are fa.shots-shot), the final point of each shot count.
    scalars = {f"eval/{fa.shots}shot_accuracy": result["accuracy"],
               f"eval/{fa.shots}shot_ci95": result["ci95"],
               "eval/nearest_class_accuracy": result["nearest_class_accuracy"]}
    for k, r in by_shots.items():
        if "accuracy" in r and int(k) != fa.shots:
            scalars[f"eval/{k}shot_accuracy"] = r["accuracy"]
    if "accuracy" in overall:
        scalars["eval/overall_accuracy"] = overall["accuracy"]
    run.writer.write(fed.rounds, scalars)
    more = "; ".join(f"{k}-shot {r['accuracy']:.3f} +- {r['ci95']:.3f}"
                     for k, r in by_shots.items() if "accuracy" in r and int(k) != fa.shots)
    overall_txt = (f"overall {overall['accuracy']:.3f} +- {overall['ci95']:.3f} (chance "
                   f"{overall['chance']:.3f}, majority {overall['majority']:.3f})"
                   if "accuracy" in overall else f"overall skipped ({overall['skipped']})")
    return run.finish(
        results, metric=f"FedAffect ({tag}) on {dataset.name}: {fa.shots}-shot accuracy",
        value=result["accuracy"], chance=result["chance"],
        detail=f" +- {result['ci95']:.3f} (95% interval, {result['episodes']} "
               f"{result['protocol']} episodes on {result['clients']} unseen clients); "
               f"nearest-class-feature probe {result['nearest_class_accuracy']:.3f}; "
               + (f"{more}; " if more else "") + overall_txt)


class _Rounds:
    """round_fn(state, r) -> (state, metrics) of one FedAffect round, and the final variables.

    A round: the SimCLR round (unless representation='none'), the hand-off of the encoder to
    the few-shot learner (Algorithm 1), the few-shot round, then (encoder_sharing='shared')
    the hand-back of the few-shot encoder to the representation learner."""

    def __init__(self, simclr, handoff, fewshot, handback, variables):
        self._simclr, self._handoff, self._fewshot = simclr, handoff, fewshot
        self._handback = handback
        self.variables = variables

    def __call__(self, state, r):
        record = {}
        t0 = time.perf_counter()
        if self._simclr is not None:
            state, totals, extra = self._simclr(state, r)
            record.update({"repr/loss": totals["loss_sum"] / max(totals["count"], 1.0), **extra})
        t1 = time.perf_counter()
        state = self._handoff(state)
        t2 = time.perf_counter()
        state, totals, extra = self._fewshot(state, r)
        t3 = time.perf_counter()
        if self._handback is not None:
            state = self._handback(state)
        record.update({**fewshot_record(totals), **extra, "round/seconds_repr": t1 - t0,
                       "round/seconds_handoff": t2 - t1 + time.perf_counter() - t3,
                       "round/seconds_fewshot": t3 - t2})
        if not all(np.isfinite(v) for v in record.values()):
            raise FloatingPointError(f"round {r + 1}: non-finite training metrics {record}")
        return state, record


def _shared(config) -> bool:
    return config.fedaffect.get("encoder_sharing", "handoff") == "shared"


def _federated_rounds(config, clients, train, rep_method, few_method, rep_vars, few_vars,
                      use_simclr):
    """Both models on the engine: cohorts of the clients with unlabeled / enough labels."""
    summary = clients["summary"]
    rep_engine, few_engine = build_engines(config, rep_method, few_method,
                                           max_unlabeled=max(summary["unlabeled_sizes"]),
                                           max_labeled=max(summary["labeled_sizes"]),
                                           num_classes=few_method.num_classes)
    rep_key, few_key = jax.random.PRNGKey(config.seed + 1), jax.random.PRNGKey(config.seed + 2)

    def simclr(state, r):
        ids = sample_cohort(clients["rep_clients"], config.repr.cohort_size, config.seed, r)
        pop = clients["rep_population"]
        plan = rep_engine.plan(pop, ids, population_size=len(clients["rep_clients"]))
        loops.log_layout("SimCLR engine", rep_engine)
        state["rep"], res = rep_engine.run_round(state["rep"], pop, plan, rep_key,
                                                 seed=config.seed)
        return state, res.totals, {"repr/clients": res.client_updates,
                                   "repr/images": res.useful_examples,
                                   **loops.layout_metrics(res, "repr/layout"),
                                   **loops.dp_metrics(res, "repr/dp")}

    engines = {"rep": rep_engine, "few": few_engine}

    def copy_encoder(state, src, dst):
        """state[dst]'s encoder := state[src]'s (hand-off: rep -> few; hand-back: few -> rep)."""
        source = fl.mesh.to_host(state[src].variables)
        target = fl.mesh.to_host(state[dst])
        state[dst] = engines[dst].place(target.replace(
            variables=hand_off_variables(target.variables, source)))
        return state

    handoff = functools.partial(copy_encoder, src="rep", dst="few")
    handback = functools.partial(copy_encoder, src="few", dst="rep")

    def fewshot(state, r):
        ids = sample_cohort(clients["few_clients"], config.fewshot.cohort_size,
                            config.seed + 1_000_003, r)
        pop = clients["few_population"]
        plan = few_engine.plan(pop, ids, population_size=len(clients["few_clients"]))
        loops.log_layout("few-shot engine", few_engine)
        state["few"], res = few_engine.run_round(state["few"], pop, plan, few_key,
                                                 seed=config.seed)
        return state, res.totals, {"fewshot/clients": res.client_updates,
                                   **loops.layout_metrics(res, "fewshot/layout"),
                                   **loops.dp_metrics(res, "fewshot/dp")}

    def variables(state):
        return fl.mesh.to_host(state["rep"].variables), fl.mesh.to_host(state["few"].variables)

    state = {"rep": rep_engine.init(rep_vars), "few": few_engine.init(few_vars)}

    def place(s):
        return {"rep": rep_engine.place(s["rep"]), "few": few_engine.place(s["few"])}

    return _Rounds(simclr if use_simclr else None, handoff, fewshot,
                   handback if _shared(config) else None, variables), state, place


def _centralized_rounds(config, clients, train, rep_method, few_method, rep_vars, few_vars,
                        use_simclr):
    """The same two methods on the pooled data (`loops.PooledLearner`), with the federated
    round's expected SimCLR images and few-shot episodes per round (and its episodes' queries
    per class): the paper's "Centralized (ours)" row."""
    unlabeled = train.images[clients["unlabeled"]]
    labeled = {"image": train.images[clients["labeled"]],
               "label": train.labels[clients["labeled"]].astype(np.int32)}
    rep_frac = min(config.repr.cohort_size, len(clients["rep_clients"])) / max(
        len(clients["rep_clients"]), 1)
    rep_steps = max(1, round(rep_frac * len(unlabeled) * config.repr.local_epochs
                             / config.repr.batch_size))
    few_steps = (min(config.fewshot.cohort_size, len(clients["few_clients"]))
                 * config.fewshot.episodes_per_round)
    few_trainable = fl.partial.trainable_mask(fl.partial.label_tree(few_vars, few_filter(config)))
    rep = loops.PooledLearner(rep_method, rep_vars, {"image": unlabeled},
                              min(config.repr.batch_size, len(unlabeled)), seed=config.seed)
    pool, _ = episode_sizes(config, few_method.num_classes, len(labeled["label"]),
                            queries_per_class=few_method.queries_per_class)
    few = loops.PooledLearner(few_method, few_vars, labeled, pool, seed=config.seed + 1,
                              trainable=few_trainable)

    def simclr(state, r):
        rep.state = state["rep"]
        totals = rep.run(r * rep_steps, rep_steps)
        return {**state, "rep": rep.state}, totals, {}

    methods = {"rep": rep_method, "few": few_method}

    def copy_encoder(state, src, dst):
        """state[dst]'s encoder := state[src]'s (hand-off: rep -> few; hand-back: few -> rep)."""
        encoder = methods[src].final(state[src])["params"]["encoder"]
        # Distinct buffers: the steps donate their state, and the hand-off may leave leaves
        # aliased with each other or with the other model's state ("donate the same buffer twice").
        return {**state, dst: jax.tree.map(jnp.copy, hand_off_state(state[dst], encoder))}

    handoff = functools.partial(copy_encoder, src="rep", dst="few")
    handback = functools.partial(copy_encoder, src="few", dst="rep")

    def fewshot(state, r):
        few.state = state["few"]
        totals = few.run(r * few_steps, few_steps)
        return {**state, "few": few.state}, totals, {}

    def variables(state):
        return rep_method.final(state["rep"]), few_method.final(state["few"])

    state = {"rep": rep.state, "few": few.state}
    return _Rounds(simclr if use_simclr else None, handoff, fewshot,
                   handback if _shared(config) else None, variables), state, None
