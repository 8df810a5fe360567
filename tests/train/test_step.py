"""The jitted steps: warm-up freezing, the unfreeze rule, frozen BatchNorm statistics, NaN safety."""

import jax
import numpy as np
import pytest
from flax import nnx

from dermjax.config import load_config
from dermjax.models.classifier import build_model
from dermjax.train.loop import init_training, step_spec
from dermjax.train.step import make_eval_step, make_train_step

SIZE, BATCH, CLASSES, TEXT = 32, 4, 5, 8


def setup(update_frozen_bn_stats=True):
    cfg = load_config("demo")
    cfg.data.img_size = (SIZE, SIZE)
    cfg.vision_model.name = "resnet50"
    cfg.vision_model.unfreeze_layers = 1  # only layer4 trains after warm-up
    cfg.training.update_frozen_bn_stats = update_frozen_bn_stats
    model = build_model(cfg, num_classes=CLASSES, text_dim=TEXT, rngs=nnx.Rngs(0))
    parts, state, tx_b, tx_h = init_training(cfg, model)
    spec = step_spec(cfg, np.ones(CLASSES), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    warm = make_train_step(parts, spec, tx_b, tx_h, warmup=True)
    main = make_train_step(parts, spec, tx_b, tx_h, warmup=False)
    return state, warm, main, make_eval_step(parts, spec)


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
    state, warm, _, _ = steps
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
    state, _, main, _ = steps
    before = host(state)
    new, _ = main(jax.tree.map(np.array, before), batch(), jax.random.key(2))
    changed = changed_leaves(before["params"]["backbone"], host(new)["params"]["backbone"])
    assert changed, "the unfrozen unit did not train"
    assert all(name.startswith("['layer4']") for name in changed), changed
    assert not equal(before["params"]["head"], host(new)["params"]["head"])


def test_frozen_batchnorm_statistics_can_be_kept_fixed():
    state, warm, main, _ = setup(update_frozen_bn_stats=False)
    before = host(state)
    new, _ = main(jax.tree.map(np.array, before), batch(), jax.random.key(3))
    changed = changed_leaves(
        before["batch_stats"]["backbone"], host(new)["batch_stats"]["backbone"]
    )
    assert changed and all(name.startswith("['layer4']") for name in changed), changed
    new, _ = warm(jax.tree.map(np.array, before), batch(), jax.random.key(3))
    assert equal(before["batch_stats"]["backbone"], host(new)["batch_stats"]["backbone"])


def test_non_finite_loss_leaves_state_unchanged(steps):
    state, _, main, _ = steps
    before = host(state)
    bad = batch()
    bad["text"][0, 0] = np.nan
    new, out = main(jax.tree.map(np.array, before), bad, jax.random.key(4))
    assert not bool(out["finite"])
    new = host(new)
    for key in ("params", "batch_stats", "opt_backbone", "opt_head"):
        assert equal(before[key], new[key]), key


def test_train_step_is_deterministic_for_a_key(steps):
    state, _, main, _ = steps
    before = host(state)
    a, _ = main(jax.tree.map(np.array, before), batch(), jax.random.key(5))
    b, _ = main(jax.tree.map(np.array, before), batch(), jax.random.key(5))
    c, _ = main(jax.tree.map(np.array, before), batch(), jax.random.key(6))
    assert equal(host(a), host(b))
    assert not equal(host(a)["params"], host(c)["params"])


def test_eval_step_ignores_padding(steps):
    state, _, _, evaluate = steps
    full = batch()
    padded = {k: v.copy() for k, v in full.items()}
    padded["valid"][2:] = False
    padded["image"][2:] = 0
    padded["label"][2:] = 0
    subset = evaluate(state, {k: v[:2] for k, v in full.items()})
    masked = evaluate(state, padded)
    np.testing.assert_allclose(masked["loss"], subset["loss"], rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(masked["preds"])[:2], np.asarray(subset["preds"]))
