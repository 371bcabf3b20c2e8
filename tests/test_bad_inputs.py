"""The bad-input sweep (docs/results.md, "2026-12-03: bad-input sweep").

Every kind of bad input either raises one ValueError naming the file (and the row and field for a
csv) and what was expected, or is skipped and counted under a named reason; unusual but valid
images (CMYK, 16-bit, palette, alpha) decode to the pixel values an independent conversion gives.
Inputs are written with PIL / NumPy into tmp_path; nothing compiles a model.
"""

import gzip
import io
import zlib

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from fer_jax.data import ckplus, fer2013, prepare, readers, types
from fer_jax.losses import classification

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (12, 10, 3), np.uint8)  # H=12, W=10.


# ------------------------------------------------------------------------------ bad image files.


def _truncated(fmt: str) -> bytes:
    """The first half of a 64x64 image file: the header intact, the pixel data cut."""
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), np.uint8)).save(buf, fmt)
    return buf.getvalue()[:len(buf.getvalue()) // 2]


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (CRC fixed) over 1 pixel of data: PIL's
    decompression-bomb guard sees the declared size at open, before any decoding."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:20], data[20:24] = width.to_bytes(4, "big"), height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def _float_tiff() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(RNG.random((6, 5)).astype(np.float32), "F").save(buf, "TIFF")
    return buf.getvalue()


# name -> (content, sniff_image's reason (None = recognised), what decode_image's message says).
BAD_IMAGES = {
    "empty.png": (b"", readers.EMPTY, "empty file (0 bytes); expected an image"),
    "truncated.jpg": (_truncated("JPEG"), None,
                      "cannot decode image (OSError: image file is truncated"),
    "truncated.png": (_truncated("PNG"), None, "expected a complete PNG file"),
    "huge.png": (_png_declaring(20000, 20000), readers.TOO_LARGE,
                 "image too large to decode (Image size (400000000 pixels) exceeds limit"),
    # 10^8 pixels: past MAX_IMAGE_PIXELS, under twice it, where PIL itself only warns.
    "large.png": (_png_declaring(10000, 10000), readers.TOO_LARGE,
                  "expected at most PIL.Image.MAX_IMAGE_PIXELS"),
    "text.jpg": (b"not a picture\n", readers.UNREADABLE,
                 "cannot decode image (UnidentifiedImageError"),
    "float.tif": (_float_tiff(), None, "mode F (32-bit float) pixels; expected an 8-bit or 16-bit"),
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_image_named_with_reason(tmp_path, name):
    content, reason, message = BAD_IMAGES[name]
    path = tmp_path / name
    path.write_bytes(content)
    assert readers.sniff_image(path) == reason
    with pytest.raises(readers.ImageError) as e:
        readers.decode_image(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)
    assert e.value.reason == (reason or readers.UNREADABLE)
    # CK+ style folders decode through the same rules and say the same.
    with pytest.raises(ValueError) as e:
        ckplus.read_image(path, channels=1)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


def test_file_gone_after_listing_is_counted_missing(tmp_path):
    Image.fromarray(RGB).save(tmp_path / "a.png")
    index = readers.Index("faces", (readers.Entry(tmp_path / "a.png", "happiness"),
                                    readers.Entry(tmp_path / "gone.png", "happiness")))
    report = prepare.Report(("happiness",))
    assert len(prepare.records_from_index(index, report)) == 1
    assert [(d["reason"], d["path"]) for d in report.drops] == [
        (readers.MISSING, str(tmp_path / "gone.png"))]
    with pytest.raises(ValueError, match=r"gone\.png: file not found \(moved or deleted"):
        readers.load_index(index, image_size=8)


def test_text_file_without_image_suffix_is_not_image(tmp_path):
    (tmp_path / "labels.txt").write_text("S010 happy\n")
    assert readers.sniff_image(tmp_path / "labels.txt") == readers.NOT_IMAGE


def _bad_folder(root):
    """root/happy: 2 good images and every bad file of BAD_IMAGES plus a text file."""
    (root / "happy").mkdir(parents=True)
    Image.fromarray(RGB).save(root / "happy" / "good1.png")
    Image.fromarray(RGB[:, :, 0]).save(root / "happy" / "good2.png")
    for name, (content, _, _) in BAD_IMAGES.items():
        (root / "happy" / name).write_bytes(content)
    (root / "happy" / "notes.txt").write_text("taken 2026-12-03\n")
    return root


def test_strict_load_index_names_first_reject_and_counts_all(tmp_path):
    index = readers.index_class_folders(_bad_folder(tmp_path / "faces"))
    reasons = {p.rsplit("/", 1)[-1]: r for p, r in index.rejected}
    assert reasons == {"empty.png": "empty_file", "huge.png": "too_large",
                       "large.png": "too_large", "text.jpg": "unreadable",
                       "notes.txt": "not_image"}
    with pytest.raises(ValueError) as e:
        readers.load_index(index, image_size=8)
    msg = str(e.value)
    first_path, first_reason = index.rejected[0]
    assert msg.startswith(f"{first_path}: {first_reason} ({readers.REASONS[first_reason]})")
    assert "faces has 5 files that are no examples: " in msg
    assert "2 too_large (.png 2)" in msg and "1 empty_file (.png 1)" in msg
    assert "1 not_image (.txt 1)" in msg and "1 unreadable (.jpg 1)" in msg
    # Without the rejects, the first undecodable entry stops the strict load, named.
    kept = readers.Index(index.name, index.entries)
    with pytest.raises(ValueError, match=r"float\.tif: mode F \(32-bit float\) pixels"):
        readers.load_index(kept, image_size=8)


def test_prepare_counts_every_bad_file_under_its_reason(tmp_path):
    index = readers.index_class_folders(_bad_folder(tmp_path / "faces"))
    report = prepare.Report(("happiness",))
    records = prepare.records_from_index(index, report)
    assert sorted(r.source.rsplit("/", 1)[-1] for r in records) == ["good1.png", "good2.png"]
    dropped = {}
    for d in report.drops:
        dropped.setdefault(d["reason"], []).append(d["path"].rsplit("/", 1)[-1])
    assert {k: sorted(v) for k, v in dropped.items()} == {
        "empty_file": ["empty.png"], "not_image": ["notes.txt"],
        "too_large": ["huge.png", "large.png"],
        "unreadable": ["float.tif", "text.jpg", "truncated.jpg", "truncated.png"]}
    details = {d["path"].rsplit("/", 1)[-1]: d["detail"] for d in report.drops if d["detail"]}
    assert "mode F (32-bit float) pixels" in details["float.tif"]
    assert "image file is truncated" in details["truncated.png"]
    stage = report.stages[0]
    assert stage["images_in"] == 10 and stage["images_out"] == 2
    md = report.to_markdown()
    assert "### too_large (2)" in md and "### unreadable (4)" in md and "huge.png" in md


# ------------------------------------------------------------------------------ odd valid images.


def _bt601(rgb: np.ndarray) -> np.ndarray:
    """Independent luma: round(0.299 R + 0.587 G + 0.114 B)."""
    return np.round(rgb.astype(np.float64) @ [0.299, 0.587, 0.114]).astype(np.int64)


def test_cmyk_converts_multiplicatively(tmp_path):
    """R = (255 - C)(255 - K) / 255: exact for a lossless TIFF; a JPEG (Adobe-inverted CMYK on
    disk) within its compression error; gray is the BT.601 luma of that RGB."""
    cmyk = RNG.integers(0, 256, (12, 10, 4), np.uint8)
    expected = np.round((255.0 - cmyk[..., :3]) * (255.0 - cmyk[..., 3:]) / 255.0)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.tif")
    rgb, mode = readers.decode_image(tmp_path / "c.tif")
    assert mode == "CMYK"
    np.testing.assert_array_equal(rgb, expected)
    gray = ckplus.read_image(tmp_path / "c.tif", channels=1)[..., 0]
    assert np.abs(gray.astype(np.int64) - _bt601(expected)).max() <= 1

    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.jpg", quality=100)
    with Image.open(tmp_path / "c.jpg") as im:
        assert im.mode == "CMYK" and "adobe" in im.info
    rgb, _ = readers.decode_image(tmp_path / "c.jpg")
    assert np.abs(rgb.astype(np.int64) - expected).max() <= 2  # 1 with libjpeg-turbo 3.


@pytest.mark.parametrize("mode,suffix", [("I;16", "png"), ("I;16B", "tif")])
def test_16bit_maps_linearly_in_every_reader(tmp_path, mode, suffix):
    deep = RNG.integers(0, 65536, (12, 10)).astype(np.uint16)
    deep[0, :4] = [0, 257, 32768, 65535]
    expected = np.round(deep / 65535.0 * 255.0).astype(np.uint8)
    np.testing.assert_array_equal(expected[0, :4], [0, 1, 128, 255])
    path = tmp_path / "faces" / "happy" / f"S001_deep.{suffix}"
    path.parent.mkdir(parents=True)
    # Built from bytes: PIL's convert('I;16B') clips to 255.
    Image.frombytes(mode, (10, 12), deep.astype(">u2" if mode == "I;16B" else "<u2").tobytes()
                    ).save(path)
    rgb, got_mode = readers.decode_image(path)
    assert got_mode == mode
    np.testing.assert_array_equal(rgb, np.repeat(expected[..., None], 3, axis=2))
    # CK+ reader: was PIL's convert('L'), which clips every value above 255 to white.
    np.testing.assert_array_equal(ckplus.read_image(path, channels=1)[..., 0], expected)
    if f".{suffix}" in ckplus.IMAGE_SUFFIXES:  # read_image_folder takes CK+'s suffixes only.
        folder = ckplus.read_image_folder(tmp_path / "faces")
        np.testing.assert_array_equal(folder.images[0, ..., 0], expected)
    ds = readers.load_index(readers.index_class_folders(tmp_path / "faces"), image_size=12,
                            channels=1)
    assert ds["all"].images.shape == (1, 12, 12, 1)


def test_32bit_integer_beyond_16_bits_is_refused(tmp_path):
    Image.fromarray(np.array([[0, 70000]], np.int32), "I").save(tmp_path / "wide.tif")
    with pytest.raises(ValueError, match=r"wide\.tif: I pixels span \[0, 70000\]; expected "
                                         r"8-bit or 16-bit unsigned"):
        ckplus.read_image(tmp_path / "wide.tif")


def test_palette_and_alpha(tmp_path):
    """Palette: the palette's colour per index; LA / RGBA: alpha dropped, colour kept."""
    pal = Image.fromarray(RGB).quantize(colors=16)
    pal.save(tmp_path / "p.png")
    index = np.asarray(pal)
    table = np.array(pal.getpalette(), np.uint8).reshape(-1, 3)
    rgb, mode = readers.decode_image(tmp_path / "p.png")
    assert mode == "P"
    np.testing.assert_array_equal(rgb, table[index])
    gray = ckplus.read_image(tmp_path / "p.png", channels=1)[..., 0]
    assert np.abs(gray.astype(np.int64) - _bt601(table[index])).max() <= 1

    la = np.stack([RGB[..., 0], RGB[..., 1]], axis=-1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    rgb, mode = readers.decode_image(tmp_path / "la.png")
    assert mode == "LA"
    np.testing.assert_array_equal(rgb, np.repeat(la[..., :1], 3, axis=2))

    rgba = np.concatenate([RGB, np.zeros_like(RGB[..., :1])], axis=-1)  # Fully transparent.
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    rgb, mode = readers.decode_image(tmp_path / "a.png")
    assert mode == "RGBA"
    np.testing.assert_array_equal(rgb, RGB)
    np.testing.assert_array_equal(ckplus.read_image(tmp_path / "a.png", channels=3), RGB)


def test_gray_ck_images_unchanged(tmp_path):
    """8-bit gray files (all of CK+48) read exactly as before the shared decoder."""
    gray = RNG.integers(0, 256, (48, 48), np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    np.testing.assert_array_equal(ckplus.read_image(tmp_path / "g.png")[..., 0], gray)
    with Image.open(tmp_path / "g.png") as im:
        old = np.asarray(im.convert("L").resize((24, 24), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(ckplus.read_image(tmp_path / "g.png", image_size=24)[..., 0],
                                  old)


# ------------------------------------------------------------------------------ FER-2013 csv.

PIXELS = " ".join(str(v) for v in RNG.integers(0, 256, 2304))
HEADER = "emotion,pixels,Usage\n"
GOOD = f"3,{PIXELS},Training\n"

BAD_CSVS = {
    "wrong_pixel_count": (HEADER + GOOD + "0," + " ".join(["1"] * 2303) + ",Training\n",
                          "data row 1 (line 3): field 'pixels' must be 2304 space-separated "
                          "integers 0..255 (48x48), got 2303 values"),
    "non_numeric": (HEADER + "0,x" + PIXELS[PIXELS.index(" "):] + ",PublicTest\n",
                    "data row 0 (line 2): field 'pixels' must be 2304 space-separated integers "
                    "0..255 (48x48), got non-integer values ['x']"),
    "pixel_over_255": (HEADER + "0,256" + " 7" * 2303 + ",Training\n",
                       "data row 0 (line 2): field 'pixels' has values outside 0..255 "
                       "(min 7, max 256)"),
    "label_7": (HEADER + GOOD + f"7,{PIXELS},Training\n",
                "data row 1 (line 3): field 'emotion' must be an integer 0..6, got '7'"),
    "label_negative": (HEADER + f"-1,{PIXELS},Training\n",
                       "data row 0 (line 2): field 'emotion' must be an integer 0..6, got '-1'"),
    "bad_usage": (HEADER + f"0,{PIXELS},Train\n",
                  "data row 0 (line 2): field 'Usage' must be one of ['Training', 'PublicTest', "
                  "'PrivateTest'], got 'Train'"),
    "missing_column": ("emotion,Usage\n0,Training\n",
                       ": header lacks column(s) ['pixels']; expected the header "
                       "emotion,pixels,Usage (any order)"),
    "truncated_row": (HEADER + GOOD + f"0,{PIXELS[:100]}",
                      "data row 1 (line 3): expected 3 fields emotion,pixels,Usage, got 2"),
    "empty": ("", ": file is empty; expected the header emotion,pixels,Usage"),
    "header_only": (HEADER, ": no data rows after the header"),
    "latin1": (HEADER + GOOD + "0,1 2,Entra\xeenement\n",
               " line 3: byte b'\\xee' at column 12 is not UTF-8 text; expected a csv of ASCII"),
}


@pytest.mark.parametrize("case", sorted(BAD_CSVS))
def test_bad_fer2013_csv_names_file_row_and_field(tmp_path, case):
    text, message = BAD_CSVS[case]
    path = tmp_path / "fer2013.csv"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError) as e:
        fer2013.read_csv(path)
    assert str(e.value).startswith(str(path)) and message in str(e.value), str(e.value)


def test_bad_fer2013_gzip(tmp_path):
    data = gzip.compress((HEADER + GOOD * 40).encode())
    path = tmp_path / "fer2013.csv.gz"
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"fer2013\.csv\.gz: cannot read past line \d+ "
                                         r"\(EOFError: .*\); expected a complete gzip file"):
        fer2013.read_csv(path)
    path.write_text(HEADER + GOOD)  # Named .gz, holds plain text.
    with pytest.raises(ValueError, match=r"fer2013\.csv\.gz: cannot read past line 0 "
                                         r"\(BadGzipFile: Not a gzipped file"):
        fer2013.read_csv(path)


def test_fer2013_csv_variants_that_are_fine(tmp_path):
    """A byte-order mark (a spreadsheet's re-save), reordered and padded column names and blank
    lines read to the same rows as Kaggle's file."""
    expected = np.array(PIXELS.split(), np.uint8).reshape(48, 48, 1)
    path = tmp_path / "fer2013.csv"
    path.write_text("\ufeffUsage, emotion, pixels\r\n\r\n" + f"PrivateTest, 3, {PIXELS}\r\n\r\n",
                    encoding="utf-8")
    images, codes, usage = fer2013.read_csv(path)
    np.testing.assert_array_equal(images, expected[None])
    assert codes.tolist() == [3] and usage.tolist() == ["PrivateTest"]


def test_bad_ferplus_votes(tmp_path):
    usage = np.array(["Training", "Training"])
    head = "Usage,Image name," + ",".join(fer2013.FERPLUS_COLUMNS) + "\n"
    path = tmp_path / "fer2013new.csv"
    path.write_text("")
    with pytest.raises(ValueError, match=r"fer2013new\.csv: expected the header Usage,Image "
                                         r"name,neutral,.*,NF, got an empty file"):
        fer2013.read_ferplus_votes(path, usage)
    path.write_text(head + "Training,a.png,4,0,0,0,0,0,0,0,0,6\n"
                    + "Training,b.png,4,0,two,0,0,0,0,0,0,6\n")
    with pytest.raises(ValueError, match=r"fer2013new\.csv data row 1 \(line 3\): votes must be "
                                         r"non-negative integers"):
        fer2013.read_ferplus_votes(path, usage)


# ------------------------------------------------------------------------------ labels.


def _split(labels):
    labels = np.asarray(labels)
    return types.Split(np.zeros((len(labels), 4, 4, 1), np.uint8), labels)


@pytest.mark.parametrize("labels,message", [
    ([0, 2, 3, 3], "label 3 at row 2 is outside [0, 3) (2 such rows); expected an index into "
                   "its 3 class names"),
    ([0, -1, 1, 2], "label -1 at row 1 is outside [0, 3) (1 such rows); expected an index "
                    "into its 3 class names"),
    (np.array([0.0, 1.0]), "labels must be (N,) integer class indices, got float64 (2,)"),
])
def test_dataset_refuses_labels_out_of_range(labels, message):
    names = ("anger", "happiness", "neutral")
    with pytest.raises(ValueError) as e:
        types.Dataset("mydata", names, {"train": _split([0, 1]), "test": _split(labels)})
    assert str(e.value) == f"dataset 'mydata' split 'test': {message}"


def test_dataset_refuses_label_dist_of_wrong_width():
    split = types.Split(np.zeros((2, 4, 4, 1), np.uint8), np.array([0, 1]),
                        label_dist=np.full((2, 8), 1 / 8, np.float32))
    with pytest.raises(ValueError, match=r"dataset 'ferplus' split 'train': label_dist has "
                                         r"shape \(2, 8\); expected \(N, 7\)"):
        types.Dataset("ferplus", tuple(f"c{i}" for i in range(7)), {"train": split})


def test_readers_label_check_passes_real_layouts(tmp_path):
    """No false alarm: a class-folder dataset's labels are checked and pass; an empty split too."""
    _bad_folder(tmp_path / "faces")
    for name in BAD_IMAGES:
        (tmp_path / "faces" / "happy" / name).unlink()
    (tmp_path / "faces" / "happy" / "notes.txt").unlink()
    ds = readers.load_index(readers.index_class_folders(tmp_path / "faces"), image_size=8)
    assert ds["all"].labels.tolist() == [0, 0] and ds.class_names == ("happiness",)
    empty = types.Split(np.zeros((0, 4, 4, 1), np.uint8), np.zeros(0, np.int32))
    assert types.Dataset("d", ("anger",), {"test": empty}).num_classes == 1


def test_jitted_loss_assumes_labels_in_range():
    """Why the data boundary checks: an unmasked out-of-range label makes the loss NaN (no
    per-step host check); masked out (padding), it is ignored."""
    logits = jnp.zeros((3, 4))
    labels = jnp.array([0, 4, 1])
    assert np.isnan(classification.weighted_cross_entropy(logits, labels))
    masked = classification.weighted_cross_entropy(logits, labels, mask=jnp.array([1, 0, 1]))
    np.testing.assert_allclose(masked, np.log(4.0), rtol=1e-6)
