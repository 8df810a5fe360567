"""Modality masking follows the original `_apply_masking` rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dermjax.data.augment import AugmentSpec
from dermjax.models.losses import LossSpec
from dermjax.train.masking import MASK_MODES, MaskSpec, apply_masking
from dermjax.train.schedules import EpochSchedule, WeightSchedule
from dermjax.train.step import StepSpec, mask_inputs

B, D = 6, 4


def _batch(batch=B):
    images = jnp.ones((batch, 2, 2, 3), jnp.float32)
    text = jnp.ones((batch, D), jnp.float32)
    has_text = jnp.arange(batch) % 3 != 0
    return images, text, has_text


def _masks(spec, n, seed=0):
    """Image/text masks of n samples, drawn with a tiny image so n can be large."""
    images = jnp.ones((n, 1, 1, 3), jnp.float32)
    text = jnp.ones((n, 1), jnp.float32)
    fn = jax.jit(lambda k: apply_masking(k, images, text, jnp.ones(n, bool), spec, training=True))
    _, _, vision_valid, text_valid = fn(jax.random.key(seed))
    return ~np.asarray(vision_valid), ~np.asarray(text_valid)


@pytest.mark.parametrize("p_img, p_txt", [(0.25, 0.25), (0.1, 0.4), (0.6, 0.3), (1.0, 0.5)])
def test_random_masking_marginal_rates_match_the_at_least_one_rule(p_img, p_txt):
    # P(img masked) = p_i - p_i p_t k, P(txt masked) = p_t - p_i p_t (1 - k),
    # with k = (1-p_i)/((1-p_i)+(1-p_t)) the chance to keep the image when both were drawn.
    n = 200_000
    img, txt = _masks(MaskSpec(random_enabled=True, image_prob=p_img, text_prob=p_txt), n)
    k = (1 - p_img) / ((1 - p_img) + (1 - p_txt))
    expected_img = p_img - p_img * p_txt * k
    expected_txt = p_txt - p_img * p_txt * (1 - k)
    # 5 standard errors of a Bernoulli mean over n samples (<= 0.0056): false alarm ~ 1e-6.
    for got, want in ((img.mean(), expected_img), (txt.mean(), expected_txt)):
        tol = 5 * np.sqrt(max(want * (1 - want), 1e-12) / n) + 1e-9
        assert abs(got - want) <= tol, (got, want, tol)
    assert not np.any(img & txt)


def test_both_probabilities_one_never_masks_both_and_splits_evenly():
    n = 100_000
    img, txt = _masks(MaskSpec(random_enabled=True, image_prob=1.0, text_prob=1.0), n)
    assert np.all(img ^ txt)
    assert abs(img.mean() - 0.5) <= 5 * np.sqrt(0.25 / n)


def test_random_masking_is_deterministic_for_a_key_and_varies_across_keys():
    spec = MaskSpec(random_enabled=True, image_prob=0.5, text_prob=0.5)
    a, b, c = _masks(spec, 256, 1), _masks(spec, 256, 1), _masks(spec, 256, 2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert np.any(a[0] != c[0])


def test_masked_inputs_are_zero_and_others_untouched():
    images, text, _ = _batch(64)
    spec = MaskSpec(random_enabled=True, image_prob=0.5, text_prob=0.5)
    out_img, out_txt, vv, tv = apply_masking(
        jax.random.key(3), images, text, jnp.ones(64, bool), spec, training=True
    )
    vv, tv = np.asarray(vv), np.asarray(tv)
    assert 0 < vv.sum() < 64 and 0 < tv.sum() < 64
    np.testing.assert_array_equal(np.asarray(out_img).reshape(64, -1).max(1), vv.astype(float))
    np.testing.assert_array_equal(np.asarray(out_txt).max(1), tv.astype(float))


@pytest.mark.parametrize("training", [True, False])
def test_complete_image_masking_applies_in_training_and_evaluation(training):
    images, text, has_text = _batch()
    out_img, out_txt, vv, tv = apply_masking(
        jax.random.key(0),
        images,
        text,
        has_text,
        MaskSpec(mask_complete="image"),
        training=training,
    )
    assert not np.any(np.asarray(out_img)) and not np.any(np.asarray(vv))
    np.testing.assert_array_equal(out_txt, text)
    np.testing.assert_array_equal(tv, has_text)


@pytest.mark.parametrize("training", [True, False])
def test_complete_text_masking_applies_in_training_and_evaluation(training):
    images, text, has_text = _batch()
    out_img, out_txt, vv, tv = apply_masking(
        jax.random.key(0), images, text, has_text, MaskSpec(mask_complete="text"), training=training
    )
    assert not np.any(np.asarray(out_txt)) and not np.any(np.asarray(tv))
    np.testing.assert_array_equal(out_img, images)
    assert np.all(np.asarray(vv))


def test_no_random_masking_at_evaluation():
    images, text, has_text = _batch()
    spec = MaskSpec(random_enabled=True, image_prob=1.0, text_prob=0.0)
    out_img, out_txt, vv, tv = apply_masking(
        jax.random.key(0), images, text, has_text, spec, training=False
    )
    np.testing.assert_array_equal(out_img, images)
    np.testing.assert_array_equal(out_txt, text)
    assert np.all(np.asarray(vv))
    np.testing.assert_array_equal(tv, has_text)


def test_complete_masking_disables_random_masking():
    img, txt = _masks(MaskSpec("text", random_enabled=True, image_prob=1.0, text_prob=0.0), 32)
    assert not np.any(img) and np.all(txt)


def test_samples_without_text_are_text_invalid():
    images, text, has_text = _batch()
    spec = MaskSpec(random_enabled=True, image_prob=1.0, text_prob=0.0)
    _, out_txt, vv, tv = apply_masking(
        jax.random.key(0), images, text, has_text, spec, training=True
    )
    np.testing.assert_array_equal(tv, has_text)
    np.testing.assert_array_equal(out_txt, text)
    assert not np.any(np.asarray(vv))


def test_mask_spec_rejects_unknown_modes_and_probabilities_outside_unit_interval():
    for mode in (None, *MASK_MODES):
        assert MaskSpec(mask_complete=mode).mask_complete == mode
    with pytest.raises(ValueError, match="mask_complete"):
        MaskSpec(mask_complete="audio")
    with pytest.raises(ValueError, match="image_prob"):
        MaskSpec(image_prob=1.5)
    with pytest.raises(ValueError, match="text_prob"):
        MaskSpec(text_prob=-0.1)


def _step_spec(mask: MaskSpec, **kw) -> StepSpec:
    return StepSpec(AugmentSpec(), mask, LossSpec(), (0.0,) * 3, (1.0,) * 3, **kw)


def _per_epoch(spec: StepSpec, schedule: EpochSchedule, epochs, *, training=True):
    """(image masked?, text masked?) per sample, for each epoch, through the step's masking."""
    images, text, has_text = _batch()
    batch = {"has_text": has_text}
    fn = jax.jit(
        lambda c: mask_inputs(jax.random.key(0), images, text, batch, spec, c, training=training)
    )
    out = []
    for e in epochs:
        img, txt, vv, tv = fn(schedule.controls(e))
        img_off = np.asarray(img).reshape(B, -1).max(1) == 0
        txt_off = np.asarray(txt).max(1) == 0
        np.testing.assert_array_equal(~img_off, np.asarray(vv))  # validity follows the zeroing
        np.testing.assert_array_equal(~txt_off & np.asarray(has_text), np.asarray(tv))
        out.append((img_off.tolist(), txt_off.tolist()))
    assert fn._cache_size() == 1  # epochs change values, never the compiled function
    return out


def test_masking_priority_per_epoch_is_schedule_then_complete_then_random():
    schedule = EpochSchedule(
        epoch_masking=True, vision_mask_epochs=[[1, 2]], text_mask_epochs=[[2, 3]]
    )
    all_, none = [True] * B, [False] * B
    complete = _step_spec(MaskSpec("text", True, 1.0, 0.0), epoch_masking=True)
    assert _per_epoch(complete, schedule, range(4)) == [
        (none, all_),  # no scheduled mask: mask_complete="text" (random is off under it)
        (all_, none),  # schedule masks the image and skips mask_complete
        (none, all_),  # schedule masks the text
        (none, all_),
    ]
    random = _step_spec(MaskSpec(None, True, 1.0, 0.0), epoch_masking=True)
    assert _per_epoch(random, schedule, [0, 1, 2]) == [(all_, none), (all_, none), (none, all_)]


def test_no_random_masking_in_eval_unless_the_parity_option_is_set():
    schedule, none, all_ = EpochSchedule(), [False] * B, [True] * B
    random = MaskSpec(None, True, 1.0, 0.0)
    assert _per_epoch(_step_spec(random), schedule, [0], training=False) == [(none, none)]
    parity = _step_spec(random, random_mask_in_eval=True)
    assert _per_epoch(parity, schedule, [0], training=False) == [(all_, none)]


def test_text_content_gating_independent_of_the_aux_weight_unless_coupled():
    images, text, has_text = _batch()
    off = EpochSchedule(aux_text=WeightSchedule.constant(0.0)).controls(0)
    for gating, expected in (("content", has_text), ("aux_weight", jnp.ones(B, bool))):
        spec = _step_spec(MaskSpec(), text_gating=gating)
        *_, tv = mask_inputs(
            jax.random.key(0), images, text, {"has_text": has_text}, spec, off, training=True
        )
        np.testing.assert_array_equal(tv, expected)
