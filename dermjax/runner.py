"""Drives one run: its folders, its lock, the resume rules, training and the final evaluation.

`run(cfg, workdir)` is what `python -m dermjax.main` does:

1. Run folders (`run_folders`): with `--workdir=DIR`, everything of the run lives in DIR
   (checkpoints in DIR/checkpoints). Without it, each experiment gets its own folders named after
   `output.experiment_name`: logs under `<output.log_dir or workdirs>/<name>/`, checkpoints under
   `<output.save_dir>/<name>/` (or the log folder's `checkpoints/`). Runs that share `save_dir`
   or `log_dir` never share a folder unless they share a name.
2. The run folder is locked (`RunLock`), and a local checkpoint folder outside it too: a second
   process on the same run stops with a message naming the first; the kernel drops the lock
   when its holder dies.
3. Resume rules (`check_resumable`): a folder with checkpoints is continued only when the stored
   config agrees on every field that changes what is trained; fields in `RESUMABLE_CHANGES`
   (epoch budget, patience, workers, paths, logging, checkpoint cadence) may differ and are
   logged. `checkpoint.load_from` (another run's folder, opened read-only) follows the same rule.
   A finished run is not trained again: its summary is returned.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
from ml_collections import config_dict

from dermjax import experiment_data
from dermjax.data import fs
from dermjax.errors import RunFolderError, UserError
from dermjax.experiment import compose
from dermjax.tracking import Tracker
from dermjax.train import preemption
from dermjax.train.checkpoint import Checkpointer, CheckpointReader, resolve_load_from
from dermjax.train.loop import Trainer
from dermjax.train.runlock import RunLock

log = logging.getLogger(__name__)

# Config fields (or whole sections) a resumed run may change: they do not change what is trained.
RESUMABLE_CHANGES = (
    "training.num_epochs",
    "training.patience",
    "training.validation_interval",
    "training.num_workers",
    "training.prefetch_factor",
    "training.eval_batch_size",
    "training.log_every_steps",
    "training.compilation_cache_dir",
    "training.on_nonfinite",
    "data.use_local",
    "data.local_root",
    "data.gcs_root",
    "data.metadata_path",
    "data.img_prefix",
    "data.embeddings_path",
    "data.cache_dir",
    "data.use_cache",
    "data.on_bad_image",
    "output",
    "checkpoint",
    "evaluation",
    "training.shard_params",
    "encoder.batch_size",
)


@dataclasses.dataclass(frozen=True)
class RunFolders:
    """Where one run writes: `run_dir` (logs, metrics, summary, lock) and its checkpoints."""

    run_dir: str
    checkpoint_dir: str


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def run_folders(cfg: config_dict.ConfigDict, workdir: str | None) -> RunFolders:
    """The run's folders: all in `workdir` when given, else per experiment name (module doc)."""
    if workdir:
        return RunFolders(_absolute(workdir), _absolute(os.path.join(workdir, "checkpoints")))
    out = cfg.output
    run_dir = os.path.join(out.log_dir or "workdirs", out.experiment_name)
    checkpoints = (
        f"{out.save_dir.rstrip('/')}/{out.experiment_name}"
        if out.save_dir
        else os.path.join(run_dir, "checkpoints")
    )
    return RunFolders(_absolute(run_dir), _absolute(checkpoints))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _canonical(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))  # tuples == lists, as stored in JSON


_MISSING = object()


def _lookup(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, Mapping) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree


@functools.cache
def _fields() -> tuple[str, ...]:
    """Every field of the config schema, dotted (a dict-valued field is one field)."""
    from dermjax.config import load_config

    return tuple(_flatten(_canonical(load_config("default").to_dict())))


def config_changes(stored: Mapping[str, Any], current: Mapping[str, Any]) -> tuple[list, list]:
    """(blocking, allowed) differences between a checkpoint's config and the current one.

    Each is a list of "field: stored -> current" strings. Fields are compared whole, so a
    dict-valued one (data.per_dataset_split_ratios) that gains a key or stops being None
    counts. A field only one side has (a config schema of another dermjax version) is not
    compared.
    """
    old, new = _canonical(stored), _canonical(current)
    blocking, allowed = [], []
    for key in sorted(_fields()):
        a, b = _lookup(old, key), _lookup(new, key)
        if a is _MISSING or b is _MISSING or a == b:
            continue
        change = f"{key}: {a!r} -> {b!r}"
        resumable = any(key == f or key.startswith(f"{f}.") for f in RESUMABLE_CHANGES)
        (allowed if resumable else blocking).append(change)
    return blocking, allowed


def check_resumable(cfg: config_dict.ConfigDict, stored_config: Mapping[str, Any], where: str):
    """Raises RunFolderError when the checkpoint's config differs in a field that is trained."""
    blocking, allowed = config_changes(stored_config, cfg.to_dict())
    if blocking:
        raise RunFolderError(
            f"{where} holds a run made with a different config ({'; '.join(blocking)}). "
            "Set those fields back to resume it, or start a fresh run in another folder "
            "(--workdir=NEW_DIR or --config.output.experiment_name=NEW_NAME)."
        )
    for change in allowed:
        log.info("resuming with a changed setting: %s", change)
        if change.startswith("training.eval_batch_size:"):
            log.warning(
                "val/loss is a mean of per-batch mean losses (as the original's), so it depends "
                "on training.eval_batch_size: the epochs before and after this change compare "
                "values computed differently (monitor %s)",
                cfg.training.monitor,
            )


def open_checkpoints(cfg: config_dict.ConfigDict, folders: RunFolders) -> Checkpointer:
    """The run's own checkpoint folder, for writing."""
    return Checkpointer(
        folders.checkpoint_dir,
        save_frequency=cfg.checkpoint.save_frequency,
        keep_last=cfg.checkpoint.keep_last,
        monitor_mode="min" if cfg.training.monitor == "val/loss" else "max",
    )


def finished_summary(
    folders: RunFolders, meta: Mapping[str, Any], saved_step: int, num_epochs: int
) -> dict | None:
    """The stored summary when the checkpoint's run is over (early-stopped, or all epochs done).

    The summary must be the evaluation of that very checkpoint (its `trained_steps`); otherwise
    (the final evaluation did not complete, or it belongs to an earlier end of the run) the run
    evaluates again.
    """
    finished = meta.get("finished")
    if finished is None or (finished == "completed" and meta["epoch"] < num_epochs):
        return None
    path = os.path.join(folders.run_dir, "summary.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            summary = json.load(f)
    except (OSError, ValueError) as e:  # cut short by a kill or a full disk: evaluate again
        log.warning("%s cannot be read (%s): evaluating the finished run again", path, e)
        return None
    if not isinstance(summary, dict):
        return None
    return summary if summary.get("trained_steps") == saved_step else None


def run(cfg: config_dict.ConfigDict, workdir: str | None) -> dict[str, Any]:
    """Trains (or resumes) the run `cfg` describes and evaluates it; returns the summary.

    Only process 0 locks the run folder (all processes of a multi-host run share it).
    """
    start = time.time()
    folders = run_folders(cfg, workdir)
    if "://" in folders.run_dir:
        raise RunFolderError(
            f"run folder {folders.run_dir}: --workdir and output.log_dir must be local folders "
            "(logs, lock); put checkpoints on a bucket with output.save_dir=gs://..."
        )
    fs.ensure_writable_folder(
        folders.run_dir,
        "run folder",
        "give --workdir a folder you can write" if workdir else "set output.log_dir (or --workdir)",
    )
    main = jax.process_index() == 0
    log_file = _log_file(folders) if main else contextlib.nullcontext()
    with _locks(folders) if main else contextlib.nullcontext(), log_file:
        ckpt = open_checkpoints(cfg, folders)
        try:
            return _run_locked(cfg, folders, ckpt, start)
        finally:
            ckpt.close()


@contextlib.contextmanager
def _locks(folders: RunFolders):
    """The run folder's lock, and the checkpoint folder's when it is a local folder elsewhere
    (`output.save_dir`): two runs sharing it through different log folders would both write."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(RunLock(folders.run_dir))
        ckpt = folders.checkpoint_dir
        if "://" not in ckpt and not ckpt.startswith(folders.run_dir + os.sep):
            fix = (
                "wait for it to finish, stop it, or give this run another "
                "output.experiment_name (or --workdir)"
            )
            stack.enter_context(RunLock(ckpt, what="checkpoint folder", fix=fix))
        yield


def _file_handler(folders: RunFolders) -> logging.FileHandler:
    handler = logging.FileHandler(os.path.join(folders.run_dir, "train.log"))
    handler.setFormatter(  # dated: the file outlives the day, and a run spans several
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    )
    return handler


def log_after_run(folders: RunFolders, message: str) -> None:
    """Adds a warning to train.log (process 0) after `run` returned, without printing it: the
    line the launcher prints last (a preempted run's resume command) is in the file too."""
    if jax.process_index() != 0:
        return
    handler = _file_handler(folders)
    try:
        handler.emit(logging.LogRecord(log.name, logging.WARNING, "", 0, message, None, None))
    finally:
        handler.close()


@contextlib.contextmanager
def _log_file(folders: RunFolders):
    """Copies this process's log lines to the run's train.log while the run holds its folder."""
    handler = _file_handler(folders)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """A checkpoint to continue from: its source, step (None: newest readable) and meta."""

    source: Checkpointer | CheckpointReader
    step: int | None
    name: str
    saved_step: int
    meta: Mapping[str, Any]


def _resume_point(cfg, folders: RunFolders, ckpt: Checkpointer) -> ResumePoint | None:
    """Where to continue from (this run's newest checkpoint, else load_from); checks configs."""
    c = cfg.checkpoint
    found = ckpt.latest_meta()
    if found is None and ckpt.latest() is not None:
        raise RunFolderError(
            f"{folders.checkpoint_dir} holds checkpoints (newest step {ckpt.latest()}) whose "
            "metadata cannot be read (see the warnings above): fix access to that folder and "
            "re-run, or start fresh in another --workdir / output.experiment_name"
        )
    if found is not None:
        if not c.auto_resume:
            raise RunFolderError(
                f"{folders.checkpoint_dir} holds checkpoints of an earlier run and "
                "checkpoint.auto_resume is false: a new run there would mix with it; use another "
                "--workdir or output.experiment_name, or delete that folder"
            )
        check_resumable(cfg, found[1]["config"], folders.checkpoint_dir)
        for field in ("load_from", "init_from"):
            if c[field]:
                log.warning(
                    "checkpoint.%s=%s is not used: this run folder has its own checkpoints, and "
                    "the run continues from them",
                    field,
                    c[field],
                )
        return ResumePoint(ckpt, None, folders.checkpoint_dir, *found)
    if c.load_from:
        directory, step = resolve_load_from(c.load_from)
        reader = CheckpointReader(directory)
        found = reader.latest_meta() if step is None else (step, reader.read_meta(step))
        if found is None:
            raise RunFolderError(f"checkpoint.load_from={c.load_from}: no checkpoint in it")
        check_resumable(cfg, found[1]["config"], c.load_from)
        return ResumePoint(reader, step, c.load_from, *found)  # step None: newest readable
    return None


def _run_locked(cfg, folders: RunFolders, ckpt: Checkpointer, start: float) -> dict[str, Any]:
    resume = _resume_point(cfg, folders, ckpt)
    start_step = resume.saved_step if resume is not None else 0
    if preemption.register_start(start_step):
        log.warning("a preemption notice came while the run was starting: not training")
        return {"preempted": True, "step": start_step, "trained": False}
    own_resume = resume is not None and resume.source is ckpt  # this run folder's own checkpoint
    if own_resume:
        summary = finished_summary(folders, resume.meta, resume.saved_step, cfg.training.num_epochs)
        if summary is not None:
            how = resume.meta["finished"].replace("_", "-")
            log.info(
                "run %s already finished (%s after %d epochs): not training again; summary: %s",
                folders.run_dir,
                how,
                resume.meta["epoch"],
                os.path.join(folders.run_dir, "summary.json"),
            )
            if not _report_is_current(folders, summary):  # ended before it, or was extended
                _evaluate_after_training(cfg, folders)
            return {**summary, "already_finished": True}
    if resume is not None and not (own_resume and resume.meta.get("finished")):
        _check_epoch_budget(cfg, resume)
    ev = cfg.evaluation
    if ev.after_training and (ev.groups_path or ev.group_columns is not None):
        from dermjax.evaluation.run import group_frame  # the report's settings, before training

        group_frame(cfg, experiment_data.selected_metadata(cfg)[1])
    if resume is None and cfg.checkpoint.init_from:  # before the data is read
        resolve_load_from(cfg.checkpoint.init_from, "checkpoint.init_from")
    from_checkpoint = resume is not None or bool(cfg.checkpoint.init_from)
    components = compose(cfg, folders.run_dir, weights_from_checkpoint=from_checkpoint)
    tracker = Tracker(
        folders.run_dir,
        experiment_name=cfg.output.experiment_name,
        config_dict=cfg.to_dict(),
        wandb_project=cfg.output.wandb_project,
        enabled=jax.process_index() == 0,
        resume_step=resume.saved_step if own_resume else None,
        wandb_run_id=resume.meta.get("wandb_run_id") if own_resume else None,
    )
    trainer = Trainer(components, ckpt, tracker, started_at=start)
    try:
        if resume is not None:
            trainer.restore(resume.source, resume.step, resume.name, dict(resume.meta))
            if own_resume and (restored := int(trainer.state["step"])) != resume.saved_step:
                tracker.rewind(restored)  # fell back past a damaged newer copy
        elif cfg.checkpoint.init_from:
            trainer.init_weights(cfg.checkpoint.init_from)
        if not trainer.train():
            return {"preempted": True, "step": int(trainer.state["step"])}
        summary = trainer.test()
    finally:
        trainer.close()
    _evaluate_after_training(cfg, folders)  # after close(): the input workers have stopped
    return summary


def _report_is_current(folders: RunFolders, summary: Mapping[str, Any]) -> bool:
    """Whether the run's test report exists and is of the checkpoint the summary evaluated
    (the best, else the last); a run given more epochs has a newer one."""
    folder = os.path.join(folders.run_dir, "evaluation", "test")
    if not os.path.exists(os.path.join(folder, "report.html")):
        return False
    try:
        with open(os.path.join(folder, "evaluation.json")) as f:
            step = json.load(f)["checkpoint"]["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    best = summary.get("best_step")
    return step == (best if best is not None else summary.get("trained_steps"))


def _check_epoch_budget(cfg, resume: ResumePoint) -> None:
    """RunFolderError when `training.num_epochs` is below the epochs the checkpoint has begun:
    the run would stop mid-epoch, with a summary of a half-trained epoch."""
    epoch, step = resume.meta["epoch"], resume.meta.get("step_in_epoch", 0)
    started = epoch + (1 if step else 0)
    if cfg.training.num_epochs < started:
        where = f"epoch {epoch + 1}, step {step}" if step else f"the end of epoch {epoch}"
        raise RunFolderError(
            f"training.num_epochs={cfg.training.num_epochs} is below the {started} epochs "
            f"already begun in {resume.name} (saved at {where}): set it to {started} or more "
            "to continue, or start a fresh run in another --workdir"
        )


def _evaluate_after_training(cfg, folders: RunFolders) -> None:
    """The test split's evaluation report (evaluation.after_training), once per finished run."""
    if not cfg.evaluation.after_training:
        return
    from dermjax.evaluation.run import evaluate_run  # matplotlib etc. only when asked for

    try:
        out = evaluate_run(folders.run_dir, folders.checkpoint_dir)
    except UserError as e:  # the run itself is complete and saved: report, do not fail it
        log.warning("no evaluation report: %s", e)
        return
    log.info("evaluation report: %s", os.path.join(out, "report.html"))
