"""On-device augmentation: torchvision parity with fixed parameters, distributions, determinism.

Images are 32x40 (H != W) so a swapped axis shows. Bounds:
* rotate / affine alone: < 0.5% of pixels may differ from torchvision (rounding ties only).
* flips, grayscale, the no-op spec: exact.
* colour ops, alone and chained in any order: max abs difference < 1e-5.
* composed geometry vs torchvision's sequential rotate-then-affine: every pixel's source is within
  one pixel per axis (the original rounds twice, we round once).
"""

import inspect
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dermjax.data.augment import (
    AugmentParams,
    AugmentSpec,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    affine,
    apply,
    augment,
    normalize,
    prepare_eval,
    rgb_to_grayscale,
    rotate,
    sample_params,
)

H, W = 32, 40
FULL = AugmentSpec(
    horizontal_flip_prob=0.5,
    vertical_flip_prob=0.2,
    rotation_degrees=25.0,
    translate=(0.1, 0.1),
    scale=(0.9, 1.1),
    brightness=0.1,
    contrast=0.1,
    saturation=0.1,
    hue=0.01,
    grayscale_prob=0.3,
)

_apply = jax.jit(apply, static_argnames="spec")


@pytest.fixture(scope="module")
def tvf():
    pytest.importorskip("torch")
    return pytest.importorskip("torchvision.transforms.functional")


def _image(seed: int = 0) -> np.ndarray:
    """Random uint8 HWC with a gray ramp row (equal channels) and pure black/white pixels."""
    img = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    img[0] = np.linspace(0, 255, W, dtype=np.uint8)[:, None]
    img[1, :3], img[1, 3:6] = 0, 255
    return img


def _to_torch(img: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)


def _from_torch(t) -> np.ndarray:
    return t.permute(1, 2, 0).numpy()


def _params(**overrides) -> AugmentParams:
    neutral = dict(
        hflip=False,
        vflip=False,
        angle=0.0,
        translate=(0.0, 0.0),
        scale=1.0,
        order=(0, 1, 2, 3),
        factors=(1.0, 1.0, 1.0, 0.0),
        grayscale=False,
    )
    neutral.update(overrides)
    return AugmentParams(**{k: jnp.asarray(v) for k, v in neutral.items()})


def _edge(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood holds both True and False."""
    padded = np.pad(mask, 1, mode="edge")
    windows = [padded[dy : dy + H, dx : dx + W] for dy in range(3) for dx in range(3)]
    return np.any(windows, axis=0) & ~np.all(windows, axis=0)


def _differing_fraction(a: np.ndarray, b: np.ndarray) -> float:
    return float((a != b).any(axis=-1).mean())


# --- geometry against torchvision ---------------------------------------------------------------


@pytest.mark.parametrize("angle", [7.3, -25.0, 90.0, 143.7])
def test_rotate_matches_torchvision_nearest_no_expand_fill_zero(tvf, angle):
    img = _image()
    ours = np.asarray(jax.jit(rotate)(jnp.asarray(img), angle))
    ref = _from_torch(tvf.rotate(_to_torch(img), angle))
    assert _differing_fraction(ours, ref) < 0.005
    assert (ours == 0).all(axis=-1).any()  # corners are filled with 0


@pytest.mark.parametrize(
    ("angle", "translate", "scale"),
    [(0.0, (3, -5), 0.87), (0.0, (0, 0), 1.13), (0.0, (-6, 2), 1.0), (12.5, (2, 4), 0.93)],
)
def test_affine_matches_torchvision_nearest_fill_zero(tvf, angle, translate, scale):
    img = _image()
    ours = np.asarray(jax.jit(affine)(jnp.asarray(img), angle, jnp.asarray(translate), scale))
    ref = _from_torch(tvf.affine(_to_torch(img), angle, list(translate), scale, [0.0, 0.0]))
    assert _differing_fraction(ours, ref) < 0.005


@pytest.mark.parametrize(("hflip", "vflip"), [(True, False), (False, True), (True, True)])
def test_flips_match_torchvision_exactly(tvf, hflip, vflip):
    img = _image()
    # Only the flips drawn are enabled: a flip whose probability alone enabled the warp is tested.
    spec = AugmentSpec(horizontal_flip_prob=0.5 * hflip, vertical_flip_prob=0.5 * vflip)
    ours = np.asarray(_apply(_params(hflip=hflip, vflip=vflip), jnp.asarray(img), spec))
    ref = _to_torch(img)
    ref = tvf.hflip(ref) if hflip else ref
    ref = tvf.vflip(ref) if vflip else ref
    np.testing.assert_array_equal(ours, _from_torch(ref).astype(np.float32) / 255.0)


def test_composed_geometry_takes_each_pixel_within_one_source_pixel_of_torchvision_chain(tvf):
    """hflip -> rotate -> affine in one gather vs torchvision's three sequential resamplings."""
    rows, cols = np.mgrid[:H, :W]
    coords = np.stack([cols, rows, np.full_like(rows, 255)], axis=-1).astype(np.uint8)
    spec = AugmentSpec(horizontal_flip_prob=0.5, rotation_degrees=30.0, scale=(0.8, 1.2))
    params = _params(hflip=True, angle=17.0, translate=(3.0, -2.0), scale=0.91)
    ours = np.rint(np.asarray(_apply(params, jnp.asarray(coords), spec)) * 255).astype(int)
    ref = tvf.affine(tvf.rotate(tvf.hflip(_to_torch(coords)), 17.0), 0.0, [3, -2], 0.91, [0.0, 0.0])
    ref = _from_torch(ref).astype(int)
    ours_in, ref_in = ours[..., 2] == 255, ref[..., 2] == 255
    both = ours_in & ref_in
    assert np.abs(ours[both, :2] - ref[both, :2]).max() <= 1
    assert not ((ours_in != ref_in) & ~_edge(ours_in)).any()  # fill differs only on the edge
    assert (ours[both, :2] == ref[both, :2]).all(axis=-1).mean() > 0.5


# --- colour against torchvision -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "ours_fn", "factor"),
    [
        ("adjust_brightness", adjust_brightness, 0.7),
        ("adjust_brightness", adjust_brightness, 1.3),
        ("adjust_contrast", adjust_contrast, 0.6),
        ("adjust_contrast", adjust_contrast, 1.4),
        ("adjust_saturation", adjust_saturation, 0.2),
        ("adjust_saturation", adjust_saturation, 1.7),
        ("adjust_hue", adjust_hue, -0.3),
        ("adjust_hue", adjust_hue, 0.02),
        ("adjust_hue", adjust_hue, 0.45),
    ],
)
def test_colour_op_matches_torchvision_tensor_op(tvf, name, ours_fn, factor):
    x = _image().astype(np.float32) / 255.0
    ours = np.asarray(jax.jit(ours_fn)(jnp.asarray(x), factor))
    ref = _from_torch(getattr(tvf, name)(_to_torch(x), factor))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("field", "index", "factor", "name"),
    [("brightness", 0, 1.3, "adjust_brightness"), ("contrast", 1, 0.6, "adjust_contrast"),
     ("saturation", 2, 1.7, "adjust_saturation"), ("hue", 3, 0.08, "adjust_hue")],
)  # fmt: skip
def test_each_jitter_alone_is_applied(tvf, field, index, factor, name):
    """A spec with one ColorJitter range only (the others off) still jitters."""
    img = _image()
    factors = [1.0, 1.0, 1.0, 0.0]
    factors[index] = factor
    spec = AugmentSpec(**{field: 0.5})
    ours = np.asarray(_apply(_params(factors=tuple(factors)), jnp.asarray(img), spec))
    ref = _from_torch(getattr(tvf, name)(_to_torch(img.astype(np.float32) / 255.0), factor))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


def test_grayscale_matches_torchvision_three_channels(tvf):
    x = _image().astype(np.float32) / 255.0
    spec = AugmentSpec(grayscale_prob=0.5)
    ours = np.asarray(_apply(_params(grayscale=True), jnp.asarray(_image()), spec))
    ref = _from_torch(tvf.rgb_to_grayscale(_to_torch(x), num_output_channels=3))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(rgb_to_grayscale(jnp.asarray(x))), ref[..., :1], atol=1e-6
    )


def test_color_jitter_then_grayscale_matches_torchvision_for_all_24_orders(tvf):
    factors = (1.2, 0.7, 1.5, 0.08)  # brightness, contrast, saturation, hue
    orders = list(itertools.permutations(range(4)))
    spec = AugmentSpec(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.1, grayscale_prob=0.5)
    img = _image(1)
    per_order = [
        _params(order=o, factors=factors, grayscale=i % 5 == 0) for i, o in enumerate(orders)
    ]
    batch = jax.tree.map(lambda *leaves: jnp.stack(leaves), *per_order)
    ours = jax.jit(jax.vmap(lambda p: apply(p, jnp.asarray(img), spec)))(batch)
    ops = [tvf.adjust_brightness, tvf.adjust_contrast, tvf.adjust_saturation, tvf.adjust_hue]
    for i, order in enumerate(orders):
        t = _to_torch(img.astype(np.float32) / 255.0)
        for op in order:
            t = ops[op](t, factors[op])
        if i % 5 == 0:
            t = tvf.rgb_to_grayscale(t, num_output_channels=3)
        np.testing.assert_allclose(
            np.asarray(ours[i]), _from_torch(t), atol=1e-5, err_msg=str(order)
        )


def test_normalize_and_prepare_eval_match_torchvision_normalize(tvf):
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    img = _image()
    ref = _from_torch(tvf.normalize(_to_torch(img.astype(np.float32) / 255.0), mean, std))
    np.testing.assert_allclose(
        np.asarray(prepare_eval(jnp.asarray(img), mean, std)), ref, atol=1e-6
    )
    x01 = jnp.asarray(img, jnp.float32) / 255.0
    np.testing.assert_allclose(np.asarray(normalize(x01, mean, std)), ref, atol=1e-6)


# --- augment: purity, shape, no-op --------------------------------------------------------------


def _batch(b: int = 4) -> jax.Array:
    return jnp.asarray(np.stack([_image(s) for s in range(b)]))


def test_augment_is_a_pure_function_of_key_with_sample_i_using_split_key_i():
    images = _batch()
    out = augment(jax.random.key(3), images, FULL)
    np.testing.assert_array_equal(out, augment(jax.random.key(3), images, FULL))
    assert not np.array_equal(out, augment(jax.random.key(4), images, FULL))
    keys = jax.random.split(jax.random.key(3), images.shape[0])
    params = jax.vmap(lambda k: sample_params(k, FULL, H, W))(keys)
    by_hand = jax.jit(jax.vmap(lambda p, im: apply(p, im, FULL)))(params, images)
    np.testing.assert_allclose(out, by_hand, atol=1e-6)  # fusion may differ by an ulp
    assert out.shape == (4, H, W, 3) and out.dtype == jnp.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_augment_with_nothing_enabled_returns_input_over_255_exactly():
    images = _batch()
    out = augment(jax.random.key(0), images, AugmentSpec())
    np.testing.assert_array_equal(out, np.asarray(images, np.float32) / np.float32(255.0))


# --- parameter distributions --------------------------------------------------------------------

DIST = AugmentSpec(
    horizontal_flip_prob=0.3,
    vertical_flip_prob=0.7,
    rotation_degrees=20.0,
    translate=(0.1, 0.25),
    scale=(0.8, 1.15),
    brightness=0.4,
    contrast=1.5,
    hue=0.05,
    grayscale_prob=0.2,
)
N = 4000


@pytest.fixture(scope="module")
def draws() -> AugmentParams:
    keys = jax.random.split(jax.random.key(0), N)
    p = jax.jit(jax.vmap(lambda k: sample_params(k, DIST, H, W)))(keys)
    return AugmentParams(*(np.asarray(x) for x in p))


def _ks_uniform(x: np.ndarray, low: float, high: float) -> float:
    """Kolmogorov-Smirnov distance between the sample and U[low, high]."""
    u = np.sort((x - low) / (high - low))
    return float(np.max(np.abs(u - (np.arange(1, len(u) + 1) - 0.5) / len(u))))


@pytest.mark.parametrize(("field", "p"), [("hflip", 0.3), ("vflip", 0.7), ("grayscale", 0.2)])
def test_coin_flips_happen_at_their_probability(draws, field, p):
    rate = getattr(draws, field).mean()
    assert abs(rate - p) < 4 * np.sqrt(p * (1 - p) / N)


def test_rotation_angle_is_uniform_in_plus_minus_degrees(draws):
    assert np.abs(draws.angle).max() <= 20.0 and np.abs(draws.angle).max() > 19.9
    assert _ks_uniform(draws.angle, -20.0, 20.0) < 0.03


def test_translate_is_rounded_uniform_of_width_and_height_fractions(draws):
    tx, ty = draws.translate[:, 0], draws.translate[:, 1]
    assert set(np.unique(tx)) == set(range(-4, 5))  # round(U(-0.1*40, 0.1*40))
    assert set(np.unique(ty)) == set(range(-8, 9))  # round(U(-0.25*32, 0.25*32))
    assert abs((tx == 4).mean() - 1 / 16) < 0.02  # half-width end bins, as torchvision's round


def test_scale_is_uniform_in_range(draws):
    assert draws.scale.min() >= 0.8 and draws.scale.max() < 1.15
    assert _ks_uniform(draws.scale, 0.8, 1.15) < 0.03


def test_jitter_factors_are_uniform_in_clipped_ranges_and_unset_saturation_is_one(draws):
    brightness, contrast, saturation, hue = draws.factors.T
    assert _ks_uniform(brightness, 0.6, 1.4) < 0.03
    assert _ks_uniform(contrast, 0.0, 2.5) < 0.03  # 1 - 1.5 is clipped to 0
    np.testing.assert_array_equal(saturation, 1.0)
    assert _ks_uniform(hue, -0.05, 0.05) < 0.03


def test_color_jitter_orders_are_permutations_covering_all_24(draws):
    assert (np.sort(draws.order, axis=1) == np.arange(4)).all()
    assert len({tuple(o) for o in draws.order}) == 24


def test_unset_spec_draws_neutral_parameters():
    p = jax.jit(sample_params, static_argnums=(1, 2, 3))(jax.random.key(1), AugmentSpec(), H, W)
    assert not p.hflip and not p.vflip and not p.grayscale
    assert float(p.angle) == 0.0 and float(p.scale) == 1.0
    np.testing.assert_array_equal(p.translate, [0.0, 0.0])
    np.testing.assert_array_equal(p.factors, [1.0, 1.0, 1.0, 0.0])


# --- spec -----------------------------------------------------------------------------------------


def test_spec_create_takes_the_augmentation_config_fields_by_name():
    fields = dict(
        brightness_jitter=0.1,
        contrast_jitter=0.2,
        saturation_jitter=0.3,
        hue_jitter=0.01,
        rotation_degrees=25,
        translate=None,
        scale=[0.9, 1.1],
        horizontal_flip_prob=0.5,
        vertical_flip_prob=None,
        grayscale_prob=None,
    )
    spec = AugmentSpec.create(**fields)
    assert spec == AugmentSpec(0.5, None, 25.0, None, (0.9, 1.1), 0.1, 0.2, 0.3, 0.01, None)
    assert hash(spec) == hash(AugmentSpec.create(**fields))
    assert AugmentSpec.create() == AugmentSpec()


def test_spec_create_accepts_exactly_the_default_configs_augmentation_section():
    from dermjax.configs.default import get_config

    section = get_config().augmentation.to_dict()
    assert set(inspect.signature(AugmentSpec.create).parameters) == set(section)
    assert AugmentSpec.create(**section).geometric  # the defaults rotate and scale


@pytest.mark.parametrize(
    ("kwargs", "geometric"),
    [
        ({}, False),
        ({"horizontal_flip_prob": 0.5, "brightness": 0.1}, False),
        ({"rotation_degrees": 0.0}, True),  # the original tests `is not None`
        ({"translate": (0.0, 0.0), "scale": (1.0, 1.0)}, False),
        ({"translate": (0.0, 0.1)}, True),
        ({"scale": (1.0, 1.1)}, True),
    ],
)
def test_geometric_follows_the_original_resize_rule(kwargs, geometric):
    assert AugmentSpec(**kwargs).geometric is geometric
