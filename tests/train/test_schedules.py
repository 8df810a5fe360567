"""Per-epoch schedules: aux-weight curves, epoch masks, stage labels, config fallbacks."""

import math

import numpy as np
import pytest

from dermjax.config import load_config, validate
from dermjax.errors import ConfigError
from dermjax.experiment import epoch_schedule
from dermjax.train.schedules import SCHEDULE_TYPES, EpochSchedule, WeightSchedule


def _values(schedule, epochs):
    return [schedule.value(e) for e in epochs]


def test_constant_is_zero_before_start_and_end_weight_from_end_on():
    s = WeightSchedule("constant", start_epoch=2, end_epoch=5, start_weight=0.5, end_weight=0.2)
    assert _values(s, [0, 1, 2, 4, 5, 9]) == [0.0, 0.0, 0.5, 0.5, 0.2, 0.2]


def test_linear_matches_hand_computed_values_including_boundaries():  # dv2_24's text schedule
    s = WeightSchedule("linear", start_epoch=10, end_epoch=30, start_weight=0.0, end_weight=0.2)
    assert _values(s, [9, 10, 20, 29, 30, 31]) == pytest.approx([0.0, 0.0, 0.1, 0.19, 0.2, 0.2])


def test_exponential_is_geometric_and_linear_in_p_when_start_is_zero():
    s = WeightSchedule("exponential", 0, 2, start_weight=0.1, end_weight=0.4)
    assert _values(s, [0, 1, 2]) == pytest.approx([0.1, 0.2, 0.4])  # 0.1 * 4 ** (1/2) = 0.2
    zero = WeightSchedule("exponential", 0, 4, start_weight=0.0, end_weight=0.4)
    assert _values(zero, [0, 1, 2, 3, 4]) == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_cosine_and_step_match_hand_computed_values():
    cos = WeightSchedule("cosine", 0, 4, start_weight=0.0, end_weight=1.0)
    expected = [0.0, (1 - math.cos(math.pi / 4)) / 2, 0.5, (1 - math.cos(3 * math.pi / 4)) / 2, 1.0]
    assert _values(cos, range(5)) == pytest.approx(expected)
    step = WeightSchedule("step", 0, 4, start_weight=0.1, end_weight=0.3)
    assert _values(step, range(5)) == [0.1, 0.1, 0.3, 0.3, 0.3]  # p = 0.5 switches


def test_unknown_schedule_type_is_rejected():
    assert SCHEDULE_TYPES == ("constant", "linear", "exponential", "cosine", "step")
    with pytest.raises(ValueError, match="schedule_type"):
        WeightSchedule("polynomial")


def test_epoch_masks_are_half_open_ranges_and_only_when_enabled():
    on = EpochSchedule(epoch_masking=True, vision_mask_epochs=[[1, 3]], text_mask_epochs=[[3, 4]])
    assert [on.epoch_masks(e) for e in range(5)] == [
        (False, False),
        (True, False),
        (True, False),
        (False, True),
        (False, False),
    ]
    off = EpochSchedule(epoch_masking=False, vision_mask_epochs=[[0, 9]])
    assert off.epoch_masks(3) == (False, False)
    c = on.controls(1)
    assert c["epoch_mask"].dtype == bool and c["epoch_mask"].tolist() == [True, False]
    assert c["aux_weights"].dtype == np.float32 and c["aux_weights"].shape == (2,)


def test_stage_labels_follow_the_original_rules():
    const = WeightSchedule.constant
    s = EpochSchedule(vision_only_epochs=1, aux_vision=const(0.5), aux_text=const(0.3))
    assert s.stage(0) == "vision_only_pretraining"
    assert s.stage(1) == "multimodal"
    assert s.stage(1, mask_complete="text") == "vision_only"
    assert EpochSchedule(aux_vision=const(0.5), aux_text=const(0.0)).stage(0) == "vision_only"
    assert EpochSchedule(aux_vision=const(0.0), aux_text=const(0.2)).stage(0) == "text_only"
    assert EpochSchedule(aux_vision=const(0.0), aux_text=const(0.0)).stage(0) == "fusion_only"


def _cfg(**fields):
    cfg = load_config("demo")
    m = cfg.multimodal_classifier
    for key, value in fields.items():
        m[key] = value
    return cfg


def test_unscheduled_weights_fall_back_to_per_modality_then_shared_then_0_3():
    assert epoch_schedule(_cfg(auxiliary_loss_weight=0.2)).aux_weights(7) == (0.2, 0.2)
    chosen = _cfg(auxiliary_loss_weight=0.2, auxiliary_text_loss_weight=0.0)
    assert epoch_schedule(chosen).aux_weights(7) == (0.2, 0.0)
    assert epoch_schedule(_cfg(auxiliary_loss_weight=None)).aux_weights(0) == (0.3, 0.3)


def test_configured_schedule_and_vision_only_phase_reach_the_epoch_schedule():
    cfg = _cfg(use_auxiliary_loss=True)
    text = cfg.training.auxiliary_loss_schedule.text
    text.schedule_type, text.start_epoch, text.end_epoch = "linear", 10, 30
    text.start_weight, text.end_weight = 0.0, 0.2
    cfg.training.vision_only_pretraining.enabled = True
    cfg.training.vision_only_pretraining.epochs = 3
    validate(cfg)
    s = epoch_schedule(cfg)
    assert s.aux_weights(20) == pytest.approx((0.3, 0.1))
    assert [s.is_vision_only(e) for e in (2, 3)] == [True, False]


def test_validation_rejects_partial_schedules_and_options_that_need_aux_heads():
    cfg = _cfg(use_auxiliary_loss=False, ablation_routing=True)
    cfg.training.auxiliary_loss_schedule.vision.schedule_type = "linear"
    cfg.training.vision_only_pretraining.enabled = True
    cfg.training.vision_only_pretraining.epochs = 2
    cfg.masking.epoch_schedule.text.mask_epochs = ((3, 1),)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    text = str(e.value)
    assert "auxiliary_loss_schedule.vision: set all of" in text
    assert "vision_only_pretraining" in text and "ablation_routing" in text
    assert "epoch_schedule.text.mask_epochs" in text
