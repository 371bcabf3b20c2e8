r"""Supervised FedAvg (and FedAvgM / FedAdam / FedYogi / FedProx) on simulated clients.

Embedded synthetic faces, one client per subject (about a minute):
  python -m fer_jax.main --config=configs/fedavg.py:runlocal --workdir=/tmp/fedavg
FER-2013 in 100 Dirichlet(0.5) clients, 10 per round:
  python -m fer_jax.main --config=configs/fedavg.py:data=fer2013,partition=dirichlet \
      --workdir=/tmp/fedavg_fer
CK+48, one client per subject:
  python -m fer_jax.main --config=configs/fedavg.py:data=ckplus48 --workdir=/tmp/fedavg_ck

Arguments: runlocal, data=synthetic|fer2013|ferplus|ckplus48, partition=subject|iid|dirichlet,
model=small_cnn|resnet18|...
Backend knobs (see WORKSPACE.md, "Federated engine"): fed.clients_per_call (clients per jitted
chunk), fed.vmap_width (clients computed together by vmap; 1 on CPU, wide on GPU/TPU),
fed.unroll (unroll local-step scans; needed for convolutions on XLA:CPU), fed.tail_multiple (the
last batch of an epoch as its own smaller step: less padding, a few more compiled shapes),
fed.steps_per_call (> 0: local steps in calls of at most this many, client states carried on
device; bounds the unrolled program for clients with many steps).
On a CPU-only machine add `--cpu_devices=<cores>` (a flag of fer_jax.main): one JAX device per
core on the 'clients' mesh axis, clients_per_call rounded up to the device count; 1.28-1.36x
per 100-client small-CNN round on 2 cores (WORKSPACE.md, section 9).
"""

import ml_collections

from configs import common
from configs.supervised import data_config


def get_config(arg=None):
    arg = common.parse_arg(arg, runlocal=False, data="synthetic", partition="",
                           model="small_cnn")
    config = ml_collections.ConfigDict()
    config.experiment = "fedavg"
    config.seed = 0
    config.data = data_config(arg.data, runlocal=arg.runlocal)
    config.data.val_split = ""
    if arg.model != "small_cnn":
        config.data.image_size, config.data.channels = 96, 3

    config.model = ml_collections.ConfigDict()
    config.model.name = arg.model
    # BatchNorm statistics would mix padded examples of partial client batches; FL uses no norm.
    config.model.kwargs = ml_collections.ConfigDict(
        {"norm": "none", "dropout": 0.3} if arg.model == "small_cnn" else {})

    fed = config.fed = ml_collections.ConfigDict()
    fed.partition = arg.partition or ("subject" if arg.data in ("synthetic", "ckplus48")
                                      else "dirichlet")
    fed.num_clients = 100  # iid / dirichlet only; 'subject' gives one client per subject.
    fed.dirichlet_alpha = 0.5
    fed.rounds = 100
    fed.cohort_size = 10
    fed.server_optimizer = "fedavg"  # fedavg | fedavgm | fedadam | fedyogi
    fed.server_learning_rate = 0.0  # 0 = the optimizer's default (1.0 for fedavg/fedavgm).
    fed.client_optimizer = "sgd"  # sgd | adam
    fed.client_learning_rate = 0.05
    fed.client_momentum = 0.0
    fed.local_epochs = 1
    fed.batch_size = 16
    fed.weighting = "num_examples"  # num_examples | uniform
    fed.prox_mu = 0.0  # > 0: FedProx
    fed.clients_per_call = 1
    # Each epoch's last batch gets its own step of ceil(rows / 4) * 4 rows instead of a padded
    # full batch (0 = pad to batch_size). Same training, less padded compute; more compiled shapes.
    fed.tail_multiple = 4
    fed.vmap_width = 1
    fed.unroll = True
    fed.steps_per_call = 0  # > 0: a client's local steps in calls of at most this many

    config.augment = ml_collections.ConfigDict(dict(
        flip=0.5, rotate_deg=10.0, scale=0.1, translate=0.1, brightness=0.2, contrast=0.2))
    config.eval_every_rounds = 10
    config.eval_batch_size = 256
    config.checkpoint_every_rounds = 10

    if arg.runlocal:
        fed.rounds = 30
        fed.cohort_size = 6
        config.eval_every_rounds = 10
        config.checkpoint_every_rounds = 10
        config.model.kwargs.widths = (16, 32, 64)
    return config


def get_sweep(arg=None):
    """Server optimizers x cohort sizes."""
    del arg
    return [{"fed.server_optimizer": opt, "fed.cohort_size": c}
            for opt in ("fedavg", "fedavgm", "fedadam") for c in (10, 50)]
