"""What a grain pipeline becomes for its users: `Loader` (an iterable of batches of one split) and
`LoaderIterator`, whose `close()` cleans up; and what each grain worker runs first.

Closing. Close every iterator taken from a loader with `close_iterator(it)` (or all of them with
`loader.close()`) when done: it stops the grain workers and releases their shared memory before
the interpreter exits. Iterators still open at exit are closed by an `atexit` hook, and each
worker kills itself as soon as the process that started it is gone, even after a SIGKILL.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import gc
import os
import select
import signal
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import grain
import grain.multiprocessing
import numpy as np

_OPEN_ITERATORS: weakref.WeakSet = weakref.WeakSet()  # of every loader, until closed


class LoaderIterator(grain.DatasetIterator):
    """A loader's iterator: grain's iterator (checkpointable) with a `close()` that cleans up.

    `close()` stops the grain workers, waits until the shared memory of the batches in flight is
    freed and drops the pipeline, so nothing of it is left for the interpreter's exit. Call it
    when done (also after an error); calling it again does nothing, and an exhausted iterator
    (an eval pass) closes itself. Without it the exit races grain's own cleanup: "leaked
    shared_memory objects" warnings and `__del__` tracebacks.
    """

    def __init__(self, inner: grain.DatasetIterator):
        super().__init__()  # no parents: this object holds the only reference to `inner`
        self._inner: grain.DatasetIterator | None = inner
        _OPEN_ITERATORS.add(self)

    def _live(self) -> grain.DatasetIterator:
        if self._inner is None:
            raise ValueError("this loader iterator was closed")
        return self._inner

    def __next__(self) -> dict[str, np.ndarray]:
        try:
            return next(self._live())
        except StopIteration:  # an eval pass is over: nothing more to keep running
            self.close()
            raise

    def get_state(self) -> dict[str, Any]:
        return self._live().get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._live().set_state(state)

    def start_prefetch(self) -> None:
        self._live().start_prefetch()

    def close(self) -> None:
        if self._inner is None:
            return
        inner, self._inner, self._closed = self._inner, None, True
        _OPEN_ITERATORS.discard(self)
        inner.close()
        del inner
        _release_shared_memory()


@dataclasses.dataclass
class Loader:
    """An iterable of batches of one split; `iter(loader)` gives a `LoaderIterator`.

    Train loaders are infinite and `steps_per_epoch` batches make one epoch; eval loaders stop
    after `steps_per_epoch` batches (`repeat=True` ones run on, one pass every that many). `bad_images` counts the samples masked as bad images in the
    batches this loader's iterators delivered so far (for an eval loader after one pass: the
    split's unreadable images). Close each iterator when done (`it.close()`), or all of them
    with `loader.close()`.
    """

    dataset: grain.IterDataset
    steps_per_epoch: int
    batch_size: int
    split: str
    counter: BadImageCounter
    iterators: weakref.WeakSet = dataclasses.field(default_factory=weakref.WeakSet)

    def __iter__(self) -> LoaderIterator:
        it = LoaderIterator(iter(self.dataset))
        self.iterators.add(it)
        return it

    @property
    def bad_images(self) -> int:
        return self.counter.count

    def close(self) -> None:
        """Closes every iterator of this loader; safe to call again."""
        for it in list(self.iterators):
            it.close()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def close_iterator(iterator: Iterator | None) -> None:
    """`iterator.close()` for a loader's iterator (see `LoaderIterator`); None is ignored."""
    if iterator is not None:
        iterator.close()


def _release_shared_memory() -> None:
    """Waits until grain has unlinked the shared memory of the batches it dropped.

    grain frees a batch's shared memory in a one-thread pool when the batch is garbage
    collected; a task queued after them finishes last, so waiting for it waits for them all.
    """
    pool = getattr(grain.multiprocessing.SharedMemoryArray, "_del_thread_pool", None)
    if pool is not None:
        with contextlib.suppress(ValueError):  # the pool was already shut down
            pool.apply_async(int).wait(timeout=10)


@atexit.register
def _close_open_iterators() -> None:
    """Closes the iterators still open at exit, before multiprocessing's own exit handlers."""
    for it in list(_OPEN_ITERATORS):
        it.close()
    gc.collect()  # pipelines kept alive only by reference cycles close while modules still exist
    _release_shared_memory()


class BadImageCounter:
    """Samples masked as bad images in the batches delivered so far (shared with `Loader`)."""

    def __init__(self) -> None:
        self.count = 0


def worker_init(worker_index: int, worker_count: int, *, parent_pid: int) -> None:
    """Runs first in each grain worker: no accelerator for it, and death with its parent.

    JAX imported by accident in a worker must not take the accelerator. A worker whose parent
    died without closing it (SIGKILL, OOM kill) would otherwise live on holding its memory, and
    keep multiprocessing's resource tracker alive with it.
    """
    del worker_index, worker_count
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    _die_with(parent_pid)


def _die_with(parent_pid: int) -> None:
    """Kills this process as soon as process `parent_pid` ends (a daemon thread waits for it).

    `prctl(PR_SET_PDEATHSIG)` would fire when the *thread* that started the worker ends, and
    grain starts workers from prefetch threads that it replaces on `set_state` (every resume).
    A pidfd (Linux 5.3+) wakes the thread when the parent exits; elsewhere it polls getppid.
    """
    if os.getppid() != parent_pid:  # the parent is already gone
        os.kill(os.getpid(), signal.SIGKILL)

    def wait_for_parent() -> None:
        try:
            fd = os.pidfd_open(parent_pid)
        except (AttributeError, OSError):
            while os.getppid() == parent_pid:
                time.sleep(0.5)
        else:
            select.select([fd], [], [])
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=wait_for_parent, name="dermjax-parent-watch", daemon=True).start()
