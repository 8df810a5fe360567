"""The training run, read top to bottom: data, mesh, model, optimizers, resume, epochs, test.

Optimisation follows the original (ORIGINAL_WORKFLOW.md §10): two optimizer groups, learning
rates set once per epoch (cosine after warm-up), the whole backbone frozen for the first
`n_warmup_epochs`, then the `unfreeze_layers` rule; validation every `validation_interval` epochs
with early stopping on `training.monitor`; and, unlike the original, a final test evaluation of
the best model.
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
from dermjax.data import pipeline
from dermjax.data.augment import AugmentSpec
from dermjax.data.setup import PreparedData, prepare_data
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


# ------------------------------------------------------------------------------------------------
# Model and optimizers
# ------------------------------------------------------------------------------------------------
def _load_pretrained(cfg: config_dict.ConfigDict, model: DermClassifier) -> None:
    from dermjax.weights import torchvision as tv_weights

    path = tv_weights.resolve_weights_path(cfg.vision_model.name, cfg.vision_model.weights_path)
    tv_weights.load_converted(model.backbone, path, drop_head=True)
    log.info("loaded pretrained %s weights from %s", cfg.vision_model.name, path)


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


def _epoch_lrs(cfg: config_dict.ConfigDict, epoch: int) -> tuple[float, float]:
    t, s, o = cfg.training, cfg.training.scheduler, cfg.optimizer
    kw = dict(n_warmup=t.n_warmup_epochs, num_epochs=t.num_epochs, cosine=s.use_cosine_annealing)
    return (
        optim.epoch_lr(o.vision_model.learning_rate, s.vision_eta_min, epoch, **kw),
        optim.epoch_lr(
            o.multimodal_classifier.learning_rate, s.multimodal_classifier_eta_min, epoch, **kw
        ),
    )


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------
def evaluate(eval_step, state, records: pipeline.Records, cfg, mesh, num_classes, desc: str):
    """One pass over `records` (every sample once); returns the metrics dict."""
    batch_size = parallel.check_batch_size(
        cfg.training.eval_batch_size or cfg.training.batch_size, "training.eval_batch_size"
    )
    loader = pipeline.eval_loader(
        records,
        batch_size=batch_size,
        img_size=tuple(cfg.data.img_size),
        num_workers=cfg.training.num_workers,
        prefetch_factor=cfg.training.prefetch_factor,
        on_bad_image=cfg.data.on_bad_image,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )
    metrics = ClassificationMetrics(num_classes)
    progress = Progress(len(records.labels), desc=desc, enabled=jax.process_index() == 0)
    for batch in loader:
        out = eval_step(state, parallel.shard_batch(batch, mesh))
        valid = batch["valid"]
        metrics.update(
            batch["label"], parallel.to_host(out["preds"]), valid=valid, loss=out["loss"]
        )
        progress.update(int(valid.sum()))
    progress.close()
    return metrics.compute()


def _public(metrics: dict[str, Any], prefix: str) -> dict[str, Any]:
    keys = ("loss", "accuracy", "macro_f1", "balanced_accuracy", "per_class_recall")
    return {f"{prefix}/{k}": metrics[k] for k in keys if k in metrics}


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------
def train_and_evaluate(cfg: config_dict.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains per `cfg` in `workdir` (resuming if it holds checkpoints); returns the summary."""
    t_start = time.time()
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)

    # ---- Data ------------------------------------------------------------------------------
    data: PreparedData = prepare_data(cfg, workdir)
    num_classes = len(data.classes)
    aug = AugmentSpec.from_config(cfg.augmentation)

    # ---- Mesh --------------------------------------------------------------------------------
    mesh = parallel.make_mesh()
    local_batch = parallel.check_batch_size(cfg.training.batch_size)

    # ---- Model & optimizers ------------------------------------------------------------------
    rngs = nnx.Rngs(params=cfg.data.seed, dropout=cfg.data.seed + 1)
    model = build_model(cfg, num_classes=num_classes, text_dim=data.text_dim, rngs=rngs)
    if cfg.vision_model.pretrained:
        _load_pretrained(cfg, model)
    labels = registry.param_labels(
        model.backbone, cfg.vision_model.name, cfg.vision_model.unfreeze_layers
    )
    labels = labels.to_pure_dict() if isinstance(labels, nnx.State) else labels
    parts, params, batch_stats = split_model(
        model, _frozen_prefixes(labels), update_frozen_bn_stats=cfg.training.update_frozen_bn_stats
    )
    del model
    tx_backbone = optim.masked_tx(_group_tx(cfg.optimizer.vision_model), labels)
    tx_head = _group_tx(cfg.optimizer.multimodal_classifier)
    state = {
        "params": params,
        "batch_stats": batch_stats,
        "opt_backbone": tx_backbone.init(params["backbone"]),
        "opt_head": tx_head.init(params["head"]),
        "step": jnp.zeros((), jnp.int32),
    }
    spec = StepSpec(
        augment=aug,
        mask=MaskSpec.from_config(cfg.masking.to_dict()),
        loss=LossSpec.from_config(cfg.multimodal_classifier.to_dict(), data.class_weights),
        mean=data.mean,
        std=data.std,
        compute_dtype=jnp.bfloat16 if cfg.training.dtype == "bfloat16" else jnp.float32,
    )
    warmup_step = make_train_step(parts, spec, tx_backbone, tx_head, warmup=True)
    main_step = make_train_step(parts, spec, tx_backbone, tx_head, warmup=False)
    eval_step = make_eval_step(parts, spec)

    # ---- Input pipeline ----------------------------------------------------------------------
    train_loader = pipeline.train_loader(
        data.train,
        batch_size=local_batch,
        img_size=tuple(cfg.data.img_size),
        geometric=aug.geometric,
        seed=cfg.data.seed,
        weighted_sampling=cfg.training.weighted_sampling,
        num_workers=cfg.training.num_workers,
        prefetch_factor=cfg.training.prefetch_factor,
        on_bad_image=cfg.data.on_bad_image,
        bad_image_log=os.path.join(workdir, "bad_images.txt"),
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )
    steps_per_epoch = train_loader.steps_per_epoch
    if steps_per_epoch == 0:
        raise ValueError(
            f"training.batch_size={cfg.training.batch_size} exceeds the {len(data.train.labels)} "
            "training samples: no full batch can be formed"
        )
    train_iter = iter(train_loader)

    # ---- Checkpoints & resume ----------------------------------------------------------------
    ckpt_dir = cfg.output.save_dir or os.path.join(workdir, "checkpoints")
    ckpt = Checkpointer(
        ckpt_dir,
        save_frequency=cfg.checkpoint.save_frequency,
        keep_last=cfg.checkpoint.keep_last,
        monitor_mode="min" if cfg.training.monitor == "val/loss" else "max",
    )
    stopper = EarlyStopping(
        monitor=cfg.training.monitor,
        mode="min" if cfg.training.monitor == "val/loss" else "max",
        patience=cfg.training.patience,
    )
    state = parallel.replicate(state, mesh)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    start_epoch, start_step_in_epoch, train_acc = 0, 0, None
    resume_dir, resume_step = None, None
    if cfg.checkpoint.load_from:
        resume_dir, resume_step = resolve_load_from(cfg.checkpoint.load_from)
    elif cfg.checkpoint.auto_resume and ckpt.latest() is not None:
        resume_dir = ckpt_dir
    if resume_dir is not None:
        source = (
            ckpt
            if resume_dir == ckpt_dir
            else Checkpointer(
                resume_dir, save_frequency=1, keep_last=1, monitor_mode=ckpt.monitor_mode
            )
        )
        state, meta = source.restore(resume_step, abstract_state=abstract, data_iter=train_iter)
        if meta["classes"] != data.classes:
            raise ValueError(f"checkpoint {resume_dir} was trained on other classes")
        stopper.load_state_dict(meta["early_stopping"])
        start_epoch, start_step_in_epoch = meta["epoch"], meta["step_in_epoch"]
        train_acc = meta.get("train_accumulator")
        log.info(
            "resumed from %s at epoch %d, step %d", resume_dir, start_epoch, int(state["step"])
        )
    elif cfg.checkpoint.init_from:
        weights, meta = restore_weights_only(
            cfg.checkpoint.init_from, {k: abstract[k] for k in ("params", "batch_stats")}
        )
        if meta["classes"] != data.classes:
            raise ValueError(
                f"checkpoint.init_from={cfg.checkpoint.init_from} has classes {meta['classes']}, "
                f"this run has {data.classes}"
            )
        state = {**state, **weights}
        log.info("initialised weights from %s", cfg.checkpoint.init_from)

    tracker = Tracker(
        cfg.output.log_dir or workdir,
        experiment_name=cfg.output.experiment_name,
        config_dict=cfg.to_dict(),
        wandb_project=cfg.output.wandb_project,
        enabled=is_main,
    )

    def meta_for(epoch: int, step_in_epoch: int, acc: ClassificationMetrics | None) -> dict:
        return {
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "early_stopping": stopper.state_dict(),
            "frozen": epoch < cfg.training.n_warmup_epochs,
            "classes": data.classes,
            "class_to_idx": data.class_to_idx,
            "normalization_mean": list(data.mean),
            "normalization_std": list(data.std),
            "img_size": list(cfg.data.img_size),
            "encoder": data.encoder_spec,
            "train_accumulator": None
            if acc is None
            else {"matrix": acc.matrix.tolist(), "batch_losses": acc.batch_losses},
            "config": cfg.to_dict(),
            "dermjax_version": dermjax.__version__,
        }

    # ---- Train loop --------------------------------------------------------------------------
    base_key = jax.random.key(cfg.data.seed)
    skipped = 0
    stopped_early = False
    with PreemptionGuard() as guard:
        for epoch in range(start_epoch, cfg.training.num_epochs):
            warm = epoch < cfg.training.n_warmup_epochs
            lr_backbone, lr_head = _epoch_lrs(cfg, epoch)
            state["opt_backbone"] = optim.set_learning_rate(state["opt_backbone"], lr_backbone)
            state["opt_head"] = optim.set_learning_rate(state["opt_head"], lr_head)
            state = parallel.replicate(state, mesh)
            step_fn = warmup_step if warm else main_step
            acc = ClassificationMetrics(num_classes)
            if train_acc is not None:
                acc.matrix[:] = np.asarray(train_acc["matrix"])
                acc.batch_losses = list(train_acc["batch_losses"])
                train_acc = None
            first = start_step_in_epoch if epoch == start_epoch else 0
            total = steps_per_epoch * cfg.training.batch_size
            progress = Progress(
                total, desc=f"epoch {epoch + 1}/{cfg.training.num_epochs}", enabled=is_main
            )
            progress.update(first * cfg.training.batch_size)
            pending = None
            for i in range(first, steps_per_epoch):
                batch = parallel.shard_batch(next(train_iter), mesh)
                key = jax.random.fold_in(base_key, state["step"])
                state, out = step_fn(state, batch, key)
                if pending is not None:
                    skipped += _consume(pending, acc, cfg, progress)
                pending = (out, batch, epoch * steps_per_epoch + i)
                if guard.requested:
                    skipped += _consume(pending, acc, cfg, progress)
                    ckpt.save(
                        int(state["step"]),
                        state=state,
                        data_iter=train_iter,
                        meta=meta_for(epoch, i + 1, acc),
                        kind="preempt",
                    )
                    ckpt.close()
                    tracker.close()
                    print(
                        f"Preempted: saved step {int(state['step'])} to {ckpt_dir}. Resume with "
                        f"the same command (same --workdir={workdir}).",
                        flush=True,
                    )
                    return {"preempted": True, "step": int(state["step"])}
            if pending is not None:
                skipped += _consume(pending, acc, cfg, progress)
            progress.close()
            record = {
                "epoch": epoch,
                "frozen_backbone": warm,
                "lr/backbone": lr_backbone,
                "lr/head": lr_head,
                **_public(acc.compute(), "train"),
            }
            improved = False
            if data.val is not None and (epoch + 1) % cfg.training.validation_interval == 0:
                val = evaluate(eval_step, state, data.val, cfg, mesh, num_classes, "validation")
                record.update(_public(val, "val"))
                improved, stopped_early = stopper.update(record[cfg.training.monitor], epoch=epoch)
                tracker.log_confusion_matrix(
                    "val", np.asarray(val["confusion_matrix"]), data.classes
                )
            tracker.log("epoch", epoch, record)
            if is_main:
                log.info(
                    "epoch %d: %s",
                    epoch,
                    ", ".join(f"{k}={v:.4f}" for k, v in record.items() if isinstance(v, float)),
                )
            meta = meta_for(epoch + 1, 0, None)
            if improved:
                ckpt.save(
                    int(state["step"]), state=state, data_iter=train_iter, meta=meta, kind="best"
                )
            if ckpt.should_save_periodic(epoch) or stopped_early:
                ckpt.save(
                    int(state["step"]),
                    state=state,
                    data_iter=train_iter,
                    meta=meta,
                    kind="periodic",
                )
            if stopped_early:
                log.info(
                    "early stopping after epoch %d (%s did not improve)", epoch, stopper.monitor
                )
                break

    # ---- Test ----------------------------------------------------------------------------------
    ckpt.wait()
    best = ckpt.best()
    if best is not None:
        state, _ = ckpt.restore(best, abstract_state=abstract, data_iter=None)
    results = {"baseline": {"majority_accuracy": data.majority_accuracy}}
    for split, records in (("val", data.val), ("test", data.test)):
        if records is None:
            continue
        m = evaluate(eval_step, state, records, cfg, mesh, num_classes, split)
        results[split] = {k: m[k] for k in ("accuracy", "macro_f1", "balanced_accuracy", "loss")}
        results[split]["per_class_recall"] = m["per_class_recall"]
        tracker.log_confusion_matrix(split, np.asarray(m["confusion_matrix"]), data.classes)
    tracker.log("final", int(state["step"]), _flatten(results))
    results.update(
        classes=data.classes,
        best_epoch=stopper.best_epoch,
        stopped_early=stopped_early,
        skipped_nonfinite_steps=skipped,
        wall_time_s=round(time.time() - t_start, 1),
    )
    tracker.summary(results)
    ckpt.close()
    tracker.close()
    return results


def _flatten(results: dict) -> dict:
    return {
        f"{split}/{k}": v
        for split, m in results.items()
        for k, v in m.items()
        if isinstance(v, float)
    }


def _consume(pending, acc: ClassificationMetrics, cfg, progress: Progress) -> int:
    """Reads a finished step's outputs (one step behind, so the device never waits)."""
    out, batch, step = pending
    if not bool(out["finite"]):
        if cfg.training.on_nonfinite == "error":
            raise NonFiniteLossError(step, float(out["loss"]))
        log.warning("non-finite loss at step %d: batch skipped, parameters unchanged", step)
        return 1
    labels, valid = parallel.to_host(batch["label"]), parallel.to_host(batch["valid"])
    acc.update(labels, parallel.to_host(out["preds"]), valid=valid, loss=out["loss"])
    progress.update(int(valid.sum()), loss=float(out["loss"]))
    return 0
