"""The epoch loop of one run: train, validate, early-stop, checkpoint, and the final evaluation.

Optimisation follows the original: two optimizer groups with learning rates set once per epoch
(cosine after the warm-up), the whole backbone frozen for the first `n_warmup_epochs`, then the
`unfreeze_layers` rule; validation every `validation_interval` epochs with early stopping on
`training.monitor`. Unlike the original, the best model is evaluated on the test split at the end.
Everything needed to continue (state, data position, early-stopping state, the partial epoch's
metrics, counters) is checkpointed, so a resumed run is the same run. What the loop works with
is composed from the config by `dermjax.experiment`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
import numpy as np

import dermjax
from dermjax import parallel
from dermjax.data import pipeline
from dermjax.errors import UserError
from dermjax.experiment import Components, epoch_learning_rates
from dermjax.tracking import Progress, Tracker
from dermjax.train import optim
from dermjax.train.checkpoint import Checkpointer, restore_weights_only
from dermjax.train.early_stopping import EarlyStopping
from dermjax.train.metrics import ClassificationMetrics
from dermjax.train.preemption import NonFiniteLossError, PreemptionGuard
from dermjax.train.step import make_eval_step, make_train_step

log = logging.getLogger(__name__)

SUMMARY_KEYS = ("accuracy", "macro_f1", "balanced_accuracy", "loss", "per_class_recall")


class Trainer:
    """Runs the epochs of one composed run; `restore`/`init_weights` pick its starting point."""

    def __init__(self, c: Components, ckpt: Checkpointer, tracker: Tracker):
        self.c, self.cfg, self.ckpt, self.tracker = c, c.cfg, ckpt, tracker
        self.is_main = jax.process_index() == 0
        self.num_classes = len(c.data.classes)
        self.state = c.state
        self.abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state
        )
        args = (c.parts, c.spec, c.tx_backbone, c.tx_head)
        self.warmup_step = make_train_step(*args, warmup=True)
        self.main_step = make_train_step(*args, warmup=False)
        self.eval_step = make_eval_step(c.parts, c.spec)
        self.train_loader = c.train_loader()
        self.steps_per_epoch = self.train_loader.steps_per_epoch
        self.train_iter = iter(self.train_loader)
        t = self.cfg.training
        self.stopper = EarlyStopping(t.monitor, ckpt.monitor_mode, t.patience)
        self.start_epoch, self.start_step_in_epoch, self.train_acc = 0, 0, None
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
        self.state, meta = source.restore(
            step, abstract_state=self.abstract, data_iter=self.train_iter
        )
        self.stopper.load_state_dict(meta["early_stopping"])
        self.start_epoch, self.start_step_in_epoch = meta["epoch"], meta["step_in_epoch"]
        self.train_acc = meta.get("train_accumulator")
        # Another run's end (load_from) or a completed run given more epochs trains on.
        self.finished = meta.get("finished") if source is self.ckpt else None
        if self.finished == "completed" and meta["epoch"] < self.cfg.training.num_epochs:
            self.finished = None
        counters = meta.get("counters", {})
        self.skipped = counters.get("skipped_nonfinite_steps", 0)
        self.bad_train_before = counters.get("bad_images_train", 0)
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
            "early_stopping": self.stopper.state_dict(),
            "frozen": epoch < self.cfg.training.n_warmup_epochs,
            "finished": self.finished,
            "counters": {
                "skipped_nonfinite_steps": self.skipped,
                "bad_images_train": self.bad_train,
            },
            "train_accumulator": None
            if acc is None
            else {"matrix": acc.matrix.tolist(), "batch_losses": acc.batch_losses},
            "dermjax_version": dermjax.__version__,
        }

    def _save(self, kind: str, meta: dict) -> None:
        step = int(self.state["step"])
        self.ckpt.save(step, state=self.state, data_iter=self.train_iter, meta=meta, kind=kind)

    # ---- Evaluation ---------------------------------------------------------------------------
    def evaluate(self, records: pipeline.Records, split: str) -> dict[str, Any]:
        """One pass over `records` (every sample once); metrics over the readable samples.

        Adds `bad_images` (samples skipped as unreadable) and `majority_accuracy` (the train
        split's majority class on the same samples the metrics count).
        """
        loader = self.c.eval_loader(records, split)
        metrics = ClassificationMetrics(self.num_classes)
        progress = Progress(len(records.labels), desc=split, enabled=self.is_main)
        it = iter(loader)
        try:
            for batch in it:
                batch = parallel.shard_batch(batch, self.c.mesh)
                out = self.eval_step(self.state, batch)
                valid = parallel.to_host(batch["valid"])  # global views, also on several hosts
                labels, preds = parallel.to_host(batch["label"]), parallel.to_host(out["preds"])
                metrics.update(labels, preds, valid=valid, loss=out["loss"])
                progress.update(int(valid.sum()))
        finally:
            pipeline.close_iterator(it)
        progress.close()
        result = metrics.compute()
        support = metrics.matrix.sum(axis=1)
        result["bad_images"] = loader.bad_images
        result["majority_accuracy"] = float(
            support[self.c.data.majority_class] / max(1, support.sum())
        )
        return result

    # ---- Training -----------------------------------------------------------------------------
    def _consume(self, pending: tuple, acc: ClassificationMetrics, progress: Progress) -> None:
        """Reads a finished step's outputs one step late, so the device never waits on the host."""
        out, batch, step = pending
        if not bool(out["finite"]):
            if self.cfg.training.on_nonfinite == "error":
                raise NonFiniteLossError(step, float(out["loss"]))
            log.warning(
                "non-finite loss or gradients at step %d: batch skipped, parameters unchanged",
                step,
            )
            self.skipped += 1
            return
        valid = parallel.to_host(batch["valid"])
        preds = parallel.to_host(out["preds"])
        acc.update(parallel.to_host(batch["label"]), preds, valid=valid, loss=out["loss"])
        progress.update(int(valid.sum()), loss=float(out["loss"]))

    def train_epoch(self, epoch: int, guard: PreemptionGuard) -> dict[str, Any] | None:
        """Trains one epoch; returns its record, or None if preemption stopped it (saved)."""
        cfg = self.cfg
        warm = epoch < cfg.training.n_warmup_epochs
        lr_backbone, lr_head = epoch_learning_rates(cfg, epoch)
        state = dict(self.state)
        state["opt_backbone"] = optim.set_learning_rate(state["opt_backbone"], lr_backbone)
        state["opt_head"] = optim.set_learning_rate(state["opt_head"], lr_head)
        self.state = state
        step_fn = self.warmup_step if warm else self.main_step
        acc = ClassificationMetrics(self.num_classes)
        first = 0
        if epoch == self.start_epoch:
            first = self.start_step_in_epoch
            if self.train_acc is not None:
                acc.matrix[:] = np.asarray(self.train_acc["matrix"])
                acc.batch_losses = list(self.train_acc["batch_losses"])
        progress = Progress(
            self.steps_per_epoch * cfg.training.batch_size,
            desc=f"epoch {epoch + 1}/{cfg.training.num_epochs}" + (" (warm-up)" if warm else ""),
            every_updates=cfg.training.log_every_steps,
            enabled=self.is_main,
        )
        pending = None
        for i in range(first, self.steps_per_epoch):
            global_step = epoch * self.steps_per_epoch + i
            batch = parallel.shard_batch(next(self.train_iter), self.c.mesh)
            key = jax.random.fold_in(self.c.step_key, global_step)
            self.state, out = step_fn(self.state, batch, key)
            if pending is not None:
                self._consume(pending, acc, progress)
            pending = (out, batch, global_step)
            if guard.should_stop(global_step):
                self._consume(pending, acc, progress)
                self._save("preempt", self._meta(epoch, i + 1, acc))
                return None
        if pending is not None:
            self._consume(pending, acc, progress)
        progress.close()
        train = acc.compute()
        return {
            "epoch": epoch,
            "frozen_backbone": warm,
            "lr/backbone": lr_backbone,
            "lr/head": lr_head,
            **{f"train/{k}": train[k] for k in SUMMARY_KEYS},
        }

    def train(self) -> bool:
        """The epoch loop; returns False when preempted (after saving), True when finished."""
        cfg = self.cfg
        if self.finished == "early_stopped":
            return True
        with PreemptionGuard() as guard:
            for epoch in range(self.start_epoch, cfg.training.num_epochs):
                record = self.train_epoch(epoch, guard)
                if record is None:
                    return False
                step = int(self.state["step"])
                improved = stop = False
                due = (epoch + 1) % cfg.training.validation_interval == 0
                if self.c.data.val is not None and due:
                    val = self.evaluate(self.c.data.val, "val")
                    record.update({f"val/{k}": val[k] for k in SUMMARY_KEYS})
                    improved, stop = self.stopper.update(record[cfg.training.monitor], epoch=epoch)
                    self.tracker.log_confusion_matrix(
                        "val", np.asarray(val["confusion_matrix"]), self.c.data.classes, step=step
                    )
                self.tracker.log("epoch", step, record)
                floats = {k: v for k, v in record.items() if isinstance(v, float)}
                log.info(
                    "epoch %d: %s", epoch, ", ".join(f"{k}={v:.4g}" for k, v in floats.items())
                )
                last = epoch + 1 == cfg.training.num_epochs
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
                    return True
        return True

    def test(self, started_at: float) -> dict[str, Any]:
        """Evaluates the best checkpoint (or the last state) on val and test; writes summary."""
        self.ckpt.wait()
        trained_steps = int(self.state["step"])
        best = self.ckpt.best()
        if best is not None:
            self.state, _ = self.ckpt.restore(best, abstract_state=self.abstract, data_iter=None)
        results: dict[str, Any] = {}
        bad = {"train": self.bad_train}
        for split, records in (("val", self.c.data.val), ("test", self.c.data.test)):
            if records is None:
                continue
            m = self.evaluate(records, split)
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
        final = {
            f"{split}/{k}": v
            for split, m in results.items()
            for k, v in m.items()
            if isinstance(v, float)
        }
        self.tracker.log("final", trained_steps, final)
        results.update(
            classes=self.c.data.classes,
            best_epoch=self.stopper.best_epoch,
            best_step=best,
            trained_steps=trained_steps,
            skipped_nonfinite_steps=self.skipped,
            bad_images=bad,
            wall_time_s=round(time.time() - started_at, 1),
        )
        self.tracker.summary(results)
        return results

    def close(self) -> None:
        """Stops the input workers, completes checkpoint writes and closes the trackers."""
        pipeline.close_iterator(self.train_iter)
        self.ckpt.wait()
        self.tracker.close()
