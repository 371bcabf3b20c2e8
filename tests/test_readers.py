"""Real-dataset readers (fer_jax.data.readers) on tiny fixtures written in each dataset's layout."""

import pathlib

import numpy as np
import pytest
from PIL import Image

from fer_jax.data import readers


def _png(path, seed, size=(20, 16), mode="RGB"):
    """A random image at `path` (W, H = size); returns its RGB pixels as decode_image sees them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels if mode == "RGB" else np.repeat(pixels[:, :, None], 3, axis=2)


# ------------------------------------------------------------------------------ decoding.


def test_decode_modes(tmp_path):
    gray = _png(tmp_path / "g.png", 0, mode="L")
    rgb, mode = readers.decode_image(tmp_path / "g.png")
    assert mode == "L" and rgb.shape == (16, 20, 3)
    np.testing.assert_array_equal(rgb, gray)

    rgba = np.random.default_rng(1).integers(0, 256, (8, 9, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    rgb, mode = readers.decode_image(tmp_path / "a.png")
    assert mode == "RGBA"
    np.testing.assert_array_equal(rgb, rgba[:, :, :3])  # Alpha dropped, colours kept.

    deep = np.array([[0, 257, 32768, 65535]], np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    rgb, mode = readers.decode_image(tmp_path / "d.png")
    assert mode.startswith("I;16")
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 1, 128, 255])  # Linear, not clipped.
    assert (rgb[..., 0] == rgb[..., 2]).all()

    pal = Image.fromarray(gray[:, :, 0]).convert("P")
    pal.save(tmp_path / "p.png")
    assert readers.decode_image(tmp_path / "p.png")[0].shape == (16, 20, 3)


def test_decode_errors_name_the_file(tmp_path):
    _png(tmp_path / "x.png", 0)
    bad = tmp_path / "corrupt.png"
    bad.write_bytes((tmp_path / "x.png").read_bytes()[:50])
    with pytest.raises(ValueError, match="corrupt.png: cannot decode image"):
        readers.decode_image(bad)
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    with pytest.raises(ValueError, match="notes.jpg: cannot decode image"):
        readers.decode_image(text)


def test_subject_ids():
    ids, names = readers.subject_ids(["S010", "S011", "S010"])
    assert ids.tolist() == [10, 11, 10] and names == {10: "S010", 11: "S011"}
    ids, names = readers.subject_ids(["T010", "S010", "aia"])  # No one-to-one digits: ranks.
    assert ids.tolist() == [1, 0, 2] and names == {0: "S010", 1: "T010", 2: "aia"}


# ------------------------------------------------------------------------------ class folders.


def test_class_folders(tmp_path):
    root = tmp_path / "faces"
    pix = {}
    for folder, subject in (("happy", 10), ("angry", 11), ("Sadness", 10)):
        for k in range(2):
            pix[f"{folder}/S{subject:03d}_00{k}.png"] = _png(
                root / folder / f"S{subject:03d}_00{k}.png", seed=subject * 7 + k + len(folder))
    (root / "happy" / "notes.txt").write_text("labels by hand")
    (root / "happy" / ".DS_Store").write_text("")
    index = readers.index_class_folders(root, subject_pattern=r"^(S\d+)_")
    assert index.class_names == ("anger", "happiness", "sadness")
    assert index.rejected == ((str(root / "happy" / "notes.txt"), readers.NOT_IMAGE),)
    # Folders in sorted order (capitals first): Sadness, angry, happy.
    assert [e.subject for e in index.entries] == [10, 10, 11, 11, 10, 10]
    assert index.subject_names == {10: "S010", 11: "S011"}
    with pytest.raises(ValueError, match="notes.txt: not_image"):
        readers.load_index(index)
    (root / "happy" / "notes.txt").unlink()
    ds = readers.load_index(readers.index_class_folders(root, subject_pattern=r"^(S\d+)_"),
                            image_size=20, channels=3)
    split = ds["all"]
    assert split.images.shape == (6, 20, 20, 3) and split.images.dtype == np.uint8
    assert split.labels.tolist() == [2, 2, 0, 0, 1, 1] and split.subjects.tolist()[2] == 11
    for i, e in enumerate(index.entries):  # Pixels are the file's, resized.
        key = f"{e.path.parent.name}/{e.path.name}"
        np.testing.assert_array_equal(split.images[i], readers.resize_rgb(pix[key], 20))
    gray = readers.load_index(readers.index_class_folders(root), image_size=16, channels=1)
    assert gray["all"].images.shape == (6, 16, 16, 1) and gray["all"].subjects is None


def test_class_folders_nested_and_errors(tmp_path):
    root = tmp_path / "clips"
    _png(root / "fear" / "video7" / "0001.jpg", 0)
    _png(root / "fear" / "video9" / "0001.jpg", 1)
    index = readers.index_class_folders(root, subject_pattern=r"^video(\d+)/")
    assert [e.subject for e in index.entries] == [7, 9]
    with pytest.raises(ValueError, match="0001.jpg: 'video7/0001.jpg' has no subject id"):
        readers.index_class_folders(root, subject_pattern=r"^(S\d+)_")
    _png(root / "smirk" / "a.png", 2)
    with pytest.raises(ValueError, match="'smirk' in class folder .*clips/smirk"):
        readers.index_class_folders(root)
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        readers.index_class_folders(tmp_path / "nowhere")



def _gif(path, frames):
    """Gray frames (T, H, W) uint8 as a GIF at `path` (animated when T > 1), whatever its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, format="GIF", save_all=len(images) > 1, append_images=images[1:],
                   duration=100, loop=0)


def test_content_not_suffix_decides(tmp_path):
    """Yale-style GIFs named 'subject01.happy', extensionless PNGs and an animated GIF are images;
    a text file without suffix is not_image, a '.gif' holding text is unreadable."""
    rng = np.random.default_rng(0)
    root = tmp_path / "yale"
    still = rng.integers(0, 256, (12, 10), dtype=np.uint8)
    _gif(root / "happy" / "subject01.happy", still[None])
    anim = rng.integers(0, 256, (3, 12, 10), dtype=np.uint8)
    _gif(root / "happy" / "subject02.gif", anim)
    png = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    (root / "sad").mkdir()
    Image.fromarray(png).save(root / "sad" / "subject03", format="PNG")
    (root / "sad" / "README").write_text("Yale faces, 15 subjects")
    (root / "sad" / "broken.gif").write_text("GIF in name only")
    assert readers.sniff_image(root / "happy" / "subject01.happy") is None
    assert readers.sniff_image(root / "sad" / "README") == readers.NOT_IMAGE
    assert readers.sniff_image(root / "sad" / "broken.gif") == readers.UNREADABLE
    index = readers.index_class_folders(root)
    assert [e.path.name for e in index.entries] == ["subject01.happy", "subject02.gif",
                                                    "subject03"]
    assert sorted((pathlib.Path(p).name, r) for p, r in index.rejected) == [
        ("README", readers.NOT_IMAGE), ("broken.gif", readers.UNREADABLE)]
    ds = readers.load_index(readers.Index("yale", index.entries), image_size=12)
    images = ds["all"].images
    np.testing.assert_array_equal(images[0], readers.resize_rgb(np.dstack([still] * 3), 12))
    # An animated GIF gives its first frame.
    np.testing.assert_array_equal(images[1], readers.resize_rgb(np.dstack([anim[0]] * 3), 12))
    assert not np.array_equal(images[1], readers.resize_rgb(np.dstack([anim[1]] * 3), 12))
    np.testing.assert_array_equal(images[2], readers.resize_rgb(png, 12))


def test_no_readable_images_says_what_was_seen(tmp_path):
    root = tmp_path / "faces"
    for folder, n in (("happy", 3), ("sad", 2)):
        (root / folder).mkdir(parents=True)
        for k in range(n):
            (root / folder / f"s{k}.txt").write_text("a caption")
        (root / folder / "clip.mp4").write_bytes(b"\0\0\0\x18ftypmp42")
    (root / "sad" / "fake.jpg").write_text("not a jpeg")
    (root / "labels.csv").write_text("file,label")
    with pytest.raises(FileNotFoundError) as e:
        readers.index_class_folders(root)
    message = str(e.value)
    assert "saw 8 files in 2 class folders and rejected all of them" in message
    assert "7 not_image (.txt 5, .mp4 2), 1 unreadable (.jpg 1)" in message
    assert "1 more files lie directly in" in message
    flat = tmp_path / "flat"
    flat.mkdir()
    _png(flat / "a.png", 0)
    with pytest.raises(FileNotFoundError, match="has no class folders \\(1 files lie directly"):
        readers.index_class_folders(flat)


def test_affwild2_six_classes(tmp_path):
    root = tmp_path / "affwild2"
    for k, name in enumerate(("surprise", "anger", "disgust", "fear", "happiness", "sadness")):
        _png(root / name / f"{k}.jpg", k)
    index = readers.index_affwild2(root)
    assert index.class_names == readers.AFFWILD2_CLASSES  # Labels 0..5 as in the paper.
    ds = readers.load_index(index, image_size=16)
    assert ds["all"].labels.tolist() == [0, 1, 2, 3, 4, 5]
    _png(root / "neutral" / "n.jpg", 9)
    with pytest.raises(ValueError, match="neutral.*expects only"):
        readers.index_affwild2(root)


# ------------------------------------------------------------------------------ RAF-DB.


def _rafdb(root, lines, *, variant="aligned"):
    (root / "basic" / "EmoLabel").mkdir(parents=True)
    (root / "basic" / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    for k, line in enumerate(lines):
        file = line.split()[0]
        stem, suffix = file.rsplit(".", 1)
        name = f"{stem}_aligned.{suffix}" if variant == "aligned" else file
        _png(root / "basic" / "Image" / variant / name, k)


def test_rafdb_basic(tmp_path):
    lines = ["train_00001.jpg 5", "train_00002.jpg 1", "test_0001.jpg 7", "test_0002.jpg 4"]
    _rafdb(tmp_path, lines)
    index = readers.index_rafdb(tmp_path)
    assert [(e.split, e.label) for e in index.entries] == [
        ("train", "sadness"), ("train", "surprise"), ("test", "neutral"), ("test", "happiness")]
    assert index.entries[0].path.name == "train_00001_aligned.jpg"
    ds = readers.load_index(index, image_size=24)
    assert ds.class_names == ("happiness", "sadness", "surprise", "neutral")
    assert len(ds["train"]) == 2 and len(ds["test"]) == 2
    assert ds["test"].labels.tolist() == [3, 0]
    # Pointing at basic/ itself works too; a missing image is rejected, not fatal.
    (tmp_path / "basic/Image/aligned/test_0002_aligned.jpg").unlink()
    index = readers.index_rafdb(tmp_path / "basic")
    assert len(index.entries) == 3 and index.rejected[0][1] == readers.MISSING
    with pytest.raises(FileNotFoundError, match="original"):
        readers.index_rafdb(tmp_path, variant="original")


def test_rafdb_original_and_bad_lines(tmp_path):
    _rafdb(tmp_path / "a", ["train_00001.jpg 6"], variant="original")
    index = readers.index_rafdb(tmp_path / "a", variant="original")
    assert index.entries[0].label == "anger"
    _rafdb(tmp_path / "b", ["train_00001.jpg 6", "train_00002.jpg 8"])
    with pytest.raises(ValueError, match="list_patition_label.txt line 2: 'train_00002.jpg 8'"):
        readers.index_rafdb(tmp_path / "b")
    _rafdb(tmp_path / "c", ["val_00001.jpg 6"])
    with pytest.raises(ValueError, match="line 1: 'val_00001.jpg' starts with neither"):
        readers.index_rafdb(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="list_patition_label.txt not found"):
        readers.index_rafdb(tmp_path / "a" / "basic" / "Image")


# ------------------------------------------------------------------------------ AffectNet.

AFFECTNET_HEADER = ("subDirectory_filePath,face_x,face_y,face_width,face_height,"
                    "facial_landmarks,expression,valence,arousal")


def _affectnet(root, name, rows):
    lines = [AFFECTNET_HEADER]
    for k, (file, code) in enumerate(rows):
        if not file.startswith("missing"):
            _png(root / "Manually_Annotated_Images" / file, k, size=(40, 30))
        lines.append(f'{file},4,2,20,24,"1.0;2.0;3.0;4.0",{code},0.5,-0.25')
    (root / f"{name}.csv").write_text("\n".join(lines) + "\n")


def test_affectnet(tmp_path):
    _affectnet(tmp_path, "training", [("689/a.jpg", 1), ("689/b.jpg", 7), ("12/c.jpg", 8),
                                      ("12/d.jpg", 10), ("missing/e.jpg", 0)])
    _affectnet(tmp_path, "validation", [("5/f.jpg", 6), ("5/g.jpg", 9)])
    index = readers.index_affectnet(tmp_path)
    assert [(e.split, e.label) for e in index.entries] == [
        ("train", "happiness"), ("train", "contempt"), ("test", "anger")]
    assert index.entries[0].box == (4.0, 2.0, 20.0, 24.0)
    reasons = sorted((p.split("Images/")[-1], r) for p, r in index.rejected)
    assert reasons == [("12/c.jpg", readers.NO_LABEL), ("12/d.jpg", readers.NO_LABEL),
                       ("5/g.jpg", readers.NO_LABEL), ("missing/e.jpg", readers.MISSING)]
    clean = readers.Index("affectnet", index.entries)
    ds = readers.load_index(clean, image_size=16, crop_to_box=True)
    assert ds.class_names == ("anger", "happiness", "contempt")
    src = readers.decode_image(index.entries[0].path)[0][2:26, 4:24]
    np.testing.assert_array_equal(ds["train"].images[0], readers.resize_rgb(src, 16))


def test_affectnet_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Manually_Annotated_Images"):
        readers.index_affectnet(tmp_path)
    _affectnet(tmp_path, "training", [("1/a.jpg", 11)])
    with pytest.raises(ValueError, match="training.csv row 2: expression 11; expected 0..10"):
        readers.index_affectnet(tmp_path)
    (tmp_path / "training.csv").write_text("subDirectory_filePath,expression\n1/a.jpg,1\n")
    with pytest.raises(ValueError, match=r"training.csv: header lacks columns \['face_x'"):
        readers.index_affectnet(tmp_path)


# ------------------------------------------------------------------------------ FERG.


def test_ferg(tmp_path):
    root = tmp_path / "FERG_DB_256"
    for char in ("ray", "aia"):
        for expr in ("joy", "anger"):
            for n in (1, 2):
                _png(root / char / f"{char}_{expr}" / f"{char}_{expr}_{n}.png", n, mode="RGB")
    (root / "ray" / "ray_joy" / "Thumbs.db").write_bytes(b"\0")
    index = readers.index_ferg(tmp_path)
    assert index.class_names == ("anger", "happiness")
    assert sorted({e.subject for e in index.entries}) == [0, 5]  # aia 0, ray 5.
    assert index.subject_names[5] == "ray" and index.rejected[0][1] == readers.NOT_IMAGE
    ds = readers.load_index(readers.Index("ferg", index.entries), image_size=16)
    assert len(ds["all"]) == 8 and ds["all"].subjects.tolist()[:4] == [0, 0, 0, 0]
    _png(root / "ray" / "bonnie_fear" / "x.png", 0)
    with pytest.raises(ValueError, match="expression folder .*bonnie_fear: expected ray_"):
        readers.index_ferg(root)


def test_ferg_unknown_character(tmp_path):
    _png(tmp_path / "FERG_DB_256" / "bob" / "bob_joy" / "bob_joy_1.png", 0)
    with pytest.raises(ValueError, match="character folder .*bob: expected one of"):
        readers.index_ferg(tmp_path)
