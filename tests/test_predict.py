"""Prediction on images, folders and videos (fer_jax.predict).

Fast tests use a stand-in detector (one known face per image) and a trained workdir saved from
random variables (tests/test_evaluate_job.py); the slow tests run the real MTCNN on a real video
of ../shared/data and the command line.
"""

import csv
import json
import os
import pathlib
import subprocess
import sys

import av
import numpy as np
import pytest
from PIL import Image
from test_evaluate_job import _workdir

from fer_jax import predict
from fer_jax.data import synthetic
from fer_jax.data.face import Face, align_face
from fer_jax.io import trained as trained_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
BOX = (20.0, 16.0, 76.0, 80.0)
MARKS = np.array([[36, 40], [60, 40], [48, 52], [38, 66], [58, 66]], np.float64)


def _detector(image):
    """One face at BOX in every image wider than 40 px, none in smaller ones."""
    return [Face(BOX, 0.99, MARKS)] if image.shape[1] > 40 else []


def _faces(n, size=96):
    return synthetic.make_dataset(num_subjects=2, images_per_class=1, test_subjects=1,
                                  image_size=size, channels=3, seed=3)["train"].images[:n]


def _write_video(path, frames, rate=10):
    writer = predict.VideoWriter(path, rate)
    for frame in frames:
        writer.add(frame)
    writer.close()


@pytest.fixture
def trained(tmp_path, make_config):
    _workdir(tmp_path / "run", make_config)
    return trained_lib.load(tmp_path / "run")


def test_list_inputs_by_content(tmp_path):
    faces = _faces(2)
    Image.fromarray(faces[0]).save(tmp_path / "subject01.happy", format="GIF")
    Image.fromarray(faces[1]).save(tmp_path / "b.png")
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "c.mp4").write_bytes(b"")  # A video by name; decoding comes later.
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.png").write_bytes(b"")
    found, skipped = predict.list_inputs(tmp_path)
    assert [(p.name, k) for p, k in found] == [("b.png", "image"), ("c.mp4", "video"),
                                               ("subject01.happy", "image")]
    assert skipped == {"not_image": 1}
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"has no image or video \(1 files, 1 not_image"):
        predict.list_inputs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        predict.list_inputs(tmp_path / "nowhere")


def test_predictor_classifies_the_aligned_crop(trained):
    image = _faces(1)[0]
    predictor = predict.Predictor(trained, detector=_detector, margin=0.1)
    (face,) = predictor(image)
    crop = align_face(image, MARKS, box=BOX, output_size=48, margin=0.1, channels=1)
    want = trained.predict(np.rint(crop * 255).astype(np.uint8)[None])[0]
    assert face.box == BOX and face.score == 0.99
    np.testing.assert_allclose(face.probabilities, want, atol=1e-6)
    assert predictor(np.zeros((30, 30, 3), np.uint8)) == []
    assert all(v > 0 for v in predictor.seconds.values())


def test_rows_and_writers(tmp_path):
    names = ("anger", "happiness")
    faces = [predict.FacePrediction((1.0, 2.0, 30.0, 40.0), 0.9, np.array([0.25, 0.75])),
             predict.FacePrediction((50.0, 2.0, 80.0, 40.0), 0.8, np.array([0.6, 0.4]))]
    rows = predict.rows("v.mp4", faces, names, frame=7, seconds=0.7)
    assert [r["top_class"] for r in rows] == ["happiness", "anger"]
    assert rows[0]["p_anger"] == 0.25 and rows[1]["face"] == 1 and rows[1]["x1"] == 50.0
    for suffix in ("csv", "jsonl"):
        writer = predict.RowWriter(tmp_path / f"out.{suffix}", names)
        writer.write(rows)
        writer.close()
    with open(tmp_path / "out.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert table[1]["top_class"] == "anger" and float(table[0]["p_happiness"]) == 0.75
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert lines[0]["probabilities"] == {"anger": 0.25, "happiness": 0.75}
    assert lines[0]["frame"] == 7 and "p_anger" not in lines[0]
    with pytest.raises(ValueError, match="expected a .csv or .jsonl"):
        predict.RowWriter(tmp_path / "out.txt", names)


def test_annotate_draws_box_and_label():
    image = np.full((120, 160, 3), 90, np.uint8)
    face = predict.FacePrediction((40.0, 50.0, 100.0, 110.0), 0.9, np.array([0.2, 0.8]))
    out = predict.annotate(image, [face], ("anger", "happiness"))
    green = (out == (0, 255, 0)).all(-1)
    assert green[50, 40:101].all() and green[50:111, 40].all()  # The box's edges.
    assert green[30:50, 40:60].any()  # The label's background, above the box.
    assert (out[60:100, 50:90] == 90).all() and (out[:, 120:] == 90).all()  # Inside and away.


def test_predict_path_folder_of_images_and_a_video(tmp_path, trained):
    faces = _faces(4)
    root = tmp_path / "in"
    (root / "clips").mkdir(parents=True)
    Image.fromarray(faces[0]).save(root / "a.png")
    Image.fromarray(faces[1][:32, :32]).save(root / "small.jpg")  # The detector finds none.
    (root / "broken.png").write_text("not a png")
    _write_video(root / "clips" / "v.mp4", np.concatenate([faces[1:4]] * 2))  # 6 frames.
    writer = predict.RowWriter(tmp_path / "out.csv", trained.class_names)
    stats = predict.predict_path(predict.Predictor(trained, detector=_detector), root, writer,
                                 annotate_dir=tmp_path / "ann", every=2, log=lambda m: None)
    writer.close()
    assert {k: stats[k] for k in ("images", "videos", "frames", "faces", "without_face")} == {
        "images": 2, "videos": 1, "frames": 3, "faces": 4, "without_face": 1}
    assert stats["skipped"] == {"unreadable": 1}  # broken.png: sniffed, never decoded.
    with open(tmp_path / "out.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["file"], r["frame"]) for r in table] == [
        ("a.png", ""), ("clips/v.mp4", "0"), ("clips/v.mp4", "2"), ("clips/v.mp4", "4")]
    assert table[2]["time_s"] == "0.2"  # 10 frames/s.
    ann = tmp_path / "ann"
    assert (ann / "a.png.png").is_file() and (ann / "small.jpg.png").is_file()
    assert len(list((ann / "clips").glob("v.mp4.frame*.png"))) == 1
    with av.open(str(ann / "clips" / "v.mp4.annotated.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 3


@pytest.mark.slow
def test_real_video_and_command_line(shared_data, tmp_path, make_config):
    """The real MTCNN on every 12th frame of a one-face video (6 frames), through the CLI."""
    _workdir(tmp_path / "run", make_config)
    video = shared_data / "videos_unlabelled" / "single_face.mp4"
    cmd = [sys.executable, "-m", "fer_jax.predict", f"--workdir={tmp_path / 'run'}",
           f"--input={video}", f"--output={tmp_path / 'out.jsonl'}", "--every=12",
           f"--annotate={tmp_path / 'ann'}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "1 videos, 6 video frames: 6 faces" in out.stderr
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in lines] == [0, 12, 24, 36, 48, 60]
    for r in lines:  # The face is near the middle of the 640x360 frames.
        assert 150 < (r["x1"] + r["x2"]) / 2 < 450 and r["face_score"] > 0.9
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-3
    assert len(list((tmp_path / "ann").glob("single_face.mp4.frame*.png"))) == 1
    bad = subprocess.run([sys.executable, "-m", "fer_jax.predict", f"--workdir={tmp_path}",
                          f"--input={video}"], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env=env)
    assert bad.returncode == 1 and "is not a training workdir" in bad.stderr
