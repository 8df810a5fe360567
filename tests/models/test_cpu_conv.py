"""The CPU convolution reformulations equal XLA's convolution, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from dermjax.models import cpu_conv

NHWC = ("NHWC", "HWIO", "NHWC")

# (input size, in channels, out channels, kernel, stride, padding, groups)
CASES = [
    (5, 3, 4, 1, 1, 0, 1),  # pointwise
    (6, 3, 4, 1, 2, 0, 1),  # strided pointwise (ResNet downsample)
    (2, 4, 5, 3, 1, 1, 1),  # kernel larger than the output (ResNet layer4 at 64 px)
    (4, 4, 5, 3, 2, 1, 1),  # strided, output smaller than the kernel
    (7, 3, 4, 3, 2, 1, 1),  # odd size, strided
    (9, 3, 4, 7, 2, 3, 1),  # stem-like
    (8, 3, 6, 4, 4, 0, 1),  # patchify (ViT)
    (10, 3, 6, 4, 4, 0, 1),  # patchify with a remainder XLA drops
    (6, 4, 4, 3, 1, 1, 4),  # depthwise
    (7, 6, 6, 5, 2, 2, 6),  # strided 5x5 depthwise (EfficientNet)
]


def _conv_pair(case, dtype):
    size, cin, cout, k, s, p, groups = case
    rng = np.random.default_rng(sum(case))
    x = jnp.asarray(rng.normal(size=(2, size, size, cin)), dtype)
    w = jnp.asarray(rng.normal(size=(k, k, cin // groups, cout)), dtype)
    args = ((s, s), ((p, p), (p, p)))

    def run(fn):
        def f(x, w):
            return fn(x, w, *args, dimension_numbers=NHWC, feature_group_count=groups)

        y, vjp = jax.vjp(f, x, w)
        return (y, *vjp(jnp.cos(y)))

    with cpu_conv.conv_algorithm("matmul"):
        ours = jax.jit(lambda x, w: run(cpu_conv.conv_general_dilated))(x, w)
    return ours, run(lax.conv_general_dilated)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_values_and_gradients_equal_xla_in_float64(case):
    with jax.enable_x64(True):
        ours, xla = _conv_pair(case, jnp.float64)
        assert ours[0].dtype == jnp.float64
    for name, a, b in zip(("output", "input grad", "kernel grad"), ours, xla, strict=True):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-10, err_msg=name
        )


def test_bfloat16_stays_bfloat16_and_close_to_xla():
    ours, xla = _conv_pair(CASES[-1], jnp.bfloat16)
    assert ours[0].dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(ours[0], np.float32), np.asarray(xla[0], np.float32), rtol=0.05, atol=0.1
    )


def _plan_for(size, cin, cout, k, s, p, groups=1):
    x = jax.ShapeDtypeStruct((1, size, size, cin), jnp.float32)
    w = jax.ShapeDtypeStruct((k, k, cin // groups, cout), jnp.float32)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    return cpu_conv.plan(x, w, (s, s), ((p, p), (p, p)), None, None, dn, groups, None)


def test_auto_keeps_xla_where_xla_is_fast_and_reformulates_its_slow_cases():
    if jax.default_backend() != "cpu":
        pytest.skip("the auto rules apply on CPU only")
    assert _plan_for(56, 64, 64, 3, 1, 1) is None  # Eigen's spatial convolution
    assert _plan_for(2, 512, 512, 3, 1, 1) == "matmul"
    assert _plan_for(4, 512, 512, 3, 2, 1) == "matmul"
    assert _plan_for(16, 64, 256, 1, 1, 0) == "matmul"
    assert _plan_for(224, 3, 768, 16, 16, 0) == "matmul"
    assert _plan_for(32, 96, 96, 3, 2, 1, groups=96) == "depthwise"
    assert _plan_for(32, 96, 96, 3, 1, 1, groups=2) is None  # other grouped convolutions
    with cpu_conv.conv_algorithm("xla"):
        assert _plan_for(2, 512, 512, 3, 1, 1) is None


def test_unknown_algorithm_is_refused():
    with pytest.raises(ValueError, match="expected one of"), cpu_conv.conv_algorithm("fft"):
        pass


def _dot_operand_ranks(fn, *args) -> list[int]:
    jaxpr = jax.make_jaxpr(fn)(*args)
    return [e.invars[0].aval.ndim for e in jaxpr.eqns if e.primitive.name == "dot_general"]


def test_dense_dot_on_tokens_runs_on_2d_rows_and_equals_xla_in_float64():
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(2, 5, 4)))
        w = jnp.asarray(rng.normal(size=(4, 3)))
        dims = (((2,), (0,)), ((), ()))

        def run(fn):
            y, vjp = jax.vjp(lambda x, w: fn(x, w, dims), x, w)
            return (y, *vjp(jnp.cos(y)))

        ours, xla = run(cpu_conv.dot_general), run(lax.dot_general)
        for a, b in zip(ours, xla, strict=True):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
        assert _dot_operand_ranks(lambda x, w: cpu_conv.dot_general(x, w, dims), x, w) == [2]
        with cpu_conv.conv_algorithm("xla"):
            assert _dot_operand_ranks(lambda x, w: cpu_conv.dot_general(x, w, dims), x, w) == [3]
        # A batched product is not a dense layer's: passed to XLA as it is.
        batched = (((2,), (1,)), ((0,), (0,)))
        y = jnp.asarray(rng.normal(size=(2, 4, 3)))
        assert _dot_operand_ranks(lambda x, y: cpu_conv.dot_general(x, y, batched), x, y) == [3]
