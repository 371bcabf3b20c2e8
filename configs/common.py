"""Helpers shared by the config files (ml_collections only; configs never import fer_jax).

`parse_arg('runlocal,data=ckplus48', runlocal=False, data='synthetic')` turns the text after
the colon of `--config=configs/x.py:ARGS` into a ConfigDict of typed values (big_vision style):
a bare word sets a boolean to True, `k=v` sets a value converted to the default's type.
`data_config`, `train_config`, `fed_config` and `init_config` are the blocks every training
config shares; `mode` (centralized | federated) picks which of `train` / `fed` a run trains with.
"""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    result = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; expected one of {sorted(defaults)}")
        if not _:  # A bare word is a switch.
            if not isinstance(defaults[key], bool):
                raise ValueError(f"config argument {key!r} needs a value: {key}=...")
            result[key] = True
            continue
        kind = type(defaults[key])
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config argument {key}={value!r} is not a boolean")
            result[key] = value.lower() in ("true", "1")
        else:
            try:
                result[key] = kind(value)
            except ValueError as e:
                raise ValueError(f"config argument {key}={value!r} is not a {kind.__name__}") from e
    return result


MODES = ("centralized", "federated")


def data_config(name: str, *, runlocal: bool = False) -> ml_collections.ConfigDict:
    """The `data` block shared by every experiment config."""
    data = ml_collections.ConfigDict()
    data.name = name
    # Folder with the raw files (TFDS manual_dir); '' = $FER_JAX_DATA/<dataset> or
    # ../shared/data/<dataset> relative to the working directory.
    data.manual_dir = ""
    data.data_dir = ""  # Where TFDS writes prepared array_record files; '' = ~/tensorflow_datasets.
    data.image_size = 48  # Model input size; images are resized on device when they differ.
    data.channels = 1  # 1 = gray, 3 = RGB (gray sources are repeated).
    data.train_split = "train"
    data.eval_split = "test"
    data.val_split = "validation" if name in ("fer2013", "ferplus") else ""
    data.num_folds = 10  # CK+48: subject-wise k-fold.
    data.fold = 0
    data.synthetic = ml_collections.ConfigDict(dict(
        num_subjects=16 if runlocal else 80,
        images_per_class=6 if runlocal else 20,
        test_subjects=4 if runlocal else 20,
        seed=0,
    ))
    return data


def train_config(**overrides) -> ml_collections.ConfigDict:
    """The centralized `train` block (optimizer, schedule, length); `overrides` replace keys."""
    train = ml_collections.ConfigDict()
    train.batch_size = 64
    train.num_epochs = 30
    train.num_steps = 0  # > 0 overrides num_epochs.
    train.optimizer = "adamw"  # adam | adamw | sgd (momentum 0.9, nesterov)
    train.learning_rate = 1e-3
    train.weight_decay = 1e-4
    train.schedule = "cosine"  # cosine | constant
    train.warmup_epochs = 1.0
    train.update(overrides)
    return train


def fed_config(data: str = "synthetic", *, keep: tuple[str, ...] = (),
               **overrides) -> ml_collections.ConfigDict:
    """The `fed` block: partition, rounds, server and client optimizers, engine layout.

    Backend knobs (WORKSPACE.md#engine-knobs): clients_per_call (clients per jitted
    chunk, rounded up to devices x vmap_width), vmap_width (clients computed together; 1 on
    CPU, wide on GPU/TPU), unroll (unrolled local-step scans; convolutions on XLA:CPU want it),
    tail_multiple (an epoch's last batch as its own step of ceil(rows / m) * m rows; 0 = pad to
    the batch size), steps_per_call (> 0: local steps in calls of at most this many).
    keep: only these keys (a method whose other knobs live in its own blocks, e.g. FedAffect).
    """
    fed = ml_collections.ConfigDict()
    fed.partition = "subject" if data in ("synthetic", "ckplus48") else "dirichlet"
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
    # > 0: every client runs exactly this many steps (batches of its reshuffled epochs, in
    # order) instead of local_epochs passes; needs local_epochs = 1, tail_multiple = 0.
    fed.local_steps = 0
    fed.batch_size = 16
    # Client weight: num_examples (examples trained) | client_size (fedjax's default, with
    # drop_remainder) | uniform.
    fed.weighting = "num_examples"
    fed.drop_remainder = False  # True: floor(n / batch_size) steps, the partial batch dropped
    fed.prox_mu = 0.0  # > 0: FedProx
    fed.clients_per_call = 1
    fed.tail_multiple = 4
    fed.vmap_width = 1
    fed.unroll = True
    fed.steps_per_call = 0
    fed.num_devices = 0  # devices of the 'clients' mesh; 0 = all
    # auto: the engine picks clients_per_call / vmap_width / unroll at the first round (conv
    # models on CPU: 1 client per call, one local step per call unless steps_per_call is set;
    # others: a short timed probe; WORKSPACE.md#engine-knobs) | fixed: those three as given.
    fed.layout = "auto"
    fed.dp = dp_config()
    fed.update(overrides)
    if keep:  # weighting and dp stay: client-level DP works for every method (and needs both)
        fed = ml_collections.ConfigDict({k: fed[k] for k in (*keep, "weighting", "dp")})
    return fed


def init_config() -> ml_collections.ConfigDict:
    """The `init` block: start the model, or a subtree of it, from another run's checkpoint or
    converted weights (fer_jax/io/init.py; WORKSPACE.md#init). path '' = random init.

    E.g. --config.init.path=/tmp/pretrain --config.init.skip=head: every parameter of that
    run's latest checkpoint but the classifier head, which keeps its random init.
    """
    init = ml_collections.ConfigDict()
    # A fer_jax run's --workdir (its orbax checkpoints) or a weights file converted by
    # fer_jax.models.convert (.npz, Keras .h5, PyTorch .pt / .pth, .safetensors).
    init.path = ""
    init.step = 0  # The run's checkpoint step; 0 = the latest.
    # Subtrees, '/'-separated paths, '' = all: src in the checkpoint ('encoder' in every
    # collection, 'params/backbone' in one, 'rep/encoder' of a run with several models), dst in
    # this model (FedAffect: 'rep/...' or 'few/...'). Comma-separated: several src -> dst pairs.
    init.src = ""
    init.dst = ""
    # Regex searched in parameter names ('params/head/kernel'): those keep their random init
    # (e.g. 'head' when the classes differ), checkpoint leaves it matches are not read.
    init.skip = ""
    return init


def dp_config() -> ml_collections.ConfigDict:
    """The `fed.dp` block: client-level DP-FedAvg (WORKSPACE.md#client-level-differential-privacy).

    Enabling it needs fed.weighting = 'uniform' and exactly one of noise_multiplier and
    target_epsilon (e.g. --config.fed.dp.enabled=True --config.fed.weighting=uniform
    --config.fed.dp.target_epsilon=4). Unset (None) fields take the documented default.
    """
    placeholder = ml_collections.config_dict.placeholder
    dp = ml_collections.ConfigDict()
    dp.enabled = False
    dp.clip_norm = 1.0  # C: each client's federated delta is clipped to this L2 norm
    dp.noise_multiplier = placeholder(float)  # z: noise std z * C on the sum of clipped deltas
    dp.target_epsilon = placeholder(float)  # or: z computed so that fed.rounds give this epsilon
    dp.delta = placeholder(float)  # delta of the reported epsilon; None = 1 / N^1.1
    # Adaptive clipping (Andrew et al. 2021): C tracks this quantile of the update norms;
    # None = a fixed C. Its learning rate, and the count's noise std (None = cohort size / 20).
    dp.target_quantile = placeholder(float)
    dp.clip_learning_rate = 0.2
    dp.clip_count_stddev = placeholder(float)
    return dp
