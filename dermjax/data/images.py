"""Image decoding and the original workflow's geometry, producing uint8 HWC arrays.

Two load rules cover every transform of the original (`img_size` is `(H, W)`):
  * `"shorter"` — torchvision `Resize(int(1.1 * H))`: the shorter side becomes `int(1.1 * H)`, the
    long side `int(short_target * long / short)`, aspect kept. The train transform then takes a
    `RandomCrop((H, W))`. Used for training when geometric augmentation is active.
  * `"exact"` — torchvision `Resize((H, W))`: exact H x W, aspect not kept. Used for evaluation and
    for training without geometric augmentation.

Resizing is PIL bilinear (always antialiased), which is what torchvision does for PIL images.
JPEGs are decoded at reduced size first (`Image.draft`: DCT scaling by 1/2, 1/4 or 1/8 while
staying at least as large as the resize target), which is several times faster on photo-sized
files and changes pixels by about one grey level. Unlike the original, EXIF orientation is applied.
Photos above PIL's decompression-bomb warning size (89 Mpx) decode without that warning; above
its limit (twice that) they are bad images with the fix named.

Every PIL mode becomes 8-bit RGB by value, not by clipping (see `to_rgb`): 16-bit greyscale is
scaled by 1/257, alpha is dropped after un-premultiplying, palettes and colour spaces are
converted.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from dermjax.errors import DataError

SHORTER = "shorter"
EXACT = "exact"
RULES = (SHORTER, EXACT)
BAD_IMAGE_POLICIES = ("skip", "error")  # data.on_bad_image: skip (mask, count, log) or error

_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = (5, 6, 7, 8)


def quiet_large_image_warnings() -> None:
    """Drops PIL's warning for photos above 89 Mpx (done at import): large clinical photos are
    legitimate; its hard limit (DecompressionBombError) still applies."""
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


quiet_large_image_warnings()


class BadImageError(DataError):
    """An image that is missing, truncated or cannot be decoded (skipped, or with
    data.on_bad_image=error raised to the user)."""

    def __init__(self, path: str, reason: str):
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"bad image {self.path}: {self.reason}"


def _grey(values: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(values.astype(np.uint8)[..., None], 3, axis=-1), "RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """`img` as 8-bit RGB with every mode PIL opens mapped by value.

    * I;16, I;16B, I;16L, I;16N and I (16-bit greyscale, as 16-bit PNGs and TIFFs open): each
      value v, clipped to [0, 65535], becomes round(v / 257), so 65535 is white and 257 is 1.
      PIL's own `convert` clips these at 255 instead, which turns almost every pixel white.
    * F (32-bit float): values in [0, 1] when the image's maximum is at most 1, else in [0, 255];
      round(v * 255) or round(v), clipped, NaN as 0.
    * LA, La, PA, RGBA, RGBa, and P with a transparent colour: the colour (un-premultiplied for
      La and RGBa), alpha dropped.
    * 1, L, P, CMYK, YCbCr, LAB, HSV and others: PIL's conversion to RGB.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "I" or mode.startswith("I;16"):
        v = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        return _grey((2 * v + 257) // 514)  # round(v / 257); never a tie since 257 is odd
    if mode == "F":
        v = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        scale = 255.0 if v.size and v.max() <= 1.0 else 1.0
        return _grey(np.clip(np.rint(v * scale), 0, 255))
    if mode == "La":
        img = img.convert("LA")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def train_rule(geometric: bool) -> str:
    """The load rule of the train transform: shorter-side resize + crop iff geometric aug is on."""
    return SHORTER if geometric else EXACT


def shorter_side_target(img_size: tuple[int, int]) -> int:
    """`int(img_size[0] * 1.1)`, the original's pre-crop shorter side (246 for 224)."""
    return int(img_size[0] * 1.1)


def resized_size(hw: tuple[int, int], img_size: tuple[int, int], rule: str) -> tuple[int, int]:
    """Output (H, W) of the rule for an input of size `hw`, with torchvision's rounding."""
    if rule == EXACT:
        return int(img_size[0]), int(img_size[1])
    if rule != SHORTER:
        raise ValueError(f"unknown resize rule {rule!r}; expected one of {RULES}")
    h, w = hw
    size = shorter_side_target(img_size)
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    return (new_long, size) if w <= h else (size, new_long)


def decode(
    data: bytes, path: str, img_size: tuple[int, int], rule: str, *, draft: bool = True
) -> np.ndarray:
    """Decode `data` and resize it by `rule`; returns uint8[h, w, 3] in display orientation.

    Raises BadImageError (naming `path`) for anything PIL cannot read completely.
    """
    if not data:
        raise BadImageError(path, "empty file")
    try:
        img = Image.open(io.BytesIO(data))
        is_jpeg = img.format == "JPEG"
        if not is_jpeg:
            img.load()  # PNG and others may keep EXIF in chunks after the pixel data
        orientation = img.getexif().get(_ORIENTATION_TAG, 1)
        if orientation not in _TRANSPOSE:
            orientation = 1
        swap = orientation in _SWAPS_AXES
        shown_hw = (img.width, img.height) if swap else (img.height, img.width)
        out_h, out_w = resized_size(shown_hw, img_size, rule)
        stored_wh = (out_h, out_w) if swap else (out_w, out_h)
        full_w, full_h = img.size
        box = None
        if draft and is_jpeg:
            drafted = img.draft("RGB", stored_wh)
            if drafted is not None:
                box = drafted[1]
        if box is None:
            box = (0, 0, full_w, full_h)
        img.load()
        img = to_rgb(img)
        if img.size != stored_wh or box != (0, 0, *img.size):
            img = img.resize(stored_wh, Image.Resampling.BILINEAR, box=box)
        if orientation != 1:
            img = img.transpose(_TRANSPOSE[orientation])
        return np.asarray(img, dtype=np.uint8)
    except UnidentifiedImageError as e:  # its message is a BytesIO repr, useless to a user
        raise BadImageError(path, "not an image file (PIL cannot identify its format)") from e
    except Image.DecompressionBombError as e:
        raise BadImageError(path, f"{e}; downscale the image") from e
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise BadImageError(path, f"{type(e).__name__}: {e}") from e


def random_crop(
    image: np.ndarray, img_size: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """torchvision `RandomCrop((H, W))`: top uniform in [0, h-H], left uniform in [0, w-W].

    An image smaller than the crop in some dimension (only possible for non-square `img_size`) is
    first zero-padded symmetrically, as `RandomCrop(pad_if_needed=True)` would, instead of failing.
    """
    th, tw = int(img_size[0]), int(img_size[1])
    h, w = image.shape[:2]
    if h < th or w < tw:
        ph, pw = max(th - h, 0), max(tw - w, 0)
        pad = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0))
        image = np.pad(image, pad)
        h, w = image.shape[:2]
    top = int(rng.integers(0, h - th + 1))
    left = int(rng.integers(0, w - tw + 1))
    return image[top : top + th, left : left + tw]


def load_train(
    data: bytes,
    path: str,
    img_size: tuple[int, int],
    geometric: bool,
    rng: np.random.Generator,
    *,
    draft: bool = True,
) -> np.ndarray:
    """The original train geometry: uint8[H, W, 3]."""
    image = decode(data, path, img_size, train_rule(geometric), draft=draft)
    return random_crop(image, img_size, rng) if geometric else image


def load_eval(
    data: bytes, path: str, img_size: tuple[int, int], *, draft: bool = True
) -> np.ndarray:
    """The original eval geometry (exact resize): uint8[H, W, 3]."""
    return decode(data, path, img_size, EXACT, draft=draft)
