r"""Centralized supervised FER: any model on any dataset (the baseline every paper compares to).

Run (embedded synthetic faces, ~1 minute on 2 CPU cores):
  python -m fer_jax.main --config=configs/supervised.py:runlocal --workdir=/tmp/sup
Real FER-2013 (the documented >= 63% PrivateTest benchmark, see WORKSPACE.md):
  python -m fer_jax.main --config=configs/supervised.py:data=fer2013 --workdir=/tmp/fer
CK+48, fold 3 of a subject-wise 10-fold split, ResNet-18 on 96x96x3:
  python -m fer_jax.main --config=configs/supervised.py:data=ckplus48,model=resnet18 \
      --config.data.fold=3 --workdir=/tmp/ck

Arguments (after the colon, comma separated): runlocal (tiny, for smoke tests), data=
synthetic|fer2013|ferplus|ckplus48, model=small_cnn|resnet18|resnet50|resnet50v2|mobilenetv2.
"""

import ml_collections

from configs import common

_MODEL_KWARGS = {
    # 4 stages, 6 convs, 0.77M parameters: 2x cheaper per image than widths (32, 64, 128) x 2
    # convs and faster to learn on FER-2013 (WORKSPACE.md, section 9).
    "small_cnn": dict(widths=(24, 48, 96, 192), convs_per_stage=(1, 2, 2, 1), dense=256,
                      dropout=0.4),
    "resnet18": dict(stem="small"),
    "resnet50": dict(stem="small"),
    "resnet50v2": dict(stem="small"),
    "mobilenetv2": dict(depthwise="shifted"),
}


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


def get_config(arg=None):
    arg = common.parse_arg(arg, runlocal=False, data="synthetic", model="small_cnn")
    if arg.model not in _MODEL_KWARGS:
        raise ValueError(f"config argument model={arg.model!r}; expected one of "
                         f"{sorted(_MODEL_KWARGS)}")
    config = ml_collections.ConfigDict()
    config.experiment = "supervised"
    config.seed = 0

    config.data = data_config(arg.data, runlocal=arg.runlocal)
    if arg.model != "small_cnn":
        config.data.image_size, config.data.channels = 96, 3

    config.model = ml_collections.ConfigDict()
    config.model.name = arg.model
    config.model.kwargs = ml_collections.ConfigDict(_MODEL_KWARGS[arg.model])

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 64
    config.train.num_epochs = 18 if arg.data in ("fer2013", "ferplus") else 30
    config.train.num_steps = 0  # > 0 overrides num_epochs.
    config.train.optimizer = "adamw"  # adam | adamw | sgd (momentum 0.9, nesterov)
    config.train.learning_rate = 1e-3
    config.train.weight_decay = 1e-4
    config.train.schedule = "cosine"  # cosine | constant
    config.train.warmup_epochs = 1.0
    config.train.class_weights = "none"  # none | balanced (n / (K * n_k), IFER-style)

    config.augment = ml_collections.ConfigDict(dict(
        flip=0.5, rotate_deg=10.0, scale=0.1, translate=0.1, brightness=0.2, contrast=0.2))

    config.log_every_steps = 50
    config.eval_every_steps = 0  # 0 = once per epoch.
    config.checkpoint_every_steps = 500
    config.eval_batch_size = 256
    # Test-time augmentation: average the softmax of each image and its mirror image.
    config.eval_flip_tta = arg.data in ("fer2013", "ferplus")

    if arg.runlocal:
        config.train.batch_size = 32
        config.train.num_epochs = 3
        config.log_every_steps = 10
        config.checkpoint_every_steps = 20
        config.model.kwargs = ml_collections.ConfigDict(
            dict(_MODEL_KWARGS[arg.model], **({"widths": (8, 16, 32, 64)}
                                              if arg.model == "small_cnn" else {})))
    return config


def get_sweep(arg=None):
    """Overrides for `launch/sweep.py`: learning rate x weight decay on the chosen dataset."""
    del arg
    return [{"train.learning_rate": lr, "train.weight_decay": wd}
            for lr in (3e-4, 1e-3, 3e-3) for wd in (0.0, 1e-4)]
