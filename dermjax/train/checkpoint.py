"""Orbax checkpoints that never lose work: keep-last plus best, exact resume, damaged-step fallback.

Layout under `directory` (a local path or a gs:// URL; nothing outside it is touched):

    periodic/<step>/   kind "periodic": the newest `keep_last` are kept
    best/<step>/       kind "best": the newest is kept (the loop saves one only on a new best)
    last/<step>/       kinds "preempt" and "final": the newest is kept

One Orbax CheckpointManager per subdirectory keeps the retention rules independent: `keep_last`
can never remove the best checkpoint, and a preemption save survives later periodic pruning. Each
step holds three items: `state` (the train-state pytree, StandardSave), `data` (the grain
iterator's position, present when an iterator was given) and `meta` (JSON, plus `kind`,
`timestamp` and `monitor_mode`). `step` must be the global optimisation step, so steps only grow
within a run; the same step may be saved under several kinds (a best epoch that is also periodic).

`CheckpointReader` opens a folder read-only (another run's, for `load_from` / `init_from`): it
never creates, changes or deletes anything in it, so read-only storage works. `Checkpointer` is
the writing reader of a run's own folder.

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

import datetime
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocm

from dermjax.errors import UserError

log = logging.getLogger(__name__)

KIND_SUBDIR = {"periodic": "periodic", "best": "best", "preempt": "last", "final": "last"}
_RESTORE_PRIORITY = {"last": 2, "periodic": 1, "best": 0}  # among copies of one step
_MAX_LISTED_DIFFERENCES = 5


class _DropReadOnlyNotice(logging.Filter):
    """orbax warns "Given directory is read only" for every manager opened read-only: six lines
    per restore that only restate what was asked for."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Given directory is read only")


logging.getLogger("absl").addFilter(_DropReadOnlyNotice())


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable, or does not fit the model it is restored into."""


def _manager(
    path: str, *, keep: int | None, async_save: bool, read_only: bool = False, item_handlers=None
) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        preservation_policy=None if read_only else ocm.LatestN(n=keep),
        enable_async_checkpointing=async_save,
        read_only=read_only,
        create=not read_only,
        save_interval_steps=0 if read_only else 1,
    )
    return ocp.CheckpointManager(path, options=options, item_handlers=item_handlers)


def _read_only_managers(directory: str, item_handlers=None) -> dict[str, ocp.CheckpointManager]:
    return {
        sub: _manager(
            f"{directory}/{sub}",
            keep=None,
            async_save=False,
            read_only=True,
            item_handlers=item_handlers,
        )
        for sub in _RESTORE_PRIORITY
    }


def _item_dir(manager: ocp.CheckpointManager, step: int, item: str) -> epath.Path:
    return epath.Path(manager.directory) / str(step) / item


def _first_line(e: Exception) -> str:
    text = str(e).splitlines()[0][:300] if str(e) else ""
    return f"{type(e).__name__}: {text}"


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


def _candidates(
    managers: dict[str, ocp.CheckpointManager], directory: str, step: int | None
) -> list[tuple[int, str]]:
    """(step, subdir) copies to try, newest first; only `step`'s copies when it is given."""
    saved = [(s, sub) for sub, m in managers.items() for s in m.all_steps()]
    candidates = sorted(saved, key=lambda c: (c[0], _RESTORE_PRIORITY[c[1]]), reverse=True)
    if step is not None:
        candidates = [c for c in candidates if c[0] == step]
        if not candidates:
            steps = sorted({s for s, _ in saved})
            raise CheckpointError(
                f"No checkpoint for step {step} under {directory}; saved: {steps}"
            )
    return candidates


def _unreadable(failures: list[str], directory: str, sub: str, s: int, e: Exception) -> None:
    reason = f"{sub}/{s}: {_first_line(e)}"
    failures.append(reason)
    log.warning("Checkpoint %s/%s cannot be read: %s", directory, sub, reason)


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


def _restore_first_readable(
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
    candidates = _candidates(managers, directory, step)
    if not candidates:
        raise CheckpointError(f"No checkpoint under {directory}.")
    failures: list[str] = []
    for s, sub in candidates:
        try:
            structure = ocp.StandardCheckpointHandler().metadata(
                _item_dir(managers[sub], s, "state")
            )
        except Exception as e:  # missing or damaged tree metadata: like any other damage
            _unreadable(failures, directory, sub, s, e)
            continue
        _check_fits(structure.tree, target, partial=partial, where=f"{directory} ({sub}/{s})")
        try:
            restored = managers[sub].restore(s, args=args_for(sub, s))
        except Exception as e:  # any damage: missing file, truncated chunk, bad JSON, ...
            _unreadable(failures, directory, sub, s, e)
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
    what = f"step {step}" if step is not None else "any checkpoint"
    raise CheckpointError(f"Cannot read {what} under {directory}: " + "; ".join(failures))


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
        return _read_only_managers(self.directory)

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

        None when the folder holds no readable checkpoint; unreadable newer ones are logged.
        """
        self.wait()
        failures: list[str] = []
        for s, sub in _candidates(self._managers, self.directory, None):
            try:
                return s, self._read_meta(sub, s)
            except Exception as e:  # damaged or missing meta: try an older copy
                _unreadable(failures, self.directory, sub, s, e)
        return None

    def read_meta(self, step: int) -> dict:
        """The JSON meta saved with `step` (from any readable copy of it)."""
        self.wait()
        failures: list[str] = []
        for s, sub in _candidates(self._managers, self.directory, step):
            try:
                return self._read_meta(sub, s)
            except Exception as e:
                _unreadable(failures, self.directory, sub, s, e)
        raise CheckpointError(
            f"Cannot read the metadata of step {step} under {self.directory}: "
            + "; ".join(failures)
        )

    def restore(self, step: int | None, *, abstract_state: Any, data_iter: Any) -> tuple[Any, dict]:
        """Restore `step` (None: newest readable) into `abstract_state`'s shardings and dtypes.

        The grain iterator, when given, is moved in place to the saved position. Raises
        CheckpointError when nothing can be read or the checkpoint holds another model's tree;
        with `step=None`, unreadable newer steps are skipped with a warning.
        """
        self.wait()

        def args_for(sub: str, s: int) -> ocp.args.Composite:
            items = {
                "state": ocp.args.StandardRestore(abstract_state),
                "meta": ocp.args.JsonRestore(),
            }
            if data_iter is not None:
                if _item_dir(self._managers[sub], s, "data").exists():
                    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
                else:
                    log.warning(
                        "Checkpoint %s/%s/%d holds no data-iterator state; the iterator keeps "
                        "its current position.",
                        self.directory,
                        sub,
                        s,
                    )
            return ocp.args.Composite(**items)

        restored, _ = _restore_first_readable(
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
            self._weight_managers = _read_only_managers(self.directory, item_handlers=handlers)
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_weights)
        args = ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=abstract_weights, restore_args=restore_args, partial_restore=True
            ),
            meta=ocp.args.JsonRestore(),
        )
        restored, _ = _restore_first_readable(
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


class Checkpointer(CheckpointReader):
    """Saves and restores training state, data-iterator position and run metadata."""

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
        super().__init__(directory, monitor_mode=monitor_mode)

    def _open_managers(self) -> dict[str, ocp.CheckpointManager]:
        return {
            sub: _manager(f"{self.directory}/{sub}", keep=n, async_save=self._async_save)
            for sub, n in self._keep.items()
        }

    def should_save_periodic(self, epoch: int) -> bool:
        """Whether 0-based `epoch` ends with a periodic save (every `save_frequency` epochs)."""
        return (epoch + 1) % self.save_frequency == 0

    def save(self, step: int, *, state: Any, data_iter: Any, meta: dict, kind: str) -> None:
        """Save `state`, the iterator position and `meta` as `step` of `kind`."""
        if kind not in KIND_SUBDIR:
            raise ValueError(f"kind must be one of {sorted(KIND_SUBDIR)}, got {kind!r}.")
        sub = KIND_SUBDIR[kind]
        stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        meta = {**meta, "kind": kind, "timestamp": stamp, "monitor_mode": self.monitor_mode}
        json.dumps(meta)  # fail here, not in the background writer, on non-JSON values
        self._drop_superseded(step, sub)
        for name, manager in self._managers.items():  # keep saves visible in the order made
            if name != sub:
                manager.wait_until_finished()
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
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
        log.warning(
            "Saving step %d under %s: removing checkpoints it supersedes (the run resumed from an "
            "earlier step): %s",
            step,
            self.directory,
            ", ".join(f"{name}/{s}" for name, s in stale),
        )
        for name, s in stale:
            self._managers[name].delete(s)

    def __enter__(self) -> Checkpointer:
        return self


def resolve_load_from(path: str) -> tuple[str, int | None]:
    """Map `checkpoint.load_from` to (checkpoints directory, step or None for latest).

    Accepts a workdir (uses its `checkpoints/`), a checkpoints directory, a kind directory
    (`.../checkpoints/best`: its newest step) or a step directory (`.../checkpoints/periodic/120`).
    Only reads.
    """
    path = str(path).rstrip("/")
    p = epath.Path(path if "://" in path else os.path.abspath(path))  # Orbax needs absolute
    kind_dirs = set(_RESTORE_PRIORITY)
    if (p / "checkpoints").is_dir():
        return str(p / "checkpoints"), None
    if any((p / sub).is_dir() for sub in kind_dirs):
        return str(p), None
    if p.name in kind_dirs and p.is_dir():
        steps = _read_only_managers(str(p.parent))[p.name].all_steps()
        if not steps:
            raise CheckpointError(f"load_from={path}: no finalised checkpoint in it.")
        return str(p.parent), max(steps)
    if p.name.isdigit() and p.parent.name in kind_dirs and p.is_dir():
        return str(p.parent.parent), int(p.name)
    raise CheckpointError(
        f"load_from={path} is not a workdir, a checkpoints directory or a checkpoint step "
        f"directory (e.g. WORKDIR/checkpoints/periodic/120)."
    )


def restore_weights_only(path: str, abstract_weights: dict) -> tuple[dict, dict]:
    """Read the entries of `abstract_weights` (e.g. {"params", "batch_stats"}) and the meta.

    `path` is anything `resolve_load_from` accepts; the folder is only read. Comparing classes
    is the caller's job.
    """
    directory, step = resolve_load_from(path)
    with CheckpointReader(directory) as reader:
        return reader.restore_weights(step, abstract_weights=abstract_weights)
