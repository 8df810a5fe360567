"""EfficientNet-B0 to B4 against torchvision: structure, f64/f32 parity, pooling, train mode, bf16.

Parity runs at 64 px (the architecture does not depend on the image size; SE and global pooling
work at any size) with every 1-D tensor randomised and BatchNorm statistics calibrated.
"""

from __future__ import annotations

import copy
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dermjax.models import create_backbone, default_image_size, feature_dim
from dermjax.models.efficientnet import MBConv, stage_settings, unfreeze_units
from dermjax.models.registry import backbone_spec
from tests.models import parity

NAMES = (
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b2",
    "efficientnet_b3",
    "efficientnet_b4",
)
# torchvision Weights.meta["num_params"].
TORCHVISION_PARAMS = {
    "efficientnet_b0": 5_288_548,
    "efficientnet_b1": 7_794_184,
    "efficientnet_b2": 9_109_994,
    "efficientnet_b3": 12_233_232,
    "efficientnet_b4": 19_341_616,
}
# 96 px with BN calibrated on 4 images keeps logits O(1); at 64 px the last stages see 2x2 maps,
# the calibrated statistics amplify (logits ~50) and float32 noise of both frameworks reaches 5e-5.
SIZE = 96
CALIBRATION_BATCH = 4
F64_SIZE = 32


def torch_model(tv: Any, name: str) -> Any:
    """torchvision model `name` with seeded (reproducible) initial weights."""
    import torch

    torch.manual_seed(0)
    return getattr(tv.models, name)()


@pytest.fixture(scope="module")
def b0() -> tuple:
    """A randomised, calibrated torchvision B0 (eval mode) and its state_dict."""
    tv = parity.import_torchvision()
    model = parity.randomize_torch_model(
        torch_model(tv, "efficientnet_b0"), SIZE, batch=CALIBRATION_BATCH
    )
    return model, parity.torch_state_dict(model)


@pytest.fixture(scope="module")
def abstract_b0() -> nnx.Module:
    return nnx.eval_shape(lambda: create_backbone("efficientnet_b0", rngs=nnx.Rngs(0)))


def assert_float64_parity(name: str, model: Any, image_size: int) -> None:
    """float64 logits within 1e-9 of torch's (model converted in place). XLA's float64
    depthwise convolutions are slow on CPU (~40 s for B4 at 96 px), hence a small input."""
    import torch

    x = parity.random_images(1, image_size, seed=7)
    state = parity.torch_state_dict(model)
    ref = parity.torch_logits(model.double(), x, torch.float64)
    with jax.enable_x64(True):
        module = parity.build_loaded(name, state, dtype=jnp.float64, include_top=True)
        out = parity.jax_logits(module, x, jnp.float64)
    assert out.dtype == np.float64
    assert parity.max_abs_diff(out, ref) <= parity.F64_TOL * max(1, np.abs(ref).max())


def settings(name: str) -> list[tuple[int, ...]]:
    variant = backbone_spec(name).variant
    return stage_settings(variant["width_mult"], variant["depth_mult"])


def test_width_and_depth_rounding_match_torchvision() -> None:
    assert settings("efficientnet_b4") == [
        (1, 3, 1, 48, 24, 2),
        (6, 3, 2, 24, 32, 4),
        (6, 5, 2, 32, 56, 4),
        (6, 3, 2, 56, 112, 6),
        (6, 5, 1, 112, 160, 6),
        (6, 5, 2, 160, 272, 8),
        (6, 3, 1, 272, 448, 2),
    ]
    assert [row[5] for row in settings("efficientnet_b1")] == [2, 3, 3, 4, 4, 5, 2]
    assert settings("efficientnet_b2") == [
        (1, 3, 1, 32, 16, 2),
        (6, 3, 2, 16, 24, 3),
        (6, 5, 2, 24, 48, 3),
        (6, 3, 2, 48, 88, 4),
        (6, 5, 1, 88, 120, 4),
        (6, 5, 2, 120, 208, 5),
        (6, 3, 1, 208, 352, 2),
    ]
    assert settings("efficientnet_b3") == [
        (1, 3, 1, 40, 24, 2),
        (6, 3, 2, 24, 32, 3),
        (6, 5, 2, 32, 48, 3),
        (6, 3, 2, 48, 96, 5),
        (6, 5, 1, 96, 136, 5),
        (6, 5, 2, 136, 232, 6),
        (6, 3, 1, 232, 384, 2),
    ]


@pytest.mark.parametrize("name", NAMES)
def test_dropout_and_image_size_match_torchvision_builder_and_weights(name: str) -> None:
    """Classifier dropout of torchvision's builder and the crop size of its DEFAULT weights."""
    import torch

    tv = parity.import_torchvision()
    with torch.device("meta"):
        reference = getattr(tv.models, name)()
    assert backbone_spec(name).variant["dropout"] == reference.classifier[0].p
    weights = tv.models.get_model_weights(name).DEFAULT
    assert default_image_size(name) == weights.transforms().crop_size[0]


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_matches_torchvision(name: str) -> None:
    assert parity.abstract_param_count(name, include_top=True) == TORCHVISION_PARAMS[name]


@pytest.mark.parametrize(
    ("name", "pooling_type", "dim"),
    [
        ("efficientnet_b0", "avg", 1280),
        ("efficientnet_b0", "concat", 2560),
        ("efficientnet_b4", "max", 1792),
    ],
)
def test_headless_output_is_pooled_features(name: str, pooling_type: str, dim: int) -> None:
    def forward() -> jax.Array:
        model = create_backbone(name, rngs=nnx.Rngs(0), pooling_type=pooling_type)
        return model(jnp.zeros((2, 32, 32, 3)))

    out = nnx.eval_shape(forward)
    assert out.shape == (2, dim) and out.dtype == jnp.float32
    assert feature_dim(name, pooling_type) == dim  # the registry's table agrees with the model


def test_se_squeeze_width_is_a_quarter_of_block_input(abstract_b0: nnx.Module) -> None:
    model = abstract_b0
    se = model.features[2][0].block[2]  # stage 2, block 0: 16 -> 96 expanded, squeeze 16 // 4
    assert se.fc1.kernel.shape == (1, 1, 96, 4)
    assert model.features[1][0].block[1].fc1.kernel.shape == (1, 1, 32, 8)


def test_unfreeze_units_are_the_nine_feature_children(abstract_b0: nnx.Module) -> None:
    model = abstract_b0
    units = unfreeze_units(model)
    assert units == [("features", i) for i in range(9)]
    paths = [path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    assert all(any(p[:2] == unit for p in paths) for unit in units)
    assert all(p[:2] in units for p in paths)


@pytest.mark.parametrize("name", ("efficientnet_b0", "efficientnet_b1", "efficientnet_b4"))
def test_logits_match_torchvision_in_float32_and_float64(name: str) -> None:
    tv = parity.import_torchvision()
    model = parity.randomize_torch_model(torch_model(tv, name), SIZE, batch=CALIBRATION_BATCH)
    parity.assert_parity(name, model, image_size=SIZE, f64_tol=None)
    assert_float64_parity(name, model, F64_SIZE)


@pytest.mark.slow
@pytest.mark.parametrize("name", ("efficientnet_b2", "efficientnet_b3"))
def test_b2_b3_logits_match_torchvision_in_float64(name: str) -> None:
    """Randomised, calibrated B2/B3 (float64 only: the float32 path is B0's code)."""
    tv = parity.import_torchvision()
    model = parity.randomize_torch_model(torch_model(tv, name), SIZE, batch=CALIBRATION_BATCH)
    assert_float64_parity(name, model, F64_SIZE)


def test_concat_features_match_original_features_then_avg_and_max_pool(b0: tuple) -> None:
    import torch

    model, state = b0

    def original(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        f = m.features(x)
        pooled = [torch.nn.AdaptiveAvgPool2d(1)(f), torch.nn.AdaptiveMaxPool2d(1)(f)]
        return torch.flatten(torch.cat(pooled, dim=1), 1)

    x = parity.random_images(2, SIZE, seed=1)
    ref = parity.torch_logits(model, x, forward=original)
    module = parity.build_loaded("efficientnet_b0", state, pooling_type="concat")
    out = parity.jax_logits(module, x)
    assert out.shape == (2, 2560)
    assert parity.max_abs_diff(out, ref) <= parity.OTHER_F32_TOL * max(1, np.abs(ref).max())


def test_train_mode_normalises_with_batch_stats_and_updates_running_mean_like_torch(
    b0: tuple,
) -> None:
    import torch

    model, state = b0
    model = copy.deepcopy(model)
    for m in model.modules():  # drop-path and dropout off on both sides: BN alone differs
        if isinstance(m, torch.nn.Dropout) or type(m).__name__ == "StochasticDepth":
            m.p = 0.0
    model.train()
    x = parity.random_images(4, SIZE, seed=2)
    ref = parity.torch_logits(model, x)

    module = parity.build_loaded("efficientnet_b0", state, include_top=True)
    for _, m in nnx.iter_modules(module):
        if isinstance(m, nnx.Dropout):
            m.rate = 0.0
    eval_out = parity.jax_logits(module, x)
    module.train()
    out = parity.jax_logits(module, x)
    scale = max(1, np.abs(ref).max())
    assert parity.max_abs_diff(out, ref) <= parity.OTHER_F32_TOL * scale
    assert parity.max_abs_diff(eval_out, ref) > 1e-2 * scale
    # BNs fed by a nonlinearity (after a conv of BN output, the batch mean is fixed by beta).
    norms = {
        "features.0.1": module.features[0][1],
        "features.4.1.block.1.1": module.features[4][1].block[1][1],
    }
    for key, norm in norms.items():
        new_mean = np.asarray(norm.mean[...])
        ref_mean = model.state_dict()[f"{key}.running_mean"].numpy()
        np.testing.assert_allclose(new_mean, ref_mean, rtol=1e-5, atol=1e-6)
        assert np.abs(new_mean - state[f"{key}.running_mean"]).max() > 1e-4


def test_stochastic_depth_drops_whole_samples_in_train_mode_only() -> None:
    block = MBConv(16, 16, 6, 3, 1, 0.5, rngs=nnx.Rngs(0, dropout=1), dtype=jnp.float32)
    block.eval()  # BN on running statistics; only drop-path toggles below
    x = jax.random.normal(jax.random.key(0), (64, 4, 4, 16))
    branch = np.asarray(block(x) - x)
    block.stochastic_depth.deterministic = False
    dropped = np.asarray(block(x) - x)
    kept = np.all(np.isclose(dropped, 2 * branch, rtol=1e-5, atol=1e-6), axis=(1, 2, 3))
    zeroed = np.all(dropped == 0, axis=(1, 2, 3))
    assert np.all(kept ^ zeroed) and 16 < kept.sum() < 48


def test_stochastic_depth_rate_grows_linearly_with_block_index(abstract_b0: nnx.Module) -> None:
    stages = abstract_b0.features[1:8]
    rates = [block.stochastic_depth.rate for stage in stages for block in stage]
    np.testing.assert_allclose(rates, [0.2 * i / 16 for i in range(16)])


def test_b3_stochastic_depth_rates_equal_torchvisions() -> None:
    import torch

    tv = parity.import_torchvision()
    with torch.device("meta"):
        features = tv.models.efficientnet_b3().features
    ref = [block.stochastic_depth.p for stage in features[1:8] for block in stage]
    model = nnx.eval_shape(lambda: create_backbone("efficientnet_b3", rngs=nnx.Rngs(0)))
    rates = [block.stochastic_depth.rate for stage in model.features[1:8] for block in stage]
    assert len(rates) == 26
    np.testing.assert_allclose(rates, ref, rtol=1e-12)


def test_bfloat16_keeps_float32_params_and_agrees_with_float32(b0: tuple) -> None:
    """Loose by nature: bf16 carries ~0.4% error per op (torch autocast measured ~10% relative
    L2 on this randomised model), and random weights leave near-ties among 1000 logits."""
    _, state = b0
    x = parity.random_images(8, SIZE, seed=3)
    ref = parity.jax_logits(parity.build_loaded("efficientnet_b0", state, include_top=True), x)
    module = parity.build_loaded("efficientnet_b0", state, include_top=True, dtype=jnp.bfloat16)
    params = jax.tree.leaves(nnx.state(module, nnx.Param))
    assert {p.dtype for p in params} == {jnp.dtype(jnp.float32)}
    out = parity.jax_logits(module, x, jnp.bfloat16)
    assert out.dtype == np.float32
    assert np.linalg.norm(out - ref) <= 0.2 * np.linalg.norm(ref)
    assert np.mean(out.argmax(-1) == ref.argmax(-1)) >= 0.75
