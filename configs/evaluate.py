r"""Evaluate a trained workdir on any dataset, as a job of its own that writes only into --workdir
(the training run's files are never touched).

  python -m fer_jax.main --config=configs/evaluate.py:data=ckplus48 \
      --config.trained=/tmp/sup --workdir=/tmp/sup_on_ck
A prepared dataset (configs/prepare.py) or a folder of class folders, every image of it:
  python -m fer_jax.main --config=configs/evaluate.py:data=prepared \
      --config.trained=/tmp/fer --config.data.manual_dir=/tmp/prep --workdir=/tmp/fer_on_prep
  python -m fer_jax.main --config=configs/evaluate.py:data=folder \
      --config.trained=/tmp/fer --config.data.manual_dir=/data/faces \
      --config.data.eval_split=all --workdir=/tmp/fer_on_faces

Classes are matched by canonical name. When the dataset has only some of the model's classes,
eval.json reports the plain argmax over all the model's classes ('full') and the argmax over the
dataset's classes only ('restricted'); images of classes the model lacks are counted and left
out. Writes eval.json, metrics.jsonl, confusion_matrix.png (+ confusion_matrix_restricted.png).

Arguments (after the colon, comma separated): data=<a fer_jax.data name>|folder, trained=DIR.
"""

import ml_collections

from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, data="synthetic", trained="")
    config = ml_collections.ConfigDict()
    config.experiment = "evaluate"
    config.trained = arg.trained  # The --workdir of a training run.
    config.step = 0  # Checkpoint step to evaluate; 0 = the latest.

    config.data = common.data_config(arg.data)  # data.name=folder: manual_dir = the root folder.
    config.data.image_size = 0  # 0 = the trained model's input size (images are resized anyway).
    config.data.channels = 0  # 0 = the trained model's channels.
    # A split name, 'all' (every split together), or '' = 'test' when the dataset has one, else
    # its only split.
    config.data.eval_split = ""
    config.data.subject_pattern = ""  # data.name=folder: optional subject-id regex.

    config.eval_batch_size = 256
    # Test-time augmentation: average the softmax of each image and its mirror image.
    config.eval_flip_tta = False
    return config
