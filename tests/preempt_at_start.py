"""`python -m dermjax.main`, with a preemption notice (SIGTERM to process 1) just before the run
reports its start step to JAX's preemption sync: test_multiprocess launches it."""

import os
import runpy
import signal
import sys
import time

from dermjax.train import preemption

_register_start = preemption.register_start


def _noticed_first(completed_steps: int) -> bool:
    if "--process_id=1" in sys.argv:
        os.kill(os.getpid(), signal.SIGTERM)  # JAX's notifier catches it in a multi-process run
    time.sleep(3)  # both processes: the notice's sync point is set before either reports
    return _register_start(completed_steps)


preemption.register_start = _noticed_first
runpy.run_module("dermjax.main", run_name="__main__", alter_sys=True)
