"""The training run: data, mesh, model, optimizers, resume, epochs, validation, test.

Optimisation follows the original (ORIGINAL_WORKFLOW.md §10): two optimizer groups, learning
rates set once per epoch (cosine after warm-up), the whole backbone frozen for the first
`n_warmup_epochs`, then the `unfreeze_layers` rule; validation every `validation_interval` epochs
with early stopping on `training.monitor`; and, unlike the original, a final test evaluation of
the best model. Everything needed to continue (state, data position, early-stopping state, the
partial epoch's metrics) is checkpointed, so a resumed run is the same run.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import config_dict

import dermjax
from dermjax import parallel
from dermjax.data import cache as prepared
from dermjax.data import images, pipeline
from dermjax.data.augment import AugmentSpec
from dermjax.data.setup import PreparedData, cache_plan, prepare_data
from dermjax.models import registry
from dermjax.models.classifier import DermClassifier, build_model
from dermjax.models.losses import LossSpec
from dermjax.tracking import Progress, Tracker
from dermjax.train import optim
from dermjax.train.checkpoint import Checkpointer, resolve_load_from, restore_weights_only
from dermjax.train.early_stopping import EarlyStopping
from dermjax.train.masking import MaskSpec
from dermjax.train.metrics import ClassificationMetrics
from dermjax.train.preemption import NonFiniteLossError, PreemptionGuard
from dermjax.train.step import StepSpec, make_eval_step, make_train_step, split_model

log = logging.getLogger(__name__)

SUMMARY_KEYS = ("accuracy", "macro_f1", "balanced_accuracy", "loss", "per_class_recall")


def _frozen_prefixes(labels: Any) -> list[tuple]:
    """Model paths of frozen parameters' modules, e.g. ('backbone', 'layer1', 0, 'bn1')."""
    flat = jax.tree_util.tree_flatten_with_path(labels)[0]
    return [
        ("backbone", *(getattr(k, "key", getattr(k, "idx", None)) for k in path[:-1]))
        for path, label in flat
        if label == "frozen"
    ]


def _group_tx(opt_cfg: config_dict.ConfigDict):
    return optim.make_group_tx(
        opt_cfg.name,
        learning_rate=opt_cfg.learning_rate,
        weight_decay=opt_cfg.weight_decay,
        betas=tuple(opt_cfg.betas),
        eps=opt_cfg.eps,
        momentum=opt_cfg.momentum,
    )


def init_training(cfg: config_dict.ConfigDict, model: DermClassifier):
    """Splits `model` for the jitted steps and builds both optimizers and the train state.

    Returns (parts, state, tx_backbone, tx_head); the backbone optimizer only touches the
    parameters `vision_model.unfreeze_layers` leaves trainable.
    """
    v = cfg.vision_model
    labels = registry.param_labels(model.backbone, v.name, v.unfreeze_layers)
    labels = nnx.to_pure_dict(labels) if isinstance(labels, nnx.State) else labels
    parts, params, batch_stats = split_model(
        model, _frozen_prefixes(labels), update_frozen_bn_stats=cfg.training.update_frozen_bn_stats
    )
    tx_backbone = optim.masked_tx(_group_tx(cfg.optimizer.vision_model), labels)
    tx_head = _group_tx(cfg.optimizer.multimodal_classifier)
    state = {
        "params": params,
        "batch_stats": batch_stats,
        "opt_backbone": tx_backbone.init(params["backbone"]),
        "opt_head": tx_head.init(params["head"]),
        "step": jnp.zeros((), jnp.int32),
    }
    return parts, state, tx_backbone, tx_head


def step_spec(cfg: config_dict.ConfigDict, data_class_weights, mean, std) -> StepSpec:
    """The static description of what the steps compute, from config."""
    return StepSpec(
        augment=AugmentSpec.from_config(cfg.augmentation),
        mask=MaskSpec.from_config(cfg.masking.to_dict()),
        loss=LossSpec.from_config(cfg.multimodal_classifier.to_dict(), data_class_weights),
        mean=tuple(mean),
        std=tuple(std),
        compute_dtype=jnp.bfloat16 if cfg.training.dtype == "bfloat16" else jnp.float32,
    )


def epoch_learning_rates(cfg: config_dict.ConfigDict, epoch: int) -> tuple[float, float]:
    """(backbone, head) learning rates used during 0-based `epoch`."""
    t, s, o = cfg.training, cfg.training.scheduler, cfg.optimizer
    kw = dict(n_warmup=t.n_warmup_epochs, num_epochs=t.num_epochs, cosine=s.use_cosine_annealing)
    return (
        optim.epoch_lr(o.vision_model.learning_rate, s.vision_eta_min, epoch, **kw),
        optim.epoch_lr(
            o.multimodal_classifier.learning_rate, s.multimodal_classifier_eta_min, epoch, **kw
        ),
    )


class Trainer:
    """One run in one workdir; `run()` trains (or resumes), then evaluates val and test."""

    def __init__(self, cfg: config_dict.ConfigDict, workdir: str):
        self.cfg, self.workdir = cfg, workdir
        self.is_main = jax.process_index() == 0
        os.makedirs(workdir, exist_ok=True)

        # ---- Data ---------------------------------------------------------------------------
        self.data: PreparedData = prepare_data(cfg, workdir)
        self.num_classes = len(self.data.classes)
        aug = AugmentSpec.from_config(cfg.augmentation)
        self.train_rule = images.train_rule(aug.geometric)
        self.caches = self._open_caches()

        # ---- Mesh ---------------------------------------------------------------------------
        self.mesh = parallel.make_mesh()
        parallel.check_batch_size(cfg.training.batch_size)

        # ---- Model & optimizers -------------------------------------------------------------
        rngs = nnx.Rngs(params=cfg.data.seed, dropout=cfg.data.seed + 1)
        model = build_model(
            cfg, num_classes=self.num_classes, text_dim=self.data.text_dim, rngs=rngs
        )
        parts, state, tx_backbone, tx_head = init_training(cfg, model)
        self.state = parallel.replicate(state, self.mesh)
        self.abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state
        )
        spec = step_spec(cfg, self.data.class_weights, self.data.mean, self.data.std)
        self.warmup_step = make_train_step(parts, spec, tx_backbone, tx_head, warmup=True)
        self.main_step = make_train_step(parts, spec, tx_backbone, tx_head, warmup=False)
        self.eval_step = make_eval_step(parts, spec)

        # ---- Input pipeline -----------------------------------------------------------------
        self.train_loader = pipeline.train_loader(
            self.data.train,
            batch_size=cfg.training.batch_size,
            geometric=aug.geometric,
            seed=cfg.data.seed,
            weighted_sampling=cfg.training.weighted_sampling,
            cache=self.caches.get(self.train_rule),
            **self._loader_kwargs(),
        )
        self.steps_per_epoch = self.train_loader.steps_per_epoch
        self.train_iter = iter(self.train_loader)

        # ---- Checkpoints, early stopping, tracking ------------------------------------------
        self.ckpt_dir = cfg.output.save_dir or os.path.join(workdir, "checkpoints")
        if "://" not in self.ckpt_dir:
            self.ckpt_dir = os.path.abspath(self.ckpt_dir)  # Orbax needs absolute paths
        mode = "min" if cfg.training.monitor == "val/loss" else "max"
        self.ckpt = Checkpointer(
            self.ckpt_dir,
            save_frequency=cfg.checkpoint.save_frequency,
            keep_last=cfg.checkpoint.keep_last,
            monitor_mode=mode,
        )
        self.stopper = EarlyStopping(cfg.training.monitor, mode, cfg.training.patience)
        self.tracker = Tracker(
            cfg.output.log_dir or workdir,
            experiment_name=cfg.output.experiment_name,
            config_dict=cfg.to_dict(),
            wandb_project=cfg.output.wandb_project,
            enabled=self.is_main,
        )
        self.start_epoch, self.start_step_in_epoch, self.train_acc = 0, 0, None
        self.skipped = 0

    # ---------------------------------------------------------------------------------------------
    def _loader_kwargs(self) -> dict[str, Any]:
        t = self.cfg.training
        return dict(
            img_size=tuple(self.cfg.data.img_size),
            num_workers=t.num_workers,
            prefetch_factor=t.prefetch_factor,
            on_bad_image=self.cfg.data.on_bad_image,
            bad_image_log=os.path.join(self.workdir, "bad_images.txt"),
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
        )

    def _open_caches(self) -> dict[str, prepared.Cache]:
        if not self.cfg.data.use_cache:
            return {}
        caches = {}
        for rule, (directory, paths) in cache_plan(self.cfg, self.data).items():
            found = prepared.open_cache(directory, paths, self.cfg.data.img_size, rule)
            if found is not None:
                log.info("using prepared cache at %s", directory)
                caches[rule] = found
        return caches

    def _meta(self, epoch: int, step_in_epoch: int, acc: ClassificationMetrics | None) -> dict:
        d = self.data
        return {
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "early_stopping": self.stopper.state_dict(),
            "frozen": epoch < self.cfg.training.n_warmup_epochs,
            "classes": d.classes,
            "class_to_idx": d.class_to_idx,
            "normalization_mean": list(d.mean),
            "normalization_std": list(d.std),
            "img_size": list(self.cfg.data.img_size),
            "encoder": d.encoder_spec,
            "train_accumulator": None
            if acc is None
            else {"matrix": acc.matrix.tolist(), "batch_losses": acc.batch_losses},
            "config": self.cfg.to_dict(),
            "dermjax_version": dermjax.__version__,
        }

    def _save(self, kind: str, meta: dict) -> None:
        step = int(self.state["step"])
        self.ckpt.save(step, state=self.state, data_iter=self.train_iter, meta=meta, kind=kind)

    # ---------------------------------------------------------------------------------------------
    def resume(self) -> None:
        """Continues this workdir's latest checkpoint, else checkpoint.load_from, else init_from.

        The workdir comes first so that re-running a preempted command never goes back to
        `load_from` and overwrites the newer work.
        """
        c = self.cfg.checkpoint
        if c.auto_resume and self.ckpt.latest() is not None:
            self._restore(self.ckpt, None, self.ckpt_dir)
        elif c.load_from:
            directory, step = resolve_load_from(c.load_from)
            with Checkpointer(directory, save_frequency=1, keep_last=1) as source:
                self._restore(source, step, c.load_from)
        elif c.init_from:
            weights, meta = restore_weights_only(
                c.init_from, {k: self.abstract[k] for k in ("params", "batch_stats")}
            )
            self._check_classes(meta, c.init_from)
            self.state = {**self.state, **weights}
            log.info("initialised weights from %s", c.init_from)

    def _restore(self, source: Checkpointer, step: int | None, name: str) -> None:
        self.state, meta = source.restore(
            step, abstract_state=self.abstract, data_iter=self.train_iter
        )
        self._check_classes(meta, name)
        self.stopper.load_state_dict(meta["early_stopping"])
        self.start_epoch, self.start_step_in_epoch = meta["epoch"], meta["step_in_epoch"]
        self.train_acc = meta.get("train_accumulator")
        log.info(
            "resumed from %s at epoch %d, step %d of %d in the epoch (global step %d)",
            name,
            self.start_epoch,
            self.start_step_in_epoch,
            self.steps_per_epoch,
            int(self.state["step"]),
        )

    def _check_classes(self, meta: dict, source: str) -> None:
        if meta["classes"] != self.data.classes:
            raise ValueError(
                f"checkpoint {source} was trained on classes {meta['classes']}, "
                f"but this run's data has {self.data.classes}"
            )

    def evaluate(self, records: pipeline.Records, desc: str) -> dict[str, Any]:
        """One pass over `records` (every sample exactly once); returns the metrics dict."""
        batch_size = self.cfg.training.eval_batch_size or self.cfg.training.batch_size
        parallel.check_batch_size(batch_size, "training.eval_batch_size")
        loader = pipeline.eval_loader(
            records, batch_size=batch_size, cache=self.caches.get(images.EXACT),
            **self._loader_kwargs(),
        )  # fmt: skip
        metrics = ClassificationMetrics(self.num_classes)
        progress = Progress(len(records.labels), desc=desc, enabled=self.is_main)
        for batch in loader:
            batch = parallel.shard_batch(batch, self.mesh)
            out = self.eval_step(self.state, batch)
            valid = parallel.to_host(batch["valid"])  # global views, also on several hosts
            labels, preds = parallel.to_host(batch["label"]), parallel.to_host(out["preds"])
            metrics.update(labels, preds, valid=valid, loss=out["loss"])
            progress.update(int(valid.sum()))
        progress.close()
        return metrics.compute()

    # ---------------------------------------------------------------------------------------------
    def _consume(self, pending: tuple, acc: ClassificationMetrics, progress: Progress) -> None:
        """Reads a finished step's outputs one step late, so the device never waits on the host."""
        out, batch, step = pending
        if not bool(out["finite"]):
            if self.cfg.training.on_nonfinite == "error":
                raise NonFiniteLossError(step, float(out["loss"]))
            log.warning("non-finite loss at step %d: batch skipped, parameters unchanged", step)
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
        batch_size = cfg.training.batch_size
        progress = Progress(
            self.steps_per_epoch * batch_size,
            desc=f"epoch {epoch + 1}/{cfg.training.num_epochs}" + (" (warm-up)" if warm else ""),
            enabled=self.is_main,
        )
        base_key = jax.random.key(cfg.data.seed)
        pending = None
        for i in range(first, self.steps_per_epoch):
            global_step = epoch * self.steps_per_epoch + i
            batch = parallel.shard_batch(next(self.train_iter), self.mesh)
            key = jax.random.fold_in(base_key, global_step)
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
        with PreemptionGuard() as guard:
            for epoch in range(self.start_epoch, cfg.training.num_epochs):
                record = self.train_epoch(epoch, guard)
                if record is None:
                    return False
                improved = stop = False
                due = (epoch + 1) % cfg.training.validation_interval == 0
                if self.data.val is not None and due:
                    val = self.evaluate(self.data.val, "validation")
                    record.update({f"val/{k}": val[k] for k in SUMMARY_KEYS})
                    improved, stop = self.stopper.update(record[cfg.training.monitor], epoch=epoch)
                    self.tracker.log_confusion_matrix(
                        "val", np.asarray(val["confusion_matrix"]), self.data.classes, step=epoch
                    )
                self.tracker.log("epoch", epoch, record)
                floats = {k: v for k, v in record.items() if isinstance(v, float)}
                log.info(
                    "epoch %d: %s", epoch, ", ".join(f"{k}={v:.4g}" for k, v in floats.items())
                )
                meta = self._meta(epoch + 1, 0, None)
                if improved:
                    self._save("best", meta)
                if self.ckpt.should_save_periodic(epoch):
                    self._save("periodic", meta)
                elif stop or epoch + 1 == cfg.training.num_epochs:
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
        best = self.ckpt.best()
        if best is not None:
            self.state, _ = self.ckpt.restore(best, abstract_state=self.abstract, data_iter=None)
        results: dict[str, Any] = {"baseline": {"majority_accuracy": self.data.majority_accuracy}}
        for split, records in (("val", self.data.val), ("test", self.data.test)):
            if records is None:
                continue
            m = self.evaluate(records, split)
            results[split] = {k: m[k] for k in SUMMARY_KEYS}
            self.tracker.log_confusion_matrix(
                split, np.asarray(m["confusion_matrix"]), self.data.classes
            )
        final = {
            f"{split}/{k}": v
            for split, m in results.items()
            for k, v in m.items()
            if isinstance(v, float)
        }
        self.tracker.log("final", int(self.state["step"]), final)
        results.update(
            classes=self.data.classes,
            best_epoch=self.stopper.best_epoch,
            best_step=best,
            skipped_nonfinite_steps=self.skipped,
            bad_images=self.train_loader.bad_images,
            wall_time_s=round(time.time() - started_at, 1),
        )
        self.tracker.summary(results)
        return results

    def close(self) -> None:
        """Completes pending checkpoint writes and closes the trackers."""
        self.ckpt.close()
        self.tracker.close()


def train_and_evaluate(cfg: config_dict.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains per `cfg` in `workdir` (resuming if it holds checkpoints); returns the summary."""
    start = time.time()
    trainer = Trainer(cfg, workdir)
    try:
        trainer.resume()
        if not trainer.train():
            step = int(trainer.state["step"])
            print(
                f"Preempted: saved step {step} to {trainer.ckpt_dir}. Resume by re-running the "
                f"same command (same --workdir={workdir}).",
                flush=True,
            )
            return {"preempted": True, "step": step}
        return trainer.test(start)
    finally:
        trainer.close()
