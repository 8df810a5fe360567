"""From a validated config to the parts of a run: data, model, train state, steps and loaders.

This module and `dermjax.experiment_data` (the data side) are the only ones, with
`dermjax.runner`, which drives a run, that read the config: models, weights, data and the train
steps take explicit arguments. `compose(cfg, run_dir)` reads the data and builds everything the
epoch loop works with (`Components`).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import config_dict

from dermjax import experiment_data, parallel
from dermjax.data import cache as prepared
from dermjax.data import images, pipeline
from dermjax.models import registry
from dermjax.models.classifier import DermClassifier, build_model
from dermjax.models.fusion import MultimodalClassifier
from dermjax.models.losses import LossSpec
from dermjax.train import optim
from dermjax.train.masking import MaskSpec
from dermjax.train.schedules import EpochSchedule, WeightSchedule
from dermjax.train.step import ModelParts, StepSpec, split_model
from dermjax.weights.torchvision import resolve_weights_path

log = logging.getLogger(__name__)


# ---- Random streams ---------------------------------------------------------------------------
def rng_streams(seed: int) -> dict[str, jax.Array]:
    """Independent keys from one seed: model `params` and `dropout` init, and train `steps`.

    Each train step folds its global step into `steps`, so no step key equals an init key.
    """
    root = jax.random.key(seed)
    return {
        name: jax.random.fold_in(root, i) for i, name in enumerate(("params", "dropout", "steps"))
    }


# ---- Model, optimizers, steps -----------------------------------------------------------------
def compute_dtype(cfg: config_dict.ConfigDict) -> Any:
    return jnp.bfloat16 if cfg.training.dtype == "bfloat16" else jnp.float32


def _arguments_of(fn: Any, section: config_dict.ConfigDict) -> dict[str, Any]:
    """The fields of a config section that `fn` takes as keyword arguments (None: its default)."""
    names = inspect.signature(fn).parameters
    return {k: v for k, v in section.items() if k in names and v is not None}


def make_model(
    cfg: config_dict.ConfigDict,
    *,
    num_classes: int,
    text_dim: int,
    rngs: nnx.Rngs,
    weights_from_checkpoint: bool = False,
) -> DermClassifier:
    """Backbone (converted torchvision weights when `pretrained`) + the fusion head.

    `weights_from_checkpoint`: a checkpoint will overwrite the weights (resume, init_from), so
    the pretrained file is neither needed nor read.
    """
    v, m = cfg.vision_model, cfg.multimodal_classifier
    head = _arguments_of(MultimodalClassifier.__init__, m)
    return build_model(
        backbone=v.name,
        pretrained=v.pretrained and not weights_from_checkpoint,
        weights_path=v.weights_path,
        pooling_type=v.pooling_type,
        img_size=tuple(cfg.data.img_size),
        dtype=compute_dtype(cfg),
        head=head,
        num_classes=num_classes,
        text_dim=text_dim,
        rngs=rngs,
    )


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
    labels = registry.param_labels(model.backbone, v.name, v.unfreeze_layers, rule=v.unfreeze_rule)
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
    m, k = cfg.multimodal_classifier, cfg.masking
    return StepSpec(
        augment=experiment_data.augment_spec(cfg),
        mask=MaskSpec(
            mask_complete=k.mask_complete,
            random_enabled=k.random_mask.enabled,
            image_prob=float(k.random_mask.image_prob),
            text_prob=float(k.random_mask.text_prob),
        ),
        loss=LossSpec.create(
            **{k: m[k] for k in inspect.signature(LossSpec.create).parameters if k in m},
            data_class_weights=data_class_weights,
        ),
        mean=(0.0, 0.0, 0.0) if mean is None else tuple(mean),  # None: no Normalize, and
        std=(1.0, 1.0, 1.0) if std is None else tuple(std),  # (x - 0) / 1 is exactly x
        compute_dtype=compute_dtype(cfg),
        epoch_masking=bool(k.epoch_schedule.enabled),
        random_mask_in_eval=bool(k.random_mask.in_eval),
        text_gating=m.text_content_gating,
    )


def epoch_schedule(cfg: config_dict.ConfigDict) -> EpochSchedule:
    """Aux-weight schedules, epoch masks and the vision-only phase, evaluated per epoch.

    A modality without a configured schedule keeps a constant weight: auxiliary_<m>_loss_weight,
    else auxiliary_loss_weight, else 0.3.
    """
    m, t, es = cfg.multimodal_classifier, cfg.training, cfg.masking.epoch_schedule
    weights = {}
    for modality in ("vision", "text"):
        section = t.auxiliary_loss_schedule[modality]
        if section.schedule_type is None:
            w = m[f"auxiliary_{modality}_loss_weight"]
            w = m.auxiliary_loss_weight if w is None else w
            weights[modality] = WeightSchedule.constant(0.3 if w is None else w)
        else:
            weights[modality] = WeightSchedule(**section.to_dict())
    vo = t.vision_only_pretraining
    return EpochSchedule(
        aux_vision=weights["vision"],
        aux_text=weights["text"],
        vision_only_epochs=vo.epochs if vo.enabled else 0,
        epoch_masking=es.enabled,
        vision_mask_epochs=es.vision.mask_epochs,
        text_mask_epochs=es.text.mask_epochs,
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


# ---- The composed run -------------------------------------------------------------------------
@dataclasses.dataclass
class Components:
    """Everything the epoch loop works with, built from one config."""

    cfg: config_dict.ConfigDict
    run_dir: str
    data: experiment_data.PreparedData
    mesh: jax.sharding.Mesh
    parts: ModelParts
    state: dict
    spec: StepSpec
    tx_backbone: Any
    tx_head: Any
    caches: dict[str, prepared.Cache]
    step_key: jax.Array

    def loader_kwargs(self, split: str) -> dict[str, Any]:
        t = self.cfg.training
        return dict(
            img_size=tuple(self.cfg.data.img_size),
            num_workers=t.num_workers,
            prefetch_factor=t.prefetch_factor,
            on_bad_image=self.cfg.data.on_bad_image,
            bad_image_log=os.path.join(self.run_dir, "bad_images.txt"),
            split=split,
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
        )

    def train_loader(self, start_batch: int = 0) -> pipeline.Loader:
        """The training batches from global batch number `start_batch` on."""
        aug = self.spec.augment
        return pipeline.train_loader(
            self.data.train,
            start_batch=start_batch,
            batch_size=self.cfg.training.batch_size,
            geometric=aug.geometric,
            seed=self.cfg.data.seed,
            weighted_sampling=self.cfg.training.weighted_sampling,
            cache=self.caches.get(images.train_rule(aug.geometric)),
            **self.loader_kwargs("train"),
        )

    def eval_loader(
        self, records: pipeline.Records, split: str, *, repeat: bool = False
    ) -> pipeline.Loader:
        t = self.cfg.training
        return pipeline.eval_loader(
            records,
            batch_size=t.eval_batch_size or t.batch_size,
            cache=self.caches.get(images.EXACT),
            repeat=repeat,
            **self.loader_kwargs(split),
        )

    def meta(self) -> dict[str, Any]:
        """What every checkpoint records about the run besides the arrays."""
        d = self.data
        return {
            "classes": d.classes,
            "class_to_idx": d.class_to_idx,
            "train_rows": len(d.train.labels),
            "normalization_mean": None if d.mean is None else list(d.mean),
            "normalization_std": None if d.std is None else list(d.std),
            "img_size": list(self.cfg.data.img_size),
            "encoder": d.encoder_spec,
            "config": self.cfg.to_dict(),
        }


def compose(
    cfg: config_dict.ConfigDict, run_dir: str, *, weights_from_checkpoint: bool = False
) -> Components:
    """Reads the data and builds mesh, model, train state and step spec for one run.

    `weights_from_checkpoint`: the run restores its weights from a checkpoint (see make_model).
    """
    if cfg.vision_model.pretrained and not weights_from_checkpoint:  # missing: say so before
        resolve_weights_path(cfg.vision_model.name, cfg.vision_model.weights_path)  # the data
    data = experiment_data.load_data(cfg, run_dir)
    mesh = parallel.make_mesh()
    keys = rng_streams(cfg.data.seed)
    rngs = nnx.Rngs(params=keys["params"], dropout=keys["dropout"])
    model = make_model(
        cfg,
        num_classes=len(data.classes),
        text_dim=data.text_dim,
        rngs=rngs,
        weights_from_checkpoint=weights_from_checkpoint,
    )
    parts, state, tx_backbone, tx_head = init_training(cfg, model)
    return Components(
        cfg=cfg,
        run_dir=run_dir,
        data=data,
        mesh=mesh,
        parts=parts,
        state=parallel.place_state(state, mesh, shard_params=cfg.training.shard_params),
        spec=step_spec(cfg, data.class_weights, data.mean, data.std),
        tx_backbone=tx_backbone,
        tx_head=tx_head,
        caches=experiment_data.open_caches(cfg, data),
        step_key=keys["steps"],
    )
