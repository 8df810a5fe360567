"""Host-sampled initialisers: deterministic in the key, the same eager and traced, the torch
distributions they stand for, and no XLA compilation per parameter shape."""

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dermjax.models import create_backbone, initializers, layers


def test_same_key_same_values_and_another_key_other_values():
    init = layers.kaiming_normal_fan_out
    a = init(jax.random.key(0), (3, 3, 8, 16))
    b = init(jax.random.key(0), (3, 3, 8, 16))
    c = init(jax.random.key(1), (3, 3, 8, 16))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    raw = init(jax.random.PRNGKey(0), (3, 3, 8, 16))  # a legacy uint32 key works too
    assert raw.shape == (3, 3, 8, 16) and not np.allclose(raw, c)


@pytest.mark.parametrize(
    "init",
    [layers.torch_default_init, initializers.xavier_uniform(), initializers.normal(0.02)],
    ids=["uniform", "xavier", "normal"],
)
def test_traced_under_jit_equals_eager_and_eval_shape_samples_nothing(init, monkeypatch):
    key, shape = jax.random.key(3), (5, 7)
    eager = init(key, shape)
    traced = jax.jit(lambda k: init(k, shape))(key)
    np.testing.assert_array_equal(eager, traced)

    def refuse(*args):
        raise AssertionError("eval_shape must not sample")

    monkeypatch.setattr(initializers, "_generator", refuse)
    abstract = jax.eval_shape(lambda k: init(k, shape), key)
    assert abstract.shape == shape and abstract.dtype == jnp.float32


def test_kaiming_normal_fan_out_has_torchs_standard_deviation():
    w = np.asarray(layers.kaiming_normal_fan_out(jax.random.key(0), (3, 3, 64, 256)))
    expected = math.sqrt(2 / (3 * 3 * 256))  # torch: gain sqrt(2) / sqrt(fan_out)
    assert abs(w.std() / expected - 1) < 0.02 and abs(w.mean()) < 0.02 * expected


def test_kaiming_normal_fan_in_has_torchs_standard_deviation():
    w = np.asarray(layers.kaiming_normal_fan_in(jax.random.key(0), (3, 3, 256, 64)))
    expected = math.sqrt(2 / (3 * 3 * 256))
    assert abs(w.std() / expected - 1) < 0.02


def test_uniform_initialisers_fill_torchs_bounds():
    fan_in = 3 * 3 * 32
    w = np.asarray(layers.torch_default_init(jax.random.key(0), (3, 3, 32, 64)))
    bound = 1 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))
    assert w.min() >= -bound and w.max() <= bound and w.max() > 0.99 * bound
    assert w.min() < -0.99 * bound
    x = np.asarray(initializers.xavier_uniform()(jax.random.key(0), (300, 500)))
    bound = math.sqrt(6 / 800)
    assert x.min() >= -bound and x.max() <= bound and x.max() > 0.99 * bound
    b = np.asarray(layers.torch_bias_init(100)(jax.random.key(0), (1000,)))
    assert b.min() >= -0.1 and b.max() <= 0.1 and b.max() > 0.099


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.bfloat16, jnp.float32])
def test_values_come_in_the_requested_dtype(dtype):
    with jax.enable_x64(dtype == jnp.float64):
        w = initializers.normal(1.0)(jax.random.key(0), (64, 64), dtype)
    assert w.dtype == dtype
    assert 0.9 < float(jnp.std(w.astype(jnp.float32))) < 1.1


def test_a_kernel_needs_two_dimensions_for_its_fans():
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        layers.kaiming_normal_fan_out(jax.random.key(0), (8,))


def test_building_a_resnet50_compiles_no_random_sampler(caplog):
    """The reason for this module: jax.random compiled a sampler per parameter shape (~13 s)."""
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING):
            model = create_backbone("resnet50", rngs=nnx.Rngs(7), image_size=(32, 32))
    finally:
        jax.config.update("jax_log_compiles", False)
    compiled = [
        r.getMessage() for r in caplog.records if "Finished XLA compilation" in r.getMessage()
    ]
    assert not [m for m in compiled if "_normal" in m or "_uniform" in m], compiled
    kernel = np.asarray(model.conv1.kernel[...])
    assert abs(kernel.std() / math.sqrt(2 / (7 * 7 * 64)) - 1) < 0.05  # kaiming fan_out
