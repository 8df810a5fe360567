"""Early stopping: strict improvement, patience in validation events, checkpointable state."""

import json
import math

import pytest

from dermjax.train.early_stopping import MONITORS, EarlyStopping


def _run(stopper, values):
    return [stopper.update(v, epoch=e) for e, v in enumerate(values)]


def test_min_mode_stops_when_patience_validations_fail_to_strictly_improve():
    stopper = EarlyStopping("val/loss", "min", patience=3)
    # 0.9 repeated is not an improvement (strictly lower required, as the original).
    results = _run(stopper, [1.0, 0.9, 0.95, 0.9, 0.92])
    assert [r[0] for r in results] == [True, True, False, False, False]
    assert [r[1] for r in results] == [False, False, False, False, True]
    assert (stopper.best, stopper.best_epoch, stopper.counter) == (0.9, 1, 3)


def test_max_mode_resets_the_counter_on_improvement():
    stopper = EarlyStopping("val/accuracy", "max", patience=2)
    results = _run(stopper, [0.5, 0.4, 0.6, 0.6, 0.55])
    assert [r[0] for r in results] == [True, False, True, False, False]
    assert [r[1] for r in results] == [False, False, False, False, True]
    assert (stopper.best, stopper.best_epoch) == (0.6, 2)


def _run_until_stop(stopper, values):
    for e, v in enumerate(values):
        if stopper.update(v, epoch=e)[1]:
            return e
    return None


def test_patience_none_never_stops_but_tracks_the_best():
    stopper = EarlyStopping("val/loss", "min", patience=None)
    assert _run_until_stop(stopper, [1.0] + [2.0] * 50) is None
    assert stopper.best == 1.0


def test_nan_is_never_an_improvement():
    stopper = EarlyStopping("val/loss", "min", patience=1)
    assert stopper.update(math.nan) == (False, True)
    assert stopper.best is None


def test_restored_state_continues_exactly_like_an_uninterrupted_run():
    values = [0.3, 0.5, 0.5, 0.45, 0.49, 0.2]
    full = EarlyStopping(patience=3)
    assert _run_until_stop(full, values) == 4

    first = EarlyStopping(patience=3)
    _run(first, values[:3])
    state = json.loads(json.dumps(first.state_dict()))  # checkpoint metadata is JSON
    resumed = EarlyStopping(patience=3)
    resumed.load_state_dict(state)
    assert [resumed.update(v, epoch=e)[1] for e, v in enumerate(values[3:5], 3)] == [False, True]
    assert resumed.state_dict() == full.state_dict()


def test_loading_state_of_another_monitored_metric_fails():
    state = EarlyStopping("val/loss", "min").state_dict()
    with pytest.raises(ValueError, match="val/loss"):
        EarlyStopping("val/accuracy", "max").load_state_dict(state)


def test_invalid_monitor_mode_and_patience_are_rejected():
    with pytest.raises(ValueError, match="monitor"):
        EarlyStopping("val/auc")
    with pytest.raises(ValueError, match="mode"):
        EarlyStopping(mode="maximum")
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=0)
    for monitor in MONITORS:
        assert EarlyStopping(monitor).monitor == monitor
