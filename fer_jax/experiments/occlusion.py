"""Occlusion-robust FER by adversarial learning (configs/occlusion.py; docs/papers.md).

The method is `steps.occlusion.OcclusionClient`: on each batch the D step, then the F+R step
(occluders drawn from the step key). `mode=centralized` runs it on the pooled training set with
the paper's Adam and periodic cosine schedule (fer_jax.train.loops); `mode=federated` runs it
inside the engine's clients, and the server averages F, R and D.

Reports (workdir): metrics.jsonl / TensorBoard; eval.json with the test accuracy under every
evaluation mode (clean, synthetic occluders, R8, R16, R24, eyes, mouth), the mask IoU of phi
against the true occluder, and the clean classification report; confusion_matrix.png; and
occlusion_masks.png, the paper's Figure 2: occluded inputs, true masks, learned masks.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fer_jax.data import occluders
from fer_jax.data.augment import AugmentConfig
from fer_jax.evaluation import occlusion as occlusion_eval
from fer_jax.evaluation import plots
from fer_jax.federated import config as fed_config
from fer_jax.io import init as init_lib
from fer_jax.models.occlusion import FeatureDiscriminator, occlusion_net
from fer_jax.steps import occlusion as steps
from fer_jax.train import Run, checks, loops

BACKBONES = ("resnet18", "resnet50")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("periodic_cosine", "constant")
LANDMARKS = ("canonical", "mtcnn")


def validate_config(config) -> None:
    """Raises ValueError naming the first bad field; called by main before any work."""
    check = checks.checker(config)
    checks.data_model(config, check, model_names=BACKBONES)
    checks.init_block(config, check)
    occ = config.occlusion
    check(0 <= occ.rate <= 1, "occlusion.rate", "a fraction in [0, 1]")
    check(occ.lambda_noisy >= 0, "occlusion.lambda_noisy", ">= 0")
    check(occ.lambda_adv >= 0, "occlusion.lambda_adv", ">= 0")
    modes = occlusion_eval.names(occ.eval_modes)
    check(modes and set(modes) <= set(occluders.EVAL_MODES), "occlusion.eval_modes",
          f"comma-separated names from {occluders.EVAL_MODES}")
    check(occ.landmarks in LANDMARKS, "occlusion.landmarks", f"one of {LANDMARKS}")
    try:
        occlusion_eval.occluder_config(config).size_range(config.data.image_size)
    except ValueError as e:
        raise ValueError(f"config.occlusion (shapes/textures/min_frac/max_frac) or "
                         f"config.data.image_size: {e}") from e
    check(config.mode in checks.MODES, "mode", f"one of {checks.MODES}")
    if config.mode == "federated":
        checks.mode(config, check)
        return
    train = config.train  # The paper's Adam with a periodic cosine: not the shared block.
    check(train.batch_size >= 1, "train.batch_size", "a positive batch size")
    check(train.num_epochs > 0 or train.num_steps > 0, "train.num_epochs",
          "> 0 (or train.num_steps > 0)")
    check(train.learning_rate > 0, "train.learning_rate", "a positive learning rate")
    check(0 <= train.min_learning_rate <= train.learning_rate, "train.min_learning_rate",
          "in [0, train.learning_rate]")
    check(train.optimizer in OPTIMIZERS, "train.optimizer", f"one of {OPTIMIZERS}")
    check(train.schedule in SCHEDULES, "train.schedule", f"one of {SCHEDULES}")
    check(train.period_epochs > 0, "train.period_epochs", "> 0")
    check(config.checkpoint_every_steps >= 1, "checkpoint_every_steps", ">= 1")
    check(config.log_every_steps >= 1, "log_every_steps", ">= 1")


def periodic_cosine(lr_min: float, lr_max: float, period_steps: int):
    """The paper's cosine periodic schedule (warm restarts every period, SGDR without growth):

    lr(t) = lr_min + (lr_max - lr_min) / 2 * (1 + cos(pi * (t mod T) / T)).
    """
    period = max(int(period_steps), 1)

    def schedule(step):
        phase = jnp.mod(step, period) / period
        return lr_min + 0.5 * (lr_max - lr_min) * (1 + jnp.cos(jnp.pi * phase))

    return schedule


def make_optimizer(train, learning_rate: float, steps_per_epoch: int):
    """Adam with weight decay (paper Sec. 4.1). 'adam' adds wd * w to the gradient before Adam
    (torch.optim.Adam(weight_decay=...), what the paper's PyTorch code would use); 'adamw'
    decouples it."""
    if train.schedule == "periodic_cosine":
        lr = periodic_cosine(min(train.min_learning_rate, learning_rate), learning_rate,
                             round(train.period_epochs * steps_per_epoch))
    else:
        lr = learning_rate
    if train.optimizer == "adamw":
        return optax.adamw(lr, weight_decay=train.weight_decay)
    return optax.chain(optax.add_decayed_weights(train.weight_decay), optax.adam(lr))


def build_models(config, num_classes: int):
    net = occlusion_net(config.model.name, num_classes, attention=config.occlusion.attention,
                        attention_hidden=config.model.attention_hidden,
                        attention_convs=config.model.attention_convs, **config.model.kwargs)
    return net, FeatureDiscriminator(config.model.disc_hidden)


def settings_for(config, batch_size: int, augment: bool = True) -> steps.OcclusionSettings:
    occ = config.occlusion
    return steps.OcclusionSettings(
        image_size=config.data.image_size, channels=config.data.channels,
        attention=occ.attention, adversarial=occ.adversarial, lambda_noisy=occ.lambda_noisy,
        lambda_adv=occ.lambda_adv, rate=occ.rate,
        prior=steps.empirical_prior(occ.rate, batch_size),
        augment=AugmentConfig(**config.augment) if augment else None,
        occluder=occlusion_eval.occluder_config(config))


def variant_name(config) -> str:
    occ = config.occlusion
    return "M_Res" + ("Att" if occ.attention else "") + ("Adv" if occ.adversarial else "")


def init_variables(config, net, disc):
    """{'params': {'net': F and R, 'disc': D}, 'batch_stats'}: D is initialised on F's pooled
    features (its input width)."""
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    x = jnp.zeros((1, *shape), jnp.float32)
    variables = net.init(jax.random.PRNGKey(config.seed), x, train=False)
    feats = net.apply(variables, x, train=False)["embedding"]
    d_params = disc.init(jax.random.PRNGKey(config.seed + 7), feats)["params"]
    return {"params": {"net": variables["params"], "disc": d_params},
            **({"batch_stats": variables["batch_stats"]} if "batch_stats" in variables else {})}


def client(config, net, disc, tx, d_tx, batch_size: int) -> steps.OcclusionClient:
    """The method: the D step then the F+R step on each batch (occluders from the step key)."""
    return steps.OcclusionClient(net, disc, tx, d_tx, settings_for(config, batch_size))


def run(config, workdir: str) -> dict:
    centralized = config.mode == "centralized"
    run = Run(config, workdir)
    t_start = time.perf_counter()
    dataset, train, test, val = run.load_data()
    name = variant_name(config)
    net, disc = build_models(config, dataset.num_classes)
    size, channels = config.data.image_size, config.data.channels
    clean = jax.jit(lambda v, x: steps.predict(
        v["params"]["net"], v.get("batch_stats", {}),
        steps.preprocess(x, image_size=size, channels=channels), net=net)[0])

    # Periodic evaluations read the validation split when the data has one (val/*); the test
    # split is evaluated once, at the end (eval/*).
    periodic, tag = (val, "val") if val is not None else (test, "eval")

    def evaluate(variables, step):
        logits = loops.predict_batches(functools.partial(clean, variables), periodic.images,
                                       config.eval_batch_size)
        run.writer.write(step, {f"{tag}/clean_accuracy": float(np.mean(logits.argmax(-1)
                                                                       == periodic.labels))})

    variables = init_lib.from_config(config, init_variables(config, net, disc),
                                     writer=run.writer)  # config.init
    if centralized:
        order = loops.PooledOrder(len(train), config.train.batch_size, config.seed)
        total = config.train.num_steps or int(config.train.num_epochs * order.steps_per_epoch)
        tx = make_optimizer(config.train, config.train.learning_rate, order.steps_per_epoch)
        d_tx = make_optimizer(config.train, config.train.d_learning_rate
                              or config.train.learning_rate, order.steps_per_epoch)
        variables = loops.centralized(
            run, client(config, net, disc, tx, d_tx, config.train.batch_size), variables,
            {"image": train.images, "label": train.labels.astype(np.int32)},
            batch_size=config.train.batch_size, total_steps=total, seed=config.seed,
            log_every=config.log_every_steps,
            eval_every=config.eval_every_steps or order.steps_per_epoch, evaluate=evaluate)
        done = total
    else:
        fed = config.fed
        population, summary = run.population(train, dataset.num_classes)
        opt = fed_config.client_optimizer(fed)
        engine = fed_config.build_engine(fed, client(config, net, disc, opt, opt, fed.batch_size),
                                         max_client_size=summary["sizes"]["max"])
        state = loops.federated(
            run, engine, population, variables, num_rounds=fed.rounds,
            cohort_size=fed.cohort_size, seed=config.seed, eval_every=config.eval_every_rounds,
            evaluate=lambda s, r: evaluate(loops.server_variables(s), r))
        variables, done = loops.server_variables(state), fed.rounds
    train_seconds = time.perf_counter() - t_start

    params, batch_stats = variables["params"]["net"], variables.get("batch_stats", {})
    results, reports = occlusion_eval.evaluate_modes(
        config, params, batch_stats, net, test, dataset.num_classes, dataset.class_names,
        occlusion_eval.region_centres(config, test))
    run.writer.write(done, {f"eval/{m}_accuracy": a for m, a in results["accuracy"].items()})
    if "clean" in reports:
        cm, report = reports["clean"]
        plots.save_confusion_matrix(cm, dataset.class_names, run.workdir / "confusion_matrix.png",
                                    title=f"{name} on {dataset.name}: clean acc "
                                          f"{report['accuracy']:.3f}")
        results["test"], results["confusion_matrix"] = report, cm.tolist()
    occlusion_eval.save_mask_figure(
        config, params, batch_stats, net, test, run.workdir / "occlusion_masks.png",
                     f"{name} on {dataset.name}: synthetic occluders, true and learned masks")
    results.update(variant=name, dataset=dataset.name, class_names=list(dataset.class_names),
                   steps=done, seed=config.seed, train_seconds=train_seconds,
                   wall_seconds=time.perf_counter() - t_start)
    accuracy = results["accuracy"]
    headline = "clean" if "clean" in accuracy else next(iter(accuracy))
    others = ", ".join(f"{m} {a:.3f}" for m, a in accuracy.items() if m != headline)
    return run.finish(results, metric=f"{name} {headline} accuracy", value=accuracy[headline],
                      chance=1 / dataset.num_classes,
                      detail=f"; {others}" if others else "")
