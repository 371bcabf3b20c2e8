r"""Diversified ESR-B (Heidari & Iosifidis Eq. (4); Siqueira et al. 2020) with CBAM, centralized
or federated.

Embedded synthetic faces, tiny ESR-3, 32x32, all branches trained together (about a minute on
2 CPU cores):
  python -m fer_jax.main --config=configs/esr.py:runlocal --workdir=/tmp/esr
FER+ (majority labels from fer2013new.csv, 8 classes), ESR-9 at the paper's 96x96x3 layout:
  python -m fer_jax.main --config=configs/esr.py:data=ferplus --workdir=/tmp/esr_ferplus
FER-2013 (7 classes), ESR-15 on 48x48 gray ('same' padding):
  python -m fer_jax.main --config=configs/esr.py:data=fer2013,branches=15,size=48 --workdir=/tmp/e
Federated (the engine; clients = subjects for synthetic/CK+, Dirichlet splits for FER):
  python -m fer_jax.main --config=configs/esr.py:runlocal,mode=federated --workdir=/tmp/esr_fl
Ablation arms (docs/results.md#esr-ablation): --config.model.kwargs.cbam=False, or
  --config.diversity.spatial_weight=0 / --config.diversity.channel_weight=0.

Arguments: runlocal, data=synthetic|fer2013|ferplus|ckplus48, mode=centralized|federated,
branches=B, size=48|96 (0 = 96 for FER data as in the paper, 48 for synthetic),
width=channel multiplier, recipe=adamw|paper (the authors' SGD + momentum 0.9 and step decay).
"""

import ml_collections

from configs import common


def base_config(arg, *, model: str) -> ml_collections.ConfigDict:
    """The blocks esr.py and manet.py share: data, train, augment, diversity, fed, logging."""
    config = ml_collections.ConfigDict()
    config.experiment = "diversity"
    config.mode = arg.mode
    config.seed = 0
    config.data = common.data_config(arg.data, runlocal=arg.runlocal)

    config.model = ml_collections.ConfigDict()
    config.model.name = model
    config.init = common.init_config()  # path '' = random init; WORKSPACE.md#init

    # Eq. (1)-(5): the RBF's gamma and the term weights (all 1 in the paper; 0 switches a term
    # off for the ablation). bandwidth (docs/papers.md#diversity-gamma): median = gamma is 1 / the
    # batch's median squared distance between learners (keeps det(S) off its ends, the default);
    # fixed = `gamma` as in Eq. (1) (the authors' code: 10, which saturates det(S) at 1 for ESR's
    # attention maps); per_feature = gamma / (number of features compared). Every step logs d_*,
    # gamma_*, s_lo_* / s_hi_* (off-diagonal S entries < 0.01 / > 0.99) and div_grad_norm; a
    # term saturated for warn_saturated_steps steps logs a warning (0 = never).
    config.diversity = ml_collections.ConfigDict(dict(
        bandwidth="median", gamma=10.0, spatial_weight=1.0, channel_weight=1.0,
        warn_saturated_steps=200))

    # recipe=adamw (default): AdamW 1e-3, warm-up and cosine decay, like every fer_jax config.
    # recipe=paper: the authors' SGD recipe (PAPER_RECIPES; docs/papers.md#diversity-optimizer).
    config.train = common.train_config(
        num_epochs=40 if arg.data in ("fer2013", "ferplus") else 30)
    # Used by optimizer=sgd and schedule=step: momentum, Nesterov, lr x decay_factor every
    # decay_every_epochs epochs.
    config.train.update(momentum=0.9, nesterov=True, decay_every_epochs=10.0, decay_factor=0.75)
    if arg.recipe not in ("adamw", "paper"):
        raise ValueError(f"config argument recipe={arg.recipe!r}; expected 'adamw' or 'paper'")
    if arg.recipe == "paper":
        config.train.update(PAPER_RECIPES[model]["train"])

    config.augment = ml_collections.ConfigDict(dict(
        flip=0.5, rotate_deg=10.0, scale=0.1, translate=0.1, brightness=0.2, contrast=0.2))
    config.log_every_steps = 50
    config.eval_every_steps = 0  # 0 = once per epoch.
    config.checkpoint_every_steps = 500
    config.eval_batch_size = 256

    # mode=federated: the same model and loss trained by fer_jax.federated. BatchNorm would
    # mix padded examples of partial client batches: ESR uses GroupNorm there, MA-Net none.
    config.fed = common.fed_config(arg.data, tail_multiple=0)
    config.eval_every_rounds = 10
    config.checkpoint_every_rounds = 10

    if arg.runlocal:
        config.train.batch_size = 32
        config.train.num_epochs = 3
        config.log_every_steps = 10
        config.checkpoint_every_steps = 20
        config.fed.rounds = 6
        config.fed.cohort_size = 4
        config.eval_every_rounds = 3
        config.checkpoint_every_rounds = 3
        config.diversity.warn_saturated_steps = 20
    return config


# The papers' SGD recipes, from the authors' released training scripts (Heidari & Iosifidis
# "followed the experimental setting of ESR and MA-Net", SGD with momentum 0.9):
# ESR (Siqueira et al., main_fer_plus.py): batch 32, lr 0.1 for the newest branch and 0.02 for
# the base and older branches, StepLR x0.75 every 10 epochs restarted for every branch, no
# weight decay. MA-Net (Zhao et al., main.py): batch 128, lr 0.01, weight decay 1e-4, StepLR
# x0.1 every 15 epochs.
PAPER_RECIPES = {
    "esr": dict(
        train=dict(optimizer="sgd", learning_rate=0.1, momentum=0.9, nesterov=False,
                   weight_decay=0.0, schedule="step", decay_every_epochs=10.0,
                   decay_factor=0.75, warmup_epochs=0.0, batch_size=32),
        esr=dict(base_lr_scale=0.2, old_branch_lr_scale=0.2, restart_schedule=True)),
    "manet": dict(
        train=dict(optimizer="sgd", learning_rate=0.01, momentum=0.9, nesterov=False,
                   weight_decay=1e-4, schedule="step", decay_every_epochs=15.0,
                   decay_factor=0.1, warmup_epochs=0.0, batch_size=128)),
}


def get_config(arg=None):
    arg = common.parse_arg(arg, runlocal=False, data="synthetic", mode="centralized", branches=9,
                           size=0, width=0.0, recipe="adamw")
    federated = arg.mode == "federated"
    config = base_config(arg, model="esr")
    size = arg.size or (96 if arg.data in ("fer2013", "ferplus") else 48)
    if size not in (48, 96):
        raise ValueError(f"config argument size={size}; expected 48 or 96")
    # The paper's layout is 96x96 RGB with unpadded convs; 48x48 gray needs 'same' padding.
    config.data.image_size, config.data.channels = size, (3 if size == 96 else 1)
    width = arg.width or (0.25 if arg.runlocal else 1.0)
    config.model.kwargs = ml_collections.ConfigDict(dict(
        num_branches=3 if arg.runlocal else arg.branches, cbam=True, cbam_spatial=True,
        reduction=16, padding="valid" if size == 96 else "same", width=width,
        norm="group" if federated else "batch"))

    # Progressive training (Siqueira et al.): the base and branch 1 first, then one more branch
    # per stage; the steps are split equally over the B stages. Federated runs train all
    # branches from round 1.
    config.esr = ml_collections.ConfigDict(dict(
        progressive=not federated,
        new_branch_init="fresh",  # fresh (its own random init) | copy (of the previous branch)
        base_lr_scale=1.0,  # update multipliers per group during a stage: the newest branch
        old_branch_lr_scale=1.0,  # gets 1, earlier branches these, the base this from stage 2.
        restart_schedule=False,  # True: the learning-rate schedule restarts at every stage.
    ))
    if arg.recipe == "paper":
        config.esr.update(PAPER_RECIPES["esr"]["esr"])
    if arg.runlocal:
        # About a minute on 2 CPU cores: compiling dominates (~15 s per ESR variant on a quiet
        # machine, one per progressive stage), so the smoke run trains all 3 branches from step
        # 1 (one compile, diversity live throughout) on 32x32 inputs ('same' padding: 4x4
        # attention maps). Progressive stages are the default of every other ESR config.
        config.esr.progressive = False
        config.esr.restart_schedule = False
        if size == 48:
            config.data.image_size = 32
    return config


def get_sweep(arg=None):
    """The Table 1 ablation arms (docs/results.md#esr-ablation)."""
    del arg
    return [
        {"name": "no_attention", "model.kwargs.cbam": False, "diversity.spatial_weight": 0.0,
         "diversity.channel_weight": 0.0},
        {"name": "cbam", "diversity.spatial_weight": 0.0, "diversity.channel_weight": 0.0},
        {"name": "cbam+dsp", "diversity.channel_weight": 0.0},
        {"name": "cbam+dsp+dch"},
    ]
