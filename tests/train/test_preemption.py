"""PreemptionGuard: signals become a flag, handlers come back; NonFiniteLossError's message."""

import os
import signal

import jax
import numpy as np
import pytest

from dermjax.train import preemption
from dermjax.train.preemption import NonFiniteLossError, PreemptionGuard


def test_sigterm_sets_requested_and_previous_handlers_return_on_exit():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with PreemptionGuard() as guard:
        assert not guard.requested and not guard.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested and guard.signal_name == "SIGTERM"
        assert guard.should_stop(1)
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_first_sigint_requests_a_stop_and_second_raises_keyboard_interrupt():
    with PreemptionGuard() as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_non_finite_loss_error_names_step_value_and_remedies():
    err = NonFiniteLossError(12, float("nan"))
    assert (err.step, str(err.value)) == (12, "nan")
    assert "step 12" in str(err) and "on_nonfinite='skip'" in str(err)


def _two_processes(monkeypatch, sync_point: int, peer_noticed: bool = False) -> list[int]:
    """Stands in for JAX's preemption sync with a notice whose point is `sync_point`, and for
    the other process's answer to the start-up question; returns the list of counts reported."""
    from jax.experimental import multihost_utils

    asked = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(
        multihost_utils,
        "reached_preemption_sync_point",
        lambda n: asked.append(n) or n == sync_point,
    )
    monkeypatch.setattr(
        multihost_utils, "process_allgather", lambda x: np.stack([x, np.asarray(peer_noticed)])
    )
    return asked


def test_with_several_processes_jax_hears_the_start_step_then_each_completed_step(monkeypatch):
    """JAX's sync point is one past the highest count reported and must be met exactly. Orbax
    reports each saved step, so the counts are global steps; a resumed launch reports its start
    step first, else a notice after it would set a point (1) it never meets."""
    asked = _two_processes(monkeypatch, sync_point=10)
    assert preemption.register_start(8) is False
    guard = PreemptionGuard()
    assert [guard.should_stop(9), guard.should_stop(10)] == [False, True]
    assert asked == [1, 8, 9, 10]


@pytest.mark.parametrize("here, peer", [(True, False), (False, True)])
def test_a_notice_before_the_start_step_is_reported_stops_every_process(monkeypatch, here, peer):
    # The notice set the point to 1, which a run resumed at step 8 would never meet; the
    # processes agree even when only one of them has seen the point yet.
    _two_processes(monkeypatch, sync_point=1 if here else 99, peer_noticed=peer)
    assert preemption.register_start(8) is True


def test_a_single_process_run_reports_nothing_to_jax(monkeypatch):
    from jax.experimental import multihost_utils

    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", pytest.fail)
    assert preemption.register_start(8) is False
