"""The prepare command (configs/prepare.py): raw FER files -> a prepared TFDS dataset + a report.

Khodadadi's data preparation (docs/papers.md#prepare) as an explicit ordered list of steps
(`config.steps`, paper order split -> balance -> detect -> align -> normalize -> resize; see
fer_jax.data.prepare). Host side only. Writes into the workdir: config.json, report.json and
report.md (counts per split and class after every stage, dropped files with their reasons and
paths, seconds and images/s per stage), the array_record dataset under tfds/ (or
config.output.data_dir) and dataset.json, which `fer_jax.data.prepare.load_prepared` follows.
"""

from __future__ import annotations

import pathlib
import time

from absl import logging

from fer_jax import data as data_lib
from fer_jax.data import prepare, readers
from fer_jax.io.metrics import MetricWriter
from fer_jax.train import checks

KINDS = (*readers.READERS, "dataset")


def steps_of(config) -> tuple[str, ...]:
    return tuple(s.strip() for s in config.steps.split(",") if s.strip())


def validate_config(config) -> None:
    """Raises ValueError naming the first bad field; called by main before any work."""
    check = checks.checker(config)
    check(config.input.kind in KINDS, "input.kind", f"one of {KINDS}")
    check(config.input.kind == "dataset" or bool(config.input.path), "input.path",
          f"the root folder of the {config.input.kind!r} files")
    check(config.input.kind != "dataset" or config.input.data.name in data_lib.DATASETS,
          "input.data.name", f"one of {sorted(data_lib.DATASETS)}")
    check(config.input.rafdb_variant in ("aligned", "original"), "input.rafdb_variant",
          "'aligned' or 'original'")
    try:
        prepare.check_steps(steps_of(config))
    except ValueError as e:
        raise ValueError(f"config.steps={config.steps!r}: {e}") from None
    s, b, d = config.split, config.balance, config.detect
    check(s.mode in prepare.SPLIT_MODES, "split.mode", f"one of {prepare.SPLIT_MODES}")
    check(0 < s.test_ratio < 1, "split.test_ratio", "a fraction in (0, 1)")
    check(not s.get("test_subjects") or s.mode == "subject", "split.test_subjects",
          "empty unless split.mode='subject'")
    check(0 <= b.rotation_min_deg <= b.rotation_max_deg <= 180, "balance.rotation_max_deg",
          "0 <= rotation_min_deg <= rotation_max_deg <= 180")
    check(0 < b.brightness_min <= b.brightness_max, "balance.brightness_max",
          "0 < brightness_min <= brightness_max")
    check(0 <= b.flip <= 1, "balance.flip", "a probability in [0, 1]")
    check(b.target >= 0, "balance.target", ">= 0 (0 = the majority class's count)")
    check(d.min_face_size >= 12, "detect.min_face_size", ">= 12 pixels (P-Net's window)")
    check(len(d.thresholds) == 3 and all(0 <= t <= 1 for t in d.thresholds),
          "detect.thresholds", "three probabilities (P-, R-, O-Net)")
    check(d.pad_fraction >= 0 and d.min_side >= 0, "detect.pad_fraction", ">= 0 (and min_side)")
    check(d.several in prepare.SEVERAL_FACES, "detect.several", f"one of {prepare.SEVERAL_FACES}")
    check(config.align.output_size >= 16, "align.output_size", ">= 16 pixels")
    check(config.align.margin > -0.5, "align.margin", "> -0.5 (fraction of the box per side)")
    check(config.normalize.method in prepare.NORMALIZE_METHODS, "normalize.method",
          f"one of {prepare.NORMALIZE_METHODS}")
    check(config.resize.size >= 16, "resize.size", ">= 16 pixels")
    check(config.resize.channels in (1, 3), "resize.channels", "1 or 3")


def resolve_test_subjects(text: str, subject_names: dict[int, str] | None) -> tuple[int, ...]:
    """config.split.test_subjects ('mery,ray' or '3,5') -> subject ids, by the reader's names."""
    by_name = {name: i for i, name in (subject_names or {}).items()}
    ids = []
    for token in (t.strip() for t in text.split(",")):
        if not token:
            continue
        if token in by_name:
            ids.append(by_name[token])
        elif token.lstrip("-").isdigit():
            ids.append(int(token))
        else:
            raise ValueError(f"config.split.test_subjects: {token!r} is neither a subject name of "
                             f"the input ({sorted(by_name) or 'it names no subjects'}) nor an id")
    return tuple(ids)


def options_of(config, subject_names: dict[int, str] | None = None) -> prepare.PrepareOptions:
    """The typed options of the pipeline from the config's blocks (subject_names: the reader's
    id -> name, to resolve split.test_subjects)."""
    d = config.detect
    split = config.split.to_dict()
    split["test_subjects"] = resolve_test_subjects(split.get("test_subjects", ""), subject_names)
    return prepare.PrepareOptions(
        steps=steps_of(config),
        split=prepare.SplitOptions(**split),
        balance=prepare.BalanceOptions(**config.balance),
        detect=prepare.DetectOptions(min_face_size=d.min_face_size,
                                     thresholds=tuple(d.thresholds), pad_fraction=d.pad_fraction,
                                     min_side=d.min_side, several=d.several),
        align=prepare.AlignOptions(**config.align),
        normalize=config.normalize.method, size=config.resize.size,
        channels=config.resize.channels)


def read_input(config, report_for) -> tuple[list[prepare.Record], prepare.Report, dict]:
    """Reads the input into records; report_for(class_names) makes the report."""
    inp = config.input
    if inp.kind == "dataset":
        dataset = data_lib.load(inp.data)
        report = report_for(dataset.class_names)
        return prepare.records_from_dataset(dataset, report), report, {"dataset": dataset.name}
    kwargs = {}
    if inp.kind in ("folder", "affwild2"):
        kwargs["subject_pattern"] = inp.subject_pattern or None
    elif inp.kind == "rafdb":
        kwargs["variant"] = inp.rafdb_variant
    index = readers.READERS[inp.kind](inp.path, **kwargs)
    report = report_for(index.class_names)
    records = prepare.records_from_index(index, report, crop_to_box=inp.crop_to_box)
    info = {"subjects": len(index.subject_names), "subject_names": index.subject_names} \
        if index.subject_names else {}
    return records, report, info


def run(config, workdir: str) -> dict:
    workdir = pathlib.Path(workdir)
    writer = MetricWriter(workdir, tensorboard=False)
    writer.write_json("config.json", config.to_dict())
    t0 = time.perf_counter()
    records, report, info = read_input(config, prepare.Report)
    options = options_of(config, info.pop("subject_names", None))
    logging.info("read %d images of classes %s from %s", len(records), report.class_names,
                 config.input.path or config.input.data.name)
    records = prepare.run_pipeline(records, options, report)
    report.notes.update(input={"kind": config.input.kind, "path": config.input.path, **info},
                        steps=list(options.steps))
    if not records:
        (workdir / "report.md").write_text(report.to_markdown())
        writer.write_json("report.json", report.to_dict())
        raise ValueError(f"no images are left after the steps; see {workdir / 'report.md'}")
    t_write = time.perf_counter()
    pointer = prepare.write_prepared(records, workdir, data_dir=config.output.data_dir or None)
    report.stage("write", time.perf_counter() - t_write, len(records), records)
    report.notes.update(output=pointer, total_seconds=round(time.perf_counter() - t0, 2))
    result = report.to_dict()
    writer.write_json("report.json", result)
    (workdir / "report.md").write_text(report.to_markdown())
    for stage in result["stages"]:
        logging.info("%-9s %5d -> %5d images in %7.2f s %s", stage["name"], stage["images_in"],
                     stage["images_out"], stage["seconds"], stage["dropped"] or "")
    logging.info("prepared %s into %s (train %d, test %d); report in %s", pointer["shape"],
                 pointer["data_dir"], pointer["splits"]["train"], pointer["splits"]["test"],
                 workdir / "report.md")
    writer.close()
    return result
