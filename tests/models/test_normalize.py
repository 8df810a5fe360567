"""normalize.normalize's hand-written backward pass: equal to autodiff of the plain formula and
to torch's BatchNorm2d/LayerNorm gradients in float64, and it saves only bf16 activations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dermjax.models.layers import batch_norm
from dermjax.models.normalize import LayerNorm, normalize

EPS = 1e-5
BN_AXES = (0, 1, 2)
LN_AXES = (2,)


def _reference(x, scale, bias, axes):
    """The formula autodiff differentiates: two-pass biased variance, affine per last axis."""
    mean = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + EPS) * scale + bias, mean, var


def _inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    features = shape[-1]
    x = rng.standard_normal(shape) * (0.5 + rng.random(features)) + rng.standard_normal(features)
    scale, bias = 1 + 0.3 * rng.standard_normal(features), rng.standard_normal(features)
    return x, scale, bias


@pytest.mark.parametrize(
    ("shape", "axes"), [((4, 5, 3, 6), BN_AXES), ((3, 7, 8), LN_AXES), ((1, 2, 2, 4), BN_AXES)]
)
def test_gradients_equal_autodiff_of_the_formula_in_float64(shape, axes) -> None:
    with jax.enable_x64(True):
        x, scale, bias = (jnp.asarray(a, jnp.float64) for a in _inputs(shape))
        rng = np.random.default_rng(1)
        outs = jax.eval_shape(lambda: _reference(x, scale, bias, axes))
        # Cotangents for y and for the returned mean/var, so every term of the rule is checked.
        cot = tuple(jnp.asarray(rng.standard_normal(o.shape)) for o in outs)
        ours_out, ours_vjp = jax.vjp(
            lambda *a: normalize(*a, axes, EPS, jnp.float64), x, scale, bias
        )
        ref_out, ref_vjp = jax.vjp(lambda *a: _reference(*a, axes), x, scale, bias)
        for a, b in zip(ours_out, ref_out, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-12)
        for a, b in zip(ours_vjp(cot), ref_vjp(cot), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-11)


def test_batchnorm_gradients_equal_torch_batchnorm2d_float64() -> None:
    torch = pytest.importorskip("torch")
    x, scale, bias = _inputs((4, 5, 5, 3), seed=2)
    dy = np.random.default_rng(3).standard_normal(x.shape)
    norm = torch.nn.BatchNorm2d(3).double().train()
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(scale))
        norm.bias.copy_(torch.from_numpy(bias))
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    norm(tx).backward(torch.from_numpy(dy.transpose(0, 3, 1, 2).copy()))
    with jax.enable_x64(True):
        module = batch_norm(3, rngs=nnx.Rngs(0), dtype=jnp.float64)
        module.scale[...], module.bias[...] = jnp.asarray(scale), jnp.asarray(bias)
        module.train()
        graph, params, rest = nnx.split(module, nnx.Param, ...)

        def loss(p, x):
            return jnp.sum(nnx.merge(graph, p, jax.tree.map(lambda v: v, rest))(x) * dy)

        grads = jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(x))
    np.testing.assert_allclose(
        np.asarray(grads[1]), tx.grad.numpy().transpose(0, 2, 3, 1), rtol=0, atol=1e-12
    )
    np.testing.assert_allclose(
        np.asarray(grads[0]["scale"][...]), norm.weight.grad.numpy(), atol=1e-11
    )
    np.testing.assert_allclose(
        np.asarray(grads[0]["bias"][...]), norm.bias.grad.numpy(), atol=1e-11
    )


def test_layer_norm_matches_torch_and_flax_forward_and_backward_float64() -> None:
    torch = pytest.importorskip("torch")
    x, scale, bias = _inputs((2, 5, 8), seed=4)
    dy = np.random.default_rng(5).standard_normal(x.shape)
    tx = torch.from_numpy(x).requires_grad_(True)
    tw, tb = (torch.from_numpy(a.copy()).requires_grad_(True) for a in (scale, bias))
    ref = torch.nn.functional.layer_norm(tx, (8,), tw, tb, 1e-6)
    ref.backward(torch.from_numpy(dy))
    with jax.enable_x64(True):
        kw = {"epsilon": 1e-6, "use_fast_variance": False, "param_dtype": jnp.float64}
        ours = LayerNorm(8, dtype=jnp.float64, rngs=nnx.Rngs(0), **kw)
        ours.scale[...], ours.bias[...] = jnp.asarray(scale), jnp.asarray(bias)
        flax_ln = nnx.LayerNorm(8, dtype=jnp.float64, rngs=nnx.Rngs(0), **kw)
        flax_ln.scale[...], flax_ln.bias[...] = jnp.asarray(scale), jnp.asarray(bias)
        out, vjp = jax.vjp(
            lambda x, s, b: normalize(x, s, b, (2,), 1e-6, jnp.float64)[0],
            *(jnp.asarray(a) for a in (x, scale, bias)),
        )
        dx, ds, db = vjp(jnp.asarray(dy))
        np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x))), np.asarray(out), atol=0)
        np.testing.assert_allclose(np.asarray(flax_ln(jnp.asarray(x))), np.asarray(out), atol=1e-12)
    np.testing.assert_allclose(np.asarray(out), ref.detach().numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(dx), tx.grad.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(ds), tw.grad.numpy(), rtol=0, atol=1e-11)
    np.testing.assert_allclose(np.asarray(db), tb.grad.numpy(), rtol=0, atol=1e-11)


@pytest.mark.parametrize(("shape", "axes"), [((8, 6, 6, 16), BN_AXES), ((8, 10, 16), LN_AXES)])
def test_bfloat16_saves_only_the_bf16_input_for_backward(shape, axes) -> None:
    x, scale, bias = _inputs(shape, seed=6)
    x = jnp.asarray(x, jnp.bfloat16)
    scale, bias = jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32)

    def saved(fn):
        """Shapes/dtypes of what jax.vjp keeps for the backward pass (the vjp closure's leaves)."""
        return jax.tree.leaves(jax.eval_shape(lambda: jax.vjp(fn, x, scale, bias)[1]))

    def big_float32(leaves):
        return [a for a in leaves if a.dtype == jnp.float32 and a.size >= x.size]

    ours = saved(lambda *a: normalize(*a, axes, EPS, jnp.bfloat16)[0])
    assert jax.eval_shape(lambda: normalize(x, scale, bias, axes, EPS, jnp.bfloat16))[0].dtype == (
        jnp.bfloat16
    )
    assert big_float32(ours) == []
    assert any(a.dtype == jnp.bfloat16 and a.shape == x.shape for a in ours)
    # What plain autodiff of the same float32 arithmetic keeps: activation-sized float32 arrays.
    plain = saved(lambda x, s, b: _reference(x.astype(jnp.float32), s, b, axes)[0].astype(x.dtype))
    assert len(big_float32(plain)) >= 1


def test_layer_norm_falls_back_to_flax_with_a_mask() -> None:
    x = _inputs((2, 4, 8), seed=7)[0]
    mask = np.ones(x.shape, bool)
    mask[:, :, :2] = False
    ours = LayerNorm(8, rngs=nnx.Rngs(0))
    flax_ln = nnx.LayerNorm(8, rngs=nnx.Rngs(0))
    a = ours(jnp.asarray(x, jnp.float32), mask=jnp.asarray(mask))
    b = flax_ln(jnp.asarray(x, jnp.float32), mask=jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
