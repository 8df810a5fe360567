"""The epoch loop of one run: train, validate, early-stop, checkpoint, and the final evaluation.

Optimisation follows the original: two optimizer groups with learning rates set once per epoch
(cosine after the warm-up), the whole backbone frozen for the first `n_warmup_epochs`, then the
`unfreeze_layers` rule; validation every `validation_interval` epochs (and, unlike the original,
after the last) with early stopping on `training.monitor`. Unlike the original, the best model
is evaluated on the test split at the end (on the validation split when there is no test split,
which the summary names). With `training.vision_only_pretraining` the first epochs run the
vision-only step, with their own early-stopping state; auxiliary weights and epoch masks are
evaluated per epoch on the host (`experiment.epoch_schedule`) and passed to the steps as values.
Everything needed to continue (state, data position, early-stopping state, the partial epoch's
metrics, counters) is checkpointed, so a resumed run is the same run. What the loop works with
is composed from the config by `dermjax.experiment`.

Metrics are accumulated on the devices (confusion matrix, sum and count of batch losses) and
fetched once per pass, and when a partial epoch is checkpointed; the host reads only the train
step's `finite` flag and loss (one step late, for the progress line and the non-finite policy).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import numpy as np

import dermjax
from dermjax import parallel
from dermjax.config import data_paths
from dermjax.data import pipeline
from dermjax.errors import DataError, UserError
from dermjax.experiment import Components, epoch_learning_rates, epoch_schedule
from dermjax.tracking import Progress, Tracker
from dermjax.train import optim
from dermjax.train.checkpoint import Checkpointer, restore_weights_only
from dermjax.train.early_stopping import PhasedEarlyStopping
from dermjax.train.evaluator import Evaluator, device_totals, fetch_totals, shown_samples
from dermjax.train.metrics import ClassificationMetrics, accumulate
from dermjax.train.preemption import NonFiniteLossError, PreemptionGuard
from dermjax.train.step import make_train_step

log = logging.getLogger(__name__)

SUMMARY_KEYS = ("accuracy", "macro_f1", "balanced_accuracy", "loss", "per_class_recall")


class Trainer:
    """Runs the epochs of one composed run; `restore`/`init_weights` pick its starting point."""

    def __init__(
        self, c: Components, ckpt: Checkpointer, tracker: Tracker, started_at: float | None = None
    ):
        """`started_at`: when this launch began (time.time()), for the run's times."""
        self.c, self.cfg, self.ckpt, self.tracker = c, c.cfg, ckpt, tracker
        self.started_at = time.time() if started_at is None else started_at
        self.seconds_before = 0.0  # earlier launches' time up to their last save
        self.is_main = jax.process_index() == 0
        self.num_classes = len(c.data.classes)
        self.state = c.state
        # The layout compose placed the state in: restores and train steps keep it.
        shardings = parallel.state_shardings(
            self.state, c.mesh, shard_params=self.cfg.training.shard_params
        )
        self.abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self.state, shardings
        )
        args = (c.parts, c.spec, c.tx_backbone, c.tx_head)
        self.schedule = epoch_schedule(self.cfg)
        # (warm-up, vision-only) -> train step; each is compiled on first use only.
        self.train_steps = {
            (warm, vo): make_train_step(
                *args, warmup=warm, vision_only=vo, state_shardings=shardings
            )
            for warm in (True, False)
            for vo in (False, True)
        }
        self.evaluator = Evaluator(c, show_progress=self.is_main)
        self.train_loader = c.train_loader()
        self.steps_per_epoch = self.train_loader.steps_per_epoch
        self.train_iter = iter(self.train_loader)
        t = self.cfg.training
        self.stopper = PhasedEarlyStopping(
            t.monitor,
            ckpt.monitor_mode,
            t.patience,
            vision_only_epochs=self.schedule.vision_only_epochs,
            patience_ends_run=t.vision_only_pretraining.patience_ends_run,
        )
        self.start_epoch, self.start_step_in_epoch, self.train_acc = 0, 0, None
        self.last_epoch = -1  # the last epoch trained to its end
        self.finished: str | None = None
        self.skipped = 0
        self.bad_train_before = 0  # bad training samples seen before a resume

    # ---- Starting points --------------------------------------------------------------------
    def restore(self, source: Any, step: int | None, name: str, meta: dict) -> None:
        """Continues the run saved in `source` (its newest readable step when `step` is None).

        `meta` (read before the arrays) is checked against this run's data first, so another
        class list or training set is reported as such, not as a damaged checkpoint.
        """
        self._check_data(meta, name)
        self.state, meta = source.restore(step, abstract_state=self.abstract)
        self.stopper.multimodal.load_state_dict(meta["early_stopping"])
        if meta.get("vision_only_pretraining") is not None:
            self.stopper.load_vision_only_state(meta["vision_only_pretraining"])
        self.start_epoch, self.start_step_in_epoch = meta["epoch"], meta["step_in_epoch"]
        self.train_loader.close()  # on at the batch the saved state comes to
        start = self.start_epoch * self.steps_per_epoch + self.start_step_in_epoch
        self.train_loader = self.c.train_loader(start_batch=start)  # its bad-image count too
        self.train_iter = iter(self.train_loader)
        self.last_epoch = self.start_epoch - 1
        self.train_acc = meta.get("train_accumulator")
        # Another run's end (load_from) or a completed run given more epochs trains on.
        self.finished = meta.get("finished") if source is self.ckpt else None
        if self.finished == "completed" and meta["epoch"] < self.cfg.training.num_epochs:
            self.finished = None
        counters = meta.get("counters", {})
        self.skipped = counters.get("skipped_nonfinite_steps", 0)
        self.bad_train_before = counters.get("bad_images_train", 0)
        self.seconds_before = counters.get("run_seconds", 0.0)
        log.info(
            "resumed from %s at epoch %d, step %d of %d in the epoch (global step %d)",
            name,
            self.start_epoch,
            self.start_step_in_epoch,
            self.steps_per_epoch,
            int(self.state["step"]),
        )

    def init_weights(self, path: str) -> None:
        """Takes parameters and batch statistics of another run (fine-tuning); nothing else."""
        weights, meta = restore_weights_only(
            path, {k: self.abstract[k] for k in ("params", "batch_stats")}
        )
        self._check_data(meta, path, rows=False)
        self.state = {**self.state, **weights}
        log.info("initialised weights from %s", path)

    def _check_data(self, meta: dict, source: str, rows: bool = True) -> None:
        data = self.c.data
        if meta["classes"] != data.classes:
            raise UserError(
                f"checkpoint {source} was trained on classes {meta['classes']}, but this run's "
                f"data has {data.classes}: use data filters that give the same classes, or start "
                "a fresh run"
            )
        stored = meta.get("train_rows")
        if rows and stored is not None and stored != len(data.train.labels):
            raise UserError(
                f"checkpoint {source} was trained on {stored} training rows, this run's data has "
                f"{len(data.train.labels)}: the metadata or its filters changed; resume with the "
                "same data, or start a fresh run"
            )

    # ---- Checkpoints --------------------------------------------------------------------------
    @property
    def bad_train(self) -> int:
        return self.bad_train_before + self.train_loader.bad_images

    def _meta(self, epoch: int, step_in_epoch: int, acc: ClassificationMetrics | None) -> dict:
        return {
            **self.c.meta(),
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "early_stopping": self.stopper.multimodal.state_dict(),
            "vision_only_pretraining": self.stopper.vision_only_state(),
            "vision_only_model": self.stopper.is_vision_only(epoch - (step_in_epoch == 0)),
            "frozen": epoch < self.cfg.training.n_warmup_epochs,
            "finished": self.finished,
            "counters": {
                "skipped_nonfinite_steps": self.skipped,
                "bad_images_train": self.bad_train,
                "run_seconds": self.run_seconds(),
            },
            "train_accumulator": None if acc is None else acc.state_dict(),
            "dermjax_version": dermjax.__version__,
            "wandb_run_id": self.tracker.wandb_run_id,
        }

    def run_seconds(self) -> float:
        """Wall time of the run over all its launches (each counted up to its last save)."""
        return round(self.seconds_before + time.time() - self.started_at, 1)

    def _save(self, kind: str, meta: dict) -> None:
        step = int(self.state["step"])
        self.ckpt.save(step, state=self.state, meta=meta, kind=kind)

    # ---- Evaluation ---------------------------------------------------------------------------
    def controls(self, epoch: int) -> dict[str, jax.Array]:
        """The per-epoch values (aux weights, epoch masks) the steps take, on the devices."""
        return parallel.replicate(self.schedule.controls(epoch), self.c.mesh)

    def evaluate(
        self, records: pipeline.Records, split: str, *, epoch: int = 0, vision_only: bool = False
    ) -> dict[str, Any]:
        """One pass of the current state over `records` (`Evaluator.evaluate`); `epoch` selects
        the aux weights and epoch masks, `vision_only` the pre-training path."""
        return self.evaluator.evaluate(
            self.state, records, split, self.controls(epoch), vision_only=vision_only
        )

    # ---- Training -----------------------------------------------------------------------------
    def _consume(self, pending: tuple, progress: Progress) -> None:
        """Reads a finished step's flag and loss one step late, so the device never waits on the
        host (its metrics are already accumulated on the devices)."""
        out, shown, step = pending
        if not bool(out["finite"]):
            if self.cfg.training.on_nonfinite == "error":
                raise NonFiniteLossError(step, float(out["loss"]))
            log.warning(
                "non-finite loss or gradients at step %d: batch skipped, parameters unchanged",
                step,
            )
            self.skipped += 1
            return
        progress.update(shown, loss=float(out["loss"]))

    def train_epoch(self, epoch: int, guard: PreemptionGuard) -> dict[str, Any] | None:
        """Trains one epoch; returns its record, or None if preemption stopped it (saved)."""
        cfg = self.cfg
        warm = epoch < cfg.training.n_warmup_epochs
        vision_only = self.stopper.is_vision_only(epoch)
        lr_backbone, lr_head = epoch_learning_rates(cfg, epoch)
        state = dict(self.state)
        state["opt_backbone"] = optim.set_learning_rate(state["opt_backbone"], lr_backbone)
        state["opt_head"] = optim.set_learning_rate(state["opt_head"], lr_head)
        self.state = state
        step_fn, controls = self.train_steps[warm, vision_only], self.controls(epoch)
        first, start = 0, None
        if epoch == self.start_epoch:
            first = self.start_step_in_epoch
            if self.train_acc is not None:
                start = ClassificationMetrics.from_state_dict(self.num_classes, self.train_acc)
        totals = device_totals(self.num_classes, self.c.mesh, start)
        progress = Progress(
            self.steps_per_epoch * cfg.training.batch_size,
            desc=f"epoch {epoch + 1}/{cfg.training.num_epochs}"
            + (" (warm-up)" if warm else "")
            + (" (vision-only)" if vision_only else ""),
            every_updates=cfg.training.log_every_steps,
            enabled=self.is_main,
        )
        pending, skipped_before = None, self.skipped
        for i in range(first, self.steps_per_epoch):
            global_step = epoch * self.steps_per_epoch + i
            batch = next(self.train_iter)
            shown = shown_samples(batch)
            key = jax.random.fold_in(self.c.step_key, global_step)
            self.state, out = step_fn(
                self.state, parallel.shard_batch(batch, self.c.mesh), key, controls
            )
            totals = accumulate(totals, out)
            if pending is not None:
                self._consume(pending, progress)
            pending = (out, shown, global_step)
            if guard.should_stop(global_step + 1):
                self._consume(pending, progress)
                self._save(
                    "preempt", self._meta(epoch, i + 1, fetch_totals(self.num_classes, totals))
                )
                return None
        if pending is not None:
            self._consume(pending, progress)
        progress.close()
        counted = fetch_totals(self.num_classes, totals)
        steps_run = self.steps_per_epoch - first
        if not counted.matrix.any() and self.skipped - skipped_before < steps_run:
            self._no_image_was_read(epoch)  # (every step skipped as non-finite: not the images)
        train = counted.compute()
        no_aux = vision_only or not cfg.multimodal_classifier.use_auxiliary_loss
        aux_vision, aux_text = (0.0, 0.0) if no_aux else self.schedule.aux_weights(epoch)
        return {
            "epoch": epoch,
            "frozen_backbone": warm,
            "stage": self.schedule.stage(epoch, cfg.masking.mask_complete)
            if not vision_only
            else "vision_only_pretraining",
            "aux/vision_weight": aux_vision,
            "aux/text_weight": aux_text,
            "lr/backbone": lr_backbone,
            "lr/head": lr_head,
            **{f"train/{k}": train[k] for k in SUMMARY_KEYS},
        }

    def _no_image_was_read(self, epoch: int) -> None:
        """An epoch without one readable image trains nothing: stop before it counts as done."""
        paths = data_paths(self.cfg)
        raise DataError(
            f"epoch {epoch + 1}: none of the training images could be read ({self.bad_train} "
            f"unreadable, listed in {os.path.join(self.c.run_dir, 'bad_images.txt')}); check that "
            f"the images are under {paths.img_prefix} (data.local_root / data.gcs_root, "
            "data.img_prefix), then re-run the same command: it resumes before this epoch"
        )

    def train(self) -> bool:
        """The epoch loop; returns False when preempted (after saving), True when finished."""
        cfg = self.cfg
        if self.finished == "early_stopped":
            return True
        if self.finished is None and self.start_epoch >= cfg.training.num_epochs:
            self.finished = "completed"  # a budget lowered to the epochs trained: done here
            self._save("final", self._meta(self.start_epoch, 0, None))
            self.ckpt.wait()
            return True
        with PreemptionGuard() as guard:
            for epoch in range(self.start_epoch, cfg.training.num_epochs):
                record = self.train_epoch(epoch, guard)
                if record is None:
                    return False
                self.last_epoch = epoch
                step = int(self.state["step"])
                improved = stop = False
                last = epoch + 1 == cfg.training.num_epochs
                due = last or (epoch + 1) % cfg.training.validation_interval == 0
                vision_only = self.stopper.is_vision_only(epoch)
                if self.c.data.val is not None and due:
                    val = self.evaluate(
                        self.c.data.val, "val", epoch=epoch, vision_only=vision_only
                    )
                    record.update({f"val/{k}": val[k] for k in SUMMARY_KEYS})
                    improved, stop = self.stopper.update(record[cfg.training.monitor], epoch=epoch)
                    if vision_only and not self.stopper.is_vision_only(epoch + 1):
                        log.info("vision-only pre-training ends after epoch %d", epoch)
                    self.tracker.log_confusion_matrix(
                        "val", np.asarray(val["confusion_matrix"]), self.c.data.classes, step=step
                    )
                self.tracker.log("epoch", step, record)
                floats = {k: v for k, v in record.items() if isinstance(v, float)}
                log.info(
                    "epoch %d: %s", epoch, ", ".join(f"{k}={v:.4g}" for k, v in floats.items())
                )
                if stop or last:
                    self.finished = "early_stopped" if stop else "completed"
                meta = self._meta(epoch + 1, 0, None)
                if improved:
                    self._save("best", meta)
                if self.ckpt.should_save_periodic(epoch):
                    self._save("periodic", meta)
                elif stop or last:
                    self._save("final", meta)  # the finished run is always on disk
                if stop:
                    log.info(
                        "early stopping after epoch %d: %s stalled", epoch, cfg.training.monitor
                    )
                    break
            self.ckpt.wait()  # under the guard: a SIGTERM now must not tear the last save
            if guard.requested and jax.process_count() == 1:
                return False  # asked to stop at the end: the run is saved, a re-run evaluates
        return True

    def test(self) -> dict[str, Any]:
        """Evaluates the best checkpoint (or the last state) on val and test; writes summary.

        Without a test split (None or empty) the "test" results are the validation split's,
        logged and named by the summary's `test_split`. The model is evaluated with the aux
        weights, epoch masks and forward path (vision-only or not) of the epoch it was saved in.
        """
        self.ckpt.wait()
        trained_steps = int(self.state["step"])
        best = self.ckpt.best()
        epoch, vision_only = self.last_epoch, self.stopper.is_vision_only(self.last_epoch)
        if best is not None:
            self.state, meta = self.ckpt.restore(best, abstract_state=self.abstract)
            epoch = meta["epoch"] - 1
            vision_only = meta.get("vision_only_model", False)
        data = self.c.data
        test_split = "test" if data.test is not None and len(data.test.labels) else None
        if test_split is None and data.val is not None:
            test_split = "val"
            log.warning("no test split: the final test evaluation uses the validation split")
        kw = {"epoch": max(epoch, 0), "vision_only": vision_only}
        evaluated = {}
        if data.val is not None:
            evaluated["val"] = self.evaluate(data.val, "val", **kw)
        if test_split == "test":
            evaluated["test"] = self.evaluate(data.test, "test", **kw)
        elif test_split == "val":
            evaluated["test"] = evaluated["val"]
        self.evaluator.close()
        results: dict[str, Any] = {}
        bad = {"train": self.bad_train}
        for split, m in evaluated.items():
            results[split] = {k: m[k] for k in SUMMARY_KEYS}
            bad[split] = m["bad_images"]
            if split == "test":
                results["baseline"] = {"majority_accuracy": m["majority_accuracy"]}
            self.tracker.log_confusion_matrix(
                f"final/{split}",
                np.asarray(m["confusion_matrix"]),
                self.c.data.classes,
                step=trained_steps,
            )
        final = {  # a name of its own: at the last epoch's step, "val/..." would overwrite it
            f"final/{split}/{k}": v
            for split, m in results.items()
            for k, v in m.items()
            if isinstance(v, float)
        }
        self.tracker.log("final", trained_steps, final)
        results.update(
            classes=self.c.data.classes,
            finished=self.finished,  # "completed" or "early_stopped"
            epochs_trained=self.last_epoch + 1,
            best_epoch=self.stopper.best_epoch,
            best_step=best,
            test_split=test_split,
            trained_steps=trained_steps,
            skipped_nonfinite_steps=self.skipped,
            bad_images=bad,
            wall_time_s=round(time.time() - self.started_at, 1),  # this launch
            run_time_s=self.run_seconds(),
        )
        self.tracker.summary(results)
        return results

    def close(self) -> None:
        """Stops the input workers, completes checkpoint writes and closes the trackers."""
        pipeline.close_iterator(self.train_iter)
        self.evaluator.close()
        self.ckpt.wait()
        self.tracker.close()
