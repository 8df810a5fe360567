"""Per-epoch training schedules: auxiliary-loss weights, epoch masks, the vision-only phase.

Everything here is evaluated on the host once per epoch; the jitted steps receive the result as
array values (`EpochSchedule.controls`), so a schedule never recompiles a step. Epochs are the
0-based absolute indices of the run, as in the original's `auxiliary_loss_schedule`,
`masking.epoch_schedule` and `vision_only_pretraining`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

SCHEDULE_TYPES = ("constant", "linear", "exponential", "cosine", "step")


@dataclasses.dataclass(frozen=True)
class WeightSchedule:
    """One auxiliary weight over the epochs (the original's `_compute_auxiliary_weight`)."""

    schedule_type: str = "constant"
    start_epoch: int = 0
    end_epoch: int = 100
    start_weight: float = 0.3
    end_weight: float = 0.3

    def __post_init__(self) -> None:
        if self.schedule_type not in SCHEDULE_TYPES:
            raise ValueError(f"schedule_type={self.schedule_type!r} is not one of {SCHEDULE_TYPES}")

    @classmethod
    def constant(cls, weight: float) -> WeightSchedule:
        """The schedule used when none is configured: `weight` from epoch 0 on."""
        return cls("constant", 0, 100, float(weight), float(weight))

    def value(self, epoch: int) -> float:
        """e < start: 0 (term off); e >= end: end_weight; else the type's curve at p in [0, 1)."""
        s, t, a, b = self.start_epoch, self.end_epoch, self.start_weight, self.end_weight
        if epoch < s:
            return 0.0
        if epoch >= t:
            return float(b)
        if self.schedule_type == "constant":
            return float(a)
        p = (epoch - s) / (t - s)
        if self.schedule_type == "linear":
            return a + (b - a) * p
        if self.schedule_type == "exponential":
            return a * (b / a) ** p if a > 0 else b * p
        if self.schedule_type == "cosine":
            return a + (b - a) * (1.0 - math.cos(math.pi * p)) / 2.0
        return float(a) if p < 0.5 else float(b)  # step


Ranges = tuple[tuple[int, int], ...]


def _ranges(pairs: Sequence[Sequence[int]] | None) -> Ranges:
    """[[s, t), ...] as a tuple of int pairs; each must be [start, end] with start <= end."""
    out = []
    for pair in pairs or ():
        if len(pair) != 2 or int(pair[0]) > int(pair[1]):
            raise ValueError(f"mask_epochs entry {pair!r} must be [start, end] with start <= end")
        out.append((int(pair[0]), int(pair[1])))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class EpochSchedule:
    """What changes from epoch to epoch besides the learning rate.

    `vision_only_epochs`: epochs e < this run the vision-only pre-training step (0: none).
    `vision_mask_epochs` / `text_mask_epochs`: half-open [start, end) epoch ranges in which the
    modality is masked for every sample (only when `epoch_masking`); such an epoch skips complete
    and random masking.
    """

    aux_vision: WeightSchedule = WeightSchedule()
    aux_text: WeightSchedule = WeightSchedule()
    vision_only_epochs: int = 0
    epoch_masking: bool = False
    vision_mask_epochs: Ranges = ()
    text_mask_epochs: Ranges = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "vision_mask_epochs", _ranges(self.vision_mask_epochs))
        object.__setattr__(self, "text_mask_epochs", _ranges(self.text_mask_epochs))

    def is_vision_only(self, epoch: int) -> bool:
        return epoch < self.vision_only_epochs

    def epoch_masks(self, epoch: int) -> tuple[bool, bool]:
        """(vision masked, text masked) by the epoch schedule in `epoch`."""
        if not self.epoch_masking:
            return False, False
        return tuple(  # type: ignore[return-value]
            any(s <= epoch < t for s, t in ranges)
            for ranges in (self.vision_mask_epochs, self.text_mask_epochs)
        )

    def aux_weights(self, epoch: int) -> tuple[float, float]:
        """(vision, text) auxiliary weights of `epoch`."""
        return self.aux_vision.value(epoch), self.aux_text.value(epoch)

    def controls(self, epoch: int) -> dict[str, np.ndarray]:
        """The per-epoch values the jitted steps take (fixed shapes and dtypes)."""
        return {
            "aux_weights": np.asarray(self.aux_weights(epoch), np.float32),
            "epoch_mask": np.asarray(self.epoch_masks(epoch), bool),
            "epoch": np.asarray(epoch, np.int32),
        }

    def stage(self, epoch: int, mask_complete: str | None = None) -> str:
        """The original's `params/training_stage` label of `epoch`."""
        if self.is_vision_only(epoch):
            return "vision_only_pretraining"
        vision_masked, text_masked = self.epoch_masks(epoch)
        if not (vision_masked or text_masked):
            vision_masked, text_masked = mask_complete == "image", mask_complete == "text"
        wv, wt = self.aux_weights(epoch)
        if text_masked or (wt == 0 and wv > 0):
            return "vision_only"
        if vision_masked or (wv == 0 and wt > 0):
            return "text_only"
        return "multimodal" if wv > 0 and wt > 0 else "fusion_only"
