"""Evaluation of a trained workdir on any dataset (configs/evaluate.py).

The model and its variables come from `fer_jax.io.trained` (no optimizer, nothing written to the
trained workdir); only the evaluated split is loaded, so a dataset smaller than any training batch
works. Classes are matched by canonical name: images of classes the model lacks are counted and
left out; when the dataset has a subset of the model's classes, the report has the argmax over
all the model's classes ('full') and over the dataset's classes only ('restricted').
"""

from __future__ import annotations

import pathlib

import numpy as np
from absl import logging

from fer_jax import data as data_lib
from fer_jax.data import readers, types
from fer_jax.evaluation import metrics as metrics_lib
from fer_jax.evaluation import plots
from fer_jax.io import trained as trained_lib
from fer_jax.io.metrics import MetricWriter
from fer_jax.train import checks

FOLDER = "folder"  # data.name for a root of class folders read by fer_jax.data.readers.


def validate_config(config) -> None:
    """Raises ValueError naming the first bad field; called by main before any work."""
    check = checks.checker(config)
    check(bool(config.trained), "trained", "the --workdir of a training run")
    check((pathlib.Path(config.trained).expanduser() / "config.json").is_file(), "trained",
          "a training workdir (a folder with config.json and checkpoints/)")
    names = sorted([*data_lib.DATASETS, FOLDER])
    check(config.data.name in names, "data.name", f"one of {names}")
    check(config.data.name != FOLDER or bool(config.data.manual_dir), "data.manual_dir",
          "the root of the class folders (data.name=folder)")
    check(config.data.image_size == 0 or config.data.image_size >= 16, "data.image_size",
          "0 (the trained model's) or an image size >= 16")
    check(config.data.channels in (0, 1, 3), "data.channels", "0 (the trained model's), 1 or 3")
    check(config.step >= 0, "step", ">= 0 (0 = the latest checkpoint)")
    check(config.eval_batch_size >= 1, "eval_batch_size", ">= 1")


def load_dataset(data, image_size: int, channels: int) -> types.Dataset:
    """The dataset of a `data` block, images at (image_size, image_size, channels)."""
    data = data.copy_and_resolve_references()
    with data.unlocked():
        data.image_size = data.image_size or image_size
        data.channels = data.channels or channels
    if data.name == FOLDER:
        index = readers.index_class_folders(data.manual_dir,
                                            subject_pattern=data.subject_pattern or None)
        return readers.load_index(index, image_size=data.image_size, channels=data.channels)
    return data_lib.load(data)


def pick_split(dataset: types.Dataset, name: str) -> tuple[str, types.Split]:
    """('test' | the only split | `name` | 'all' = every split concatenated, its Split)."""
    splits = dataset.splits
    if not name:
        name = "test" if "test" in splits else (next(iter(splits)) if len(splits) == 1 else "")
        if not name:
            raise ValueError(f"dataset {dataset.name} has splits {sorted(splits)} and none is "
                             "'test'; set config.data.eval_split to one of them or 'all'")
    if name == "all" and "all" not in splits:
        parts = [s for s in splits.values() if len(s)]
        subjects = (None if any(s.subjects is None for s in parts)
                    else np.concatenate([s.subjects for s in parts]))
        return name, types.Split(np.concatenate([s.images for s in parts]),
                                 np.concatenate([s.labels for s in parts]), subjects)
    if name not in splits:
        raise ValueError(f"config.data.eval_split={name!r}: dataset {dataset.name} has splits "
                         f"{sorted(splits)} (or 'all')")
    return name, splits[name]


def class_map(model_classes, data_classes) -> np.ndarray:
    """For each dataset class, its index among the model's classes, or -1 if the model lacks
    it; ValueError when the two share no class."""
    mapping = np.array([model_classes.index(c) if c in model_classes else -1
                        for c in data_classes], np.int64)
    if not (mapping >= 0).any():
        raise ValueError(f"the dataset's classes {list(data_classes)} share none with the "
                         f"model's {list(model_classes)}; nothing can be scored")
    return mapping


def score(probs: np.ndarray, labels: np.ndarray, model_classes, data_classes) -> dict:
    """Reports of model probabilities (N, K) against dataset labels (N,) (indices into
    data_classes): 'full' argmax over the K model classes, 'restricted' (only when the dataset
    lacks some of the model's classes) argmax over the shared classes; confusion matrices and
    the counts of images left out because the model lacks their class."""
    mapping = class_map(model_classes, data_classes)
    known = mapping[labels] >= 0
    left_out = {data_classes[c]: int((labels == c).sum()) for c in np.flatnonzero(mapping < 0)}
    target = mapping[labels[known]]
    probs = probs[known]
    k = len(model_classes)
    cm = metrics_lib.confusion_matrix(target, probs.argmax(-1), k)
    shared = np.sort(mapping[mapping >= 0])  # Model indices, in the model's order.
    out = {
        "classes": {"model": list(model_classes), "dataset": list(data_classes),
                    "shared": [model_classes[i] for i in shared],
                    "model_only": [c for c in model_classes if c not in data_classes],
                    "left_out_images": left_out},
        "num_examples": int(known.sum()),
        "full": {**metrics_lib.classification_report(cm, model_classes),
                 "chance": 1.0 / k, "confusion_matrix": cm.tolist()},
    }
    if len(shared) < k:
        position = np.full(k, -1)
        position[shared] = np.arange(len(shared))
        names = [model_classes[i] for i in shared]
        cm_r = metrics_lib.confusion_matrix(position[target], probs[:, shared].argmax(-1),
                                            len(shared))
        out["restricted"] = {**metrics_lib.classification_report(cm_r, names),
                             "chance": 1.0 / len(shared), "class_names": names,
                             "confusion_matrix": cm_r.tolist()}
    return out


def run(config, workdir: str) -> dict:
    out_dir = pathlib.Path(workdir).resolve()
    trained_dir = pathlib.Path(config.trained).expanduser().resolve()
    if out_dir == trained_dir or trained_dir in out_dir.parents:
        raise ValueError(f"--workdir={workdir} lies in config.trained={config.trained}; the "
                         "evaluation writes only into a workdir of its own")
    model = trained_lib.load(trained_dir, step=config.step or None,
                             flip_tta=config.eval_flip_tta)
    writer = MetricWriter(out_dir, tensorboard=False)
    writer.write_json("config.json", config.to_dict())
    dataset = load_dataset(config.data, model.image_size, model.channels)
    split_name, split = pick_split(dataset, config.data.eval_split)
    logging.info("evaluating %s (step %d, classes %s) on %s/%s: %d images of classes %s",
                 trained_dir, model.step, model.class_names, dataset.name, split_name,
                 len(split), dataset.class_names)
    probs = model.predict(split.images, batch_size=config.eval_batch_size)
    results = score(probs, split.labels, model.class_names, dataset.class_names)
    results.update(trained=str(trained_dir), step=model.step, dataset=dataset.name,
                   split=split_name, flip_tta=config.eval_flip_tta)
    where = f"{dataset.name}/{split_name}"
    full = results["full"]
    plots.save_confusion_matrix(np.array(full["confusion_matrix"]), model.class_names,
                                out_dir / "confusion_matrix.png",
                                title=f"{config.trained} on {where}: acc {full['accuracy']:.3f}")
    files = ["eval.json", "confusion_matrix.png"]
    metrics = {"eval/accuracy": full["accuracy"], "eval/macro_f1": full["macro"]["f1"]}
    line = (f"accuracy {full['accuracy']:.4f} over the model's {len(model.class_names)} classes "
            f"(chance {full['chance']:.3f})")
    if "restricted" in results:
        r = results["restricted"]
        plots.save_confusion_matrix(np.array(r["confusion_matrix"]), r["class_names"],
                                    out_dir / "confusion_matrix_restricted.png",
                                    title=f"{config.trained} on {where}, {len(r['class_names'])}"
                                          f" shared classes: acc {r['accuracy']:.3f}")
        files.append("confusion_matrix_restricted.png")
        metrics.update({"eval/restricted_accuracy": r["accuracy"],
                        "eval/restricted_macro_f1": r["macro"]["f1"]})
        line += (f", {r['accuracy']:.4f} restricted to the {len(r['class_names'])} classes "
                 f"the dataset shares (chance {r['chance']:.3f})")
    writer.write(model.step, metrics)
    writer.write_json("eval.json", results)
    writer.close()
    left_out = results["classes"]["left_out_images"]
    skipped = (f"; {sum(left_out.values())} images of classes the model lacks left out "
               f"({left_out})" if left_out else "")
    summary = (f"{line}; {results['num_examples']} images of {where}{skipped}. Outputs in "
               f"{out_dir}: {', '.join(files)}")
    logging.info("%s", summary)
    print(summary, flush=True)
    return results
