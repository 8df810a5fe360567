"""Early stopping on a monitored validation metric, with a checkpointable plain-dict state.

Same rule as the original (which monitored val loss): a value improves only if strictly better
than the best so far; otherwise the counter grows, and training stops once it reaches `patience`.
Patience counts validation events, not epochs.
"""

from __future__ import annotations

import math
from typing import Any

MODES = ("max", "min")
# Validation metrics the loop can monitor; val/loss is minimised, the others maximised.
MONITORS = ("val/accuracy", "val/loss", "val/macro_f1", "val/balanced_accuracy")


class EarlyStopping:
    """Tracks the best value of `monitor` and says when to stop.

    `patience=None` never stops (the best value is still tracked for checkpoint selection).
    """

    def __init__(self, monitor: str = "val/accuracy", mode: str = "max", patience: int | None = 5):
        if monitor not in MONITORS:
            raise ValueError(f"early stopping monitor {monitor!r} is not one of {MONITORS}")
        if mode not in MODES:
            raise ValueError(f"early stopping mode {mode!r} is not one of {MODES}")
        if patience is not None and patience < 1:
            raise ValueError(f"patience must be >= 1 or None (never stop), got {patience}")
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.counter = 0
        self.events = 0

    def is_better(self, value: float) -> bool:
        """True if `value` strictly beats the best so far (NaN never does)."""
        value = float(value)
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def update(self, value: float, *, epoch: int | None = None) -> tuple[bool, bool]:
        """Records one validation result; returns (improved, should_stop).

        `epoch` is stored as `best_epoch` on improvement; without it the 0-based count of
        validation events is stored instead.
        """
        improved = self.is_better(value)
        if improved:
            self.best = float(value)
            self.best_epoch = self.events if epoch is None else int(epoch)
            self.counter = 0
        else:
            self.counter += 1
        self.events += 1
        return improved, self.should_stop

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.counter >= self.patience

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state for checkpoint metadata."""
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "counter": self.counter,
            "events": self.events,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a `state_dict()`; the monitored metric and mode must match this instance."""
        if (state["monitor"], state["mode"]) != (self.monitor, self.mode):
            raise ValueError(
                f"checkpoint early-stopping state monitors {state['monitor']!r} ({state['mode']}), "
                f"but this run monitors {self.monitor!r} ({self.mode}); the best value would not "
                "be comparable"
            )
        self.best = None if state["best"] is None else float(state["best"])
        self.best_epoch = state["best_epoch"]
        self.counter = int(state["counter"])
        self.events = int(state["events"])


class PhasedEarlyStopping:
    """Early stopping with separate state for the vision-only pre-training phase.

    Epochs e < `vision_only_epochs` belong to the vision-only phase, later ones to the multimodal
    phase; each phase has its own best value and patience counter. Patience running out in the
    vision-only phase ends only that phase (the multimodal phase starts at the next epoch);
    running out in the multimodal phase stops the run. An improvement in either phase is an
    improvement (the loop saves the best checkpoint), so the multimodal phase's first validation
    always replaces a vision-only best, as in the original. `patience_ends_run` is the original's
    rule instead: patience running out in the vision-only phase stops the whole run.
    """

    def __init__(
        self,
        monitor: str,
        mode: str,
        patience: int | None,
        *,
        vision_only_epochs: int,
        patience_ends_run: bool = False,
    ):
        self.multimodal = EarlyStopping(monitor, mode, patience)
        self.vision_only = EarlyStopping(monitor, mode, patience)
        self.vision_only_until = int(vision_only_epochs)
        self.patience_ends_run = patience_ends_run

    def is_vision_only(self, epoch: int) -> bool:
        return epoch < self.vision_only_until

    def update(self, value: float, *, epoch: int) -> tuple[bool, bool]:
        """Records one validation of `epoch`; returns (improved, stop the run)."""
        if not self.is_vision_only(epoch):
            return self.multimodal.update(value, epoch=epoch)
        improved, stop = self.vision_only.update(value, epoch=epoch)
        if stop and not self.patience_ends_run:
            self.vision_only_until = epoch + 1
            return improved, False
        return improved, stop

    @property
    def best_epoch(self) -> int | None:
        """The epoch of the newest improvement (the best checkpoint's)."""
        if self.multimodal.best_epoch is not None:
            return self.multimodal.best_epoch
        return self.vision_only.best_epoch

    def vision_only_state(self) -> dict[str, Any]:
        """The vision-only phase's state (the multimodal state is `multimodal.state_dict()`)."""
        return {"until": self.vision_only_until, "early_stopping": self.vision_only.state_dict()}

    def load_vision_only_state(self, state: dict[str, Any]) -> None:
        self.vision_only_until = int(state["until"])
        self.vision_only.load_state_dict(state["early_stopping"])
