"""Losses equal PyTorch / the original's formulas; masks, LossSpec rules and total_loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dermjax.models.losses import (
    LOSS_FNS,
    REDUCTIONS,
    LossSpec,
    cross_entropy,
    focal_loss,
    total_loss,
)

B, C = 24, 5


def _inputs(seed=0, batch=B):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(batch, C)) * 3).astype(np.float32)
    labels = rng.integers(0, C, size=batch).astype(np.int32)
    weights = rng.uniform(0.1, 3.0, size=C).astype(np.float32)
    return logits, labels, weights


def _focal_reference(logits, labels, alpha, gamma):
    z = logits.astype(np.float64)
    logp = z - z.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    logp_t = logp[np.arange(len(labels)), labels]
    a = 1.0 if alpha is None else np.asarray(alpha, np.float64)
    a_t = a[labels] if np.ndim(a) else a
    return np.mean(-a_t * (1 - np.exp(logp_t)) ** gamma * logp_t)


@pytest.mark.parametrize("use_weights", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_cross_entropy_equals_torch_with_weights_and_label_smoothing(use_weights, smoothing):
    torch = pytest.importorskip("torch")
    logits, labels, weights = _inputs()
    w = weights if use_weights else None
    expected = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits),
        torch.from_numpy(labels).long(),
        weight=None if w is None else torch.from_numpy(w),
        label_smoothing=smoothing,
    ).item()
    got = cross_entropy(logits, labels, class_weights=w, label_smoothing=smoothing)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


@pytest.mark.parametrize("alpha", [None, 0.25, "per_class"])
@pytest.mark.parametrize("gamma", [0.0, 2.0, 3.5])
def test_focal_loss_equals_direct_formula_plain_mean(alpha, gamma):
    logits, labels, weights = _inputs(1)
    a = weights if alpha == "per_class" else alpha
    got = focal_loss(logits, labels, alpha=a, gamma=gamma)
    np.testing.assert_allclose(float(got), _focal_reference(logits, labels, a, gamma), rtol=1e-5)


def test_focal_loss_with_gamma_zero_and_no_alpha_is_cross_entropy():
    logits, labels, _ = _inputs(2)
    np.testing.assert_allclose(
        float(focal_loss(logits, labels, gamma=0.0)),
        float(cross_entropy(logits, labels)),
        rtol=1e-6,
    )


@pytest.mark.parametrize(
    "loss",
    [
        lambda lg, lb, m, w: cross_entropy(lg, lb, class_weights=w, label_smoothing=0.2, mask=m),
        lambda lg, lb, m, w: focal_loss(lg, lb, alpha=w, gamma=2.0, mask=m),
    ],
    ids=["cross_entropy", "focal"],
)
def test_mask_equals_loss_on_valid_subset_and_ignores_invalid_labels(loss):
    logits, labels, weights = _inputs(3)
    mask = np.random.default_rng(4).random(B) < 0.6
    # Invalid samples may carry padding labels and garbage logits; they must not matter.
    labels_padded = np.where(mask, labels, -1).astype(np.int32)
    logits_padded = np.where(mask[:, None], logits, 1e4).astype(np.float32)
    got = loss(logits_padded, labels_padded, jnp.asarray(mask), weights)
    expected = loss(logits[mask], labels[mask], None, weights)
    np.testing.assert_allclose(float(got), float(expected), rtol=1e-6)


@pytest.mark.parametrize(
    "loss",
    [
        lambda lg, m: cross_entropy(
            lg, jnp.zeros(B, jnp.int32), class_weights=jnp.ones(C), label_smoothing=0.1, mask=m
        ),
        lambda lg, m: focal_loss(lg, jnp.zeros(B, jnp.int32), gamma=2.0, mask=m),
    ],
    ids=["cross_entropy", "focal"],
)
def test_all_invalid_mask_gives_zero_loss_and_finite_zero_gradient(loss):
    logits, _, _ = _inputs(5)
    mask = jnp.zeros(B, bool)
    value, grad = jax.value_and_grad(loss)(jnp.asarray(logits), mask)
    assert float(value) == 0.0
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad) == 0)


def test_gradients_are_finite_for_confident_logits():
    logits = jnp.array([[80.0, -80.0, 0.0], [0.0, 0.0, 0.0]], jnp.float32)
    labels = jnp.array([0, 2], jnp.int32)
    for fn in (
        lambda z: cross_entropy(z, labels, class_weights=[1.0, 2.0, 3.0], label_smoothing=0.1),
        lambda z: focal_loss(z, labels, alpha=[0.5, 1.0, 2.0], gamma=2.0),
        lambda z: focal_loss(z, labels, gamma=0.0),
    ):
        assert np.all(np.isfinite(jax.grad(fn)(logits)))


def _focal_inputs():
    """Ordinary samples plus one with p_t == 1 exactly in float32 and one confidently wrong."""
    rng = np.random.default_rng(11)
    logits = (rng.normal(size=(6, 3)) * 2).astype(np.float32)
    labels = rng.integers(0, 3, size=6).astype(np.int32)
    logits = np.concatenate([logits, [[100.0, -100.0, -100.0], [100.0, -100.0, -100.0]]])
    labels = np.concatenate([labels, [0, 1]]).astype(np.int32)
    return logits.astype(np.float32), labels


def _central_differences(f, x, h=1e-5):
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[i] = h
        grad[i] = (f(x + step) - f(x - step)) / (2 * h)
    return grad


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
def test_focal_loss_value_and_gradient_match_float64_reference_including_p_t_one(gamma):
    logits, labels = _focal_inputs()
    alpha = np.array([0.5, 1.0, 2.0], np.float32)
    # the confident row really hits p_t == 1 in float32, where (1 - p_t)**0.5 has infinite slope
    assert float(jax.nn.log_softmax(jnp.asarray(logits[-2]))[0]) == 0.0
    value, grad = jax.value_and_grad(lambda z: focal_loss(z, labels, alpha=alpha, gamma=gamma))(
        jnp.asarray(logits)
    )
    ref = _focal_reference(logits, labels, alpha, gamma)
    np.testing.assert_allclose(float(value), ref, rtol=1e-5)
    expected = _central_differences(
        lambda z: _focal_reference(z, labels, alpha, gamma), logits.astype(np.float64)
    )
    assert np.all(np.isfinite(np.asarray(grad)))
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("gamma", [0.01, 0.5, 0.99])
def test_focal_loss_gradient_is_finite_as_p_t_approaches_one(gamma):
    margins = np.concatenate([np.linspace(0.0, 120.0, 4001), np.logspace(-8, 2, 2000)])
    logits = np.stack([margins, np.zeros_like(margins), -margins], 1).astype(np.float32)
    labels = np.zeros(len(margins), np.int32)
    grad = jax.grad(lambda z: focal_loss(z, labels, gamma=gamma))(jnp.asarray(logits))
    assert np.all(np.isfinite(np.asarray(grad)))


# The config defaults of the multimodal_classifier loss fields.
LOSS_FIELDS = dict(
    loss_fn="cross_entropy",
    label_smoothing=0.1,
    class_weights=None,
    use_class_weights_from_data=False,
    alpha=None,
    gamma=2.0,
    reduction="mean",
    use_auxiliary_loss=False,
    auxiliary_loss_weight=0.3,
    auxiliary_vision_loss_weight=None,
    auxiliary_text_loss_weight=None,
)


def _create(data_class_weights=None, **fields):
    return LossSpec.create(**{**LOSS_FIELDS, **fields}, data_class_weights=data_class_weights)


def test_loss_spec_manual_class_weights_win_over_data_weights():
    spec = _create([0.1, 0.2], class_weights=[1.0, 2.0], use_class_weights_from_data=True)
    assert spec.class_weights == (1.0, 2.0)


def test_loss_spec_injects_raw_data_weights_only_when_asked():
    assert _create([0.1, 0.2], use_class_weights_from_data=True).class_weights == (0.1, 0.2)
    assert _create([0.1, 0.2], use_class_weights_from_data=False).class_weights is None


def test_loss_spec_focal_alpha_falls_back_from_alpha_to_class_weights_to_one():
    data_w = [0.01, 0.02]
    focal = dict(loss_fn="focal")
    assert _create(**focal, alpha=[3.0, 4.0], class_weights=[1, 2]).alpha == (3.0, 4.0)
    assert _create(**focal, alpha=0.25).alpha == 0.25
    assert _create(**focal, class_weights=[1, 2]).alpha == (1.0, 2.0)
    assert _create(data_w, **focal, use_class_weights_from_data=True).alpha == (0.01, 0.02)
    assert _create(data_w, **focal).alpha == 1.0
    assert _create(**focal, gamma=None).gamma == 2.0
    assert _create(alpha=0.25).alpha is None  # alpha only matters to focal loss


def test_loss_spec_aux_weights_default_to_auxiliary_loss_weight():
    spec = _create(
        use_auxiliary_loss=True,
        auxiliary_loss_weight=0.2,
        auxiliary_text_loss_weight=0.7,
        auxiliary_vision_loss_weight=None,
    )
    assert (spec.aux_vision_weight, spec.aux_text_weight) == (0.2, 0.7)
    assert spec.use_auxiliary_loss
    spec = _create(auxiliary_loss_weight=None)
    assert (spec.aux_vision_weight, spec.aux_text_weight) == (0.3, 0.3)


def test_loss_spec_create_takes_exactly_the_config_field_names():
    spec = _create(label_smoothing=None)
    assert spec.label_smoothing == 0.0
    with pytest.raises(TypeError):
        LossSpec.create(**{**LOSS_FIELDS, "smoothing": 0.1})
    with pytest.raises(TypeError):
        LossSpec.create(**{k: v for k, v in LOSS_FIELDS.items() if k != "gamma"})


def test_loss_spec_accepts_the_listed_options_and_rejects_others():
    for loss_fn in LOSS_FNS:
        assert _create(loss_fn=loss_fn).loss_fn == loss_fn
    for reduction in (*REDUCTIONS, None):
        _create(reduction=reduction)
    with pytest.raises(ValueError, match="loss_fn"):
        _create(loss_fn="hinge")
    with pytest.raises(ValueError, match="reduction"):
        _create(reduction="sum")
    with pytest.raises(ValueError, match="gamma"):
        _create(loss_fn="focal", gamma=-1.0)


def _outputs(seed=6):
    rng = np.random.default_rng(seed)
    return {
        k: jnp.asarray(rng.normal(size=(B, C)), jnp.float32)
        for k in ("logits", "aux_vision_logits", "aux_text_logits")
    }


def test_total_loss_uses_each_modality_valid_subset_for_aux_terms():
    out = _outputs()
    _, labels, weights = _inputs(7)
    rng = np.random.default_rng(8)
    sample, vision, text = (jnp.asarray(rng.random(B) < 0.7) for _ in range(3))
    spec = LossSpec(
        class_weights=tuple(weights.tolist()),
        label_smoothing=0.1,
        use_auxiliary_loss=True,
        aux_vision_weight=0.4,
        aux_text_weight=0.25,
    )
    total, terms = jax.jit(
        lambda o, y, s, v, t: total_loss(o, y, spec, sample_valid=s, vision_valid=v, text_valid=t)
    )(out, labels, sample, vision, text)

    def subset_loss(key, m):
        m = np.asarray(m)
        return float(
            cross_entropy(
                np.asarray(out[key])[m], labels[m], class_weights=weights, label_smoothing=0.1
            )
        )

    main = subset_loss("logits", sample)
    aux_v = subset_loss("aux_vision_logits", sample & vision)
    aux_t = subset_loss("aux_text_logits", sample & text)
    np.testing.assert_allclose(float(terms["loss/main"]), main, rtol=1e-5)
    np.testing.assert_allclose(float(terms["loss/aux_vision"]), aux_v, rtol=1e-5)
    np.testing.assert_allclose(float(terms["loss/aux_text"]), aux_t, rtol=1e-5)
    np.testing.assert_allclose(float(total), main + 0.4 * aux_v + 0.25 * aux_t, rtol=1e-5)


def test_total_loss_skips_aux_terms_without_valid_samples_or_weight():
    out = _outputs()
    _, labels, _ = _inputs(9)
    ones, zeros = jnp.ones(B, bool), jnp.zeros(B, bool)
    spec = LossSpec(use_auxiliary_loss=True, aux_vision_weight=0.5, aux_text_weight=0.0)
    total, terms = total_loss(
        out, labels, spec, sample_valid=ones, vision_valid=zeros, text_valid=ones
    )
    assert float(terms["loss/aux_vision"]) == 0.0 and float(terms["loss/aux_text"]) == 0.0
    np.testing.assert_allclose(float(total), float(terms["loss/main"]), rtol=1e-7)


def test_total_loss_without_aux_is_main_and_needs_no_aux_outputs():
    out = {"logits": _outputs()["logits"]}
    _, labels, _ = _inputs(10)
    ones = jnp.ones(B, bool)
    total, terms = total_loss(
        out,
        labels,
        LossSpec(loss_fn="focal", alpha=1.0),
        sample_valid=ones,
        vision_valid=ones,
        text_valid=ones,
    )
    np.testing.assert_allclose(float(total), float(focal_loss(out["logits"], labels)), rtol=1e-6)
    assert set(terms) == {"loss/main", "loss/aux_vision", "loss/aux_text"}


def _aux_outputs(seed=0, batch=6, classes=4):
    rng = np.random.default_rng(seed)
    logits = {
        k: jnp.asarray(rng.normal(size=(batch, classes)), jnp.float32)
        for k in ("logits", "aux_vision_logits", "aux_text_logits")
    }
    return logits, jnp.asarray(rng.integers(0, classes, batch), jnp.int32)


def test_traced_aux_weights_replace_the_spec_weights_without_recompiling():
    outputs, labels = _aux_outputs()
    spec = LossSpec(use_auxiliary_loss=True, aux_vision_weight=0.3, aux_text_weight=0.3)
    ones = jnp.ones(labels.shape, bool)
    fn = jax.jit(
        lambda w: total_loss(
            outputs, labels, spec, sample_valid=ones, vision_valid=ones, text_valid=ones,
            aux_weights=w,
        )
    )  # fmt: skip
    main = cross_entropy(outputs["logits"], labels)
    aux_v = cross_entropy(outputs["aux_vision_logits"], labels)
    aux_t = cross_entropy(outputs["aux_text_logits"], labels)
    for wv, wt in ((0.5, 0.1), (0.0, 0.2), (0.0, 0.0)):
        total, terms = fn(jnp.asarray([wv, wt], jnp.float32))
        np.testing.assert_allclose(total, main + wv * aux_v + wt * aux_t, rtol=1e-6)
        assert float(terms["loss/aux_vision"]) == (0.0 if wv == 0 else pytest.approx(aux_v))
    assert fn._cache_size() == 1


def test_ablation_batches_have_the_main_loss_only():
    outputs, labels = _aux_outputs(seed=1)
    spec = LossSpec(use_auxiliary_loss=True, aux_vision_weight=0.5, aux_text_weight=0.5)
    ones = jnp.ones(labels.shape, bool)
    for mode in (1, 2):
        total, terms = total_loss(
            {**outputs, "ablation": jnp.asarray(mode, jnp.int32)}, labels, spec,
            sample_valid=ones, vision_valid=ones, text_valid=ones,
        )  # fmt: skip
        np.testing.assert_allclose(total, cross_entropy(outputs["logits"], labels), rtol=1e-6)
        assert float(terms["loss/aux_vision"]) == float(terms["loss/aux_text"]) == 0.0
