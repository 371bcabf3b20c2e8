"""Video corpus: sampling, pre-padding, bad inputs (unreadable, no face), cache, real CK+."""

import shutil

import av
import numpy as np
import pytest

from fer_jax.data import video


def test_sample_indices():
    assert video.sample_indices(5, 8).tolist() == [0, 1, 2, 3, 4]
    idx = video.sample_indices(45, 8)
    assert len(idx) == 8 and idx[0] == 0 and idx[-1] == 44 and np.all(np.diff(idx) > 0)
    assert video.sample_indices(45, 8, "last").tolist() == list(range(37, 45))
    with pytest.raises(ValueError, match="sampling"):
        video.sample_indices(4, 2, "random")


def test_pad_sequences_pre_pads_with_mask():
    seqs = [np.ones((2, 3)), 2 * np.ones((4, 3)), 3 * np.ones((6, 3))]
    out, mask = video.pad_sequences(seqs, 4)
    assert out.shape == (3, 4, 3)
    assert mask.tolist() == [[False, False, True, True], [True] * 4, [True] * 4]
    assert np.all(out[0, :2] == 0) and np.all(out[0, 2:] == 1)
    assert np.all(out[2] == 3)  # longer: the last 4 steps


def _write_video(path, frames, fps=10):
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_bad_inputs_are_named_or_counted(tmp_path):
    (tmp_path / "broken.mp4").write_bytes(b"this is not a video")
    _write_video(tmp_path / "blank.mp4", np.full((3, 64, 64, 3), 128, np.uint8))
    (tmp_path / "labels.csv").write_text(
        "video,subject,emotion\nbroken.mp4,S1,happy\nblank.mp4,S2,sad\n")
    settings = video.FaceSettings(image_size=32, max_frames=2)
    with pytest.raises(video.VideoError, match="broken.mp4"):
        video.load_video_corpus(tmp_path, settings=settings)
    with pytest.raises(ValueError, match="no usable video"):
        video.load_video_corpus(tmp_path, settings=settings, skip_unreadable=True)
    # One readable blank video is kept in the report of a corpus with a real face (below);
    # here both bad kinds are counted before the error.
    try:
        video.load_video_corpus(tmp_path, settings=settings, skip_unreadable=True)
    except ValueError as e:
        assert "broken.mp4" in str(e) and "blank.mp4" in str(e)


def test_labels_csv_errors(tmp_path):
    (tmp_path / "labels.csv").write_text("video,emotion\na.mp4,happy\n")
    with pytest.raises(ValueError, match="missing column"):
        video.read_labels(tmp_path / "labels.csv")
    (tmp_path / "labels.csv").write_text("video,subject,emotion\na.mp4,S1,boredom\n")
    with pytest.raises(ValueError, match="boredom"):
        video.read_labels(tmp_path / "labels.csv")


def test_synthetic_corpus_lengths_and_classes():
    c = video.synthetic_corpus(num_subjects=2, clips_per_class=1, min_frames=3, max_frames=5,
                               image_size=48)
    assert len(c) == 12 and c.class_names[3] == "happiness"
    assert all(3 <= len(f) <= 5 and f.shape[1:] == (48, 48, 3) for f in c.frames)
    assert sorted(set(c.subjects)) == ["s000", "s001"]


@pytest.mark.slow  # > 20 s on 2 cores: CI's slow step
def test_real_ckplus_video_cache_and_counts(shared_data, tmp_path):
    """Real CK+ clip + a blank clip: face crops, truncation, no-face count, cache hit."""
    src = shared_data / "ckplus_videos"
    shutil.copy(src / "S055_004.mp4", tmp_path / "S055_004.mp4")
    _write_video(tmp_path / "blank.mp4", np.full((3, 96, 96, 3), 128, np.uint8))
    (tmp_path / "labels.csv").write_text(
        "video,subject,emotion\nS055_004.mp4,S055,anger\nblank.mp4,S999,sadness\n")
    settings = video.FaceSettings(image_size=32, max_frames=3, detect_every=3)
    c = video.load_video_corpus(tmp_path, settings=settings, cache_dir=tmp_path / "cache")
    assert c.report["decoded"] == 2 and c.report["no_face"] == ["blank.mp4"]
    assert c.report["truncated"] == 1 and c.frames[0].shape == (3, 32, 32, 3)
    again = video.load_video_corpus(tmp_path, settings=settings, cache_dir=tmp_path / "cache")
    assert again.report["decoded"] == 0 and again.report["from_cache"] == 2
    np.testing.assert_array_equal(again.frames[0], c.frames[0])
    calls = []
    feats = video.cached_features(c, lambda x: calls.append(1) or x.reshape(len(x), -1)[:, :5]
                                  .astype(np.float32), model_key="m", cache_dir=tmp_path / "c",
                                  batch_size=4)
    video.cached_features(c, lambda x: calls.append(1), model_key="m",
                          cache_dir=tmp_path / "c", batch_size=4)
    assert feats[0].shape == (3, 5) and len(calls) == 1
