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
from fer_jax.io import init as init_lib
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
    checks.init_block(config, check)
    try:
        model = build_model(config, 8)  # Dataclass checks only: nothing is traced.
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.model.kwargs={config.model.kwargs.to_dict()!r}: {e}") from e
    if config.model.name == "esr" and model.padding == "valid":
        check(config.data.image_size >= 54, "data.image_size",
              ">= 54 for ESR's unpadded layout (or model.kwargs.padding='same')")
    federated = config.mode == "federated"
    div = config.diversity
    check(div.bandwidth in steps.BANDWIDTHS, "diversity.bandwidth", f"one of {steps.BANDWIDTHS}")
    check(div.gamma >= 0, "diversity.gamma", ">= 0")
    check(div.warn_saturated_steps >= 0, "diversity.warn_saturated_steps", ">= 0 (0 = never)")
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
        if config.esr.restart_schedule and not federated:
            check(config.esr.progressive, "esr.restart_schedule",
                  "False unless esr.progressive (the schedule restarts at each stage)")
        if model.num_branches == 1:
            warnings.warn("ESR with num_branches=1: there is no diversity term (det of a 1x1 "
                          "similarity matrix is the constant 1), so diversity.* has no effect; "
                          "training plain cross entropy", stacklevel=2)
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


def stage_schedule(schedule, total_steps: int, num_stages: int):
    """`schedule` restarted at the first step of every progressive stage (see active_branches).

    Stage b (0-based) starts at ceil(b T / B); the returned function takes the optimizer's
    global step count and gives schedule(count - start of its stage).
    """

    def lr(count):
        stage = jnp.minimum(count * num_stages // max(total_steps, 1), num_stages - 1)
        start = (stage * total_steps + num_stages - 1) // num_stages
        return schedule(count - start)

    return lr


class SaturationWatch:
    """Stands in for `run.writer`: writes every line, and warns when a diversity term is dead.

    Each training log line holds, per term t, the window means `train/s_lo_t` and `train/s_hi_t`
    (fractions of S's off-diagonal entries below 0.01 / above 0.99). When their sum is >=
    `threshold` on consecutive log lines spanning >= `patience` steps (rounds in federated runs),
    one absl warning names the term, the end it is stuck at and the gradient norm; the streak
    restarts when the term recovers. `warnings` keeps the messages (eval.json's
    `saturation_warnings`).
    """

    def __init__(self, writer, patience: int, threshold: float = 0.95):
        self._writer, self.patience, self.threshold = writer, patience, threshold
        self._start: dict[str, int] = {}  # term -> the step its saturated streak began after
        self._last = 0  # step of the previous training log line
        self.warnings: list[str] = []

    def __getattr__(self, name):
        return getattr(self._writer, name)

    def write(self, step: int, metrics: dict) -> None:
        self.observe(step, metrics)
        self._writer.write(step, metrics)

    def observe(self, step: int, metrics: dict) -> None:
        prefix = "train/s_lo_"
        terms = [k[len(prefix):] for k in metrics if k.startswith(prefix)]
        for t in terms:
            lo, hi = metrics[prefix + t], metrics.get(f"train/s_hi_{t}", 0.0)
            if lo + hi < self.threshold:
                self._start.pop(t, None)
                continue
            start = self._start.setdefault(t, self._last)
            if start is not None and step - start >= self.patience:
                self._start[t] = None  # Warned: quiet until the term recovers.
                end = ("< 0.01 (S ~ I, det(S) ~ 1: learners far apart for this gamma; "
                       "diversity.bandwidth='median' or a smaller gamma)" if lo >= hi else
                       "> 0.99 (S ~ all ones, det(S) ~ 0: learners coincide for this gamma; "
                       "diversity.bandwidth='median' or a larger gamma)")
                message = (f"diversity term d_{t} saturated for steps {start}-{step}: "
                           f"{100 * max(lo, hi):.0f}% of off-diagonal S entries {end}; "
                           f"d_{t} = {metrics.get(f'train/d_{t}', float('nan')):.4f}, gradient "
                           f"norm {metrics.get('train/div_grad_norm', float('nan')):.3g}")
                logging.warning("%s", message)
                self.warnings.append(message)
        if terms:
            self._last = step


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
    watch = None
    if config.diversity.warn_saturated_steps:
        run.writer = watch = SaturationWatch(run.writer, config.diversity.warn_saturated_steps)
    dataset, train, test, val = run.load_data()
    model = build_model(config, dataset.num_classes)
    is_esr = isinstance(model, ESR)
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    variables = jax.jit(functools.partial(model.init, train=False))(
        jax.random.PRNGKey(config.seed), np.zeros((1, *shape), np.float32))
    variables = init_lib.from_config(config, variables, writer=run.writer)  # config.init

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
        progressive = is_esr and config.esr.progressive
        if progressive and config.esr.restart_schedule:
            # Each stage runs the schedule from its start, as a fresh optimizer per branch does
            # in the ESR code (StepLR created again for every branch).
            num_stages = model.num_branches
            lr = stage_schedule(
                optim.schedule(config.train, -(-total // num_stages), order.steps_per_epoch),
                total, num_stages)
            tx = optim.make_optimizer(config.train, total, order.steps_per_epoch,
                                      learning_rate=lr)
        else:
            tx = optim.make_optimizer(config.train, total, order.steps_per_epoch)

        def stage(step):
            return active_branches(step, total, model.num_branches if is_esr else 1, progressive)

        @functools.cache
        def stage_client(b):
            if not progressive:
                return client(config, model, tx, num_active=b if is_esr else None)
            # The base trains at full rate with the first branch (stage 1), then at
            # esr.base_lr_scale (the ESR code: 0.1, then 0.02 once a second branch exists).
            return client(config, model, tx, num_active=b, scales=steps.group_scales(
                model.num_branches, b, base=config.esr.base_lr_scale if b > 1 else 1.0,
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
            evaluate=lambda s, r: evaluate(loops.server_variables(s), r, *periodic,
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
    if watch is not None:
        results["saturation_warnings"] = watch.warnings
    branches = {k: v for k, v in results["test"].items() if k.endswith("accuracy")}
    logging.info("%s accuracies %s", config.data.eval_split, branches)
    return run.finish(results, metric=f"{config.data.eval_split} accuracy",
                      value=results["test"]["accuracy"], chance=1 / dataset.num_classes,
                      detail=f", macro F1 {results['test']['macro']['f1']:.4f} on {len(test)} "
                             f"images")
