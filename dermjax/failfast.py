"""Multi-process runs stop together: an error in one process ends every process within seconds.

Without this, a process that fails alone (a file only its host lacks, a write only process 0
makes, a bug on one host) exits into JAX's shutdown barrier, which waits up to five minutes for
the others while they wait in their next collective. Measured with two CPU processes (jax
0.10.2, gloo): a failure after the first collective held both for 304 s, then JAX aborted both
(status 134, a C++ stack dump); a failure before it ended the other process 30 s later with a
"Gloo context initialization failed" traceback that does not name the cause. Here the failing
process publishes its error in jax.distributed's key-value store and leaves without the barrier;
a watcher thread in every process reads that store once a second and, on seeing a failure,
prints it as its own one-line error and exits with the same status. Process 0 hosts the store,
so it leaves last: it waits, a few seconds at most, until every other process has printed the
cause (otherwise they would die with JAX's "another task died" instead).

A process that dies without a word (kill -9, the out-of-memory killer, a host going down) cannot
publish anything; JAX notices it only after its 100 s heartbeat limit and then aborts every
process with a C++ stack dump. So each watcher also raises a counter in the store every poll,
and a counter that stands still for `SILENT_S` (`DERMJAX_SILENT_S`) is published as that
process's failure, which every other process then reports as above. (When process 0 dies, the
store goes with it and JAX ends the others at once; nothing here can speak for it.)

A single-process run is untouched: `watch`, `stop` and `stop_on_bug` do nothing there.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import sys
import threading
import time
import traceback
from typing import Any

from dermjax.errors import first_line

FAILED = "dermjax/failed/"  # + process id -> "<exit status> <message>"
SEEN = "dermjax/seen/"  # + process id: that process has printed the failure and is leaving
ALIVE = "dermjax/alive/"  # + process id -> a count its watcher raises every poll, or EXITED
EXITED = "exited"
POLL_S = 1.0
SILENT_S = 45.0  # a count unchanged this long: that process is gone (JAX's own limit is 100 s)
LAST_WAIT_S = 10.0  # how long process 0 waits for the others to read a failure
MESSAGE_LIMIT = 2000

_leaving = threading.Event()  # this process is already on its way out: print nothing twice
_stop = threading.Event()  # the process is exiting normally: the watcher ends
_claim_lock = threading.Lock()


def _claim() -> bool:
    """True for the first caller only: the one that reports and leaves."""
    with _claim_lock:
        if _leaving.is_set():
            return False
        _leaving.set()
        return True


def _wait_for_the_watcher(exit_status: int) -> None:
    """The watcher has seen another process's failure and is leaving: let it finish."""
    time.sleep(LAST_WAIT_S + 5)
    _exit(exit_status)


def _state() -> Any | None:
    """jax.distributed's state when this process is one of several, else None.

    Read without importing JAX (an error before it loads has no other processes to tell) or
    starting a backend. JAX has no public accessor for the key-value client; orbax reads the
    same object.
    """
    distributed = sys.modules.get("jax._src.distributed")
    if distributed is None:
        return None
    state = distributed.global_state
    client = getattr(state, "client", None)
    return state if client is not None and getattr(state, "num_processes", 1) > 1 else None


def watch(poll_s: float = POLL_S) -> None:
    """Starts this process's watcher thread (after jax.distributed.initialize; once)."""
    state = _state()
    if state is None or any(t.name == "dermjax-failfast" for t in threading.enumerate()):
        return
    thread = threading.Thread(
        target=_watch, args=(state, poll_s), name="dermjax-failfast", daemon=True
    )
    thread.start()
    # Registered after JAX's own exit handler, so it runs first: the watcher must not be inside
    # a key-value call when JAX shuts the client down or the interpreter finalises (a daemon
    # thread unwound there aborts the process: status 134 at the end of a successful run).
    atexit.register(_stop_watching, thread, state)


def _stop_watching(thread: threading.Thread, state: Any) -> None:
    _stop.set()
    thread.join(timeout=POLL_S + 10)
    # The count stops here: not a failure. (JAX's exit barrier may keep this process waiting
    # for the others long after.)
    with contextlib.suppress(Exception):
        state.client.key_value_set(_key(ALIVE, state), EXITED, allow_overwrite=True)


def stop(message: str, exit_status: int) -> None:
    """Multi-process: tells the other processes this one failed with `message`, and exits now.

    Returns (doing nothing) in a single-process run; the caller then exits as usual. The caller
    prints the error itself; the other processes print `message` in theirs.
    """
    state = _state()
    if state is None:
        return
    if not _claim():
        _wait_for_the_watcher(exit_status)
    _publish_and_leave(state, message, exit_status)


def stop_on_bug(error: BaseException) -> None:
    """Multi-process: like `stop` for an unexpected exception, whose traceback is printed here.

    When another process failed first, this error is most likely its consequence (a collective
    whose peer left: gloo's "connection reset"), so that process's error is printed instead.
    Returns in a single-process run.
    """
    state = _state()
    if state is None:
        return
    if not _claim():
        _wait_for_the_watcher(1)
    try:
        failures = [
            f for f in state.client.key_value_dir_get(FAILED) if f[0] != _key(FAILED, state)
        ]
    except Exception:
        failures = []
    if failures:
        _report(state, failures, f" (here: {first_line(error)})")
    traceback.print_exception(error)
    _publish_and_leave(state, f"{first_line(error)} (a bug; traceback in that process's log)", 1)


def _key(prefix: str, state: Any) -> str:
    return f"{prefix}{state.process_id}"


def _publish_and_leave(state: Any, message: str, exit_status: int) -> None:
    try:
        value = f"{exit_status} {message[:MESSAGE_LIMIT]}"
        state.client.key_value_set(_key(FAILED, state), value, allow_overwrite=True)
    except Exception:  # the store is gone (process 0 left first): nothing left to tell
        _exit(exit_status)
    _leave(state, exit_status)


def _watch(state: Any, poll_s: float) -> None:
    silent_s = float(os.environ.get("DERMJAX_SILENT_S", SILENT_S))
    counts = Counts(silent_s, state.num_processes)
    beats = 0
    while not _leaving.is_set():
        beats += 1
        try:
            state.client.key_value_set(_key(ALIVE, state), str(beats), allow_overwrite=True)
            failures = state.client.key_value_dir_get(FAILED)
            if not failures and (gone := counts.silent(state.client.key_value_dir_get(ALIVE))):
                failures = [_speak_for(state, gone, silent_s)]
        except Exception:  # the client is shutting down: the run is ending
            return
        if failures and _claim():
            _report(state, failures)
        if _stop.wait(poll_s):
            return


class Counts:
    """When each process's `ALIVE` count last changed, to find one that has gone silent.

    Every process calls `watch` right after jax.distributed.initialize returned on all of them,
    so a count that never appears is silence too, from when this one started watching."""

    def __init__(self, silent_s: float, num_processes: int, now: float | None = None) -> None:
        self.silent_s = silent_s
        start = time.monotonic() if now is None else now
        self._changed: dict[int, tuple[str | None, float]] = {
            i: (None, start) for i in range(num_processes)
        }

    def silent(self, entries: list[tuple[str, str]], now: float | None = None) -> int | None:
        """The lowest process id whose count has stood still for `silent_s`, else None."""
        now = time.monotonic() if now is None else now
        counts = {int(key.rsplit("/", 1)[1]): value for key, value in entries}
        for i, (last, since) in sorted(self._changed.items()):
            value = counts.get(i)
            if value == EXITED:
                continue
            if value != last:
                self._changed[i] = (value, now)
            elif now - since >= self.silent_s:
                return i
        return None


def _speak_for(state: Any, gone: int, silent_s: float) -> tuple[str, str]:
    """Publishes the failure of process `gone`, which cannot, and marks it as having read it
    (process 0 would wait for it); returns the failure as `key_value_dir_get` gives it."""
    value = (
        f"1 it stopped responding {silent_s:.0f} s ago (killed, out of memory, or its host went "
        "down); re-run the same command on every host to resume from the last checkpoint"
    )
    state.client.key_value_set(f"{FAILED}{gone}", value, allow_overwrite=True)
    state.client.key_value_set(f"{SEEN}{gone}", "", allow_overwrite=True)
    return f"{FAILED}{gone}", value


def _report(state: Any, failures: list[tuple[str, str]], here: str = "") -> None:
    """Prints the first failure as this process's error and leaves with its exit status."""
    failed, status, message = first_failure(failures)
    with contextlib.suppress(OSError, ValueError):  # a closed stderr must not stop the exit
        print(
            f"error: process {failed} of {state.num_processes} stopped the run: {message}{here}",
            file=sys.stderr,
            flush=True,
        )
    _leave(state, status)


def first_failure(failures: list[tuple[str, str]]) -> tuple[int, int, str]:
    """(process id, exit status, message) of the lowest-numbered failed process."""
    parsed = []
    for key, value in failures:
        status, _, message = value.partition(" ")
        parsed.append((int(key.rsplit("/", 1)[1]), int(status), message))
    return min(parsed)


def _leave(state: Any, exit_status: int) -> None:
    """Marks this process as leaving; process 0 first waits for every other one to do so."""
    try:
        state.client.key_value_set(_key(SEEN, state), "", allow_overwrite=True)
        deadline = time.monotonic() + LAST_WAIT_S
        while state.process_id == 0 and time.monotonic() < deadline:
            if len(state.client.key_value_dir_get(SEEN)) >= state.num_processes:
                break
            time.sleep(0.1)
    except Exception:  # the store is gone: leave at once
        pass
    _exit(exit_status)


def _exit(exit_status: int) -> None:
    """Leaves without JAX's shutdown barrier; logs flushed, input worker processes stopped."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    for child in multiprocessing.active_children():
        child.terminate()
    os._exit(exit_status)
