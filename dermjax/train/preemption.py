"""Stopping a run without losing work: termination signals and non-finite losses.

`PreemptionGuard` turns SIGTERM (cloud preemption, `kill`, Modal/SLURM shutdown) and the first
Ctrl-C into a flag the training loop polls between steps, so it can save a "preempt" checkpoint
and exit cleanly. A second Ctrl-C raises KeyboardInterrupt at once for a user who means it.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import jax
import numpy as np
from absl import logging

from dermjax.errors import UserError


class NonFiniteLossError(UserError, FloatingPointError):
    """The training loss became NaN or infinite (raised under `training.on_nonfinite="error"`);
    a setting to change, so one error line, not a traceback."""

    def __init__(self, step: int, value: float) -> None:
        self.step = step
        self.value = value
        super().__init__(
            f"Non-finite training loss {value} at step {step}. Lower the learning rate, check the "
            f"inputs, set training.on_nonfinite='skip' to skip such batches, or re-run with the same "
            f"--workdir to resume from the last checkpoint."
        )


def register_start(completed_steps: int) -> bool:
    """Tells JAX's preemption sync where this launch starts (multi-process runs only); returns
    True, on every process alike, when a notice came before: stop without training then.

    JAX's counts start at 0 in every launch, and a notice sets the sync point one past the
    highest count reported so far. A run resumed at step N calls `should_stop` with N+1, N+2,
    ...; reported here, as soon as the resume step is known, the point of a later notice
    becomes N+1 (a SIGTERM right after resuming used to be ignored until the run ended). A
    notice before this call set the point to 1, which a resumed run never meets: asking for 1
    finds it, and the processes agree on the answer (one may have seen the point before another).
    """
    if jax.process_count() == 1:
        return False
    from jax.experimental import multihost_utils

    noticed = multihost_utils.reached_preemption_sync_point(1)
    multihost_utils.reached_preemption_sync_point(completed_steps)
    return bool(multihost_utils.process_allgather(np.asarray(noticed)).any())


class PreemptionGuard:
    """Context manager: SIGTERM/SIGINT set `requested` instead of killing the process.

    Previous handlers are restored on exit. Outside the main thread (where Python forbids
    installing handlers) nothing is installed. With several JAX processes SIGTERM is left to JAX's
    preemption notifier (set up by jax.distributed.initialize) and `should_stop` asks it.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self._signals = signals
        self._previous: dict[int, object] = {}
        self.requested = False
        self.signal_name: str | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt(f"second {name}: stopping without a checkpoint")
        if not self.requested:
            logging.warning(
                "%s received: saving a checkpoint at the next step, then exiting.", name
            )
        self.requested = True
        self.signal_name = self.signal_name or name

    def should_stop(self, completed_steps: int) -> bool:
        """Whether to save and stop now; call it after every step on every process, with the
        number of steps the state has completed.

        One process stopping alone would leave the others waiting in a collective, so with
        several processes the answer is JAX's preemption sync point, the same on all of them.
        JAX sets that point one past the highest count any process reported when the notice
        came and matches it exactly; orbax reports the step of each checkpoint it saves, so
        the count passed here is the same global step. See `register_start` for a resumed run.
        """
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(completed_steps)
        return self.requested

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            multi = jax.process_count() > 1
            for sig in self._signals:
                if multi and sig == signal.SIGTERM:
                    continue
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
