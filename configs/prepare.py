r"""FER data preparation (Khodadadi, docs/papers.md#prepare): split -> balance -> detect -> align ->
normalize -> resize, with report.json / report.md and a TFDS array_record dataset in the workdir.

Smoke test (48 embedded synthetic faces through every step, MTCNN included):
  python -m fer_jax.main --config=configs/prepare.py:runlocal --workdir=/tmp/prep_local
Run on a folder with one sub-folder per class (optional subject id in the file names):
  python -m fer_jax.main --config=configs/prepare.py:kind=folder,path=/tmp/ck144 \
      --config.input.subject_pattern='^(S\d+)_' --workdir=/tmp/prep
Other layouts: kind=affwild2|rafdb|affectnet|ferg (see fer_jax/data/readers.py), or any dataset
of fer_jax.data (kind=dataset,data=fer2013). Detect and align before splitting:
  python -m fer_jax.main \
      --config=configs/prepare.py:kind=folder,path=/tmp/ck144,order=detect_first \
      --workdir=/tmp/prep2
Then train on it: --config=configs/supervised.py:model=resnet18 --config.data.name=prepared \
  --config.data.manual_dir=/tmp/prep

Arguments (after the colon, comma separated): kind, path, order=paper|detect_first, data=<name>
(for kind=dataset), runlocal (the embedded synthetic faces as input, 6 subjects x 8 classes at
96x96 RGB, kept to their subject-disjoint split, written as 48x48 gray like configs/supervised.py
expects; kind, path and data are ignored). The order is explicit and can be given directly:
  --config.steps=split,balance,detect,align,normalize,resize
"""

import ml_collections

from configs import common

ORDERS = {
    "paper": "split,balance,detect,align,normalize,resize",
    # Balancing after detection keeps every augmented copy (no re-detection of rotated faces).
    "detect_first": "detect,align,split,balance,normalize,resize",
}


def get_config(arg=None):
    arg = common.parse_arg(arg, runlocal=False, kind="folder", path="", order="paper",
                           data="ckplus48")
    if arg.order not in ORDERS:
        raise ValueError(f"config argument order={arg.order!r}; expected one of {sorted(ORDERS)}")
    config = ml_collections.ConfigDict()
    config.experiment = "prepare"

    config.input = ml_collections.ConfigDict()
    config.input.kind = arg.kind  # folder | affwild2 | rafdb | affectnet | ferg | dataset
    config.input.path = arg.path  # Root of the files (not used by kind=dataset).
    config.input.subject_pattern = ""  # Regex; group 1 = subject key ('^(S\d+)_' for CK+ names).
    config.input.rafdb_variant = "aligned"  # aligned | original
    config.input.crop_to_box = False  # AffectNet: crop the annotated face box before the steps.
    config.input.data = common.data_config(arg.data)  # kind=dataset: any fer_jax.data dataset.
    config.input.data.channels = 3

    config.steps = ORDERS[arg.order]  # Comma-separated, run in this order.

    config.split = ml_collections.ConfigDict(dict(
        mode="stratified",  # stratified | subject (disjoint subjects) | predefined (source's)
        test_ratio=0.25, seed=0,
        # mode=subject: comma-separated subject names (or ids) that form the test split,
        # e.g. 'mery' for FERG's leave-one-character-out; '' = random subjects (test_ratio).
        test_subjects=""))
    config.balance = ml_collections.ConfigDict(dict(
        rotation_min_deg=0.0, rotation_max_deg=90.0, both_directions=True,
        brightness_min=0.2, brightness_max=1.0, flip=0.5,
        target=0,  # Images per training class; 0 = the majority class's count.
        seed=0))
    config.detect = ml_collections.ConfigDict(dict(
        min_face_size=20.0, thresholds=(0.6, 0.7, 0.7), pad_fraction=0.0, min_side=0,
        several="drop"))  # drop (paper) | best
    config.align = ml_collections.ConfigDict(dict(output_size=96, margin=0.0))
    config.normalize = ml_collections.ConfigDict(dict(method="scale"))  # scale | minmax
    config.resize = ml_collections.ConfigDict(dict(size=96, channels=3))
    config.output = ml_collections.ConfigDict(dict(data_dir=""))  # '' = <workdir>/tfds

    if arg.runlocal:
        config.input.kind, config.input.path = "dataset", ""
        config.input.data = common.data_config("synthetic", runlocal=True)
        config.input.data.image_size, config.input.data.channels = 96, 3  # MTCNN-sized faces.
        config.input.data.synthetic.update(num_subjects=6, images_per_class=1, test_subjects=2)
        config.split.mode = "predefined"  # The generator's subject-disjoint train / test.
        config.resize.size, config.resize.channels = 48, 1
    return config
