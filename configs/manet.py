r"""Diversified MA-Net style network (Heidari & Iosifidis Eq. (5); Zhao et al. 2021), centralized
or federated.

Embedded synthetic faces, a narrow network (about a minute on 2 CPU cores):
  python -m fer_jax.main --config=configs/manet.py:runlocal --workdir=/tmp/manet
FER+ (8 classes), ResNet-18 width on 48x48 gray, trained from scratch:
  python -m fer_jax.main --config=configs/manet.py:data=ferplus --workdir=/tmp/manet_ferplus
FER-2013 (7 classes), federated over 100 Dirichlet(0.5) clients:
  python -m fer_jax.main --config=configs/manet.py:data=fer2013,mode=federated --workdir=/tmp/m_fl

Loss: local_weight * CE_local + (1 - local_weight) * CE_global
      - (branch_weight D_b + spatial_weight D_sp + channel_weight D_ch), paper: 0.6 and 1s.
Arguments: runlocal, data=synthetic|fer2013|ferplus|ckplus48, mode=centralized|federated,
width=ResNet width, recipe=adamw|paper (MA-Net's SGD 0.01, momentum 0.9, x0.1 every 15 epochs).
"""

import ml_collections

from configs import common
from configs.esr import base_config


def get_config(arg=None):
    arg = common.parse_arg(arg, runlocal=False, data="synthetic", mode="centralized", width=0,
                           recipe="adamw")
    config = base_config(arg, model="manet")
    # 48x48 gray with the 'small' ResNet stem: the 4 patches of the 24x24 stage-2 map are 12x12.
    config.data.image_size, config.data.channels = 48, 1
    if arg.runlocal:
        config.data.image_size = 32  # 8x8 patches; halves the step time of the smoke run.
    config.model.kwargs = ml_collections.ConfigDict(dict(
        width=arg.width or (8 if arg.runlocal else 64), stem="small",
        norm="none" if arg.mode == "federated" else "batch"))
    config.diversity.branch_weight = 1.0
    config.diversity.local_weight = 0.6  # lambda of Eq. (5); the paper's best value.
    return config
