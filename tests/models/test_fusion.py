"""The fusion head matches the original MultimodalClassifier's structure, init and semantics."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dermjax.models.fusion import (
    ACTIVATIONS,
    FUSION_STRATEGIES,
    MLP,
    MultimodalClassifier,
    l2_normalize,
)
from dermjax.models.losses import LossSpec, cross_entropy, total_loss

V, T, C, P, B, H = 12, 10, 4, 6, 8, 5  # H: hidden width


def _model(**kw):
    kw.setdefault("projection_dim", P)
    return MultimodalClassifier(V, T, C, rngs=nnx.Rngs(params=0, dropout=1), **kw)


def _embeddings(batch=B, seed=0):
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.normal(size=(batch, V)), jnp.float32),
        jnp.asarray(rng.normal(size=(batch, T)), jnp.float32),
    )


@pytest.mark.parametrize(
    "fusion, hidden, l2, aux",
    list(itertools.product(FUSION_STRATEGIES, [(), (H,)], [False, True], [False, True])),
)
def test_output_shapes_for_every_head_configuration(fusion, hidden, l2, aux):
    model = _model(
        fusion_strategy=fusion,
        image_projection_hidden=hidden,
        text_projection_hidden=(*hidden[::-1], 3) if hidden else (),
        final_hidden_sizes=hidden,
        use_l2_normalization=l2,
        use_auxiliary_loss=aux,
    )
    out = model(*_embeddings())
    expected = {"logits"} | ({"aux_vision_logits", "aux_text_logits"} if aux else set())
    assert set(out) == expected
    for v in out.values():
        assert v.shape == (B, C) and v.dtype == jnp.float32
    final_in = model.final_classifier.hidden[0].linear if hidden else model.final_classifier.out
    assert final_in.in_features == (P if fusion == "weighted_sum" else 2 * P)


def test_bfloat16_head_returns_float32_logits():
    out = _model(dtype=jnp.bfloat16, use_auxiliary_loss=True, image_projection_hidden=(H,))(
        *_embeddings()
    )
    assert all(v.dtype == jnp.float32 for v in out.values())


def test_weighted_sum_weights_start_equal_and_receive_gradients():
    model = _model(fusion_strategy="weighted_sum")
    assert float(model.alpha_vision[...]) == 0.5 and float(model.alpha_text[...]) == 0.5
    v, t = _embeddings()
    labels = jnp.arange(B) % C

    def loss(m):
        return cross_entropy(m(v, t)["logits"], labels)

    grads = nnx.jit(nnx.grad(loss))(model)
    gv, gt = float(grads["alpha_vision"][...]), float(grads["alpha_text"][...])
    assert gv != 0.0
    np.testing.assert_allclose(gv, -gt, rtol=1e-5)  # softmax is shift-invariant


def test_every_linear_has_torch_default_uniform_init():
    model = _model(image_projection_hidden=(H,), final_hidden_sizes=(H,), use_auxiliary_loss=True)
    linears = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Linear)]
    assert len(linears) == 7
    for lin in linears:
        bound = 1 / np.sqrt(lin.in_features)
        for p in (lin.kernel[...], lin.bias[...]):
            p = np.asarray(p)
            assert np.all(np.abs(p) <= bound)
        # Spread over the whole interval (not lecun-normal, not zero bias).
        kernel = np.asarray(lin.kernel[...])
        assert np.abs(kernel).max() > 0.8 * bound and np.abs(kernel).mean() > 0.3 * bound
        assert np.any(np.asarray(lin.bias[...]) != 0)


def _reference_mlp(x, mlp, act):
    """Eval-mode MLP with fresh BatchNorm stats (mean 0, var 1) written out by hand."""
    block = mlp.hidden[0]
    h = x @ np.asarray(block.linear.kernel[...]) + np.asarray(block.linear.bias[...])
    h = act(h / np.sqrt(1 + 1e-5))
    return h @ np.asarray(mlp.out.kernel[...]) + np.asarray(mlp.out.bias[...])


@pytest.mark.parametrize(
    "name, act",
    [
        ("relu", lambda x: np.maximum(x, 0)),
        ("gelu", lambda x: 0.5 * x * (1 + np.vectorize(__import__("math").erf)(x / np.sqrt(2)))),
        ("silu", lambda x: x / (1 + np.exp(-x))),
        ("swish", lambda x: x / (1 + np.exp(-x))),
        ("leaky_relu", lambda x: np.where(x > 0, x, 0.01 * x)),
    ],
)
def test_each_activation_name_computes_its_function(name, act):
    mlp = MLP(V, (H,), C, activation=name, dropout=0.5, rngs=nnx.Rngs(0))
    mlp.eval()
    x = np.asarray(_embeddings()[0]) * 3
    np.testing.assert_allclose(
        np.asarray(mlp(jnp.asarray(x))), _reference_mlp(x, mlp, act), atol=1e-5
    )


def test_activation_table_and_unknown_activation_error():
    assert ACTIVATIONS == ("relu", "gelu", "silu", "swish", "leaky_relu")
    with pytest.raises(ValueError, match="leaky_relu"):
        MLP(V, (H,), C, activation="tanh", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="fusion_strategy"):
        _model(fusion_strategy="attention")


def test_empty_hidden_list_is_a_single_linear():
    mlp = MLP(V, (), C, rngs=nnx.Rngs(0))
    assert len(mlp.hidden) == 0 and isinstance(mlp.out, nnx.Linear)
    assert not list(nnx.state(mlp, nnx.BatchStat))


def test_text_projection_dropout_defaults_to_projection_dropout():
    def rates(model):
        return [b.dropout.rate for b in model.text_projection.hidden]

    kw = {"image_projection_hidden": (H,), "text_projection_hidden": (H, H)}
    assert rates(_model(projection_dropout=0.45, **kw)) == [0.45, 0.45]
    assert rates(_model(projection_dropout=0.45, text_projection_dropout=0.1, **kw)) == [0.1, 0.1]
    assert _model(projection_dropout=0.45, **kw).vision_projection.hidden[0].dropout.rate == 0.45


def test_dropout_is_random_in_training_and_off_in_evaluation():
    model = _model(image_projection_hidden=(H,), projection_dropout=0.5)
    v, t = _embeddings()
    model.train()
    a, b = model(v, t)["logits"], model(v, t)["logits"]
    assert not np.allclose(a, b)
    model.eval()
    np.testing.assert_array_equal(model(v, t)["logits"], model(v, t)["logits"])


def test_mlp_training_step_matches_torch_batchnorm_and_running_mean():
    torch = pytest.importorskip("torch")
    mlp = MLP(V, (H,), C, activation="gelu", dropout=0.0, rngs=nnx.Rngs(0))
    block = mlp.hidden[0]
    ref = torch.nn.Sequential(
        torch.nn.Linear(V, H), torch.nn.BatchNorm1d(H), torch.nn.GELU(), torch.nn.Linear(H, C)
    )
    with torch.no_grad():
        for lin, tl in ((block.linear, ref[0]), (mlp.out, ref[3])):
            tl.weight.copy_(torch.from_numpy(np.asarray(lin.kernel[...]).T.copy()))
            tl.bias.copy_(torch.from_numpy(np.array(lin.bias[...])))
    x = np.array(_embeddings(seed=2)[0])
    mlp.train()
    ref.train()
    got = np.asarray(mlp(jnp.asarray(x)))
    want = ref(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(block.norm.mean[...]), ref[1].running_mean.numpy(), atol=1e-6
    )


def test_l2_normalize_matches_torch_and_has_finite_gradient_at_zero():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(3).normal(size=(4, 6)).astype(np.float32)
    x[0] = 0.0
    want = torch.nn.functional.normalize(torch.from_numpy(x), dim=1).numpy()
    np.testing.assert_allclose(np.asarray(l2_normalize(jnp.asarray(x))), want, atol=1e-6)
    grad = jax.grad(lambda z: l2_normalize(z).sum())(jnp.asarray(x))
    assert np.all(np.isfinite(grad))


def _np_cross_entropy(logits, labels):
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return -logp[np.arange(len(labels)), labels].mean()


def test_aux_losses_are_computed_on_the_valid_subset_only():
    model = _model(use_auxiliary_loss=True, use_l2_normalization=True, image_projection_hidden=(H,))
    v, t = _embeddings()
    labels = np.arange(B) % C
    sample = np.array([True] * 7 + [False])
    vision = np.array([True, False] * 4)
    text = np.array([False, False, True, True] * 2)
    spec = LossSpec(use_auxiliary_loss=True, aux_vision_weight=0.5, aux_text_weight=0.3)
    out = model(v, t)
    total, terms = total_loss(
        out, labels, spec, sample_valid=sample, vision_valid=vision, text_valid=text
    )

    def subset(key, m):
        return _np_cross_entropy(np.asarray(out[key], np.float64)[m], labels[m])

    main = subset("logits", sample)
    aux_v = subset("aux_vision_logits", sample & vision)
    aux_t = subset("aux_text_logits", sample & text)
    np.testing.assert_allclose(float(terms["loss/main"]), main, rtol=1e-5)
    np.testing.assert_allclose(float(terms["loss/aux_vision"]), aux_v, rtol=1e-5)
    np.testing.assert_allclose(float(terms["loss/aux_text"]), aux_t, rtol=1e-5)
    np.testing.assert_allclose(float(total), main + 0.5 * aux_v + 0.3 * aux_t, rtol=1e-5)


def test_hidden_sizes_accept_lists_as_a_config_holds_them():
    model = _model(image_projection_hidden=[H, 3], final_hidden_sizes=[H])
    assert [b.linear.out_features for b in model.vision_projection.hidden] == [H, 3]
    assert [b.linear.out_features for b in model.final_classifier.hidden] == [H]


def _routed(**kw):
    kw.setdefault("use_auxiliary_loss", True)
    kw.setdefault("use_l2_normalization", True)
    hidden = {k: (H,) for k in ("image_projection_hidden", "text_projection_hidden")}
    return _model(final_hidden_sizes=(H,), **hidden, **kw)


def test_zeroed_projections_are_zero_before_l2_so_aux_logits_are_the_bias():
    model = _routed(zero_masked_projections=True)
    model.eval()
    v, t = _embeddings()
    vv = jnp.asarray([True, False] * (B // 2))
    tv = jnp.asarray([True] * (B - 1) + [False])
    out = model(v, t, vv, tv)
    pv = jnp.where(vv[:, None], l2_normalize(model.vision_projection(v)), 0.0)
    pt = jnp.where(tv[:, None], l2_normalize(model.text_projection(t)), 0.0)
    expected = model.final_classifier(jnp.concatenate([pv, pt], -1))
    np.testing.assert_allclose(out["logits"], expected, rtol=1e-5, atol=1e-6)
    bias = model.aux_vision_classifier.bias[...]
    np.testing.assert_allclose(out["aux_vision_logits"][~np.asarray(vv)], np.tile(bias, (4, 1)))
    assert "ablation" not in out  # no routing unless asked
    plain = _routed()(v, t, vv, tv)  # without the option, masks do not touch the projections
    assert not np.allclose(plain["aux_vision_logits"][1], bias)


def _grad_norms(model, v, t, vv, tv):
    def loss(m):
        return jnp.sum(m(v, t, vv, tv)["logits"] ** 2)

    grads = nnx.to_pure_dict(nnx.grad(loss)(model))
    return {k: float(sum(jnp.abs(x).sum() for x in jax.tree.leaves(g))) for k, g in grads.items()}


@pytest.mark.parametrize("modality, mode, other", [("text", 1, "vision"), ("vision", 2, "text")])
def test_ablation_routing_sends_one_modality_batches_to_their_aux_head(modality, mode, other):
    model = _routed(
        ablation_routing=True, zero_masked_projections=True, fusion_strategy="weighted_sum"
    )
    v, t = _embeddings()
    some = jnp.asarray([True, False] * (B // 2))  # not applied on the ablation route
    none = jnp.zeros(B, bool)
    vv, tv = (none, some) if modality == "text" else (some, none)
    stats_before = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    model.eval()
    out = model(v, t, vv, tv)
    emb = t if modality == "text" else v
    p = l2_normalize(getattr(model, f"{modality}_projection")(emb))
    expected = getattr(model, f"aux_{modality}_classifier")(p)
    assert int(out["ablation"]) == mode
    np.testing.assert_allclose(out["logits"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out[f"aux_{modality}_logits"], out["logits"])
    model.train()
    norms = _grad_norms(model, v, t, vv, tv)
    assert norms[f"{modality}_projection"] > 0 and norms[f"aux_{modality}_classifier"] > 0
    for name in (f"{other}_projection", f"aux_{other}_classifier", "final_classifier"):
        assert norms[name] == 0.0, name
    assert norms["alpha_vision"] == norms["alpha_text"] == 0.0
    model(v, t, vv, tv)  # a training forward updates only the route's BatchNorm statistics
    stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    for name in (f"{other}_projection", "final_classifier"):
        same = jax.tree.map(np.array_equal, stats[name], stats_before[name])
        assert all(jax.tree.leaves(same)), name
    assert not np.array_equal(
        stats[f"{modality}_projection"]["hidden"][0]["norm"]["mean"],
        stats_before[f"{modality}_projection"]["hidden"][0]["norm"]["mean"],
    )


def test_ablation_routing_fuses_mixed_and_fully_masked_batches():
    model = _routed(ablation_routing=True)
    model.eval()
    v, t = _embeddings()
    none, some = jnp.zeros(B, bool), jnp.asarray([True, False] * (B // 2))
    for vv, tv in ((none, none), (some, some), (~none, ~none)):
        out = model(v, t, vv, tv)
        assert int(out["ablation"]) == 0
        np.testing.assert_allclose(out["logits"], model(v, t)["logits"], rtol=1e-6)
    # padding rows (sample_valid False) do not count as valid samples of a modality
    text_only_on_padding = jnp.asarray([False] * (B - 1) + [True])
    real = jnp.asarray([True] * (B - 1) + [False])
    assert int(model(v, t, ~none, text_only_on_padding, real)["ablation"]) == 2
    assert int(model(v, t, text_only_on_padding, ~none, real)["ablation"]) == 1  # the mirror


def test_ablation_routing_needs_aux_heads_and_vision_only_path_is_aux_vision_on_l2():
    with pytest.raises(ValueError, match="use_auxiliary_loss"):
        _model(ablation_routing=True)
    model = _routed()
    model.eval()
    v, _ = _embeddings()
    expected = model.aux_vision_classifier(l2_normalize(model.vision_projection(v)))
    np.testing.assert_allclose(model.vision_only(v)["logits"], expected, rtol=1e-6)


def test_the_originals_vision_only_path_skips_l2_when_asked():
    model = _routed(vision_only_l2_normalization=False)
    model.eval()
    v, t = _embeddings()
    raw = model.aux_vision_classifier(model.vision_projection(v))
    np.testing.assert_allclose(model.vision_only(v)["logits"], raw, rtol=1e-6)
    # the multimodal path still normalises
    fused = model.aux_vision_classifier(l2_normalize(model.vision_projection(v)))
    np.testing.assert_allclose(model(v, t)["aux_vision_logits"], fused, rtol=1e-6)
