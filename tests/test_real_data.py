"""Real-data readers: FER-2013 / FER+ and CK+48 via TFDS array_record builds, no TensorFlow.

Fast tests run on tiny files written in tmp_path in the real formats; tests on ../shared/data use
the `shared_data` fixture (skipped without it) and build into a session-scoped tmp data_dir.
Building FER-2013 once costs ~25-30 s here (5 s CPU to parse the csv, the rest TFDS writing and
a loaded 2-core machine), under the ~60 s budget for default tests, so they are not marked slow.
"""

import csv
import gzip
import time

import numpy as np
import pytest
from PIL import Image

from fer_jax.data import ckplus, classes, fer2013

FER_HEADER = "emotion,pixels,Usage\n"
FERPLUS_HEADER = ("Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,"
                  "contempt,unknown,NF\n")


def _pixels(seed):
    return np.random.default_rng(seed).integers(0, 256, (48, 48), dtype=np.uint8)


def _row(code, seed, usage):
    return f"{code},{' '.join(map(str, _pixels(seed).ravel()))},{usage}\n"


# (emotion code, pixel seed, usage, FER+ votes in FER+ column order)
TINY = [
    (0, 0, "Training", [4, 0, 0, 1, 3, 2, 0, 0, 0, 0]),    # neutral 4 beats anger 3
    (3, 1, "Training", [0, 0, 0, 0, 0, 0, 0, 0, 1, 9]),    # NF wins -> dropped by FER+
    (6, 2, "Training", [0, 5, 5, 0, 0, 0, 0, 0, 0, 0]),    # tie: happiness before surprise
    (5, 3, "PublicTest", [0, 0, 3, 0, 0, 0, 0, 0, 3, 4]),  # NF 4 > surprise 3 -> dropped
    (1, 4, "PublicTest", [0, 0, 0, 0, 0, 0, 0, 5, 5, 0]),  # contempt ties unknown -> kept
    (2, 5, "PrivateTest", [0, 0, 0, 0, 1, 0, 8, 0, 1, 0]),
    (4, 6, "PrivateTest", [1, 0, 0, 6, 0, 0, 0, 2, 1, 0]),
]


def _write_tiny(folder, *, gz=False, votes=True, rows=TINY):
    folder.mkdir(parents=True, exist_ok=True)
    text = FER_HEADER + "".join(_row(c, s, u) for c, s, u, _ in rows)
    if gz:
        with gzip.open(folder / "fer2013.csv.gz", "wt", newline="") as f:
            f.write(text)
    else:
        (folder / "fer2013.csv").write_text(text)
    if votes:
        lines = [f"{u},fer{i:07d}.png,{','.join(map(str, v))}\n"
                 for i, (_, _, u, v) in enumerate(rows)]
        (folder / "fer2013new.csv").write_text(FERPLUS_HEADER + "".join(lines))
    return folder


def test_tiny_fer2013_plain_and_gz(tmp_path):
    data_dir = tmp_path / "tfds"
    plain = fer2013.load_fer2013(manual_dir=_write_tiny(tmp_path / "a"), data_dir=data_dir)
    gz = fer2013.load_fer2013(manual_dir=_write_tiny(tmp_path / "b", gz=True, votes=False),
                              data_dir=data_dir)
    assert plain.class_names == classes.CANONICAL[:7] == gz.class_names
    assert {k: len(v) for k, v in plain.splits.items()} == {"train": 3, "validation": 2, "test": 2}
    # Codes 0 angry, 3 happy, 6 neutral, 5 surprise, 1 disgust, 2 fear, 4 sad by name.
    names = [plain.class_names[i] for s in ("train", "validation", "test") for i in plain[s].labels]
    assert names == ["anger", "happiness", "neutral", "surprise", "disgust", "fear", "sadness"]
    for split in plain.splits:
        np.testing.assert_array_equal(plain[split].images, gz[split].images)
        np.testing.assert_array_equal(plain[split].labels, gz[split].labels)
        assert plain[split].label_dist is None and plain[split].subjects is None
    np.testing.assert_array_equal(plain["train"].images[2, :, :, 0], _pixels(2))
    np.testing.assert_array_equal(plain["test"].images[1, :, :, 0], _pixels(6))
    assert plain["train"].images.dtype == np.uint8 and plain.image_shape == (48, 48, 1)


def test_tiny_ferplus_majority_and_votes(tmp_path):
    ds = fer2013.load_fer2013(manual_dir=_write_tiny(tmp_path / "raw"),
                              data_dir=tmp_path / "tfds", labels="ferplus")
    assert ds.name == "ferplus" and ds.class_names == classes.CANONICAL
    idx = ds.class_names.index
    train, val, test = ds["train"], ds["validation"], ds["test"]
    assert [len(train), len(val), len(test)] == [2, 1, 2]  # two NF-majority rows dropped
    assert train.labels.tolist() == [idx("neutral"), idx("happiness")]
    assert val.labels.tolist() == [idx("contempt")]
    assert test.labels.tolist() == [idx("fear"), idx("sadness")]
    # Row 0 votes: neutral 4, sadness 1, anger 3, disgust 2 out of 10 emotion votes.
    expect = np.zeros(8, np.float32)
    expect[[idx("neutral"), idx("sadness"), idx("anger"), idx("disgust")]] = [.4, .1, .3, .2]
    np.testing.assert_allclose(train.label_dist[0], expect)
    # Row 6: neutral 1, sadness 6, contempt 2 (unknown excluded) -> shares over 9 votes.
    np.testing.assert_allclose(test.label_dist[1][[idx("neutral"), idx("sadness"),
                                                   idx("contempt")]], [1 / 9, 6 / 9, 2 / 9])
    np.testing.assert_array_equal(train.images[1, :, :, 0], _pixels(2))  # row 2, after the drop


def test_second_load_reuses_build_and_edits_rebuild(tmp_path, monkeypatch):
    raw, data_dir = _write_tiny(tmp_path / "raw"), tmp_path / "tfds"
    first = fer2013.load_fer2013(manual_dir=raw, data_dir=data_dir)

    def fail(path):
        raise AssertionError(f"rebuilt from {path}")

    monkeypatch.setattr(fer2013, "read_csv", fail)
    again = fer2013.load_fer2013(manual_dir=raw, data_dir=data_dir)
    np.testing.assert_array_equal(first["train"].images, again["train"].images)
    # A changed source file is a different build, not a stale read.
    _write_tiny(raw, rows=TINY[:-1])
    with pytest.raises(AssertionError, match="rebuilt from"):
        fer2013.load_fer2013(manual_dir=raw, data_dir=data_dir)


def test_ferplus_labels_ties():
    votes = np.array([[3, 3, 0, 0, 0, 0, 0, 0, 4, 0],   # unknown wins
                      [3, 0, 0, 0, 0, 0, 0, 0, 3, 4],   # NF wins
                      [0, 0, 0, 0, 0, 2, 2, 0, 2, 2],   # emotion ties unknown/NF: kept, disgust
                      [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])  # no votes at all: dropped
    labels, keep, dist = fer2013.ferplus_labels(votes)
    assert keep.tolist() == [False, False, True, False]
    assert fer2013.FERPLUS_CLASSES[labels[2]] == "disgust"
    np.testing.assert_allclose(dist[2], [0, .5, .5, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(dist[3], 0)


@pytest.mark.parametrize("bad_row, match", [
    ("3,1 2 3\n", r"data row 2 \(line 4\): expected 3 fields"),
    ("3," + " ".join(["7"] * 1000) + ",Training\n", r"data row 2 \(line 4\).*got 1000 values"),
    ("3," + " ".join(["7"] * 2303) + " x,Training\n", r"non-integer values \['x'\]"),
    ("3," + " ".join(["300"] * 2304) + ",Training\n", r"outside 0\.\.255"),
    ("9," + " ".join(["7"] * 2304) + ",Training\n", r"'emotion' must be an integer 0\.\.6"),
    ("3," + " ".join(["7"] * 2304) + ",Train\n", r"'Usage' must be one of"),
])
def test_fer_csv_row_errors_name_file_and_row(tmp_path, bad_row, match):
    raw = tmp_path / "raw"
    raw.mkdir()
    text = FER_HEADER + _row(0, 0, "Training") + _row(1, 1, "Training") + bad_row
    (raw / "fer2013.csv").write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        fer2013.load_fer2013(manual_dir=raw, data_dir=tmp_path / "tfds")
    assert str(raw / "fer2013.csv") in str(e.value)


def test_fer_file_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="does not exist") as e:
        fer2013.load_fer2013(manual_dir=missing, data_dir=tmp_path / "tfds")
    assert str(missing / "fer2013.csv") in str(e.value) and "fer2013.csv.gz" in str(e.value)
    raw = _write_tiny(tmp_path / "raw", votes=False)
    with pytest.raises(FileNotFoundError, match="fer2013new.csv"):
        fer2013.load_fer2013(manual_dir=raw, data_dir=tmp_path / "tfds", labels="ferplus")
    with pytest.raises(ValueError, match="labels='fer'"):
        fer2013.load_fer2013(manual_dir=raw, labels="fer")
    (raw / "fer2013.csv").write_text("label,pixels,Usage\n" + _row(0, 0, "Training"))
    with pytest.raises(ValueError, match="expected the header emotion,pixels,Usage"):
        fer2013.read_csv(raw / "fer2013.csv")
    raw = _write_tiny(tmp_path / "short_votes")
    lines = (raw / "fer2013new.csv").read_text().splitlines(keepends=True)
    (raw / "fer2013new.csv").write_text("".join(lines[:-1]))
    with pytest.raises(ValueError, match="has 6 data rows but the FER-2013 csv has 7"):
        fer2013.load_fer2013(manual_dir=raw, data_dir=tmp_path / "tfds", labels="ferplus")


# ----------------------------------------------------------------------------- CK+48 fixtures.

def _write_png(path, seed, size=48):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size), np.uint8)).save(path)


def _write_ck_tree(root, size=48):
    """6 subjects x 3 classes under root/CK+48 with CK+48's folder spellings."""
    files = {}
    for s in range(6):
        for j, folder in enumerate(("anger", "happy", "contempt")):
            name = f"{folder}/S{10 + s:03d}_00{j}_0000001{s}.png"
            _write_png(root / "CK+48" / name, seed=10 * s + j, size=size)
            files[name] = 10 * s + j
    return files


def test_image_folder_classes_subjects_pixels(tmp_path):
    files = _write_ck_tree(tmp_path)
    ds = ckplus.load_image_folder(tmp_path / "CK+48")
    assert ds.class_names == ("anger", "happiness", "contempt")
    split = ds["all"]
    assert len(split) == 18 and split.images.shape == (18, 48, 48, 1)
    folder = ckplus.read_image_folder(tmp_path / "CK+48")
    for i, f in enumerate(folder.files):
        np.testing.assert_array_equal(split.images[i, :, :, 0], _pixels_png(files[f]))
        assert ds.class_names[split.labels[i]] == classes.canonical_name(f.split("/")[0])
        assert split.subjects[i] == int(f.split("/")[1][1:4])
    rgb = ckplus.load_image_folder(tmp_path / "CK+48", image_size=(24, 32), channels=3)
    assert rgb["all"].images.shape == (18, 24, 32, 3)


def _pixels_png(seed):
    return np.random.default_rng(seed).integers(0, 256, (48, 48), np.uint8)


def test_ckplus_tiny_folds(tmp_path):
    _write_ck_tree(tmp_path)
    seen = []
    for fold in range(3):
        ds = ckplus.load_ckplus48(manual_dir=tmp_path, data_dir=tmp_path / "tfds", num_folds=3,
                                  fold=fold)
        train, test = set(ds["train"].subjects), set(ds["test"].subjects)
        assert not train & test and len(train | test) == 6 and len(test) == 2
        assert ds.class_names == ("anger", "happiness", "contempt")
        seen += sorted(test)
    assert sorted(seen) == list(range(10, 16))
    with pytest.raises(ValueError, match="fold=3; expected 0 <= fold < num_folds=3"):
        ckplus.load_ckplus48(manual_dir=tmp_path, num_folds=3, fold=3)
    with pytest.raises(ValueError, match="num_folds=7; expected 2..6"):
        ckplus.load_ckplus48(manual_dir=tmp_path, data_dir=tmp_path / "tfds", num_folds=7)


def test_ckplus_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no CK\\+48/ folder") as e:
        ckplus.load_ckplus48(manual_dir=tmp_path / "nowhere", data_dir=tmp_path / "tfds")
    assert "nowhere/CK+48/<emotion>" in str(e.value)
    _write_ck_tree(tmp_path / "bad_name")
    (tmp_path / "bad_name/CK+48/happy").rename(tmp_path / "bad_name/CK+48/smirk")
    with pytest.raises(ValueError, match=r"'smirk' in class folder .*bad_name/CK\+48/smirk"):
        ckplus.load_ckplus48(manual_dir=tmp_path / "bad_name", data_dir=tmp_path / "tfds")
    _write_ck_tree(tmp_path / "corrupt")
    png = tmp_path / "corrupt/CK+48/anger/S012_000_00000012.png"
    png.write_bytes(png.read_bytes()[:60])  # A truncated PNG: header intact, data cut.
    with pytest.raises(ValueError, match="cannot decode image") as e:
        ckplus.load_ckplus48(manual_dir=tmp_path / "corrupt", data_dir=tmp_path / "tfds")
    assert str(png) in str(e.value)
    _write_ck_tree(tmp_path / "no_subject")
    _write_png(tmp_path / "no_subject/CK+48/anger/frame_0001.png", seed=0)
    with pytest.raises(ValueError, match="frame_0001.png: file name has no subject id"):
        ckplus.load_image_folder(tmp_path / "no_subject/CK+48")
    _write_ck_tree(tmp_path / "sizes")
    _write_png(tmp_path / "sizes/CK+48/anger/S099_001_00000001.png", seed=0, size=64)
    with pytest.raises(ValueError, match="S099_001_00000001.png: image is 64x64 but .* is 48x48"):
        ckplus.load_ckplus48(manual_dir=tmp_path / "sizes", data_dir=tmp_path / "tfds")
    _write_ck_tree(tmp_path / "big", size=64)
    with pytest.raises(ValueError, match="CK\\+48 images must be 48x48 gray, got \\(64, 64, 1\\)"):
        ckplus.load_ckplus48(manual_dir=tmp_path / "big", data_dir=tmp_path / "tfds")



# ----------------------------------------------------------------------- real data (../shared).

@pytest.fixture(scope="session")
def real_fer(shared_data, tmp_path_factory):
    """FER-2013 built once into a session tmp data_dir, loaded with both labellings."""
    data_dir = tmp_path_factory.mktemp("tfds_fer")
    t0 = time.perf_counter()
    plain = fer2013.load_fer2013(manual_dir=shared_data / "fer2013", data_dir=data_dir)
    t1 = time.perf_counter()
    plus = fer2013.load_fer2013(manual_dir=shared_data / "fer2013", data_dir=data_dir,
                                labels="ferplus")
    print(f"FER-2013 build+load {t1 - t0:.1f} s, cached FER+ load {time.perf_counter() - t1:.1f} s")
    return plain, plus


@pytest.mark.slow  # > 20 s on 2 cores: CI's slow step
def test_real_fer2013_counts_and_pixels(real_fer, shared_data):
    ds, _ = real_fer
    assert {k: len(v) for k, v in ds.splits.items()} == {
        "train": 28_473, "validation": 3_577, "test": 3_569}
    # README counts per FER-2013 code 0..6, which is canonical order for these 7 classes.
    expect = {"train": [3964, 433, 4054, 7186, 4779, 3137, 4920],
              "validation": [465, 56, 497, 891, 652, 413, 603],
              "test": [489, 55, 526, 876, 586, 413, 624]}
    for split, counts in expect.items():
        assert np.bincount(ds[split].labels, minlength=7).tolist() == counts
    with gzip.open(shared_data / "fer2013/fer2013.csv.gz", "rt") as f:
        reader = csv.reader(f)
        next(reader)
        code, pixels, usage = next(reader)
    assert usage == "Training"
    first = np.array(pixels.split(), np.uint8).reshape(48, 48)
    np.testing.assert_array_equal(ds["train"].images[0, :, :, 0], first)
    assert ds.class_names[ds["train"].labels[0]] == "anger" and code == "0"


def test_real_ferplus_by_hand(real_fer, shared_data):
    _, ds = real_fer
    with open(shared_data / "fer2013/fer2013new.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    cols = fer2013.FERPLUS_COLUMNS
    for usage, split in fer2013.USAGE_TO_SPLIT.items():
        kept = []
        for r in rows:
            if r[0] != usage:
                continue
            v = [int(x) for x in r[2:]]
            # Plain-Python majority: the first emotion with the most votes, unless unknown/NF
            # has more votes than it (a tie goes to the emotion).
            best = max(range(8), key=lambda j: (v[j], -j))
            if v[best] >= max(v[8], v[9]) and v[best] > 0:
                kept.append((classes.canonical_name(cols[best]),
                             {classes.canonical_name(c): v[j] / sum(v[:8])
                              for j, c in enumerate(cols[:8])}))
        assert len(ds[split]) == len(kept), split
        for i in (0, 1, 2, len(kept) - 1):
            name, shares = kept[i]
            assert ds.class_names[ds[split].labels[i]] == name
            got = dict(zip(ds.class_names, ds[split].label_dist[i].tolist(), strict=True))
            assert got == pytest.approx(shares)
    assert ds["train"].label_dist.sum(axis=1) == pytest.approx(1.0)


@pytest.fixture(scope="session")
def real_ckplus_dir(shared_data, tmp_path_factory):
    return tmp_path_factory.mktemp("tfds_ck")


def test_real_ckplus48(shared_data, real_ckplus_dir):
    test_subjects = []
    for fold in range(10):
        ds = ckplus.load_ckplus48(manual_dir=shared_data / "ckplus48", data_dir=real_ckplus_dir,
                                  fold=fold)
        train, test = ds["train"], ds["test"]
        assert len(train) + len(test) == 981
        assert not set(train.subjects) & set(test.subjects)
        test_subjects += sorted(set(test.subjects))
    assert len(test_subjects) == len(set(test_subjects)) == 118  # each subject tested once
    assert ds.class_names == ("anger", "disgust", "fear", "happiness", "sadness", "surprise",
                              "contempt")
    labels = np.concatenate([train.labels, test.labels])
    counts = dict(zip(ds.class_names, np.bincount(labels).tolist(), strict=True))
    assert counts == {"anger": 135, "contempt": 54, "disgust": 177, "fear": 75,
                      "happiness": 207, "sadness": 84, "surprise": 249}
    assert 10 in set(test_subjects)  # S010_004_00000017.png -> subject 10


def test_real_ckplus48_matches_direct_read(shared_data, real_ckplus_dir):
    direct = ckplus.load_image_folder(shared_data / "ckplus48" / "CK+48")
    ds = ckplus.load_ckplus48(manual_dir=shared_data / "ckplus48", data_dir=real_ckplus_dir,
                              num_folds=2)
    assert direct.class_names == ds.class_names
    # Both keep sorted file order, and a subject mask keeps it: the subsets must match exactly.
    is_test = np.isin(direct["all"].subjects, ds["test"].subjects)
    for split, mask in (("train", ~is_test), ("test", is_test)):
        want, got = direct["all"].take(mask), ds[split]
        np.testing.assert_array_equal(want.images, got.images)
        np.testing.assert_array_equal(want.labels, got.labels)
        np.testing.assert_array_equal(want.subjects, got.subjects)
    first = np.asarray(Image.open(shared_data / "ckplus48/CK+48/anger/S010_004_00000017.png"))
    np.testing.assert_array_equal(direct["all"].images[0, :, :, 0], first)
