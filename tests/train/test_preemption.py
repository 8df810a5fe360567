"""PreemptionGuard: signals become a flag, handlers come back; NonFiniteLossError's message."""

import os
import signal

import jax
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


def test_with_several_processes_jax_hears_the_start_step_then_each_completed_step(monkeypatch):
    """JAX's sync point is one past the highest count reported and must be met exactly. Orbax
    reports each saved step, so the counts are global steps; a resumed launch reports its start
    step first, else a notice before its first step would set a point (1) it never meets."""
    from jax.experimental import multihost_utils

    asked = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(
        multihost_utils, "reached_preemption_sync_point", lambda n: asked.append(n) or n == 10
    )
    preemption.register_start(8)
    guard = PreemptionGuard()
    assert [guard.should_stop(9), guard.should_stop(10)] == [False, True]
    assert asked == [8, 9, 10]
