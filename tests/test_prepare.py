"""The prepare pipeline (fer_jax.data.prepare) and its driver (fer_jax.experiments.prepare).

Step logic runs on tiny in-memory records (a stand-in detector where MTCNN's answer is not the
point); the driver runs end to end on tmp folders with every kind of bad file; the real-data test
builds a CK+48 class folder (upscaled, RGB) in tmp_path and runs the real MTCNN on it.
"""

import json

import numpy as np
import pytest
from PIL import Image

from fer_jax.data import classes, prepare, readers
from fer_jax.data.face import Face
from fer_jax.experiments import prepare as driver


def _records(counts, *, split="all", size=6, subjects=None, seed=0):
    """Records with distinct random pixels: counts = {class: n}."""
    rng = np.random.default_rng(seed)
    out = []
    for label, n in counts.items():
        for k in range(n):
            subject = -1 if subjects is None else subjects(len(out))
            out.append(prepare.Record(rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
                                      label, f"{label}/{k}", subject, split=split))
    return out


def _report(records):
    return prepare.Report(classes.canonical_order(r.label for r in records))


# ------------------------------------------------------------------------------ order.


@pytest.mark.parametrize("steps,message", [
    (("split", "balance", "detect", "align", "normalize", "resize"), None),
    (("detect", "align", "split", "balance", "normalize", "resize"), None),
    (("split", "resize"), None),
    (("balance", "split", "resize"), "'balance' must come after 'split'"),
    (("split", "align", "detect", "resize"), "'align' needs 'detect' before it"),
    (("split", "detect", "resize", "align"), r"\['resize'\] between 'detect' and 'align'"),
    (("split", "detect", "balance", "align", "resize"), "between 'detect' and 'align'"),
    (("split", "balance"), "'resize' is required"),
    (("detect", "resize"), "'split' is required"),
    (("split", "split", "resize"), "appears twice"),
    (("split", "crop", "resize"), r"unknown \['crop'\]"),
])
def test_check_steps(steps, message):
    if message is None:
        assert prepare.check_steps(steps) == steps
    else:
        with pytest.raises(ValueError, match=message):
            prepare.check_steps(steps)


# ------------------------------------------------------------------------------ split.


def test_stratified_split_counts_seed_no_overlap():
    records = _records({"anger": 8, "happiness": 12, "fear": 3})
    report = _report(records)
    out = prepare.split_records(records, prepare.SplitOptions(), report)
    tests = {}
    for r in out:
        tests.setdefault(r.label, []).append(r.split == "test")
    assert {k: sum(v) for k, v in tests.items()} == {"anger": 2, "happiness": 3, "fear": 1}
    assert sorted(r.source for r in out) == sorted(r.source for r in records)  # No overlap/loss.
    again = prepare.split_records(records, prepare.SplitOptions(), report)
    assert [r.split for r in again] == [r.split for r in out]
    other = prepare.split_records(records, prepare.SplitOptions(seed=1), report)
    assert [r.split for r in other] != [r.split for r in out]


def test_subject_and_predefined_split():
    records = _records({"anger": 20, "sadness": 20}, subjects=lambda i: i % 10)
    out = prepare.split_records(records, prepare.SplitOptions(mode="subject"), _report(records))
    train = {r.subject for r in out if r.split == "train"}
    test = {r.subject for r in out if r.split == "test"}
    assert not train & test and len(train | test) == 10
    assert 0.25 <= sum(r.split == "test" for r in out) / len(out) < 0.35
    with pytest.raises(ValueError, match="needs a subject id for every image"):
        prepare.split_records(_records({"anger": 4}), prepare.SplitOptions(mode="subject"),
                              _report(records))
    hinted = _records({"anger": 3})
    for r, hint in zip(hinted, ("train", "test", "validation"), strict=True):
        r.hint = hint
    report = _report(hinted)
    out = prepare.split_records(hinted, prepare.SplitOptions(mode="predefined"), report)
    assert [r.split for r in out] == ["train", "test"]
    assert report.drops[0]["reason"] == prepare.UNUSED_SPLIT
    with pytest.raises(ValueError, match="has no splits of its own"):
        prepare.split_records(_records({"anger": 2}), prepare.SplitOptions(mode="predefined"),
                              report)


# ------------------------------------------------------------------------------ balance.


def test_augment_image_exact_cases():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (7, 7, 3), dtype=np.uint8)
    same = dict(angle=0.0, brightness=1.0, flip=False)
    np.testing.assert_array_equal(prepare.augment_image(x, **same), x)
    np.testing.assert_array_equal(prepare.augment_image(x, **dict(same, flip=True)), x[:, ::-1])
    np.testing.assert_array_equal(prepare.augment_image(x, **dict(same, angle=90.0)),
                                  np.rot90(x))  # Counter-clockwise.
    half = prepare.augment_image(x, **dict(same, brightness=0.5))
    np.testing.assert_array_equal(half, np.round(x * np.float32(0.5)).astype(np.uint8))
    f = x.astype(np.float32) / 255
    assert prepare.augment_image(f, **dict(same, brightness=0.5)).dtype == np.float32


def test_balance_train_only_to_majority():
    train = _records({"anger": 6, "happiness": 2, "fear": 1}, split="train")
    test = _records({"anger": 1, "fear": 3}, split="test", seed=1)
    report = _report(train)
    out = prepare.balance_records(train + test, prepare.BalanceOptions(), report)
    counts = report.counts(out)
    assert counts["train"] == {"anger": 6, "fear": 6, "happiness": 6}
    assert counts["test"] == {"anger": 1, "fear": 3, "happiness": 0}
    assert out[:len(train + test)] == train + test  # Originals (and the test split) untouched.
    extra = out[len(train + test):]
    assert len(extra) == 9 and all(r.augmented and r.split == "train" for r in extra)
    assert all("#aug" in r.source for r in extra) and report.notes["balance"]["target"] == 6
    # Brightness draws stay in [0.2, 1.0] (rotation and flip off to measure it).
    opts = prepare.BalanceOptions(rotation_max_deg=0.0, flip=0.0, seed=3)
    for r in prepare.balance_records(train, opts, report)[len(train):]:
        src = next(t for t in train if r.source.startswith(t.source + "#"))
        ratio = r.image.astype(float).sum() / src.image.astype(float).sum()
        assert 0.195 <= ratio <= 1.005
    capped = prepare.balance_records(train, prepare.BalanceOptions(target=4), report)
    assert report.counts(capped)["train"] == {"anger": 6, "fear": 4, "happiness": 4}


# ------------------------------------------------------------------------------ detect, align.


def _fake_face(score=0.9, shift=0.0):
    marks = np.array([[20, 24], [40, 24], [30, 34], [22, 44], [38, 44]], float) + shift
    return Face(box=(10.0 + shift, 10.0 + shift, 50.0 + shift, 50.0 + shift), score=score,
                landmarks=marks)


def test_detect_counts_drops_and_best():
    records = _records({"anger": 3}, size=64)
    for r, n in zip(records, (0, 1, 2), strict=True):
        r.image[0, 0, 0] = n  # The stand-in detector finds this many faces.
    def detector(image):
        return [_fake_face(score=0.5 + 0.1 * k, shift=k) for k in range(image[0, 0, 0])]
    report = _report(records)
    out = prepare.detect_records(records, prepare.DetectOptions(), report, detector=detector)
    assert [r.source for r in out] == ["anger/1"]
    assert [(d["reason"], d["path"]) for d in report.drops] == [
        (prepare.NO_FACE, "anger/0"), (prepare.SEVERAL, "anger/2")]
    best = prepare.detect_records(records, prepare.DetectOptions(several="best"), report,
                                  detector=detector)
    assert [r.source for r in best] == ["anger/1", "anger/2"] and best[1].face.score == 0.6


def test_align_levels_and_counts_failures():
    records = _records({"anger": 2}, size=64)
    records[0].face = _fake_face()
    records[1].face = Face(box=(10, 10, 50, 50), score=0.9, landmarks=np.full((5, 2), 30.0))
    report = _report(records)
    out = prepare.align_records(records, prepare.AlignOptions(output_size=20), report)
    assert len(out) == 1 and out[0].image.shape == (20, 20, 3) and out[0].image.dtype == np.uint8
    assert out[0].face is None
    assert report.drops[0]["reason"] == prepare.ALIGN_FAILED
    assert "eye centres coincide" in report.drops[0]["detail"]


def test_normalize_and_resize():
    x = np.array([[[10, 20, 30], [50, 60, 70]]], np.uint8)
    np.testing.assert_allclose(prepare.normalize_image(x, "scale"), x / 255.0, rtol=1e-6)
    mm = prepare.normalize_image(x, "minmax")
    assert mm.min() == 0.0 and mm.max() == 1.0
    assert not prepare.normalize_image(np.full((2, 2, 3), 7, np.uint8), "minmax").any()
    big = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    u8 = prepare.resize_image(big, 16, 3)
    f32 = prepare.resize_image(big.astype(np.float32) / 255, 16, 3)
    assert u8.shape == f32.shape == (16, 16, 3) and f32.dtype == np.float32
    assert np.abs(u8 / 255.0 - f32).max() < 2 / 255  # Same resampling in both pixel types.
    gray = prepare.resize_image(big.astype(np.float32) / 255, 16, 1)
    assert gray.shape == (16, 16, 1)
    assert np.abs(prepare.resize_image(big, 16, 1) / 255.0 - gray).max() < 2 / 255


# ------------------------------------------------------------------------------ storage.


def test_write_and_load_prepared(tmp_path):
    records = _records({"anger": 4, "surprise": 4}, size=8, subjects=lambda i: i // 2)
    opts = prepare.PrepareOptions(steps=("split", "normalize", "resize"), size=8)
    report = _report(records)
    out = prepare.run_pipeline(records, opts, report)
    pointer = prepare.write_prepared(out, tmp_path)
    assert pointer["splits"] == {"train": 6, "test": 2} and pointer["shape"] == [8, 8, 3]
    ds = prepare.load_prepared(manual_dir=tmp_path)
    assert ds.class_names == ("anger", "surprise")
    for name in ("train", "test"):
        want = [r for r in out if r.split == name]
        got = ds[name]
        # x / 255 then 8-bit storage is lossless: the training step sees the source pixels.
        np.testing.assert_array_equal(got.images, np.stack([
            next(s for s in records if s.source == r.source).image for r in want]))
        assert [ds.class_names[k] for k in got.labels] == [r.label for r in want]
        assert got.subjects.tolist() == [r.subject for r in want]
    assert [s["name"] for s in report.stages] == ["split", "normalize", "resize"]
    assert prepare.write_prepared(out, tmp_path) == pointer  # Same content: no rebuild.
    with pytest.raises(FileNotFoundError, match="dataset.json not found"):
        prepare.load_prepared(manual_dir=tmp_path / "nowhere")


# ------------------------------------------------------------------------------ driver.


@pytest.mark.parametrize("override,message", [
    ({"input.kind": "imagenet"}, "config.input.kind='imagenet': expected one of"),
    ({"input.path": ""}, "config.input.path='': expected the root folder"),
    ({"steps": "balance,split,resize"}, "config.steps='balance,split,resize'"),
    ({"split.test_ratio": 1.0}, "config.split.test_ratio=1.0"),
    ({"balance.brightness_min": 0.0}, "config.balance.brightness_max=1.0"),
    ({"balance.rotation_max_deg": 270.0}, "config.balance.rotation_max_deg=270.0"),
    ({"detect.several": "all"}, "config.detect.several='all'"),
    ({"normalize.method": "zscore"}, "config.normalize.method='zscore'"),
    ({"resize.channels": 4}, "config.resize.channels=4"),
])
def test_validate_config(make_config, override, message):
    driver.validate_config(make_config("prepare", "path=/data/x"))
    with pytest.raises(ValueError, match=message):
        driver.validate_config(make_config("prepare", "path=/data/x", **override))


def _bad_inputs(root, sources):
    """Writes the bad-input cases into class folders under root (sources: RGB uint8 faces)."""
    a, b = sources[0], sources[1]
    Image.fromarray(a).convert("L").save(root / "anger" / "S090_gray.png")
    Image.fromarray(np.dstack([b, np.full(b.shape[:2], 200, np.uint8)])).save(
        root / "happy" / "S091_rgba.png")
    deep = (a.mean(axis=2) * 257).astype(np.uint16)
    Image.fromarray(deep).save(root / "happy" / "S092_deep16.png")
    good = (root / "anger" / "S090_gray.png").read_bytes()
    (root / "anger" / "S093_corrupt.png").write_bytes(good[:len(good) // 3])
    (root / "happy" / "S094_labels.txt").write_text("not an image")
    (root / "happy" / "S095_fake.jpg").write_text("not a jpeg either")


def test_driver_without_detection_counts_bad_files(tmp_path, make_config):
    root = tmp_path / "faces"
    sources = []
    for folder, n in (("anger", 4), ("happy", 6)):
        (root / folder).mkdir(parents=True)
        for k in range(n):
            img = np.random.default_rng(k + 10 * n).integers(0, 256, (30, 20, 3), np.uint8)
            Image.fromarray(img).save(root / folder / f"S{k:03d}_{folder}.jpg")
            sources.append(img)
    _bad_inputs(root, sources)
    config = make_config("prepare", f"path={root}", steps="split,balance,normalize,resize",
                         **{"resize.size": 16, "input.subject_pattern": r"^(S\d+)_"})
    driver.validate_config(config)
    result = driver.run(config, str(tmp_path / "run"))
    dropped = {k: sorted(i["path"].split("/")[-1] for i in v)
               for k, v in result["dropped"].items()}
    assert dropped == {"not_image": ["S094_labels.txt"],
                       "unreadable": ["S093_corrupt.png", "S095_fake.jpg"]}
    read = result["stages"][0]
    assert read["name"] == "read" and read["images_in"] == 16 and read["images_out"] == 13
    assert read["source_modes"] == {"RGB": 10, "L": 1, "RGBA": 1, "I;16": 1}
    names = [s["name"] for s in result["stages"]]
    assert names == ["read", "split", "balance", "normalize", "resize", "write"]
    balance = result["stages"][2]["counts"]
    assert balance["train"]["anger"] == balance["train"]["happiness"]
    assert balance["test"] == result["stages"][1]["counts"]["test"]
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["stages"] == result["stages"]
    md = (tmp_path / "run" / "report.md").read_text()
    assert "| balance | train |" in md and "S093_corrupt.png" in md
    ds = prepare.load_prepared(manual_dir=tmp_path / "run")
    assert ds["train"].images.shape[1:] == (16, 16, 3)
    assert len(ds["train"]) == result["output"]["splits"]["train"]


def test_driver_on_a_loaded_dataset(tmp_path, make_config):
    config = make_config("prepare", "kind=dataset,data=synthetic",
                         steps="split,normalize,resize", **{
                             "split.mode": "predefined", "resize.size": 32,
                             "input.data.synthetic.num_subjects": 4,
                             "input.data.synthetic.images_per_class": 1,
                             "input.data.synthetic.test_subjects": 1})
    driver.validate_config(config)
    result = driver.run(config, str(tmp_path / "run"))
    assert result["output"]["splits"] == {"train": 24, "test": 8}  # 8 classes x 3 / x 1.
    ds = prepare.load_prepared(manual_dir=tmp_path / "run")
    assert len(ds.class_names) == 8
    assert not set(ds["test"].subjects) & set(ds["train"].subjects)



def test_driver_on_gif_and_extensionless_files(tmp_path, make_config):
    """Yale-style files: GIFs named '<subject>.<expression>', extensionless PNGs, an animated GIF
    (first frame kept) and a text file, prepared end to end."""
    root = tmp_path / "yale"
    rng = np.random.default_rng(0)
    first = {}
    for folder in ("happy", "sad"):
        (root / folder).mkdir(parents=True)
        for k in range(4):
            gray = rng.integers(0, 256, (24, 20), dtype=np.uint8)
            first[folder, k] = gray
            Image.fromarray(gray).save(root / folder / f"subject{k:02d}.{folder}", format="GIF")
        frames = [Image.fromarray(rng.integers(0, 256, (24, 20), dtype=np.uint8)) for _ in range(3)]
        frames[0].save(root / folder / "subject04", format="GIF", save_all=True,
                       append_images=frames[1:])
        first[folder, 4] = np.asarray(frames[0])
        first[folder, 5] = rng.integers(0, 256, (24, 20), dtype=np.uint8)
        Image.fromarray(first[folder, 5]).save(root / folder / "subject05", format="PNG")
        (root / folder / "Readme").write_text("Yale-style faces")
    config = make_config("prepare", f"path={root}", steps="split,balance,normalize,resize",
                         **{"resize.size": 24, "resize.channels": 1,
                            "input.subject_pattern": r"^subject(\d+)"})
    result = driver.run(config, str(tmp_path / "run"))
    read = result["stages"][0]
    assert read["images_in"] == 14 and read["images_out"] == 12
    assert read["source_modes"] == {"P": 10, "L": 2}  # GIFs open as palette, the PNGs gray.
    assert {k: len(v) for k, v in result["dropped"].items()} == {"not_image": 2}
    ds = prepare.load_prepared(manual_dir=tmp_path / "run")
    assert ds.class_names == ("happiness", "sadness")
    # Each prepared image is one file's first frame, resized (within the float pipeline's
    # rounding); each file gives one.
    want = np.stack([readers.resize_rgb(np.dstack([g] * 3), 24, channels=1)
                     for g in first.values()]).astype(int)
    got = np.concatenate([ds["train"].images, ds["test"].images]).astype(int)
    err = np.abs(got[:, None] - want[None]).max(axis=(2, 3, 4))
    assert got.shape[0] == 12 and sorted(err.argmin(1)) == list(range(12))
    assert err.min(1).max() <= 2


def test_runlocal_config(make_config):
    config = make_config("prepare", "runlocal")
    driver.validate_config(config)
    assert driver.steps_of(config) == ("split", "balance", "detect", "align", "normalize",
                                       "resize")
    assert (config.input.kind, config.input.data.name) == ("dataset", "synthetic")


@pytest.mark.slow
def test_runlocal_every_stage(tmp_path, make_config):
    """configs/prepare.py:runlocal end to end with the real MTCNN (~20 s of CPU)."""
    result = driver.run(make_config("prepare", "runlocal"), str(tmp_path / "run"))
    stages = {s["name"]: s for s in result["stages"]}
    assert list(stages) == ["read", "split", "balance", "detect", "align", "normalize",
                            "resize", "write"]
    assert stages["read"]["images_out"] == 48
    # The synthetic faces MTCNN finds: most, not all (one subject's face shape defeats it).
    assert 24 <= stages["detect"]["images_out"] < 48
    assert result["output"]["splits"]["train"] > 0 and result["output"]["splits"]["test"] > 0
    ds = prepare.load_prepared(manual_dir=tmp_path / "run")
    assert ds["train"].images.shape[1:] == (48, 48, 1)
    assert not set(ds["test"].subjects) & set(ds["train"].subjects)


@pytest.mark.slow  # > 20 s on 2 cores: CI's slow step
def test_prepare_command_through_main(tmp_path):
    """The documented command; skipped until 'prepare' is registered in fer_jax.experiments."""
    import os
    import pathlib
    import subprocess
    import sys

    from fer_jax import experiments

    if "prepare" not in experiments.EXPERIMENTS:
        pytest.skip("experiment 'prepare' not registered in fer_jax.experiments yet")
    root = tmp_path / "faces"
    for folder in ("fear", "happy"):
        (root / folder).mkdir(parents=True)
        for k in range(4):
            Image.fromarray(np.full((20, 20, 3), 40 * k, np.uint8)).save(root / folder / f"{k}.png")
    repo = pathlib.Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "fer_jax.main", f"--workdir={tmp_path / 'run'}",
           f"--config=configs/prepare.py:path={root}", "--config.steps=split,balance,resize",
           "--config.resize.size=16"]
    out = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["read", "split", "balance", "resize", "write"]
    bad = subprocess.run([*cmd[:-2], "--config.steps=balance,split,resize"], cwd=repo,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "'balance' must come after 'split'" in bad.stderr


# ------------------------------------------------------------------------------ real data.


def _ck_folder(shared_data, root, per_class=4, size=144):
    """A class folder of CK+48 crops upscaled to size x size RGB (tmp only, never committed)."""
    faces = []
    for folder in ("anger", "happy", "surprise"):
        files = sorted((shared_data / "ckplus48" / "CK+48" / folder).glob("*.png"))[::3]
        (root / folder).mkdir(parents=True)
        for f in files[:per_class]:
            img = Image.open(f).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
            img.save(root / folder / f.name)
            faces.append(np.asarray(img))
    return faces


@pytest.mark.slow  # > 20 s on 2 cores: CI's slow step
def test_real_ckplus_bad_inputs_with_mtcnn(shared_data, tmp_path, make_config):
    root = tmp_path / "ck144"
    faces = _ck_folder(shared_data, root)
    _bad_inputs(root, faces)
    blank = np.full((144, 144, 3), 128, np.uint8)
    Image.fromarray(blank).save(root / "anger" / "S096_blank.png")
    Image.fromarray(np.concatenate([faces[0], faces[5]], axis=1)).save(
        root / "surprise" / "S097_two_faces.png")
    config = make_config("prepare", f"path={root},order=detect_first",
                         **{"input.subject_pattern": r"^(S\d+)_"})
    result = driver.run(config, str(tmp_path / "run"))
    dropped = {k: sorted(i["path"].split("/")[-1] for i in v)
               for k, v in result["dropped"].items()}
    assert dropped["no_face"] == ["S096_blank.png"]
    assert dropped["several_faces"] == ["S097_two_faces.png"]
    assert dropped["unreadable"] == ["S093_corrupt.png", "S095_fake.jpg"]
    assert dropped["not_image"] == ["S094_labels.txt"]
    detect = result["stages"][1]
    # 12 faces + gray + RGBA + 16-bit versions of real faces all kept.
    assert detect["name"] == "detect" and detect["images_out"] == 15
    ds = prepare.load_prepared(manual_dir=tmp_path / "run")
    assert ds["train"].images.shape[1:] == (96, 96, 3)
    train_counts = np.bincount(ds["train"].labels)
    assert (train_counts == train_counts.max()).all()  # Balanced after detection.
