"""Which copies a restore tries, in what order, and how a different model is reported."""

import numpy as np
import pytest

from dermjax.train import checkpoint_restore
from dermjax.train.checkpoint import KIND_SUBDIR
from dermjax.train.checkpoint_restore import CheckpointError, candidates


class _Steps:
    """Stands in for an Orbax manager: only `all_steps` is read when listing copies."""

    def __init__(self, *steps: int):
        self.steps = list(steps)

    def all_steps(self) -> list[int]:
        return self.steps


MANAGERS = {"last": _Steps(30), "periodic": _Steps(10, 20, 30), "best": _Steps(20)}


def test_every_kind_of_save_goes_to_a_subdirectory_restores_look_in():
    assert set(KIND_SUBDIR.values()) == set(checkpoint_restore.RESTORE_PRIORITY)


def test_copies_are_tried_newest_step_first_and_last_before_periodic_before_best():
    assert candidates(MANAGERS, "ck", None) == [
        (30, "last"),
        (30, "periodic"),
        (20, "periodic"),
        (20, "best"),
        (10, "periodic"),
    ]


def test_a_requested_step_is_never_substituted():
    assert candidates(MANAGERS, "ck", 20) == [(20, "periodic"), (20, "best")]
    with pytest.raises(
        CheckpointError, match=r"No checkpoint for step 25 under ck; saved: \[10, 20, 30\]"
    ):
        candidates(MANAGERS, "ck", 25)


def test_a_different_model_names_its_first_five_differences_and_counts_the_rest():
    saved = {"params": {f"w{i}": np.zeros((2, i + 1)) for i in range(8)}}
    model = {"params": {f"w{i}": np.zeros((2, i + 2)) for i in range(8)}}
    with pytest.raises(CheckpointError) as info:
        checkpoint_restore._check_fits(saved, model, partial=False, where="ck (best/20)")
    message = str(info.value)
    assert "under ck (best/20) was saved by a different model" in message
    assert "params.w0: checkpoint (2, 1), model (2, 2)" in message
    assert "params.w4" in message and "params.w5" not in message
    assert "; ... and 3 more." in message


def test_partial_compares_only_the_subtrees_the_target_names():
    saved = {"params": {"w": np.zeros(3)}, "opt_state": {"mu": np.zeros(7)}}
    checkpoint_restore._check_fits(saved, {"params": {"w": np.zeros(3)}}, partial=True, where="x")
    with pytest.raises(CheckpointError, match=r"opt_state\.mu: not in model"):
        checkpoint_restore._check_fits(
            saved, {"params": {"w": np.zeros(3)}}, partial=False, where="x"
        )
