"""ResNet-50/101 against torchvision: parameters, logits (float64 and float32), features, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dermjax.models import cpu_conv, create_backbone, feature_dim
from tests.models import parity


@pytest.mark.parametrize(("name", "count"), [("resnet50", 25_557_032), ("resnet101", 44_549_160)])
def test_parameter_count_equals_torchvision_weights_meta(name, count):
    assert parity.abstract_param_count(name, include_top=True) == count


def test_resnet50_logits_match_torchvision_float64_and_float32():
    tv = parity.import_torchvision()
    model = parity.seeded_torch_model(tv, "resnet50", image_size=64)
    parity.assert_parity("resnet50", model, image_size=64, f32_tol=parity.RESNET_F32_TOL)


@pytest.mark.slow
def test_resnet101_logits_match_torchvision_float64_and_float32():
    tv = parity.import_torchvision()
    model = parity.seeded_torch_model(tv, "resnet101", image_size=64)
    parity.assert_parity("resnet101", model, image_size=64, f32_tol=parity.RESNET101_F32_TOL)


def test_concat_features_are_avg_then_max_of_the_trunk_without_fc():
    tv = parity.import_torchvision()
    import torch

    model = parity.seeded_torch_model(tv, "resnet50", image_size=32)
    trunk = torch.nn.Sequential(*list(model.children())[:-2])

    def original_embedding(_, x):
        maps = trunk(x)
        return torch.cat([maps.mean(dim=(2, 3)), maps.amax(dim=(2, 3))], dim=1)

    parity.assert_parity(
        "resnet50",
        model,
        image_size=32,
        f32_tol=parity.RESNET_F32_TOL,
        f64_tol=None,
        torch_forward=original_embedding,
        include_top=False,
        pooling_type="concat",
    )


@pytest.mark.parametrize("pooling_type", ["avg", "max", "concat"])
def test_pooled_feature_shape_follows_pooling_type(pooling_type):
    model = nnx.eval_shape(
        lambda: create_backbone("resnet50", rngs=nnx.Rngs(0), pooling_type=pooling_type)
    )
    out = nnx.eval_shape(
        lambda m, x: m(x), model, jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    )
    assert out.shape == (2, feature_dim("resnet50", pooling_type))


def test_bfloat16_computes_convolutions_in_bf16_with_float32_params_stats_and_output():
    model = nnx.eval_shape(
        lambda: create_backbone("resnet50", rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    )
    variables = jax.tree.leaves(nnx.state(model, (nnx.Param, nnx.BatchStat)))
    assert {v.dtype for v in variables} == {jnp.dtype(jnp.float32)}
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    # XLA's convolutions, and the CPU reformulation's matmuls (one per convolution at this size).
    for algorithm, primitive in (("xla", "conv_general_dilated"), ("matmul", "dot_general")):
        with cpu_conv.conv_algorithm(algorithm):
            jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
        ops = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name == primitive]
        assert len(ops) == 53, algorithm
        assert all(v.aval.dtype == jnp.bfloat16 for e in ops for v in e.invars), algorithm
        assert jaxpr.out_avals[0].dtype == jnp.float32


def test_bfloat16_backward_saves_activations_in_bf16_only():
    """What jax.vjp keeps for the backward pass of a train-mode bf16 ResNet-50: the activations
    between layers in bf16 (plus ReLU masks), no float32 array with a batch dimension."""
    model = nnx.eval_shape(
        lambda: create_backbone("resnet50", rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    )
    model.train()
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    x = jax.ShapeDtypeStruct((3, 64, 64, 3), jnp.bfloat16)

    def saved(params, rest, x):
        def forward(params, x):
            m = nnx.merge(graph, params, jax.tree.map(lambda v: v, rest))
            return m(x), nnx.state(m, nnx.BatchStat)

        return jax.vjp(forward, params, x, has_aux=True)[1]

    leaves = jax.tree.leaves(jax.eval_shape(saved, params, rest, x))
    batched = [a for a in leaves if a.ndim == 4 and a.shape[0] == 3]
    assert len(batched) > 100
    assert {a.dtype for a in batched} <= {jnp.dtype(jnp.bfloat16), jnp.dtype(bool)}


def _equations(jaxpr):
    """Every equation of a jaxpr, nested ones (einsum's inner jit) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                yield from _equations(inner)


def test_unknown_pooling_type_fails_at_construction():
    with pytest.raises(ValueError, match="pooling_type"):
        nnx.eval_shape(lambda: create_backbone("resnet50", rngs=nnx.Rngs(0), pooling_type="gem"))


def test_batch_norm_factory_follows_torch_train_and_eval_semantics():
    torch = pytest.importorskip("torch")
    from dermjax.models.layers import batch_norm

    x = np.random.default_rng(0).standard_normal((4, 5, 5, 3)) * 3 + 1
    ours = batch_norm(3, rngs=nnx.Rngs(0))
    theirs = torch.nn.BatchNorm2d(3).double()
    ours.train()
    out = np.asarray(ours(jnp.asarray(x, jnp.float32)))
    ref = theirs.train()(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy()
    np.testing.assert_allclose(out, ref.transpose(0, 2, 3, 1), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ours.mean.get_value()), theirs.running_mean, atol=1e-6)
    ours.eval()
    frozen = np.asarray(ours.mean.get_value())
    out = np.asarray(ours(jnp.asarray(x, jnp.float32)))
    np.testing.assert_array_equal(np.asarray(ours.mean.get_value()), frozen)
    var = np.asarray(ours.var.get_value())
    expected = (x - frozen) / np.sqrt(var + 1e-5)
    np.testing.assert_allclose(out, expected, atol=1e-5)
