"""The jitted steps: warm-up freezing, the unfreeze rule, frozen BatchNorm statistics, NaN safety,
bfloat16 compute, the per-batch confusion matrix."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dermjax.config import load_config
from dermjax.data.augment import to_unit
from dermjax.experiment import init_training, make_model, step_spec
from dermjax.train import step as step_module
from dermjax.train.metrics import confusion_matrix
from dermjax.train.step import COMPUTE_DTYPES, StepSpec, make_eval_step, make_train_step

SIZE, BATCH, CLASSES, TEXT = 32, 4, 5, 8


def setup(update_frozen_bn_stats=True, dtype="float32", head_batchnorm=True):
    """A ResNet-50 (only layer4 trains after warm-up) with its state, steps and their inputs.

    `head_batchnorm=False` drops the head's hidden blocks (Linear-BatchNorm-act-dropout).
    """
    cfg = load_config("demo")
    cfg.data.img_size = (SIZE, SIZE)
    cfg.vision_model.name = "resnet50"
    cfg.vision_model.unfreeze_layers = 1
    cfg.training.update_frozen_bn_stats = update_frozen_bn_stats
    cfg.training.dtype = dtype
    if not head_batchnorm:
        head = cfg.multimodal_classifier
        head.image_projection_hidden = head.text_projection_hidden = head.final_hidden_sizes = ()
    model = make_model(cfg, num_classes=CLASSES, text_dim=TEXT, rngs=nnx.Rngs(0))
    parts, state, tx_b, tx_h = init_training(cfg, model)
    spec = step_spec(cfg, np.ones(CLASSES), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return types.SimpleNamespace(
        state=state,
        parts=parts,
        spec=spec,
        tx=(tx_b, tx_h),
        warm=make_train_step(parts, spec, tx_b, tx_h, warmup=True),
        main=make_train_step(parts, spec, tx_b, tx_h, warmup=False),
        evaluate=make_eval_step(parts, spec),
    )


def batch(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8),
        "label": (np.arange(BATCH) % CLASSES).astype(np.int32),
        "text": rng.standard_normal((BATCH, TEXT)).astype(np.float32),
        "has_text": np.ones(BATCH, bool),
        "valid": np.ones(BATCH, bool),
        "index": np.arange(BATCH, dtype=np.int32),
    }


def host(tree):
    return jax.tree.map(np.asarray, tree)


def equal(a, b):
    return all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def changed_leaves(before, after):
    flat_b = jax.tree_util.tree_flatten_with_path(before)[0]
    flat_a = jax.tree.leaves(after)
    return {
        jax.tree_util.keystr(p)
        for (p, x), y in zip(flat_b, flat_a, strict=True)
        if not np.array_equal(x, y)
    }


@pytest.fixture(scope="module")
def steps():
    return setup()


def test_warmup_leaves_backbone_and_its_optimizer_state_bitwise_unchanged(steps):
    state, warm = steps.state, steps.warm
    before = host(state)
    new, out = warm(jax.tree.map(np.array, before), batch(), jax.random.key(1))
    new = host(new)
    assert bool(out["finite"])
    assert equal(before["params"]["backbone"], new["params"]["backbone"])
    assert equal(before["opt_backbone"], new["opt_backbone"])
    assert not equal(before["params"]["head"], new["params"]["head"])
    assert not equal(before["opt_head"], new["opt_head"])
    # the original keeps the frozen backbone in train mode: its BN statistics still update
    assert not equal(before["batch_stats"]["backbone"], new["batch_stats"]["backbone"])
    assert int(new["step"]) == int(before["step"]) + 1


def test_after_warmup_only_the_unfrozen_units_change(steps):
    state, main = steps.state, steps.main
    before = host(state)
    new, _ = main(jax.tree.map(np.array, before), batch(), jax.random.key(2))
    changed = changed_leaves(before["params"]["backbone"], host(new)["params"]["backbone"])
    assert changed, "the unfrozen unit did not train"
    assert all(name.startswith("['layer4']") for name in changed), changed
    assert not equal(before["params"]["head"], host(new)["params"]["head"])


def test_frozen_batchnorm_statistics_can_be_kept_fixed():
    run = setup(update_frozen_bn_stats=False)
    state, warm, main = run.state, run.warm, run.main
    before = host(state)
    new, _ = main(jax.tree.map(np.array, before), batch(), jax.random.key(3))
    changed = changed_leaves(
        before["batch_stats"]["backbone"], host(new)["batch_stats"]["backbone"]
    )
    assert changed and all(name.startswith("['layer4']") for name in changed), changed
    new, _ = warm(jax.tree.map(np.array, before), batch(), jax.random.key(3))
    assert equal(before["batch_stats"]["backbone"], host(new)["batch_stats"]["backbone"])


def assert_state_kept(before: dict, new: dict) -> None:
    """A skipped step: parameters, statistics and both optimizer states as they were."""
    for key in ("params", "batch_stats", "opt_backbone", "opt_head"):
        assert equal(before[key], new[key]), key


def test_non_finite_loss_leaves_state_unchanged_and_still_counts_the_step(steps):
    state, main = steps.state, steps.main
    before = host(state)
    bad = batch()
    bad["text"][0, 0] = np.nan
    new, out = main(jax.tree.map(np.array, before), bad, jax.random.key(4))
    assert not bool(out["finite"])
    assert_state_kept(before, host(new))
    assert int(new["step"]) == int(before["step"]) + 1


@jax.custom_jvp
def _nan_gradient(x):
    """Identity in value; its derivative is NaN (like a backward pass that overflowed)."""
    return x


@_nan_gradient.defjvp
def _nan_gradient_jvp(primals, tangents):
    return primals[0], tangents[0] * jnp.nan


def test_finite_loss_with_non_finite_gradients_leaves_state_unchanged(steps, monkeypatch):
    real_total_loss = step_module.total_loss

    def finite_loss_nan_gradients(*args, **kwargs):
        loss, terms = real_total_loss(*args, **kwargs)
        return _nan_gradient(loss), terms

    monkeypatch.setattr(step_module, "total_loss", finite_loss_nan_gradients)
    train = make_train_step(steps.parts, steps.spec, *steps.tx, warmup=False)
    before = host(steps.state)
    new, out = train(jax.tree.map(np.array, before), batch(), jax.random.key(7))
    assert np.isfinite(float(out["loss"]))
    assert not bool(out["finite"])
    assert_state_kept(before, host(new))
    assert int(new["step"]) == int(before["step"]) + 1


def test_non_finite_backbone_updates_alone_leave_state_unchanged(steps):
    """Loss and head finite, only the backbone's updates NaN: the guard covers every group."""
    tx_backbone, tx_head = steps.tx

    def nan_update(grads, opt_state, params=None):
        updates, opt_state = tx_backbone.update(grads, opt_state, params)
        return jax.tree.map(lambda u: u * jnp.nan, updates), opt_state

    nan_backbone = optax.GradientTransformation(tx_backbone.init, nan_update)
    train = make_train_step(steps.parts, steps.spec, nan_backbone, tx_head, warmup=False)
    before = host(steps.state)
    new, out = train(jax.tree.map(np.array, before), batch(), jax.random.key(8))
    assert np.isfinite(float(out["loss"]))
    assert not bool(out["finite"])
    assert_state_kept(before, host(new))


def test_train_and_eval_steps_feed_the_network_the_same_normalised_pixels(steps, monkeypatch):
    """With augmentation taken out, the train step's network input is the eval step's: uint8
    -> [0, 1] -> (x - mean) / std (here mean 0.5, std 0.25)."""
    seen = []
    real_mask_inputs = step_module.mask_inputs

    def recording(key, images, *args, **kwargs):
        jax.debug.callback(lambda x: seen.append(np.asarray(x)), images)
        return real_mask_inputs(key, images, *args, **kwargs)

    monkeypatch.setattr(step_module, "mask_inputs", recording)
    monkeypatch.setattr(step_module, "augment", lambda key, images, spec: to_unit(images))
    train = make_train_step(steps.parts, steps.spec, *steps.tx, warmup=True)
    evaluate = make_eval_step(steps.parts, steps.spec)
    b = batch()
    train(jax.tree.map(np.array, host(steps.state)), b, jax.random.key(9))
    evaluate(steps.state, b)
    jax.effects_barrier()
    trained, evaluated = seen
    np.testing.assert_allclose(trained, (b["image"] / 255.0 - 0.5) / 0.25, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(trained, evaluated)


def test_train_step_is_deterministic_for_a_key(steps):
    state, main = steps.state, steps.main
    before = host(state)
    a, _ = main(jax.tree.map(np.array, before), batch(), jax.random.key(5))
    b, _ = main(jax.tree.map(np.array, before), batch(), jax.random.key(5))
    c, _ = main(jax.tree.map(np.array, before), batch(), jax.random.key(6))
    assert equal(host(a), host(b))
    assert not equal(host(a)["params"], host(c)["params"])


def test_eval_step_ignores_padding_in_loss_predictions_and_confusion(steps):
    state, evaluate = steps.state, steps.evaluate
    full = batch()
    padded = {k: v.copy() for k, v in full.items()}
    padded["valid"][2:] = False
    padded["image"][2:] = 0
    padded["label"][2:] = 0
    subset = evaluate(state, {k: v[:2] for k, v in full.items()})
    masked = evaluate(state, padded)
    np.testing.assert_allclose(masked["loss"], subset["loss"], rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(masked["preds"])[:2], np.asarray(subset["preds"]))
    # the confusion matrix the loop accumulates on the devices counts the valid rows only
    expected = confusion_matrix(full["label"][:2], np.asarray(subset["preds"]), CLASSES)
    np.testing.assert_array_equal(np.asarray(masked["confusion"]), expected)
    assert masked["confusion"].dtype == jnp.int32


def test_compute_dtype_accepts_listed_names_and_jnp_dtypes_only(steps):
    spec = steps.spec
    for name in COMPUTE_DTYPES:
        assert (
            StepSpec(spec.augment, spec.mask, spec.loss, spec.mean, spec.std, name).compute_dtype
            == name
        )
    as_dtype = StepSpec(spec.augment, spec.mask, spec.loss, spec.mean, spec.std, jnp.bfloat16)
    assert as_dtype.compute_dtype == "bfloat16"
    with pytest.raises(ValueError, match="float16"):
        StepSpec(spec.augment, spec.mask, spec.loss, spec.mean, spec.std, "float16")


def _float_dtypes(tree):
    return {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


# The losses are compared on the warm-up step with BatchNorm on running statistics and a head
# without BatchNorm, where bfloat16 (8 significand bits) moved the loss by 0.3-0.5% on 3 batches.
# Train-mode BatchNorm over 4 samples of a randomly initialised ResNet-50 is chaotic (a 1e-3
# relative input change alone moves float32 features by ~50%), so there the loss is not compared.
BF16_LOSS_RTOL = 2e-2


def test_bfloat16_train_step_keeps_float32_state_and_a_close_finite_loss():
    f32 = setup(update_frozen_bn_stats=False, head_batchnorm=False)
    bf16 = setup(update_frozen_bn_stats=False, dtype="bfloat16", head_batchnorm=False)
    assert bf16.spec.compute_dtype == "bfloat16"
    before = host(f32.state)
    assert equal(before, host(bf16.state))  # same initialisation as the float32 run
    _, out32 = f32.warm(jax.tree.map(np.array, before), batch(), jax.random.key(8))
    _, out16 = bf16.warm(jax.tree.map(np.array, before), batch(), jax.random.key(8))
    assert bool(out16["finite"]) and out16["loss"].dtype == jnp.float32
    np.testing.assert_allclose(float(out16["loss"]), float(out32["loss"]), rtol=BF16_LOSS_RTOL)

    new, out = bf16.main(jax.tree.map(np.array, before), batch(), jax.random.key(8))
    assert bool(out["finite"]) and out["loss"].dtype == jnp.float32  # backward through bf16
    new = host(new)
    for key in ("params", "batch_stats", "opt_backbone", "opt_head"):
        assert _float_dtypes(new[key]) == {np.dtype(np.float32)}, key
    assert not equal(before["params"]["backbone"], new["params"]["backbone"])

    model = nnx.merge(
        bf16.parts.eval_graph,
        jax.tree.map(jnp.asarray, before["params"]),
        jax.tree.map(jnp.asarray, before["batch_stats"]),
        bf16.parts.rngs,
    )
    images = jnp.zeros((BATCH, SIZE, SIZE, 3), jnp.bfloat16)
    text = jnp.zeros((BATCH, TEXT), jnp.float32)
    assert jax.eval_shape(model.backbone.conv1, images).dtype == jnp.bfloat16  # really bf16
    assert jax.eval_shape(model, images, text)["logits"].dtype == jnp.float32
