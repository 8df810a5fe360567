"""Decoding and the original's train/eval geometry."""

import io
import warnings

import numpy as np
import pytest
from PIL import Image

from dermjax.data import images


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Gradients plus noise: compresses and resizes like a photo, not like a flat test card."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, 128 + 100 * np.sin(x / 7 + y / 11)], -1)
    noise = np.random.default_rng(seed).normal(0, 6, base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def encode(array_or_image, fmt: str = "JPEG", **kwargs) -> bytes:
    img = (
        array_or_image
        if isinstance(array_or_image, Image.Image)
        else Image.fromarray(array_or_image)
    )
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("hw", "expected"),
    [((768, 1024), (246, 328)), ((1024, 768), (328, 246)), ((300, 300), (246, 246))],
)
def test_shorter_side_rule_sets_short_side_to_int_1_1_h_and_truncates_long_side(hw, expected):
    assert images.resized_size(hw, (224, 224), images.SHORTER) == expected
    assert images.decode(encode(photo(*hw)), "p", (224, 224), images.SHORTER).shape == (
        *expected,
        3,
    )


def test_exact_rule_resizes_to_h_w_ignoring_aspect():
    out = images.load_eval(encode(photo(90, 200)), "p", (32, 48))
    assert out.shape == (32, 48, 3) and out.dtype == np.uint8


def test_full_decode_equals_torchvision_resize_on_pil():
    transforms = pytest.importorskip("torchvision.transforms")
    data = encode(photo(120, 160))
    pil = Image.open(io.BytesIO(data)).convert("RGB")
    shorter = images.decode(data, "p", (64, 64), images.SHORTER, draft=False)
    exact = images.decode(data, "p", (64, 64), images.EXACT, draft=False)
    np.testing.assert_array_equal(shorter, np.asarray(transforms.Resize(70)(pil)))
    np.testing.assert_array_equal(exact, np.asarray(transforms.Resize((64, 64))(pil)))


def test_random_crop_is_a_window_inside_the_image_reaching_both_edges():
    rows, cols = np.mgrid[0:10, 0:14]
    image = np.stack([rows, cols, rows * 0], -1).astype(np.uint8)  # each pixel names its position
    tops, lefts = set(), set()
    for seed in range(200):
        crop = images.random_crop(image, (8, 8), np.random.default_rng(seed))
        top, left = int(crop[0, 0, 0]), int(crop[0, 0, 1])
        np.testing.assert_array_equal(crop, image[top : top + 8, left : left + 8])
        tops.add(top)
        lefts.add(left)
    assert tops == {0, 1, 2} and lefts == set(range(7))


def test_train_geometry_crops_from_the_shorter_side_resize_only_when_geometric():
    data = encode(photo(60, 100))
    rng = np.random.default_rng(0)
    assert images.load_train(data, "p", (32, 32), True, rng).shape == (32, 32, 3)
    exact = images.load_train(data, "p", (32, 32), False, rng)
    np.testing.assert_array_equal(exact, images.load_eval(data, "p", (32, 32)))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied(fmt):
    shown = np.zeros((40, 80, 3), np.uint8)
    shown[:, :40] = (255, 0, 0)  # red left half, blue right half as displayed
    shown[:, 40:] = (0, 0, 255)
    stored = np.rot90(shown, 1)  # orientation 6 means: rotate the stored pixels 90° clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(stored, fmt, exif=exif.tobytes())
    out = images.load_eval(data, "p", (40, 80)).astype(int)
    assert np.abs(out - shown).mean() < 8


@pytest.mark.parametrize("value", [0, 9, 300])
def test_an_orientation_outside_exifs_eight_values_leaves_the_pixels_as_stored(value):
    stored = photo(40, 80)
    exif = Image.Exif()
    exif[0x0112] = value
    data = encode(stored, "PNG", exif=exif.tobytes())
    assert np.array_equal(images.load_eval(data, "p", (40, 80)), stored)


def test_exif_orientation_with_reduced_decode_matches_transposed_full_image():
    shown = photo(240, 320)
    exif = Image.Exif()
    exif[0x0112] = 8  # stored rotated 90° clockwise; shown = stored rotated 90° counter-clockwise
    data = encode(np.rot90(shown, -1), exif=exif.tobytes())
    out = images.decode(data, "p", (48, 48), images.SHORTER)
    assert out.shape == (52, 69, 3)
    reference = np.asarray(Image.fromarray(shown).resize((69, 52), Image.Resampling.BILINEAR))
    assert np.abs(out.astype(int) - reference).mean() < 4


def test_palette_with_transparency_keeps_its_colours_when_alpha_is_dropped():
    img = Image.new("P", (8, 8))
    img.putpalette([200, 10, 10, 0, 255, 0] + [0] * 762)
    img.putpixel((0, 0), 1)
    data = encode(img, "PNG", transparency=0)  # index 0 (dark red) is transparent
    out = images.load_eval(data, "p", (8, 8))
    assert tuple(out[4, 4]) == (200, 10, 10)  # not composited onto black or white
    assert tuple(out[0, 0]) == (0, 255, 0)


def from_values(mode: str, values, bands: int = 1) -> Image.Image:
    """A 2 x 3 image of `mode` whose raw pixel values are `values` (row-major, per band)."""
    dtype = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2", "I": "<i4", "F": "<f4"}.get(mode, "u1")
    raw = np.asarray(values, dtype=dtype).reshape(2, 3, bands).tobytes()
    return Image.frombytes(mode, (3, 2), raw)


def grey(values) -> np.ndarray:
    return np.repeat(np.asarray(values, np.uint8).reshape(2, 3, 1), 3, axis=-1)


def rgb(values) -> np.ndarray:
    return np.asarray(values, np.uint8).reshape(2, 3, 3)


SIXTEEN_BIT = [0, 128, 129, 257, 1000, 65535]
SIXTEEN_BIT_AS_8 = grey([0, 0, 1, 1, 4, 255])  # round(v / 257)
PALETTE = [200, 10, 10, 0, 255, 0, 7, 8, 9] + [0] * 759
PALETTE_COLOURS = rgb([PALETTE[3 * (i % 3) : 3 * (i % 3) + 3] for i in range(6)])
COLOURS = [(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (12, 34, 56)]
ALPHAS = [0, 255, 1, 128, 0, 7]
CMYK = [(0, 0, 0, 0), (255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 255), (0, 0, 0, 0)]
CMYK_AS_RGB = [(255, 255, 255), (0, 255, 255), (255, 0, 255), (255, 255, 0), (0, 0, 0)]


def palette_image(mode: str) -> Image.Image:
    if mode == "PA":
        img = from_values("PA", [[i % 3, ALPHAS[i]] for i in range(6)], bands=2)
    else:
        img = from_values("P", [i % 3 for i in range(6)])
    img.putpalette(PALETTE)
    return img


# name: (image, file format to save it in, or None: no format stores the mode, expected pixels)
MODE_CASES = {
    "I;16 (16-bit PNG)": (from_values("I;16", SIXTEEN_BIT), "PNG", SIXTEEN_BIT_AS_8),
    "I;16B": (from_values("I;16B", SIXTEEN_BIT), "TIFF", SIXTEEN_BIT_AS_8),
    "I;16L": (from_values("I;16L", SIXTEEN_BIT), None, SIXTEEN_BIT_AS_8),
    "I": (from_values("I", [-5, 0, 257, 1000, 65535, 70000]), "TIFF", grey([0, 0, 1, 4, 255, 255])),
    "F in [0, 1]": (
        from_values("F", [0, 0.25, 0.5, 1, 0.1, 0.75]),
        "TIFF",
        grey([0, 64, 128, 255, 26, 191]),
    ),
    "F in [0, 255]": (
        from_values("F", [0, 12.4, 200, 300, -3, 1.5]),
        "TIFF",
        grey([0, 12, 200, 255, 0, 2]),
    ),
    "1": (
        from_values("L", [0, 255, 0, 255, 255, 0]).convert("1"),
        "PNG",
        grey([0, 255, 0, 255, 255, 0]),
    ),
    "L": (from_values("L", [0, 1, 100, 128, 254, 255]), "PNG", grey([0, 1, 100, 128, 254, 255])),
    "LA": (
        from_values("LA", [[10 * (i + 1), ALPHAS[i]] for i in range(6)], bands=2),
        "PNG",
        grey([10, 20, 30, 40, 50, 60]),
    ),
    "La (premultiplied)": (from_values("La", [[100, 128]] * 6, bands=2), None, grey([199] * 6)),
    "P": (palette_image("P"), "PNG", PALETTE_COLOURS),
    "PA": (palette_image("PA"), "TIFF", PALETTE_COLOURS),
    "RGB": (from_values("RGB", COLOURS, bands=3), "PNG", rgb(COLOURS)),
    "RGBA": (
        from_values("RGBA", [(*c, a) for c, a in zip(COLOURS, ALPHAS, strict=True)], bands=4),
        "PNG",
        rgb(COLOURS),
    ),
    "RGBa (premultiplied)": (
        from_values("RGBa", [(100, 50, 20, 128)] * 6, bands=4),
        None,
        rgb([(199, 99, 39)] * 6),
    ),
    "CMYK": (from_values("CMYK", CMYK, bands=4), "TIFF", rgb([*CMYK_AS_RGB, (255, 255, 255)])),
    "YCbCr": (
        from_values("YCbCr", [(0, 128, 128), (128, 128, 128), (255, 128, 128)] * 2, bands=3),
        "TIFF",
        grey([0, 128, 255] * 2),
    ),
}


@pytest.mark.parametrize("case", MODE_CASES)
def test_every_pil_mode_decodes_to_the_expected_8_bit_rgb_values(case):
    img, fmt, expected = MODE_CASES[case]
    if fmt is None:  # no file format stores this mode: check the conversion itself
        out = np.asarray(images.to_rgb(img))
    else:
        data = encode(img, fmt)
        assert Image.open(io.BytesIO(data)).mode == img.mode  # the file really holds that mode
        out = images.load_eval(data, "p", (2, 3))
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out, expected)


def test_sixteen_bit_png_is_scaled_not_clipped_to_white():
    ramp = np.linspace(0, 65535, 64 * 64).astype(np.uint16).reshape(64, 64)
    out = images.load_eval(encode(Image.fromarray(ramp), "PNG"), "p", (64, 64))
    np.testing.assert_array_equal(out[..., 0], (ramp.astype(np.int64) * 2 + 257) // 514)
    assert 120 < out.mean() < 135  # a ramp is mid-grey on average, not white


def test_reduced_size_decode_gives_same_shape_and_close_pixels():
    data = encode(photo(768, 1024), quality=90)
    full = images.decode(data, "p", (64, 64), images.SHORTER, draft=False)
    reduced = images.decode(data, "p", (64, 64), images.SHORTER, draft=True)
    assert reduced.shape == full.shape == (70, 93, 3)
    diff = np.abs(reduced.astype(int) - full)
    assert diff.mean() < 1.5 and np.percentile(diff, 99) < 8


@pytest.mark.parametrize("data", [b"", b"not an image", "truncated"])
def test_unreadable_bytes_raise_bad_image_error_naming_the_path(data):
    if data == "truncated":
        data = encode(photo(64, 64))[:500]
    with pytest.raises(images.BadImageError, match=r"some/file\.jpg"):
        images.load_eval(data, "some/file.jpg", (8, 8))


def test_text_and_empty_files_give_clear_reasons_without_an_object_repr(tmp_path):
    from dermjax.evaluation import inference

    text, empty = tmp_path / "x.jpg", tmp_path / "empty.png"
    text.write_text("this is not a picture\n")
    empty.write_bytes(b"")
    paths = [str(text), str(empty)]
    loaded, errors = inference.load_images(paths, (8, 8))
    assert loaded == [None, None]
    assert errors == {
        str(text): "not an image file (PIL cannot identify its format)",
        str(empty): "empty file",
    }
    assert not any("object at 0x" in reason for reason in errors.values())


def test_photos_over_pils_warning_size_decode_quietly_and_over_its_limit_are_bad(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # warns above 100 px, refuses above 200

    def png(side):
        buffer = io.BytesIO()
        Image.fromarray(np.full((side, side, 3), 90, np.uint8)).save(buffer, "PNG")
        return buffer.getvalue()

    with warnings.catch_warnings(record=True) as caught:
        images.quiet_large_image_warnings()  # at import; pytest resets filters for each test
        assert images.load_eval(png(12), "big.png", (8, 8)).shape == (8, 8, 3)
    assert not [w for w in caught if w.category is Image.DecompressionBombWarning]
    with pytest.raises(images.BadImageError, match=r"exceeds limit of 200 pixels.*; downscale"):
        images.load_eval(png(15), "huge.png", (8, 8))
