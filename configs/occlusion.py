r"""Occlusion-robust FER by adversarial learning (docs/papers.md#occlusion): phi + D min-max.

Embedded synthetic faces, tiny (about a minute on 2 CPU cores):
  python -m fer_jax.main --config=configs/occlusion.py:runlocal --workdir=/tmp/occ
CK+48 (48x48 gray, subject-wise fold 0), ResNet-18 small stem, the full model M_ResAttAdv:
  python -m fer_jax.main --config=configs/occlusion.py:data=ckplus48 --workdir=/tmp/occ_ck
The four-model ablation (M_Res, M_ResAtt, M_ResAdv, M_ResAttAdv) in sequence:
  python launch/sweep.py --config=configs/occlusion.py:data=ckplus48 --workdir=/tmp/occ_abl
One ablation arm: configs/occlusion.py:data=ckplus48,variant=resatt (or
  --config.occlusion.attention=False --config.occlusion.adversarial=True).
FER-2013: configs/occlusion.py:data=fer2013. The paper's ResNet-50: model=resnet50.
Federated (the min-max steps inside the engine's clients, one client per subject):
  python -m fer_jax.main --config=configs/occlusion.py:runlocal,mode=federated --workdir=/tmp/occ_fl

Arguments: runlocal, data=synthetic|fer2013|ckplus48, model=resnet18|resnet50,
variant=res|resatt|resadv|resattadv, mode=centralized|federated.
"""

import ml_collections

from configs import common

VARIANTS = {  # name -> (attention, adversarial), the paper's Sec. 4.3 ablation.
    "res": (False, False),
    "resatt": (True, False),
    "resadv": (False, True),
    "resattadv": (True, True),
}
EVAL_MODES = ("clean", "synthetic", "R8", "R16", "R24", "eyes", "mouth")


def get_config(arg=None):
    arg = common.parse_arg(arg, runlocal=False, data="synthetic", model="resnet18",
                           variant="resattadv", mode="centralized")
    if arg.variant not in VARIANTS:
        raise ValueError(f"config argument variant={arg.variant!r}; expected one of "
                         f"{sorted(VARIANTS)}")
    if arg.model not in ("resnet18", "resnet50"):
        raise ValueError(f"config argument model={arg.model!r}; expected resnet18 or resnet50")
    config = ml_collections.ConfigDict()
    config.experiment = "occlusion"
    config.mode = arg.mode
    config.seed = 0

    config.data = common.data_config(arg.data, runlocal=arg.runlocal)
    # 48x48 gray everywhere: CK+48 and FER-2013 are stored at that size (Table 3's R8-R24 and
    # the 24x24 eye/mouth squares refer to 48-pixel crops).
    config.data.image_size, config.data.channels = 48, 1

    config.model = ml_collections.ConfigDict()
    config.model.name = arg.model  # resnet18 | resnet50 (paper), split after the first stage
    config.model.kwargs = ml_collections.ConfigDict(dict(stem="small", width=64))
    config.model.attention_hidden = 64  # phi: 3x3 convs of this width
    config.model.attention_convs = 2
    config.model.disc_hidden = 256  # D: two hidden Dense layers
    # path '' = random init. A plain ResNet run goes in with
    # dst='params/net/backbone,batch_stats/backbone' (WORKSPACE.md#init).
    config.init = common.init_config()

    occ = config.occlusion = ml_collections.ConfigDict()
    occ.attention, occ.adversarial = VARIANTS[arg.variant]
    occ.lambda_noisy = 0.1  # lambda1 (Eq. 8)
    occ.lambda_adv = 0.1  # lambda2 (Eq. 8)
    occ.rate = 0.5  # 1:1 clean / occluded mixing; P_E is the resulting empirical rate
    occ.min_frac = 1 / 3.75  # occluder box side / image side
    occ.max_frac = 0.5
    occ.shapes = "block,ellipse,hand,blob"
    occ.textures = "solid,noise,stripes,patch"
    occ.eval_modes = ",".join(EVAL_MODES)
    occ.eval_seed = 1234  # the same occlusions for every model of an ablation
    occ.landmarks = "canonical"  # canonical | mtcnn: where 'eyes' / 'mouth' squares go
    occ.figure_examples = 8  # columns of the Figure-2 PNG

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 64  # paper: 128
    config.train.num_epochs = 30
    config.train.num_steps = 0  # > 0 overrides num_epochs
    config.train.optimizer = "adam"  # adam (+ L2 weight decay, as torch Adam) | adamw
    config.train.learning_rate = 1e-3  # lr_max of the periodic cosine
    config.train.min_learning_rate = 1e-5  # lr_min
    config.train.schedule = "periodic_cosine"  # periodic_cosine | constant
    config.train.period_epochs = 30.0  # paper: lr_epochs = 30
    config.train.weight_decay = 1e-4
    config.train.d_learning_rate = 0.0  # 0 = train.learning_rate (D's own Adam)

    config.augment = ml_collections.ConfigDict(dict(
        flip=0.5, rotate_deg=10.0, scale=0.1, translate=0.1, brightness=0.2, contrast=0.2))

    config.log_every_steps = 50
    config.eval_every_steps = 0  # 0 = once per epoch (clean accuracy only)
    config.checkpoint_every_steps = 500
    config.eval_batch_size = 128

    # mode=federated: the D step and the F+R step run inside the engine's clients (Adam for
    # F/R and for D); F, R and D are averaged by the server.
    config.fed = common.fed_config(arg.data, client_optimizer="adam", client_learning_rate=1e-3,
                                   tail_multiple=0)
    config.eval_every_rounds = 10
    config.checkpoint_every_rounds = 10

    if arg.runlocal:
        config.model.kwargs.width = 8
        config.model.attention_hidden = 16
        config.model.disc_hidden = 32
        config.data.image_size = 32
        config.train.batch_size = 16
        config.train.num_epochs = 0
        config.train.num_steps = 12
        config.log_every_steps = 4
        config.checkpoint_every_steps = 6
        config.eval_batch_size = 64
        config.occlusion.figure_examples = 4
        if arg.mode == "federated":
            config.fed.rounds = 3
            config.fed.cohort_size = 2
            config.fed.batch_size = 8
            config.eval_every_rounds = 0
            config.checkpoint_every_rounds = 2
    return config


def get_sweep(arg=None):
    """The four-model ablation of the paper (Sec. 4.3), one arm per run."""
    del arg
    return [{"name": name, "occlusion.attention": att, "occlusion.adversarial": adv}
            for name, (att, adv) in VARIANTS.items()]
