"""VGG-16 against torchvision: parameters, logits (adaptive pool, NCHW flatten), unfreeze units."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dermjax.models import create_backbone, feature_dim, unit_count
from dermjax.models.layers import adaptive_avg_pool
from dermjax.models.vgg import unfreeze_units
from tests.models import parity


def test_parameter_count_equals_torchvision_weights_meta():
    assert parity.abstract_param_count("vgg16", include_top=True) == 138_357_544


@pytest.mark.slow
def test_logits_match_torchvision_float64_and_float32_at_32px():
    # At 32 px the features are 1x1 and the adaptive pool replicates them to 7x7, so the
    # NCHW-order flatten before classifier.0 is exercised with every one of its 25088 inputs.
    tv = parity.import_torchvision()
    model = parity.seeded_torch_model(tv, "vgg16", image_size=32, batch=1)
    parity.assert_parity("vgg16", model, image_size=32, batch=1)


@pytest.mark.parametrize("size", [1, 5, 7, 8, 13])
def test_adaptive_avg_pool_matches_torch_bins(size):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(size).standard_normal((2, size, size + 3, 4))
    ref = torch.nn.AdaptiveAvgPool2d((7, 7))(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    out = adaptive_avg_pool(jnp.asarray(x, jnp.float32), (7, 7))
    np.testing.assert_allclose(np.asarray(out), ref.numpy().transpose(0, 2, 3, 1), atol=1e-6)


@pytest.mark.parametrize("pooling_type", ["avg", "max", "concat"])
def test_features_have_512_channels_per_pooling(pooling_type):
    model = nnx.eval_shape(
        lambda: create_backbone("vgg16", rngs=nnx.Rngs(0), pooling_type=pooling_type)
    )
    out = nnx.eval_shape(
        lambda m, x: m(x), model, jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    )
    assert out.shape == (1, feature_dim("vgg16", pooling_type))
    assert out.dtype == jnp.float32


def test_parameterless_layers_hold_their_torch_indices():
    model = nnx.eval_shape(lambda: create_backbone("vgg16", rngs=nnx.Rngs(0), include_top=True))
    params = {p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    convs = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    expected = {("features", i, leaf) for i in convs for leaf in ("kernel", "bias")}
    expected |= {("classifier", i, leaf) for i in (0, 3, 6) for leaf in ("kernel", "bias")}
    assert params == expected
    assert len(unfreeze_units(model)) == unit_count("vgg16") == 31
