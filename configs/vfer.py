r"""VFER personalization with head-only FedAvg (Salman & Busso, ICMI 2022; docs/papers.md#vfer).

Embedded synthetic sequences, subject-disjoint (a few minutes on 2 CPU cores):
  python -m fer_jax.main --config=configs/vfer.py:runlocal --workdir=/tmp/vfer
Real CK+ videos (../shared/data/ckplus_videos, 10 subjects): IFER g on FER-2013 (its 6 classes
shared with the videos), VFER v on 6 subjects, dev 1, personalize and test on the other 3:
  python -m fer_jax.main --config=configs/vfer.py:data=ckplus --workdir=/tmp/vfer_ck
Arguments: runlocal (small sizes), data=synthetic|ckplus, mode=federated|centralized
(centralized: v fine-tuned once on every test subject's pseudo-labelled clips pooled, the same
client method as one client), weights=PATH (MobileNetV2 weights
converted by fer_jax.models.convert: .npz from Keras .h5 / torchvision state_dict; without it f
is randomly initialised, since no ImageNet weights can be downloaded here). The general form is
--config.init.path: another run's checkpoint (e.g. a supervised mobilenetv2, with
--config.init.skip=head) or any converted weights (WORKSPACE.md#init).
Outputs in the workdir: eval.json (before/after tables, per subject, central before/after each
FedAvg round, parameter counts, bytes per client, pseudo-label accuracy and coverage vs
p_threshold), figure3_subject_micro_f1.png, pseudo_labels.png, learning_curve.png (IFER epochs,
VFER epochs, rounds), metrics.jsonl.
"""

import ml_collections

from configs import common

_DATA_ROOT = "../shared/data"


def get_config(arg=None):
    arg = common.parse_arg(arg, runlocal=False, data="synthetic", weights="", mode="federated")
    config = ml_collections.ConfigDict()
    config.experiment = "vfer"
    config.mode = arg.mode
    config.seed = 0

    data = config.data = ml_collections.ConfigDict()
    data.name = arg.data  # synthetic | ckplus
    data.video_dir = f"{_DATA_ROOT}/ckplus_videos"
    data.fer2013_csv = f"{_DATA_ROOT}/fer2013/fer2013.csv.gz"
    data.cache_dir = ""  # '' = <workdir>/cache; frames and features of real videos live here.
    data.image_size = 224  # Paper: faces resized to 224x224x3.
    data.max_frames = 32  # Longer videos are sampled at evenly spaced frames (first and last kept).
    data.sampling = "uniform"  # uniform | last
    data.detect_every = 1  # MTCNN on every k-th frame; frames in between reuse the detection.
    data.min_face_size = 40.0
    data.skip_unreadable = False  # True: unreadable videos are skipped and counted, not fatal.
    data.test_subjects = 3  # personalized and tested; never seen in training
    data.dev_subjects = 1  # VFER's reduce-on-plateau dev set
    # Synthetic corpus (the embedded default).
    data.num_subjects = 24
    data.clips_per_class = 3
    data.min_frames = 6
    data.ifer_subjects = 40  # distinct synthetic identities for IFER's still images
    data.ifer_images_per_class = 20
    # FER-2013 for IFER (data=ckplus): at most this many Training / PublicTest images (0 = all).
    data.ifer_max_train = 0
    data.ifer_max_dev = 0

    model = config.model = ml_collections.ConfigDict()
    model.width = 1.0
    model.weights = arg.weights  # converted MobileNetV2 .npz ('' = random init)
    model.feature_batch = 64
    # Random f only: frames of training subjects whose BatchNorm statistics f adopts.
    model.calibration_frames = 256
    model.g_hidden = (512,)
    model.norm = "batch"  # batch (the paper's parameter counts) | none
    # f (MobileNetV2, no head) from a run's checkpoint or converted weights (the general
    # form of model.weights; use one of the two); path '' = random init (WORKSPACE.md#init).
    config.init = common.init_config()

    ifer = config.ifer = ml_collections.ConfigDict()
    ifer.epochs = 60
    ifer.batch_size = 64
    ifer.learning_rate = 1e-3
    ifer.class_weights = "balanced"  # balanced | none

    vfer = config.vfer = ml_collections.ConfigDict()
    vfer.epochs = 20
    vfer.batch_size = 16
    vfer.learning_rate = 1e-3
    vfer.plateau_patience = 2  # epochs without dev-loss improvement before LR x0.5

    pers = config.personalize = ml_collections.ConfigDict()
    pers.max_per_class = 50  # P (MSP-IMPROV value; CK+ subjects have <= 5 videos)
    pers.threshold = 0.5  # p_threshold
    pers.learning_rate = 1e-3
    pers.epochs = 2
    pers.batch_size = 32
    # FedAvg moves the central v only in a round where at least this many subjects adapted
    # (1 = the paper: any); fewer, and each still keeps its own adapted head.
    pers.min_subjects = 1

    # Head-only FedAvg of v: the engine's server and layout knobs (batch size, epochs and the
    # client's Adam are `personalize`'s). Subjects are few and v is small: a wide rolled vmap.
    fed = config.fed = common.fed_config(
        keep=("rounds", "server_optimizer", "server_learning_rate", "clients_per_call",
              "vmap_width", "unroll", "steps_per_call", "num_devices", "layout"))
    fed.rounds = 2
    fed.layout = "fixed"
    fed.clients_per_call = 8
    fed.vmap_width = 8
    fed.unroll = False

    config.checkpoint_every_rounds = 1

    if arg.data == "synthetic":
        data.image_size = 64
        data.max_frames = 16
        data.test_subjects = 8
        data.dev_subjects = 2
        model.width = 0.35
    if arg.data == "ckplus":
        data.ifer_max_train = 6000
        data.ifer_max_dev = 1000
        data.image_size = 96
        data.max_frames = 16
        data.detect_every = 4
    if arg.runlocal:
        data.num_subjects = 12
        data.clips_per_class = 2
        data.test_subjects = 4
        data.dev_subjects = 1
        data.ifer_subjects = 16
        data.ifer_images_per_class = 8
        data.image_size = 48
        data.max_frames = 10
        data.ifer_max_train = min(data.ifer_max_train, 1500) or 1500
        data.ifer_max_dev = min(data.ifer_max_dev, 300) or 300
        model.width = 0.35
        ifer.epochs = 8
        vfer.epochs = 8
    return config
