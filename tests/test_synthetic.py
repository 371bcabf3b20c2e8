"""Tests of the procedural synthetic face generator (fer_jax/data/synthetic.py)."""

import numpy as np
import pytest

from fer_jax.data import classes as classes_lib
from fer_jax.data import synthetic

SEVEN = tuple(c for c in classes_lib.CANONICAL if c != "contempt")


@pytest.mark.parametrize("size", synthetic.SIZES)
@pytest.mark.parametrize("channels", [1, 3])
def test_subject_shapes_and_dtypes(size, channels):
    gen = synthetic.SyntheticFaces(seed=0, image_size=size, channels=channels)
    split = gen.subject(3, images_per_class=2)
    assert split.images.shape == (16, size, size, channels)
    assert split.images.dtype == np.uint8
    assert split.labels.dtype == np.int32 and split.subjects.dtype == np.int32
    np.testing.assert_array_equal(split.labels, np.repeat(np.arange(8), 2))
    np.testing.assert_array_equal(split.subjects, np.full(16, 3))
    # Not a blank canvas: a face has a wide range of intensities.
    assert split.images.std() > 15 and split.images.max() - split.images.min() > 100


def test_same_arguments_give_identical_bytes_and_seeds_differ():
    make = lambda seed: synthetic.make_dataset(num_subjects=4, images_per_class=2,
                                               test_subjects=1, seed=seed)
    a, b, c = make(0), make(0), make(1)
    for split in ("train", "test"):
        assert a[split].images.tobytes() == b[split].images.tobytes()
        np.testing.assert_array_equal(a[split].labels, b[split].labels)
        assert np.abs(a[split].images.astype(int) - c[split].images).mean() > 10
    seq = lambda: synthetic.SyntheticFaces(seed=2).sequence(1, 3, num_frames=5)
    assert seq().tobytes() == seq().tobytes()


def test_subject_is_independent_of_other_subjects():
    fresh = synthetic.SyntheticFaces(seed=7, channels=3).subject(5, images_per_class=3)
    busy = synthetic.SyntheticFaces(seed=7, channels=3)
    for i in (0, 9, 4):
        busy.subject(i, images_per_class=2)
    np.testing.assert_array_equal(busy.subject(5, images_per_class=3).images, fresh.images)
    # The dataset's rows for subject 5 are exactly that subject rendered alone.
    ds = synthetic.make_dataset(num_subjects=6, images_per_class=3, test_subjects=2, seed=7,
                                channels=3)
    test = ds["test"]
    np.testing.assert_array_equal(test.images[test.subjects == 5], fresh.images)
    # Two different subjects look different (identity traits vary).
    other = synthetic.SyntheticFaces(seed=7, channels=3).subject(6, images_per_class=3)
    assert np.abs(other.images.astype(int) - fresh.images).mean() > 10


def test_make_dataset_balance_and_disjoint_subjects():
    ds = synthetic.make_dataset(num_subjects=10, images_per_class=3, test_subjects=0.3)
    assert ds.name == "synthetic" and ds.class_names == classes_lib.CANONICAL
    assert ds.image_shape == (48, 48, 1)
    train, test = ds["train"], ds["test"]
    assert set(np.unique(train.subjects)) == set(range(7))
    assert set(np.unique(test.subjects)) == {7, 8, 9}
    np.testing.assert_array_equal(np.bincount(train.labels, minlength=8), np.full(8, 7 * 3))
    np.testing.assert_array_equal(np.bincount(test.labels, minlength=8), np.full(8, 3 * 3))
    assert len(synthetic.make_dataset(num_subjects=3, images_per_class=1,
                                      test_subjects=2)["test"]) == 16


def test_class_subset_keeps_canonical_order_and_rendering():
    sub = synthetic.SyntheticFaces(seed=0, classes=["contempt", "happy", "anger"])
    assert sub.class_names == ("anger", "happiness", "contempt")
    full = synthetic.SyntheticFaces(seed=0)
    t = np.full(3, 0.9, np.float32)
    # Label k of the subset renders the same face as that class's canonical label.
    for k, name in enumerate(sub.class_names):
        np.testing.assert_array_equal(
            sub.render(2, np.full(3, k), t),
            full.render(2, np.full(3, classes_lib.CANONICAL.index(name)), t))
    ds = synthetic.make_dataset(num_subjects=3, images_per_class=2, test_subjects=1,
                                classes=SEVEN)
    assert ds.class_names == SEVEN and ds["train"].labels.max() == 6


def test_intensity_zero_is_the_same_neutral_face_for_every_class():
    gen = synthetic.SyntheticFaces(seed=3)
    zero = np.zeros(4, np.float32)
    neutral = gen.render(1, np.full(4, 6), zero)
    for label in range(8):
        np.testing.assert_array_equal(gen.render(1, np.full(4, label), zero), neutral)
    # At the apex, every pair of classes differs clearly somewhere in the face.
    apex = [gen.render(1, np.full(4, label), np.ones(4, np.float32), stream=0)
            for label in range(8)]
    for i in range(8):
        for j in range(i + 1, 8):
            diff = np.abs(apex[i].astype(int) - apex[j]).max(axis=(1, 2, 3))
            assert (diff > 25).all(), (classes_lib.CANONICAL[i], classes_lib.CANONICAL[j])


@pytest.mark.parametrize("noise_std", [0.0, 6.0])
def test_sequence_grows_from_neutral_to_apex(noise_std):
    gen = synthetic.SyntheticFaces(seed=0, image_size=96, channels=3, noise_std=noise_std)
    frame0 = None
    for label in range(8):
        clip = gen.sequence(4, label, num_frames=8)
        assert clip.shape == (8, 96, 96, 3) and clip.dtype == np.uint8
        # Frame 0 (intensity 0) does not depend on the label for the same clip index.
        frame0 = clip[0] if frame0 is None else frame0
        np.testing.assert_array_equal(clip[0], frame0)
        diff = np.abs(clip.astype(np.float32) - clip[:1]).mean(axis=(1, 2, 3))
        if classes_lib.CANONICAL[label] == "neutral":
            assert diff.max() <= 2.5 * noise_std, diff  # Only sensor noise changes.
        elif noise_std == 0:
            assert (np.diff(diff) > 0).all(), diff
        else:
            # Fresh sensor noise every frame adds a constant floor from frame 1 on.
            assert diff[-1] > diff[1] + 0.1, diff


def test_make_sequences_shapes():
    out = synthetic.make_sequences(num_subjects=2, clips_per_class=2, num_frames=4,
                                   classes=SEVEN, seed=1)
    assert out["videos"].shape == (2 * 7 * 2, 4, 48, 48, 1) and out["videos"].dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(out["labels"]), np.full(7, 4))
    np.testing.assert_array_equal(np.bincount(out["subjects"]), np.full(2, 14))
    assert out["class_names"] == SEVEN


def test_occlusion_changes_images():
    plain = synthetic.SyntheticFaces(seed=0).subject(0, images_per_class=2).images
    occluded = synthetic.SyntheticFaces(seed=0, occlusion_prob=1.0).subject(
        0, images_per_class=2).images
    change = np.abs(occluded.astype(int) - plain).mean(axis=(1, 2, 3))
    assert (change > 0.3).all() and change.mean() > 2, change


@pytest.mark.parametrize("kwargs, match", [
    (dict(image_size=16), "image_size"), (dict(image_size=1000), "image_size"),
    (dict(image_size=48.0), "image_size"), (dict(channels=2), "channels"),
    (dict(seed=-1), "seed"), (dict(classes=["smirk"]), "class name"),
    (dict(classes=[]), "classes"), (dict(classes="anger"), "classes"),
    (dict(intensity_range=(0.8, 0.2)), "intensity_range"), (dict(noise_std=-1), "noise_std"),
    (dict(occlusion_prob=2.0), "occlusion_prob"),
])
def test_bad_generator_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthetic.SyntheticFaces(**kwargs)


def test_bad_call_arguments_raise():
    gen = synthetic.SyntheticFaces(classes=SEVEN)
    with pytest.raises(ValueError, match="images_per_class"):
        gen.subject(0, images_per_class=0)
    with pytest.raises(ValueError, match="subject_id"):
        gen.subject(-1, images_per_class=1)
    with pytest.raises(ValueError, match="labels"):
        gen.render(0, np.array([7]), np.array([0.5]))
    with pytest.raises(ValueError, match="intensities"):
        gen.render(0, np.array([1]), np.array([1.5]))
    with pytest.raises(ValueError, match="intensities"):
        gen.render(0, np.array([1, 2]), np.array([0.5]))
    with pytest.raises(ValueError, match="num_frames"):
        gen.sequence(0, 1, num_frames=1)
    with pytest.raises(ValueError, match="labels"):
        gen.sequence(0, 9, num_frames=3)
    for kwargs, match in [(dict(num_subjects=1), "num_subjects"),
                          (dict(test_subjects=0), "test_subjects"),
                          (dict(test_subjects=5), "test_subjects"),
                          (dict(test_subjects=1.0), "test_subjects")]:
        args = dict(num_subjects=5, images_per_class=1, test_subjects=1) | kwargs
        with pytest.raises(ValueError, match=match):
            synthetic.make_dataset(**args)
    with pytest.raises(ValueError, match="clips_per_class"):
        synthetic.make_sequences(num_subjects=1, clips_per_class=0, num_frames=3)
