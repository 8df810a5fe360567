"""Reading Orbax checkpoint folders: managers, a saved tree against the model, damaged copies.

The restore side of `dermjax.train.checkpoint`: one Orbax manager per kind subdirectory
(`open_manager`, which also opens the writing ones), the newest-first list of copies to try, the comparison of a saved tree's paths and shapes with the
model's (a different model is an error, not damage), and the restore that falls back past
unreadable copies with a warning for each.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import types
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocm

from dermjax.errors import UserError, first_line

log = logging.getLogger(__name__)

# The kind subdirectories (`checkpoint.KIND_SUBDIR`'s values), best first among copies of one step.
RESTORE_PRIORITY = {"last": 2, "periodic": 1, "best": 0}
_MAX_LISTED_DIFFERENCES = 5


class _DropReadOnlyNotice(logging.Filter):
    """orbax warns "Given directory is read only" for every manager opened read-only: six lines
    per restore that only restate what was asked for."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Given directory is read only")


class _DropReraisedWriteErrors(logging.Filter):
    """orbax logs a failed background write three times with its whole traceback, then raises
    the same error where the run waits for the save (`Checkpointer` reports it in one line)."""

    _SAID = ("raised an exception", "in background save thread", "Save Finalize thread")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("orbax" in record.pathname and any(s in message for s in self._SAID))


logging.getLogger("absl").addFilter(_DropReadOnlyNotice())
logging.getLogger("absl").addFilter(_DropReraisedWriteErrors())


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable, or does not fit the model it is restored into."""


def open_manager(
    path: str, *, keep: int | None, async_save: bool, read_only: bool = False, item_handlers=None
) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        preservation_policy=None if read_only else ocm.LatestN(n=keep),
        enable_async_checkpointing=async_save,
        read_only=read_only,
        create=not read_only,
        save_interval_steps=0 if read_only else 1,
        # The torn writes of a killed run (a whole state each); safe: the folder is locked.
        cleanup_tmp_directories=not read_only and "://" not in path,
    )
    return ocp.CheckpointManager(path, options=options, item_handlers=item_handlers)


def read_only_managers(directory: str, item_handlers=None) -> dict[str, ocp.CheckpointManager]:
    return {
        sub: open_manager(
            f"{directory}/{sub}",
            keep=None,
            async_save=False,
            read_only=True,
            item_handlers=item_handlers,
        )
        for sub in RESTORE_PRIORITY
    }


def item_dir(m: ocp.CheckpointManager, step: int, item: str) -> epath.Path:
    return epath.Path(m.directory) / str(step) / item


def _shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
    """Dotted leaf path (Orbax's naming: namedtuple fields by name, sequences by index) -> shape."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(ocp.tree.str_keypath(p)): tuple(np.shape(leaf)) for p, leaf in leaves}


def _differences(saved: Any, target: Any, *, partial: bool) -> list[str]:
    """How the saved tree's array paths and shapes differ from `target`'s ([] when they fit).

    With `partial`, only the saved subtrees named by `target`'s top-level keys are compared.
    """
    if partial:
        saved = {k: saved[k] for k in target if k in saved}
    have, want = _shapes_by_path(saved), _shapes_by_path(target)
    shapes = [
        f"{p}: checkpoint {have[p]}, model {want[p]}"
        for p in sorted(want)
        if p in have and have[p] != want[p]
    ]
    missing = [f"{p}: not in checkpoint" for p in sorted(want.keys() - have.keys())]
    extra = [f"{p}: not in model" for p in sorted(have.keys() - want.keys())]
    return shapes + missing + extra


def candidates(
    managers: dict[str, ocp.CheckpointManager], directory: str, step: int | None
) -> list[tuple[int, str]]:
    """(step, subdir) copies to try, newest first; only `step`'s copies when it is given."""
    saved = [(s, sub) for sub, m in managers.items() for s in m.all_steps()]
    candidates = sorted(saved, key=lambda c: (c[0], RESTORE_PRIORITY[c[1]]), reverse=True)
    if step is not None:
        candidates = [c for c in candidates if c[0] == step]
        if not candidates:
            steps = sorted({s for s, _ in saved})
            raise CheckpointError(
                f"No checkpoint for step {step} under {directory}; saved: {steps}"
            )
    return candidates


def unreadable(failures: list[str], sub: str, s: int, e: Exception) -> None:
    """Adds why copy `sub/s` cannot be read to `failures` (reported once, by the caller)."""
    root = e
    while root.__cause__ is not None:  # orbax wraps TensorStore's error, which names the file
        root = root.__cause__
    reason = f"{sub}/{s}: {first_line(root, limit=300)}"
    if reason not in failures:
        failures.append(reason)


def _check_fits(structure: Any, target: Any, *, partial: bool, where: str) -> None:
    wrong = _differences(structure, target, partial=partial)
    if wrong:
        listed = "; ".join(wrong[:_MAX_LISTED_DIFFERENCES])
        more = len(wrong) - _MAX_LISTED_DIFFERENCES
        raise CheckpointError(
            f"checkpoint under {where} was saved by a different model: {listed}"
            f"{f'; ... and {more} more' if more > 0 else ''}. Restore it with the model config "
            "it was trained with, or use another checkpoint or --workdir."
        )


def restore_first_readable(
    managers: dict[str, ocp.CheckpointManager],
    directory: str,
    step: int | None,
    target: Any,
    args_for: Callable[[str, int], ocp.args.Composite],
    *,
    partial: bool = False,
) -> tuple[Any, int]:
    """Restore `step` (any copy), or with `step=None` the newest readable step, falling back.

    Each copy's saved tree is compared with `target` before its arrays are read: a different
    model raises at once instead of counting as damage.
    """
    copies = candidates(managers, directory, step)
    if not copies:
        raise CheckpointError(f"No checkpoint under {directory}.")
    failures: list[str] = []
    with _quiet_leftover_reads():
        restored = _first_readable(managers, directory, copies, target, args_for, partial, failures)
    if restored is not None:
        return restored
    what = f"step {step}" if step is not None else "any checkpoint"
    saved = sorted({s for manager in managers.values() for s in manager.all_steps()})
    raise CheckpointError(
        f"Cannot read {what} under {directory} (saved steps: {saved}): " + "; ".join(failures)
    )


def _is_abandoned_read(unraisable: Any) -> bool:
    """An error of a read or write orbax abandoned: TensorStore's completion callback after its
    loop closed, or orbax's coroutine raising as it is closed (collected) unfinished, also at
    interpreter shutdown. The failure that made orbax abandon them is raised and reported;
    these say nothing more."""
    e, source = unraisable.exc_value, getattr(unraisable, "object", None)
    if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
        return True
    code = getattr(source, "cr_code", None)  # a coroutine
    return (
        isinstance(code, types.CodeType)
        and "orbax" in code.co_filename
        and (
            str(e).startswith("Encountered error while reading array")
            or (isinstance(e, ImportError) and "Python is likely shutting down" in str(e))
        )
    )


def drop_abandoned_reads() -> None:
    """Wraps `sys.unraisablehook` (once) so that it drops `_is_abandoned_read` errors.

    It stays for the rest of the process: such errors can still arrive after the restore
    returned, and they never mean anything to a user. Every other unraisable error goes on.
    """
    hook = sys.unraisablehook
    if getattr(hook, "drops_abandoned_reads", False):
        return

    def filtered(unraisable: Any) -> None:
        if not _is_abandoned_read(unraisable):
            hook(unraisable)

    filtered.drops_abandoned_reads = True
    sys.unraisablehook = filtered


@contextlib.contextmanager
def _quiet_leftover_reads():
    """Silences the abandoned reads of a damaged copy while copies are tried.

    When one array of a damaged copy fails, orbax abandons the copy's other reads. Each of them
    later logs "exception was never retrieved" through asyncio, and TensorStore's callback for
    each raises "Event loop is closed" into `sys.unraisablehook`, as does each of orbax's read
    coroutines collected unfinished: thousands of traceback lines (a damaged ResNet-50 copy:
    11,666) burying the one warning that says which copy was used.
    The failure itself is reported by `unreadable`.
    """
    logger = logging.getLogger("asyncio")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    drop_abandoned_reads()
    try:
        yield
    finally:
        gc.collect()  # the abandoned futures log when collected: collect them while quiet
        logger.setLevel(level)


def _first_readable(
    managers: dict[str, ocp.CheckpointManager],
    directory: str,
    copies: list[tuple[int, str]],
    target: Any,
    args_for: Callable[[str, int], ocp.args.Composite],
    partial: bool,
    failures: list[str],
) -> tuple[Any, int] | None:
    """(restored, step) of the first readable copy in `copies`, else None (failures listed)."""
    for s, sub in copies:
        try:
            structure = ocp.StandardCheckpointHandler().metadata(
                item_dir(managers[sub], s, "state")
            )
        except Exception as e:  # missing or damaged tree metadata: like any other damage
            unreadable(failures, sub, s, e)
            continue
        _check_fits(structure.tree, target, partial=partial, where=f"{directory} ({sub}/{s})")
        try:
            restored = managers[sub].restore(s, args=args_for(sub, s))
        except Exception as e:  # any damage: missing file, truncated chunk, bad JSON, ...
            unreadable(failures, sub, s, e)
            continue
        if failures:
            log.warning(
                "Restored step %d from %s/%s; newer copies were unreadable: %s",
                s,
                directory,
                sub,
                "; ".join(failures),
            )
        return restored, s
    return None
