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
    (Algorithm 1 sends both models out at once and hands the encoder over after aggregation;
    running the representation round first lets the relation module train on the encoder it is
    evaluated with. Documented choice.)
  * mode='centralized' trains the same two models on the pooled data with the same batch sizes
    and the same expected number of images (SimCLR) and episodes (few-shot) per round: the
    paper's "Centralized (ours)" row. representation='none' skips SimCLR (random encoder).
Evaluation (PAPERS.md decision): on held-out clients, episodes with K labeled support images per
class from that client and every remaining image as a query; mean accuracy and 95% interval over
>= `eval_episodes` episodes, confusion matrix, and a t-SNE of encoder features coloured by class.
Writes metrics.jsonl, eval.json, confusion_matrix.png, embedding_tsne.png, checkpoints/.
"""

from __future__ import annotations

import functools
import math
import pathlib
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
from fer_jax.evaluation import metrics as metrics_lib
from fer_jax.evaluation import plots
from fer_jax.experiments import supervised
from fer_jax.federated.population import hash_uniform
from fer_jax.io.checkpoint import Checkpointer
from fer_jax.io.metrics import MetricWriter
from fer_jax.io.progress import Progress
from fer_jax.models import relation
from fer_jax.steps import fedaffect as steps
from fer_jax.steps.supervised import preprocess

MODES = ("federated", "centralized")
REPRESENTATIONS = ("simclr", "none")
UNLABELED = ("rest", "all")
DATASETS = ("synthetic", "ckplus48", "fer2013")
EVAL_PROTOCOLS = ("within_client", "cross_client")
ENCODERS = ("small_cnn", "resnet18", "resnet50", "resnet50v2")


def validate_config(config) -> None:
    """Raises ValueError naming the first bad field; called by main before any work."""
    check = supervised.config_checker(config)
    check(config.data.name in DATASETS, "data.name", f"one of {DATASETS}")
    check(config.data.image_size >= 16, "data.image_size", "an image size >= 16")
    check(config.data.channels in (1, 3), "data.channels", "1 or 3")
    check(config.model.name in ENCODERS, "model.name", f"one of {ENCODERS}")
    check(config.model.kwargs.get("norm") in relation.NORMS, "model.kwargs",
          f"norm in {relation.NORMS} (clients pad partial batches; BatchNorm would mix padding "
          "into its statistics)")
    check(config.model.get("relation_norm", "none") in relation.NORMS, "model.relation_norm",
          f"one of {relation.NORMS}")
    fa, rep, few, fed = config.fedaffect, config.repr, config.fewshot, config.fed
    check(fa.mode in MODES, "fedaffect.mode", f"one of {MODES}")
    check(fa.representation in REPRESENTATIONS, "fedaffect.representation",
          f"one of {REPRESENTATIONS}")
    check(0.0 < fa.labeled_fraction <= 1.0, "fedaffect.labeled_fraction", "in (0, 1]")
    check(fa.unlabeled in UNLABELED, "fedaffect.unlabeled", f"one of {UNLABELED}")
    check(fa.shots >= 1, "fedaffect.shots", ">= 1")
    check(fa.queries >= 1, "fedaffect.queries", ">= 1")
    check(fa.pool_size >= 2, "fedaffect.pool_size", ">= 2")
    check(fa.eval_episodes >= 1, "fedaffect.eval_episodes", ">= 1")
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
    check(few.learning_rate > 0, "fewshot.learning_rate", "> 0")
    check(few.cohort_size >= 1, "fewshot.cohort_size", ">= 1")
    check(fed.partition in ("subject", "iid"), "fed.partition", "subject or iid")
    check(fed.partition != "subject" or config.data.name != "fer2013", "fed.partition",
          "iid for FER-2013 (no subject ids)")
    check(fed.num_clients >= 1, "fed.num_clients", ">= 1")
    check(fed.rounds >= 1, "fed.rounds", ">= 1")
    check(fed.server_optimizer in ("fedavg", "fedavgm", "fedadam", "fedyogi"),
          "fed.server_optimizer", "fedavg | fedavgm | fedadam | fedyogi")
    check(fed.clients_per_call >= 1, "fed.clients_per_call", ">= 1")
    check(config.checkpoint_every_rounds >= 1, "checkpoint_every_rounds", ">= 1")


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
    if fed.partition == "subject":
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
        relation_hidden=m.relation_hidden, relation_norm=m.get("relation_norm", "none"))


def init_variables(config, rep_model, few_model, num_classes: int):
    """Both models' variables; the few-shot encoder starts as the representation encoder."""
    shape = (1, config.data.image_size, config.data.image_size, config.data.channels)
    key = jax.random.PRNGKey(config.seed)
    x = jnp.zeros(shape, jnp.float32)
    rep_vars = rep_model.init(jax.random.fold_in(key, 1), x, train=False)
    few_vars = few_model.init(jax.random.fold_in(key, 2), jnp.zeros((num_classes,) + shape[1:]),
                              jnp.arange(num_classes), x, train=False)
    return rep_vars, hand_off_variables(few_vars, rep_vars)


def hand_off_variables(few_vars, rep_vars):
    """Algorithm 1: the few-shot learner's embedding module := the representation encoder."""
    params = dict(few_vars["params"])
    params["encoder"] = rep_vars["params"]["encoder"]
    return {"params": params}


def _buckets(steps_needed: int) -> tuple[int, ...]:
    return tuple(b for b in fl.packing.DEFAULT_STEP_BUCKETS if b < steps_needed) + (steps_needed,)


def few_filter(config):
    """The encoder is FROZEN in LocalFewShot when fewshot training may not change it."""
    if config.fedaffect.train_encoder:
        return fl.federate_all
    return fl.regex_filter([("params/encoder/.*", fl.FROZEN)], fl.FEDERATED)


def build_methods(config, rep_model, few_model, num_classes: int):
    rep, few, fa = config.repr, config.fewshot, config.fedaffect
    shape_kw = dict(image_size=config.data.image_size, channels=config.data.channels)
    augment = SimCLRAugmentConfig(**{k: tuple(v) if isinstance(v, list | tuple) else v
                                     for k, v in rep.augment.items()})
    rep_method = steps.SimCLRClient(rep_model, optax.adam(rep.learning_rate), augment,
                                    rep.temperature, **shape_kw)
    few_method = steps.FewShotClient(few_model, optax.adam(few.learning_rate), num_classes,
                                     fa.shots, fa.queries, **shape_kw)
    return rep_method, few_method


def clients_mesh(config):
    """The 'clients' mesh: the most devices (in order) that split fed.clients_per_call /
    fed.vmap_width evenly, e.g. all 8 for 8 clients per call, one device for the CPU default
    of 1 (with 8 forced host devices, a mesh of 8 would compute 7 padding clients per call)."""
    devices = jax.devices()
    groups = max(config.fed.clients_per_call // max(config.fed.vmap_width, 1), 1)
    n = max(d for d in range(1, len(devices) + 1) if groups % d == 0)
    return fl.clients_mesh(devices[:n])


def build_engines(config, rep_method, few_method, *, max_unlabeled: int, max_labeled: int):
    """The two engines (one per global model) with the configured backend knobs."""
    fed, rep, few = config.fed, config.repr, config.fewshot
    backend = fl.RoundBackend.from_config(fed)
    mesh = clients_mesh(config)
    pool = pool_size(config, max_labeled)
    rep_steps = rep.local_epochs * -(-max(max_unlabeled, 1) // rep.batch_size)
    few_steps = few.episodes_per_round * -(-max(max_labeled, 1) // pool)
    server = fl.server_optimizer(fed.server_optimizer)
    rep_engine = fl.FederatedEngine(
        rep_method, server_optimizer=server, backend=backend, mesh=mesh,
        packing=fl.PackingConfig(batch_size=rep.batch_size, local_epochs=rep.local_epochs,
                                 clients_per_call=fed.clients_per_call,
                                 step_buckets=_buckets(rep_steps)))
    few_engine = fl.FederatedEngine(
        few_method, server_optimizer=server, backend=backend, param_filter=few_filter(config),
        mesh=mesh, packing=fl.PackingConfig(batch_size=pool, local_epochs=few.episodes_per_round,
                                 clients_per_call=fed.clients_per_call,
                                 step_buckets=_buckets(few_steps)))
    return rep_engine, few_engine


def pool_size(config, max_labeled: int) -> int:
    """Labeled images per few-shot step: the configured pool, at most the largest client."""
    fa = config.fedaffect
    pool = min(fa.pool_size, max(max_labeled, 1))
    return max(pool, fa.shots, fa.queries)


def sample_cohort(eligible: np.ndarray, cohort: int, seed: int, round_index: int) -> np.ndarray:
    """A cohort of the eligible client ids, deterministic in (seed, round)."""
    sampler = fl.CohortSampler(len(eligible), min(cohort, len(eligible)))
    return eligible[sampler.sample(seed, round_index)]


# ----------------------------------------------------------------------------------------------
# Centralized learners (same models, same batch sizes, pooled data).


class CentralizedLearner:
    """One learner on pooled data: the client method's jitted step in a host loop.

    Batches follow a seeded epoch permutation of the pool (drop remainder), so the batch of
    global step s depends on (seed, s) only; keys are fold_in(key, s).
    """

    def __init__(self, method, variables, trainable, data: dict, batch_size: int, *, seed: int):
        n = len(next(iter(data.values())))
        self.method, self.data = method, data
        self.order = supervised.EpochOrder(n, min(batch_size, n), seed)
        # Copy every leaf: params and `initial` start as the same arrays, and the jitted step
        # donates the state (one buffer donated twice is an error).
        self.state = jax.tree.map(jnp.array, method.init(variables, trainable, None))
        self.key = jax.random.PRNGKey(seed)
        self.step_index = 0

    def run(self, steps_count: int) -> dict:
        sums = {}
        mask = np.ones(self.order.batch_size, bool)
        for _ in range(steps_count):
            idx = np.sort(self.order.indices(self.step_index))
            batch = {k: v[idx] for k, v in self.data.items()}
            key = jax.random.fold_in(self.key, self.step_index)
            self.state, m = steps.centralized_step(self.state, batch, mask, key,
                                                   method=self.method)
            sums = {k: sums.get(k, 0.0) + v for k, v in m.items()}
            self.step_index += 1
        return {k: float(v) for k, v in sums.items()}

    def variables(self):
        return jax.tree.map(np.asarray, self.method.final(self.state))

    def set_encoder(self, encoder_params) -> None:
        """The hand-off; `initial` too, so a FROZEN encoder stays the handed-over one."""
        encoder_params = jax.tree.map(jnp.asarray, encoder_params)
        params = dict(self.state.params)
        params["encoder"] = encoder_params
        initial = {"params": {**self.state.initial["params"], "encoder": encoder_params}}
        self.state = jax.tree.map(jnp.array, self.state.replace(params=params, initial=initial))


# ----------------------------------------------------------------------------------------------
# Evaluation.


def _batched_maps(params, images, *, model, config) -> np.ndarray:
    bs = config.eval_batch_size
    out = []
    for start in range(0, len(images), bs):
        chunk = images[start:start + bs]
        n = len(chunk)
        if n < bs:  # One compiled shape for every batch.
            chunk = np.concatenate([chunk, np.zeros((bs - n,) + chunk.shape[1:], chunk.dtype)])
        out.append(np.asarray(steps.feature_maps(
            params, chunk, model=model, image_size=config.data.image_size,
            channels=config.data.channels))[:n])
    return np.concatenate(out)


def evaluate_fewshot(few_params, few_model, clients, *, num_classes: int, config,
                     seed: int) -> dict:
    """Episodes on held-out clients: accuracy mean and 95% interval, chance, confusion matrix.

    Per client: E = ceil(eval_episodes / clients) episodes of K supports per class from that
    client, queries = all its other images (fedaffect.eval_protocol='within_client'), or all the
    images of the next held-out client (c + 1 mod n: 'cross_client', supports and queries of
    different people, so never frames of one sequence); prediction = argmax relation score over
    the episode's classes. Also the nearest-class-map accuracy by cosine similarity of pooled
    encoder features (no relation module): a direct probe of the encoder.
    """
    fa = config.fedaffect
    accs, nn_accs, chance = [], [], []
    cm = np.zeros((num_classes, num_classes), np.int64)
    skipped_clients, skipped_images = 0, 0
    if fa.eval_protocol == "cross_client":
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
                                                  shots=fa.shots, num_episodes=1, seed=0,
                                                  support_pool=pool)
            if not probe.query_mask.any():
                raise ValueError("no image is left as a query")
            usable.append(c)
        except ValueError as e:
            logging.warning("held-out client %d skipped: %s", c, e)
            skipped_clients += 1
    per_client = -(-fa.eval_episodes // max(len(usable), 1))
    for c in usable:
        images, labels, pool = clients[c]
        eps = episodes_lib.heldout_episodes(labels, num_classes=num_classes, shots=fa.shots,
                                            num_episodes=per_client, seed=(seed, 77, c),
                                            support_pool=pool)
        skipped_images += eps.skipped_images * per_client
        maps = _batched_maps(few_params, images, model=few_model, config=config)
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
            scores.append(np.asarray(steps.episode_scores(few_params, p, maps_p,
                                                          model=few_model))[:, :n])
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
                         f">= {fa.shots} images)")
    accs, nn_accs = np.asarray(accs), np.asarray(nn_accs)
    half = lambda a: float(1.96 * a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else 0.0
    return {"accuracy": float(accs.mean()), "ci95": half(accs), "episodes": int(len(accs)),
            "chance": float(np.mean(chance)), "nearest_class_accuracy": float(nn_accs.mean()),
            "nearest_class_ci95": half(nn_accs), "clients": len(clients),
            "protocol": fa.eval_protocol,
            "skipped_clients": skipped_clients, "skipped_query_images": int(skipped_images),
            "confusion_matrix": cm}


def tsne_2d(x: np.ndarray, *, perplexity: float = 30.0, iterations: int = 500,
            seed: int = 0) -> np.ndarray:
    """Exact t-SNE (van der Maaten & Hinton 2008) in NumPy, for a few hundred points.

    Gaussian affinities with per-point bandwidth by bisection on the perplexity, symmetrised
    P; Student-t Q; gradient descent with momentum 0.5 -> 0.8 and early exaggeration 12 for
    the first 100 iterations (the paper's Sec. 3.4 schedule, fixed learning rate 200).
    """
    x = np.asarray(x, np.float64)
    n = len(x)
    d2 = np.square(x[:, None] - x[None]).sum(-1)
    target = np.log(min(perplexity, (n - 1) / 3))
    lo, hi = np.full(n, 1e-20), np.full(n, 1e20)
    beta = np.ones(n) / max(np.median(d2), 1e-12)
    for _ in range(64):  # Bisection on beta = 1 / (2 sigma^2), all points at once.
        p = np.exp(-(d2 - np.where(np.eye(n, dtype=bool), np.inf, d2).min(1, keepdims=True))
                   * beta[:, None])
        np.fill_diagonal(p, 0.0)
        s = p.sum(1, keepdims=True)
        p = p / s
        entropy = -(p * np.log(np.maximum(p, 1e-300))).sum(1)
        too_flat = entropy > target
        lo = np.where(too_flat, beta, lo)
        hi = np.where(too_flat, hi, beta)
        beta = np.where(hi < 1e19, (lo + hi) / 2, beta * 2)
    p = (p + p.T) / (2 * n)
    y = np.random.default_rng(seed).normal(0, 1e-4, (n, 2))
    velocity = np.zeros_like(y)
    for it in range(iterations):
        exag = 12.0 if it < 100 else 1.0
        diff = y[:, None] - y[None]
        num = 1.0 / (1.0 + np.square(diff).sum(-1))
        np.fill_diagonal(num, 0.0)
        q = np.maximum(num / num.sum(), 1e-12)
        grad = 4 * (((exag * p - q) * num)[:, :, None] * diff).sum(1)
        velocity = (0.5 if it < 250 else 0.8) * velocity - 200.0 * grad
        y = y + velocity
    return y - y.mean(0)


def save_embedding_plot(points: np.ndarray, labels: np.ndarray, class_names, path, *,
                        title: str) -> None:
    import matplotlib.pyplot as plt  # plots sets the Agg backend on import.

    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    for c, name in enumerate(class_names):
        sel = labels == c
        if sel.any():
            ax.scatter(points[sel, 0], points[sel, 1], s=9, label=name, alpha=0.8)
    ax.legend(fontsize=7, markerscale=1.5, loc="best")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@functools.partial(jax.jit, static_argnames=("model", "image_size", "channels"))
def _rep_embed(params, images, *, model, image_size, channels):
    x = preprocess(images, image_size=image_size, channels=channels)
    return model.apply({"params": params}, x, train=False)["embedding"]


# ----------------------------------------------------------------------------------------------
# The run.


def run(config, workdir: str) -> dict:
    workdir = pathlib.Path(workdir)
    writer = MetricWriter(workdir)
    writer.write_json("config.json", config.to_dict())
    fa, fed = config.fedaffect, config.fed
    t_start = time.perf_counter()

    dataset = data_lib.load(config.data)
    num_classes = dataset.num_classes
    train, test = dataset[config.data.train_split], dataset[config.data.eval_split]
    clients = build_clients(config, train, num_classes)
    held = heldout_clients(config, test)
    summary = clients["summary"]
    writer.write_json("partition.json", summary)
    logging.info("%s: %d training clients (%d without unlabeled data, %d with <= C=%d labels "
                 "skipped from the few-shot round), %d held-out clients", dataset.name,
                 summary["num_clients"], summary["skipped_no_unlabeled"],
                 summary["skipped_too_few_labeled"], num_classes, len(held))
    if len(clients["few_clients"]) == 0:
        raise ValueError(f"no client has more than C={num_classes} labeled images: the few-shot "
                         "round has no participant (raise fedaffect.labeled_fraction)")
    use_simclr = fa.representation == "simclr"
    if use_simclr and len(clients["rep_clients"]) == 0:
        raise ValueError("no client has unlabeled images: the SimCLR round has no participant "
                         "(lower fedaffect.labeled_fraction or set fedaffect.unlabeled='all')")

    rep_model, few_model = build_models(config, num_classes)
    rep_vars, few_vars = init_variables(config, rep_model, few_model, num_classes)
    rep_method, few_method = build_methods(config, rep_model, few_model, num_classes)
    max_unl = max(summary["unlabeled_sizes"])
    max_lab = max(summary["labeled_sizes"])
    rep_engine, few_engine = build_engines(config, rep_method, few_method,
                                           max_unlabeled=max_unl, max_labeled=max_lab)
    checkpointer = Checkpointer(workdir, every_steps=config.checkpoint_every_rounds)
    federated = fa.mode == "federated"
    train_images = {"rep": train.images[clients["unlabeled"]],
                    "few_image": train.images[clients["labeled"]],
                    "few_label": train.labels[clients["labeled"]].astype(np.int32)}
    if federated:
        state = {"rep": rep_engine.init(rep_vars), "few": few_engine.init(few_vars)}
        state, start = checkpointer.restore_or(state)
        if start:
            state = {"rep": rep_engine.place(state["rep"]), "few": few_engine.place(state["few"])}
    else:
        few_trainable = fl.partial.trainable_mask(fl.partial.label_tree(few_vars,
                                                                        few_filter(config)))
        # Budget: the federated round's expected images (SimCLR) and episodes (few-shot).
        rep_frac = min(config.repr.cohort_size, len(clients["rep_clients"])) / max(
            len(clients["rep_clients"]), 1)
        rep_steps = max(1, round(rep_frac * len(train_images["rep"]) * config.repr.local_epochs
                                 / config.repr.batch_size))
        few_steps = (min(config.fewshot.cohort_size, len(clients["few_clients"]))
                     * config.fewshot.episodes_per_round)
        rep_learner = CentralizedLearner(rep_method, rep_vars, (), {"image": train_images["rep"]},
                                         config.repr.batch_size, seed=config.seed)
        few_learner = CentralizedLearner(
            few_method, few_vars, few_trainable,
            {"image": train_images["few_image"], "label": train_images["few_label"]},
            pool_size(config, len(train_images["few_label"])), seed=config.seed + 1)
        start = 0  # Centralized baselines are short: no resume.
    rep_key, few_key = jax.random.PRNGKey(config.seed + 1), jax.random.PRNGKey(config.seed + 2)
    times = {"repr": 0.0, "fewshot": 0.0, "handoff": 0.0}
    progress = Progress(fed.rounds, desc="rounds", start=start)
    for r in range(start, fed.rounds):
        record = {}
        t0 = time.perf_counter()
        if use_simclr:
            if federated:
                ids = sample_cohort(clients["rep_clients"], config.repr.cohort_size, config.seed, r)
                plan = rep_engine.plan(clients["rep_population"], ids)
                state["rep"], res = rep_engine.run_round(
                    state["rep"], clients["rep_population"], plan, rep_key, seed=config.seed)
                totals, record["repr/clients"] = res.totals, res.client_updates
                record["repr/images"] = res.useful_examples
            else:
                totals = rep_learner.run(rep_steps)
            record["repr/loss"] = totals["loss_sum"] / max(totals["count"], 1.0)
        t1 = time.perf_counter()
        if federated:
            rep_now = fl.mesh.to_host(state["rep"].variables)
            few_now = fl.mesh.to_host(state["few"])
            state["few"] = few_engine.place(few_now.replace(
                variables=hand_off_variables(few_now.variables, rep_now)))
        else:
            few_learner.set_encoder(rep_learner.variables()["params"]["encoder"])
        t2 = time.perf_counter()
        if federated:
            ids = sample_cohort(clients["few_clients"], config.fewshot.cohort_size,
                                config.seed + 1_000_003, r)
            plan = few_engine.plan(clients["few_population"], ids)
            state["few"], res = few_engine.run_round(
                state["few"], clients["few_population"], plan, few_key, seed=config.seed)
            totals, record["fewshot/clients"] = res.totals, res.client_updates
        else:
            totals = few_learner.run(few_steps)
        t3 = time.perf_counter()
        record.update({
            "fewshot/loss": totals["loss_sum"] / max(totals["episodes"], 1.0),
            "fewshot/train_accuracy": totals["correct"] / max(totals["queries"], 1.0),
            "fewshot/skipped_episodes": totals["skipped_episodes"],
            "fewshot/short_classes": totals["short_classes"],
            "round/seconds_repr": t1 - t0, "round/seconds_fewshot": t3 - t2,
            "round/seconds": t3 - t0})
        times["repr"] += t1 - t0
        times["handoff"] += t2 - t1
        times["fewshot"] += t3 - t2
        if not all(np.isfinite(v) for v in record.values()):
            raise FloatingPointError(f"round {r + 1}: non-finite training metrics {record}")
        writer.write(r + 1, record)
        progress.update(r + 1, repr_loss=record.get("repr/loss", 0.0),
                        fewshot_loss=record["fewshot/loss"])
        if federated and (checkpointer.should_save(r + 1) or r + 1 == fed.rounds):
            checkpointer.save(r + 1, state)
    train_seconds = time.perf_counter() - t_start

    if federated:
        rep_final = fl.mesh.to_host(state["rep"].variables)
        few_final = fl.mesh.to_host(state["few"].variables)
    else:
        rep_final, few_final = rep_learner.variables(), few_learner.variables()
    t_eval = time.perf_counter()
    result = evaluate_fewshot(few_final["params"], few_model, held, num_classes=num_classes,
                              config=config, seed=config.seed)
    cm = result.pop("confusion_matrix")
    tag = f"{fa.mode}, encoder {'SimCLR' if use_simclr else 'random'}"
    plots.save_confusion_matrix(
        cm, dataset.class_names, workdir / "confusion_matrix.png",
        title=f"FedAffect ({tag}) {dataset.name}: {fa.shots}-shot acc {result['accuracy']:.3f}")
    # t-SNE of the representation encoder's features of held-out images, coloured by class.
    images = np.concatenate([h[0] for h in held])
    labels = np.concatenate([h[1] for h in held])
    pick = np.random.default_rng(config.seed).permutation(len(images))[:fa.plot_points]
    emb = np.concatenate([np.asarray(_rep_embed(
        rep_final["params"], images[pick[i:i + config.eval_batch_size]], model=rep_model,
        image_size=config.data.image_size, channels=config.data.channels))
        for i in range(0, len(pick), config.eval_batch_size)])
    save_embedding_plot(tsne_2d(emb, seed=config.seed), labels[pick], dataset.class_names,
                        workdir / "embedding_tsne.png",
                        title=f"t-SNE of encoder features, held-out {dataset.name} ({tag})")
    eval_seconds = time.perf_counter() - t_eval
    report = metrics_lib.classification_report(cm, dataset.class_names)
    results = {"fewshot": result, "report": report, "confusion_matrix": cm.tolist(),
               "class_names": list(dataset.class_names), "mode": fa.mode,
               "representation": fa.representation, "rounds": fed.rounds,
               "clients": summary | {"labeled_sizes": None, "unlabeled_sizes": None},
               "seconds": {"train": train_seconds, "eval": eval_seconds,
                           **{f"train_{k}": v for k, v in times.items()}}}
    results["clients"] = {k: v for k, v in results["clients"].items() if v is not None}
    writer.write(fed.rounds, {"eval/accuracy": result["accuracy"], "eval/ci95": result["ci95"],
                              "eval/nearest_class_accuracy": result["nearest_class_accuracy"]})
    writer.write_json("eval.json", results)
    line = (f"FedAffect ({tag}) on {dataset.name}: {fa.shots}-shot accuracy on "
            f"{result['clients']} unseen clients ({result['protocol']} episodes) = "
            f"{result['accuracy']:.3f} +- "
            f"{result['ci95']:.3f} (95% interval, {result['episodes']} episodes); chance level "
            f"{result['chance']:.3f}; nearest-class-feature probe "
            f"{result['nearest_class_accuracy']:.3f}. Figures in {workdir}/eval.json, "
            "confusion_matrix.png, embedding_tsne.png")
    logging.info("%s", line)
    print(line, flush=True)
    checkpointer.close()
    writer.close()
    return results
