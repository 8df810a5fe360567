"""On-device train augmentation: the original's torchvision train transforms as one pure JAX function.

The host pipeline hands over uint8 [B,H,W,3] batches that are already resized (and randomly
cropped when `AugmentSpec.geometric`). `augment` does the rest of the original train transform
in the original order:
hflip -> vflip -> RandomRotation -> RandomAffine(degrees=0) -> ColorJitter -> RandomGrayscale
-> ToTensor; `normalize` is the final Normalize.

Faithfulness, and where it is deliberately not bit-exact:
* Parameters follow torchvision's distributions, not its random stream.
* Flips, rotation and affine become one nearest-neighbour gather per sample (fill 0) through
  the chained inverse maps. Each op alone equals torchvision's tensor op up to rounding ties.
  The original resampled twice (rotation, then affine): we keep its black where the rotated
  frame was cut off, but round once, so a pixel may come from a source pixel one step away.
* Colour ops are torchvision's tensor functional ops on float32 (grayscale weights
  0.2989/0.587/0.114, clamp after each blend). The original ran them on PIL uint8 images,
  which round to uint8 after every op.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # ColorJitter op ids, as torchvision numbers them
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's tensor rgb_to_grayscale
# ToTensor's uint8 / 255 as a table: XLA rewrites x / 255 into x * (1/255), which is 1 ulp off.
_UNIT = np.arange(256, dtype=np.float32) / np.float32(255)


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
    """The original's train augmentation settings; None (or 0) switches a transform off.

    Frozen and hashable, so it is passed to jit as a static argument. Ranges are checked by
    `dermjax.config.validate`, not here.
    """

    horizontal_flip_prob: float | None = None
    vertical_flip_prob: float | None = None
    rotation_degrees: float | None = None
    translate: tuple[float, float] | None = None
    scale: tuple[float, float] | None = None
    brightness: float | None = None
    contrast: float | None = None
    saturation: float | None = None
    hue: float | None = None
    grayscale_prob: float | None = None

    @classmethod
    def create(
        cls,
        *,
        brightness_jitter: float | None = None,
        contrast_jitter: float | None = None,
        saturation_jitter: float | None = None,
        hue_jitter: float | None = None,
        rotation_degrees: float | None = None,
        translate: tuple[float, float] | None = None,
        scale: tuple[float, float] | None = None,
        grayscale_prob: float | None = None,
        horizontal_flip_prob: float | None = None,
        vertical_flip_prob: float | None = None,
    ) -> AugmentSpec:
        """The spec from the `augmentation` config fields (keyword names are the field names)."""

        def number(value: float | None) -> float | None:
            return None if value is None else float(value)

        def pair(value: Any) -> tuple[float, float] | None:
            return None if value is None else (float(value[0]), float(value[1]))

        return cls(
            horizontal_flip_prob=number(horizontal_flip_prob),
            vertical_flip_prob=number(vertical_flip_prob),
            rotation_degrees=number(rotation_degrees),
            translate=pair(translate),
            scale=pair(scale),
            brightness=number(brightness_jitter),
            contrast=number(contrast_jitter),
            saturation=number(saturation_jitter),
            hue=number(hue_jitter),
            grayscale_prob=number(grayscale_prob),
        )

    @property
    def random_affine(self) -> bool:
        """Whether the original adds RandomAffine: a translate > 0 or a scale != 1."""
        return any(t > 0 for t in self.translate or ()) or any(s != 1.0 for s in self.scale or ())

    @property
    def geometric(self) -> bool:
        """The original's test for its geometry-aware resize (1.1x shorter side + random crop)."""
        return self.rotation_degrees is not None or self.random_affine

    @property
    def warps(self) -> bool:
        """Whether any flip, rotation or affine can move a pixel (else the gather is skipped)."""
        return bool(
            self.horizontal_flip_prob
            or self.vertical_flip_prob
            or self.rotation_degrees
            or self.random_affine
        )

    @property
    def jitters(self) -> bool:
        """Whether ColorJitter has a non-zero range."""
        return bool(self.brightness or self.contrast or self.saturation or self.hue)


class AugmentParams(NamedTuple):
    """One sample's drawn parameters (a leading batch axis when vmapped)."""

    hflip: jax.Array  # bool
    vflip: jax.Array  # bool
    angle: jax.Array  # RandomRotation angle, degrees counter-clockwise
    translate: jax.Array  # float32[2]: RandomAffine (tx, ty), whole pixels
    scale: jax.Array  # RandomAffine scale
    order: jax.Array  # int32[4]: ColorJitter op ids in the order they are applied
    factors: jax.Array  # float32[4]: brightness, contrast, saturation factors; hue shift
    grayscale: jax.Array  # bool


def sample_params(key: jax.Array, spec: AugmentSpec, height: int, width: int) -> AugmentParams:
    """Draws one sample's parameters from torchvision's distributions; off ops get neutral values."""
    k = jax.random.split(key, 8)
    jitter = [spec.brightness or 0.0, spec.contrast or 0.0, spec.saturation or 0.0]
    low = [max(0.0, 1.0 - x) for x in jitter] + [-(spec.hue or 0.0)]
    high = [1.0 + x for x in jitter] + [spec.hue or 0.0]
    degrees = spec.rotation_degrees or 0.0
    max_dx, max_dy = (
        (spec.translate[0] * width, spec.translate[1] * height) if spec.translate else (0.0, 0.0)
    )
    scale = spec.scale or (1.0, 1.0)
    return AugmentParams(
        hflip=jax.random.uniform(k[0]) < (spec.horizontal_flip_prob or 0.0),
        vflip=jax.random.uniform(k[1]) < (spec.vertical_flip_prob or 0.0),
        angle=jax.random.uniform(k[2], minval=-degrees, maxval=degrees),
        translate=jnp.round(
            jax.random.uniform(
                k[3], (2,), minval=jnp.array([-max_dx, -max_dy]), maxval=jnp.array([max_dx, max_dy])
            )
        ),
        scale=jax.random.uniform(k[4], minval=scale[0], maxval=scale[1]),
        order=jax.random.permutation(k[5], 4),
        factors=jax.random.uniform(k[6], (4,), minval=jnp.array(low), maxval=jnp.array(high)),
        grayscale=jax.random.uniform(k[7]) < (spec.grayscale_prob or 0.0),
    )


def apply(params: AugmentParams, image: jax.Array, spec: AugmentSpec) -> jax.Array:
    """Applies one sample's parameters: uint8 [H,W,3] -> float32 [H,W,3] in [0, 1]."""
    x = to_unit(image)
    if spec.warps:  # gathering float rows measured faster on CPU than uint8 then converting
        x = warp(x, *_inverse_maps(params, spec))
    if spec.jitters:
        x = _color_jitter(x, params.order, params.factors, with_hue=bool(spec.hue))
    if spec.grayscale_prob:
        x = jnp.where(params.grayscale, jnp.broadcast_to(rgb_to_grayscale(x), x.shape), x)
    return x


@functools.partial(jax.jit, static_argnames="spec")
def augment(key: jax.Array, images: jax.Array, spec: AugmentSpec) -> jax.Array:
    """The original's random train transforms on a uint8 [B,H,W,3] batch -> float32 in [0, 1].

    Sample i uses `jax.random.split(key, B)[i]`, so the result is a pure function of the inputs.
    """
    b, h, w = images.shape[:3]
    params = jax.vmap(lambda k: sample_params(k, spec, h, w))(jax.random.split(key, b))
    return jax.vmap(lambda p, im: apply(p, im, spec))(params, images)


def to_unit(images: jax.Array) -> jax.Array:
    """ToTensor's scaling: uint8 -> float32 x / 255, bit-exact."""
    return jnp.asarray(_UNIT)[images]


def normalize(images01: jax.Array, mean: Any, std: Any) -> jax.Array:
    """torchvision Normalize over the last (channel) axis: (x - mean) / std."""
    return (images01 - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def prepare_eval(images: jax.Array, mean: Any, std: Any) -> jax.Array:
    """The eval transform after resizing: uint8 -> [0, 1] (ToTensor), then Normalize."""
    return normalize(to_unit(images), mean, std)


# ---------------------------------------------------------------------------------------------
# Geometry: inverse affine maps in torchvision's centred coordinates, one nearest gather.
# ---------------------------------------------------------------------------------------------


def inverse_matrix(angle: Any, translate: Any, scale: Any) -> jax.Array:
    """torchvision's inverse affine matrix about the image centre, without shear, as 2x3.

    Maps centred output coordinates to centred source coordinates; `angle` is in degrees
    clockwise, as for `torchvision.transforms.functional.affine`.
    """
    rad = jnp.deg2rad(jnp.asarray(angle, jnp.float32))
    cos, sin = jnp.cos(rad), jnp.sin(rad)
    linear = jnp.stack([jnp.stack([cos, sin]), jnp.stack([-sin, cos])]) / scale
    tx, ty = jnp.asarray(translate, jnp.float32)
    offset = -(linear[:, 0] * tx + linear[:, 1] * ty)  # elementwise: no TF32 matmul on GPUs
    return jnp.concatenate([linear, offset[:, None]], axis=1)


def warp(image: jax.Array, *inverse_maps: jax.Array) -> jax.Array:
    """Nearest-neighbour resampling of [H,W,C] through a chain of inverse 2x3 maps, fill 0.

    The maps undo the forward ops last-first. As in the original's chain of same-size
    resamplings, a pixel is 0 when any stage's input falls outside the frame; only the final
    source is rounded (the original rounds at every stage). Pixel (row i, col j) has centred
    coordinates (j - (W-1)/2, i - (H-1)/2), as in torchvision's affine grid, and indices round
    half to even, as grid_sample's nearest mode does.
    """
    h, w = image.shape[:2]
    x = jnp.arange(w, dtype=jnp.float32)[None, :] - (w - 1) / 2
    y = jnp.arange(h, dtype=jnp.float32)[:, None] - (h - 1) / 2
    inside = jnp.ones((h, w), bool)
    for m in inverse_maps:
        x, y = m[0, 0] * x + m[0, 1] * y + m[0, 2], m[1, 0] * x + m[1, 1] * y + m[1, 2]
        col, row = jnp.round(x + (w - 1) / 2), jnp.round(y + (h - 1) / 2)
        inside &= (col >= 0) & (col < w) & (row >= 0) & (row < h)
    flat = jnp.where(inside, row * w + col, 0).astype(jnp.int32).ravel()
    out = jnp.take(image.reshape(h * w, -1), flat, axis=0, mode="clip").reshape(image.shape)
    return jnp.where(inside[..., None], out, jnp.zeros((), image.dtype))


def rotate(image: jax.Array, angle: Any) -> jax.Array:
    """`F.rotate(img, angle)` defaults: counter-clockwise degrees, nearest, no expand, fill 0."""
    return warp(image, inverse_matrix(-jnp.asarray(angle, jnp.float32), (0.0, 0.0), 1.0))


def affine(image: jax.Array, angle: Any, translate: Any, scale: Any) -> jax.Array:
    """`F.affine(img, angle, translate, scale, shear=0)` defaults: nearest, fill 0."""
    return warp(image, inverse_matrix(angle, translate, scale))


def _inverse_maps(params: AugmentParams, spec: AugmentSpec) -> list[jax.Array]:
    """Inverse maps for affine, then rotation with the flips folded in (flips never crop)."""
    maps = []
    if spec.random_affine:
        maps.append(inverse_matrix(0.0, params.translate, params.scale))
    last = jnp.concatenate([jnp.eye(2), jnp.zeros((2, 1))], axis=1)
    if spec.rotation_degrees:
        last = inverse_matrix(-params.angle, (0.0, 0.0), 1.0)  # F.rotate negates its angle
    signs = jnp.stack([jnp.where(params.hflip, -1.0, 1.0), jnp.where(params.vflip, -1.0, 1.0)])
    return [*maps, last * signs[:, None]]  # a flip negates a centred source coordinate


# ---------------------------------------------------------------------------------------------
# Colour: torchvision's functional tensor ops on float32 [..., H, W, 3] in [0, 1].
# ---------------------------------------------------------------------------------------------


def rgb_to_grayscale(image: jax.Array) -> jax.Array:
    """Luma with torchvision's tensor weights; keeps a channel axis of size 1."""
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    wr, wg, wb = _GRAY_WEIGHTS
    return (wr * r + wg * g + wb * b)[..., None]


def _blend(image: jax.Array, other: jax.Array, ratio: Any) -> jax.Array:
    return jnp.clip(ratio * image + (1.0 - ratio) * other, 0.0, 1.0)


def _gray_mean(image: jax.Array) -> jax.Array:
    return jnp.mean(rgb_to_grayscale(image), axis=(-3, -2, -1), keepdims=True)


def adjust_brightness(image: jax.Array, factor: Any) -> jax.Array:
    """Blend with black."""
    return _blend(image, jnp.zeros((), image.dtype), factor)


def adjust_contrast(image: jax.Array, factor: Any) -> jax.Array:
    """Blend with the mean of the grayscale image."""
    return _blend(image, _gray_mean(image), factor)


def adjust_saturation(image: jax.Array, factor: Any) -> jax.Array:
    """Blend with the grayscale image."""
    return _blend(image, rgb_to_grayscale(image), factor)


def adjust_hue(image: jax.Array, shift: Any) -> jax.Array:
    """Shift hue by `shift` (a fraction of a turn) through torchvision's RGB->HSV->RGB."""
    h, s, v = _rgb_to_hsv(image)
    return _hsv_to_rgb((h + shift) % 1.0, s, v)


def _rgb_to_hsv(image: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    maxc = jnp.maximum(jnp.maximum(r, g), b)  # elementwise, not a reduce: fuses better on CPU
    minc = jnp.minimum(jnp.minimum(r, g), b)
    gray = maxc == minc  # hue and saturation are 0 there; avoid dividing by 0
    chroma = maxc - minc
    s = chroma / jnp.where(gray, 1.0, maxc)
    divisor = jnp.where(gray, 1.0, chroma)
    rc, gc, bc = (maxc - r) / divisor, (maxc - g) / divisor, (maxc - b) / divisor
    h = jnp.where(maxc == r, bc - gc, jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    return jnp.fmod(h / 6.0 + 1.0, 1.0), s, maxc


def _hsv_to_rgb(h: jax.Array, s: jax.Array, v: jax.Array) -> jax.Array:
    i = jnp.floor(h * 6.0)
    f = h * 6.0 - i
    sector = [i.astype(jnp.int32) % 6 == n for n in range(5)]  # sector 5 is the default
    p = jnp.clip(v * (1.0 - s), 0.0, 1.0)
    q = jnp.clip(v * (1.0 - s * f), 0.0, 1.0)
    t = jnp.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
    r = jnp.select(sector, [v, q, p, p, t], v)
    g = jnp.select(sector, [t, v, v, q, p], p)
    b = jnp.select(sector, [p, p, t, v, v], q)
    return jnp.stack([r, g, b], axis=-1)


def _color_jitter(
    x: jax.Array, order: jax.Array, factors: jax.Array, *, with_hue: bool
) -> jax.Array:
    """ColorJitter with the ops in `order`.

    The blends (brightness, contrast, saturation) before the hue step and those after it run as
    masked steps around a single hue step, so under vmap the costly hue conversion is computed
    once per sample rather than at every position. A blend with factor 1 is the identity, so
    ops that are off need no special case.
    """
    hue_at = jnp.argmax(order == HUE)
    for k in range(3):  # position 3 cannot come before the hue op
        x = jnp.where(k < hue_at, _blend_op(x, order[k], factors), x)
    if with_hue:
        x = adjust_hue(x, factors[HUE])
    for k in range(1, 4):  # position 0 cannot come after it
        x = jnp.where(k > hue_at, _blend_op(x, order[k], factors), x)
    return x


def _blend_op(x: jax.Array, op: jax.Array, factors: jax.Array) -> jax.Array:
    """Brightness, contrast or saturation chosen by a traced op id (the hue id is never used)."""
    gray = rgb_to_grayscale(x)
    other = jnp.where(op == BRIGHTNESS, 0.0, jnp.where(op == CONTRAST, _gray_mean(x), gray))
    return _blend(x, other, factors[op])
