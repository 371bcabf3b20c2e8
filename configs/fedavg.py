r"""Supervised FedAvg (and FedAvgM / FedAdam / FedYogi / FedProx) on simulated clients.

Embedded synthetic faces, one client per subject (about a minute):
  python -m fer_jax.main --config=configs/fedavg.py:runlocal --workdir=/tmp/fedavg
FER-2013 in 100 Dirichlet(0.5) clients, 10 per round:
  python -m fer_jax.main --config=configs/fedavg.py:data=fer2013,partition=dirichlet \
      --workdir=/tmp/fedavg_fer
CK+48, one client per subject:
  python -m fer_jax.main --config=configs/fedavg.py:data=ckplus48 --workdir=/tmp/fedavg_ck

Arguments: runlocal, data=synthetic|fer2013|ferplus|ckplus48, partition=subject|iid|dirichlet,
model=small_cnn|resnet18|..., mode=federated|centralized (centralized = the same model, data and
augmentation trained on the pooled set with the `train` block: the federated run's twin).
Backend knobs (WORKSPACE.md#engine-knobs): fed.layout (auto, the default: the engine picks
clients per call, vmap width, unrolling and steps per call at the first round and logs the
choice; fixed: fed.clients_per_call, fed.vmap_width, fed.unroll as set), fed.tail_multiple (the
last batch of an epoch as its own smaller step: less padding, a few more compiled shapes),
fed.steps_per_call (> 0: local steps in calls of at most this many, client states carried on
device).
On a CPU-only machine add `--cpu_devices=<cores>` (a flag of fer_jax.main): one JAX device per
core on the 'clients' mesh axis, clients_per_call rounded up to the device count; 1.08x per
100-client small-CNN round on 2 cores with the automatic layout (docs/performance.md#cpu-devices).
"""

import ml_collections

from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, runlocal=False, data="synthetic", partition="",
                           model="small_cnn", mode="federated")
    config = ml_collections.ConfigDict()
    config.experiment = "supervised"
    config.mode = arg.mode
    config.seed = 0
    config.data = common.data_config(arg.data, runlocal=arg.runlocal)
    config.data.val_split = ""
    if arg.model != "small_cnn":
        config.data.image_size, config.data.channels = 96, 3

    config.model = ml_collections.ConfigDict()
    config.model.name = arg.model
    # BatchNorm statistics would mix padded examples of partial client batches; FL uses no norm.
    config.model.kwargs = ml_collections.ConfigDict(
        {"norm": "none", "dropout": 0.3, "widths": (32, 64, 128)} if arg.model == "small_cnn"
        else {})
    # The server's initial model from a run's checkpoint (path '' = random); WORKSPACE.md#init
    config.init = common.init_config()

    config.fed = common.fed_config(arg.data)
    if arg.partition:
        config.fed.partition = arg.partition
    config.train = common.train_config(batch_size=16, num_epochs=10, class_weights="none")

    config.augment = ml_collections.ConfigDict(dict(
        flip=0.5, rotate_deg=10.0, scale=0.1, translate=0.1, brightness=0.2, contrast=0.2))
    config.eval_every_rounds = 10
    config.eval_batch_size = 256
    config.checkpoint_every_rounds = 10
    config.log_every_steps = 50
    config.eval_every_steps = 0  # 0 = once per epoch.
    config.checkpoint_every_steps = 500

    if arg.runlocal:
        config.fed.rounds = 30
        config.fed.cohort_size = 6
        config.train.num_epochs = 3
        config.log_every_steps = 10
        config.checkpoint_every_steps = 20
        config.model.kwargs.widths = (16, 32, 64)
    return config


def get_sweep(arg=None):
    """Server optimizers x cohort sizes."""
    del arg
    return [{"name": f"{opt}_cohort{c}", "fed.server_optimizer": opt, "fed.cohort_size": c}
            for opt in ("fedavg", "fedavgm", "fedadam") for c in (10, 50)]
