"""Orbax checkpoints that never lose work: keep-last plus best, exact resume, damaged-step fallback.

Layout under `directory` (a local path or a gs:// URL; nothing outside it is touched):

    periodic/<step>/   kind "periodic": the newest `keep_last` are kept
    best/<step>/       kind "best": the newest is kept (the loop saves one only on a new best)
    last/<step>/       kinds "preempt" and "final": the newest is kept

One Orbax CheckpointManager per subdirectory keeps the retention rules independent: `keep_last`
can never remove the best checkpoint, and a preemption save survives later periodic pruning. Each
step holds two items: `state` (the train-state pytree, StandardSave) and `meta` (JSON, plus
`kind`, `timestamp` and `monitor_mode`). The input position needs no item of its own: the
training batches are a pure function of their global number, which the meta's epoch and step in
the epoch give (steps written before 2026-12-02 also hold grain's iterator state as `data`; it is
not read). `step` must be the global optimisation step, so steps only grow
within a run; the same step may be saved under several kinds (a best epoch that is also periodic).

Opening the managers, finding a step's copies and comparing a saved tree with the model live
in `checkpoint_restore`. `CheckpointReader` opens a folder read-only (another run's, for
`load_from` / `init_from`): it never creates, changes or deletes anything in it, so read-only
storage works. `Checkpointer` is the writing reader of a run's own folder.

`latest()` is the highest finalised step across the three managers. Restoring it tries every copy
of that step (last, periodic, best), then older steps, logging a warning for each unreadable one;
an explicitly requested step is never substituted. Before reading arrays, the saved tree's paths
and shapes are compared with the target's: a difference means another model (backbone, class
count) and raises at once, since older steps of that folder have the same structure. A save at
step S first deletes every checkpoint newer than S (and S itself of the same kind): those belong
to a trajectory that was abandoned when the run resumed from an earlier or damaged step, and
would otherwise win `latest()`.

Saves are asynchronous when `async_save`: arrays are copied off the device before `save` returns
and written in the background; `wait()` runs before every restore, listing and `close()`. A save
first waits for pending saves of the other kinds, so checkpoints become visible in the order they
were made: after a crash, a visible periodic step implies the best saved just before it is whole.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from dermjax.data import fs
from dermjax.train.checkpoint_restore import (
    RESTORE_PRIORITY,
    CheckpointError,
    candidates,
    drop_abandoned_reads,
    open_manager,
    read_only_managers,
    restore_first_readable,
    unreadable,
)

log = logging.getLogger(__name__)

KIND_SUBDIR = {"periodic": "periodic", "best": "best", "preempt": "last", "final": "last"}


class CheckpointReader:
    """Reads a checkpoints folder without writing to it: steps, metadata, state, weights.

    `monitor_mode` ("max"/"min"), when given, is compared with the one each restored
    checkpoint was saved with; a difference is logged as a warning.
    """

    def __init__(self, directory: str, *, monitor_mode: str | None = None) -> None:
        if monitor_mode not in ("max", "min", None):
            raise ValueError(f"monitor_mode must be 'max' or 'min', got {monitor_mode!r}.")
        self.directory = str(directory).rstrip("/")
        self.monitor_mode = monitor_mode
        self._managers = self._open_managers()
        self._weight_managers: dict[str, ocp.CheckpointManager] | None = None

    def _open_managers(self) -> dict[str, ocp.CheckpointManager]:
        return read_only_managers(self.directory)

    def latest(self) -> int | None:
        """The newest finalised step of any kind, or None when there is none."""
        self.wait()
        steps = [m.latest_step() for m in self._managers.values()]
        return max((s for s in steps if s is not None), default=None)

    def best(self) -> int | None:
        """The step of the kept best checkpoint, or None."""
        self.wait()
        return self._managers["best"].latest_step()

    def _read_meta(self, sub: str, s: int) -> dict:
        restored = self._managers[sub].restore(
            s, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        )
        return dict(restored["meta"])

    def latest_meta(self) -> tuple[int, dict] | None:
        """(step, meta) of the newest step whose JSON meta is readable (no arrays are read).

        None when the folder holds no readable checkpoint, with a warning naming each copy.
        Newer unreadable copies are only logged at INFO: the restore tries them again and its
        warning names them.
        """
        self.wait()
        failures: list[str] = []
        for s, sub in candidates(self._managers, self.directory, None):
            try:
                found = s, self._read_meta(sub, s)
            except Exception as e:  # damaged or missing meta: try an older copy
                unreadable(failures, sub, s, e)
                continue
            if failures:
                log.info("%s: metadata of newer copies unreadable: %s", self.directory, failures)
            return found
        if failures:
            log.warning("%s: no checkpoint metadata can be read: %s", self.directory, failures)
        return None

    def read_meta(self, step: int) -> dict:
        """The JSON meta saved with `step` (from any readable copy of it)."""
        self.wait()
        failures: list[str] = []
        for s, sub in candidates(self._managers, self.directory, step):
            try:
                return self._read_meta(sub, s)
            except Exception as e:
                unreadable(failures, sub, s, e)
        raise CheckpointError(
            f"Cannot read the metadata of step {step} under {self.directory}: "
            + "; ".join(failures)
        )

    def restore(self, step: int | None, *, abstract_state: Any) -> tuple[Any, dict]:
        """Restore `step` (None: newest readable) into `abstract_state`'s shardings and dtypes.

        Raises CheckpointError when nothing can be read or the checkpoint holds another model's
        tree; with `step=None`, unreadable newer steps are skipped with a warning.
        """
        self.wait()

        def args_for(sub: str, s: int) -> ocp.args.Composite:
            return ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            )

        restored, _ = restore_first_readable(
            self._managers, self.directory, step, abstract_state, args_for
        )
        meta = dict(restored["meta"])
        saved_mode = meta.get("monitor_mode")
        if None not in (saved_mode, self.monitor_mode) and saved_mode != self.monitor_mode:
            log.warning(
                "Checkpoint was saved with monitor_mode=%r, this run uses %r: its best metric "
                "is compared in the other direction.",
                saved_mode,
                self.monitor_mode,
            )
        return restored["state"], meta

    def restore_weights(self, step: int | None, *, abstract_weights: dict) -> tuple[dict, dict]:
        """Read only the top-level state entries in `abstract_weights` (e.g. params, batch_stats).

        For fine-tuning from another run: optimizer state, step and iterator position are not
        read. Returns (concrete arrays with `abstract_weights`' shardings and dtypes, meta).
        """
        self.wait()
        if self._weight_managers is None:  # a PyTree handler, which can read part of a tree
            handlers = {"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
            self._weight_managers = read_only_managers(self.directory, item_handlers=handlers)
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_weights)
        args = ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=abstract_weights, restore_args=restore_args, partial_restore=True
            ),
            meta=ocp.args.JsonRestore(),
        )
        restored, _ = restore_first_readable(
            self._weight_managers,
            self.directory,
            step,
            abstract_weights,
            lambda sub, s: args,
            partial=True,
        )
        return dict(restored["state"]), dict(restored["meta"])

    def wait(self) -> None:
        """Block until every pending asynchronous save is written."""
        for manager in self._managers.values():
            manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the managers."""
        self.wait()
        for manager in [*self._managers.values(), *(self._weight_managers or {}).values()]:
            manager.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# How storage refuses a write, as the OS or TensorStore words it -> what to tell the user.
_REFUSED_WRITES = {
    "No space left on device": "no space left on device",
    "os_error_code='28'": "no space left on device",
    "Disk quota exceeded": "disk quota exceeded",
    "Read-only file system": "the file system is read-only",
    "Permission denied": "permission denied",
}


def refused_write(error: BaseException) -> str | None:
    """Why storage refused a checkpoint write (full, read-only, ...), None for other errors."""
    seen: BaseException | None = error
    while seen is not None:
        text = str(seen)
        for marker, reason in _REFUSED_WRITES.items():
            if marker in text:
                return reason
        seen = seen.__cause__ or seen.__context__
    return None


class Checkpointer(CheckpointReader):
    """Saves and restores training state and run metadata (the input position included).

    A write the storage refuses (disk full, read-only, no permission) raises CheckpointError in
    one line, where the run saves or waits for a save; the newer checkpoints stay whole.
    """

    def __init__(
        self,
        directory: str,
        *,
        save_frequency: int,
        keep_last: int,
        monitor_mode: str = "max",
        async_save: bool = True,
    ) -> None:
        if save_frequency < 1 or keep_last < 1:
            raise ValueError(
                f"checkpoint.save_frequency ({save_frequency}) and checkpoint.keep_last "
                f"({keep_last}) must both be >= 1."
            )
        if monitor_mode not in ("max", "min"):
            raise ValueError(f"monitor_mode must be 'max' or 'min', got {monitor_mode!r}.")
        self.save_frequency = save_frequency
        self._keep = {"periodic": keep_last, "best": 1, "last": 1}
        self._async_save = async_save
        self._write_failed = False
        drop_abandoned_reads()  # a failed write abandons the others like a failed read
        super().__init__(directory, monitor_mode=monitor_mode)

    @contextlib.contextmanager
    def _writes(self):
        """Turns a write the storage refused into one CheckpointError (other errors are bugs)."""
        try:
            yield
        except CheckpointError:
            raise
        except Exception as e:
            reason = refused_write(e)
            if reason is None:
                raise
            self._write_failed = True
            raise CheckpointError(
                f"cannot write a checkpoint under {self.directory}: {reason}; make room (or fix "
                "the folder) and re-run the same command: it resumes from the newest complete "
                "checkpoint"
            ) from e

    def wait(self) -> None:
        with self._writes():
            super().wait()

    def close(self) -> None:
        """Finish pending saves and release the managers; after a refused write, only release
        them (the error was raised already)."""
        if not self._write_failed:
            super().close()
            return
        for manager in self._managers.values():
            with contextlib.suppress(Exception):
                manager.close()

    def _open_managers(self) -> dict[str, ocp.CheckpointManager]:
        return {
            sub: open_manager(f"{self.directory}/{sub}", keep=n, async_save=self._async_save)
            for sub, n in self._keep.items()
        }

    def should_save_periodic(self, epoch: int) -> bool:
        """Whether 0-based `epoch` ends with a periodic save (every `save_frequency` epochs)."""
        return (epoch + 1) % self.save_frequency == 0

    def save(self, step: int, *, state: Any, meta: dict, kind: str) -> None:
        """Save `state` and `meta` as `step` of `kind`."""
        if kind not in KIND_SUBDIR:
            raise ValueError(f"kind must be one of {sorted(KIND_SUBDIR)}, got {kind!r}.")
        sub = KIND_SUBDIR[kind]
        stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        meta = {
            **meta,
            "kind": kind,
            "timestamp": stamp,
            "monitor_mode": self.monitor_mode,
        }
        json.dumps(meta)  # fail here, not in the background writer, on non-JSON values
        with self._writes():
            self._drop_superseded(step, sub)
            for name, manager in self._managers.items():  # keep saves visible in the order made
                if name != sub:
                    manager.wait_until_finished()
            items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
            self._managers[sub].save(step, args=ocp.args.Composite(**items), force=True)

    def _drop_superseded(self, step: int, sub: str) -> None:
        stale = [
            (name, s)
            for name, manager in self._managers.items()
            for s in manager.all_steps()
            # the same step of the same kind, or a preemption copy ("last") it completes
            if s > step or (s == step and name in (sub, "last"))
        ]
        if not stale:
            return
        self.wait()
        why = (
            "the run resumed from an earlier step"
            if any(s > step for _, s in stale)
            else "this step is saved again"
        )
        log.warning(
            "Saving step %d under %s: removing checkpoints it supersedes (%s): %s",
            step,
            self.directory,
            why,
            ", ".join(f"{name}/{s}" for name, s in stale),
        )
        for name, s in stale:
            self._managers[name].delete(s)

    def __enter__(self) -> Checkpointer:
        return self


def resolve_load_from(path: str, field: str = "checkpoint.load_from") -> tuple[str, int | None]:
    """Map `checkpoint.load_from` (or the config `field` named in errors) to (checkpoints
    directory, step or None for latest).

    Accepts a workdir (uses its `checkpoints/`), a checkpoints directory, a kind directory
    (`.../checkpoints/best`: its newest step) or a step directory (`.../checkpoints/periodic/120`).
    Only reads.
    """
    path = str(path).rstrip("/")
    fs.check_credentials(path)  # a bucket without them: one line, not minutes of retries
    p = epath.Path(path if "://" in path else os.path.abspath(path))  # Orbax needs absolute
    kind_dirs = set(RESTORE_PRIORITY)
    if (p / "checkpoints").is_dir():
        return str(p / "checkpoints"), None
    if any((p / sub).is_dir() for sub in kind_dirs):
        return str(p), None
    if p.name in kind_dirs and p.is_dir():
        steps = read_only_managers(str(p.parent))[p.name].all_steps()
        if not steps:
            raise CheckpointError(f"{field}={path}: no finalised checkpoint in it.")
        return str(p.parent), max(steps)
    if p.name.isdigit() and p.parent.name in kind_dirs and p.is_dir():
        return str(p.parent.parent), int(p.name)
    pth = (
        sorted(q.name for q in p.glob("*.pt*") if q.suffix in (".pth", ".pt")) if p.is_dir() else []
    )
    hint = (
        f"; it holds PyTorch checkpoints of the original ({', '.join(pth[:3])}"
        f"{', ...' if len(pth) > 3 else ''}): convert one with `{_conversion_command(p / pth[0])}`"
        " and give its --out folder"
        if pth
        else ""
    )
    raise CheckpointError(
        f"{field}={path} is not a workdir, a checkpoints directory or a checkpoint step "
        f"directory (e.g. WORKDIR/checkpoints/periodic/120){hint}"
    )


def _conversion_command(pth: epath.Path) -> str:
    from dermjax.weights.original import conversion_command  # lazy: it imports the models

    return conversion_command(str(pth))


def restore_weights_only(
    path: str, abstract_weights: dict, field: str = "checkpoint.init_from"
) -> tuple[dict, dict]:
    """Read the entries of `abstract_weights` (e.g. {"params", "batch_stats"}) and the meta.

    `path` is anything `resolve_load_from` accepts (`field` names it in errors); the folder is
    only read. Comparing classes is the caller's job.
    """
    directory, step = resolve_load_from(path, field)
    with CheckpointReader(directory) as reader:
        return reader.restore_weights(step, abstract_weights=abstract_weights)
