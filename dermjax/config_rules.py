"""The field-by-field rules behind `dermjax.config.validate`.

Each `_check_*` function covers one part of the config and appends to a `_Checker`, which
collects every problem (field, bad value, what is allowed) instead of raising on the first.
Option lists come from the modules that implement them.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ml_collections import config_dict

from dermjax.data.encoders import TEXT_DTYPES, TEXT_POOLING
from dermjax.data.images import BAD_IMAGE_POLICIES
from dermjax.data.metadata import DATASETS, DERM1M_SOURCES, SPLIT_RATIO_KEYS
from dermjax.models.fusion import ACTIVATIONS, FUSION_STRATEGIES
from dermjax.models.layers import POOLING_TYPES
from dermjax.models.losses import LOSS_FNS, REDUCTIONS
from dermjax.models.registry import BACKBONES, UNFREEZE_RULES, vit_patch_size
from dermjax.train.early_stopping import MONITORS
from dermjax.train.masking import MASK_MODES
from dermjax.train.optim import OPTIMIZERS
from dermjax.train.schedules import SCHEDULE_TYPES
from dermjax.train.step import COMPUTE_DTYPES, NONFINITE_POLICIES, TEXT_GATINGS
from dermjax.weights.original import conversion_command, is_original_checkpoint


def is_int(x: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


class _Checker:
    """Collects problems instead of raising on the first."""

    def __init__(self, cfg: config_dict.ConfigDict):
        self.cfg = cfg
        self.problems: list[str] = []

    def get(self, path: str) -> Any:
        node: Any = self.cfg
        for part in path.split("."):
            node = node[part]
        return node

    def check(self, path: str, ok: Callable[[Any], bool], allowed: str, optional=False) -> Any:
        value = self.get(path)
        if value is None and optional:
            return None
        try:
            good = ok(value)
        except (TypeError, ValueError):
            good = False
        if not good:
            self.problems.append(f"{path}={value!r}: expected {allowed}")
        return value

    def choice(self, path: str, options: Sequence[str], optional=False) -> Any:
        return self.check(path, lambda v: v in options, f"one of {list(options)}", optional)

    def number(
        self, path: str, lo=None, hi=None, *, integer=False, lo_open=False, hi_open=False,
        optional=False,
    ):  # fmt: skip
        def ok(v):
            if not (is_int(v) if integer else _is_num(v)):
                return False
            if lo is not None and (v <= lo if lo_open else v < lo):
                return False
            return hi is None or (v < hi if hi_open else v <= hi)

        kind = "an integer" if integer else "a number"
        if lo is not None and hi is not None:
            bounds = f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        elif lo is not None:
            bounds = f" > {lo}" if lo_open else f" >= {lo}"
        else:
            bounds = "" if hi is None else (f" < {hi}" if hi_open else f" <= {hi}")
        extra = " or None" if optional else ""
        return self.check(path, ok, f"{kind}{bounds}{extra}", optional)

    def prob(self, path: str, optional=False):
        return self.number(path, 0.0, 1.0, optional=optional)

    def boolean(self, path: str, optional=False):
        return self.check(path, lambda v: isinstance(v, bool), "true or false", optional)

    def seq(self, path: str, item_ok, allowed: str, *, length=None, optional=False):
        def ok(v):
            if isinstance(v, str | bytes) or not isinstance(v, Sequence):
                return False
            return (length is None or len(v) == length) and all(item_ok(x) for x in v)

        return self.check(path, ok, allowed, optional)


def _check_data(c: _Checker) -> None:
    cfg = c.cfg.data
    c.boolean("data.use_local")
    c.check("data.dataset", lambda v: isinstance(v, str) and v, "a non-empty string", True)
    if cfg.dataset is None and cfg.demo:
        c.problems.append(
            "data.dataset=None: data.demo=True needs it (the folder under data.local_root that "
            "holds the demo data, e.g. demo_v1)"
        )
    elif cfg.dataset is None and not (cfg.metadata_path and cfg.img_prefix):
        c.problems.append(
            "data.dataset=None: set data.dataset, or both data.metadata_path and data.img_prefix"
        )
    c.number("data.min_samples_per_label", 1, integer=True, optional=True)
    c.seq("data.datasets", lambda x: x in DATASETS, f"a list from {list(DATASETS)}", optional=True)
    c.seq(
        "data.derm1m_sources",
        lambda x: x in DERM1M_SOURCES,
        f"a list from {list(DERM1M_SOURCES)}",
        optional=True,
    )
    c.boolean("data.has_text", optional=True)
    c.number("data.data_fraction", 0.0, 1.0, lo_open=True, optional=True)
    test = c.number("data.test_size", 0.0, 1.0, hi_open=True)  # 0: no test split
    val = c.number("data.val_size", 0.0, 1.0, hi_open=True, optional=True)  # 0/None: no val
    if _is_num(test) and _is_num(val) and test + val >= 1.0:
        c.problems.append(f"data.test_size + data.val_size = {test + val}: must be < 1")
    c.seq("data.img_size", lambda x: is_int(x) and x >= 8, "[height, width], ints >= 8", length=2)
    c.number("data.seed", 0, integer=True)
    c.choice("data.on_bad_image", BAD_IMAGE_POLICIES)
    c.boolean("data.use_cache")
    c.boolean("data.demo")
    c.number("data.demo_size", 50, integer=True)


def _check_training(c: _Checker) -> None:
    for f in ("batch_size", "prefetch_factor", "num_epochs", "patience", "validation_interval"):
        c.number(f"training.{f}", 1, integer=True)
    c.number("training.eval_batch_size", 1, integer=True, optional=True)
    c.number("training.num_workers", 0, integer=True)
    c.number("training.n_warmup_epochs", 0, integer=True)
    c.number("training.log_every_steps", 1, integer=True)
    for f in ("compute_stats", "weighted_sampling", "update_frozen_bn_stats"):
        c.boolean(f"training.{f}")
    c.choice("training.monitor", MONITORS)  # unused when data.val_size is None
    c.choice("training.on_nonfinite", NONFINITE_POLICIES)
    c.choice("training.dtype", COMPUTE_DTYPES)
    c.boolean("training.scheduler.use_cosine_annealing")
    c.number("training.scheduler.vision_eta_min", 0.0)
    c.number("training.scheduler.multimodal_classifier_eta_min", 0.0)


def _check_augmentation(c: _Checker) -> None:
    for f in ("brightness_jitter", "contrast_jitter", "saturation_jitter"):
        c.number(f"augmentation.{f}", 0.0, optional=True)
    c.number("augmentation.hue_jitter", 0.0, 0.5, optional=True)
    c.number("augmentation.rotation_degrees", 0.0, 180.0, optional=True)
    c.seq(
        "augmentation.translate",
        lambda x: _is_num(x) and 0 <= x <= 1,
        "None or two fractions in [0, 1]",
        length=2,
        optional=True,
    )
    scale = c.seq(
        "augmentation.scale", lambda x: _is_num(x) and x > 0, "None or [min, max] > 0", length=2,
        optional=True,
    )  # fmt: skip
    if scale is not None and len(scale) == 2 and all(map(_is_num, scale)) and scale[0] > scale[1]:
        c.problems.append(f"augmentation.scale={scale!r}: min must be <= max")
    for f in ("grayscale_prob", "horizontal_flip_prob", "vertical_flip_prob"):
        c.prob(f"augmentation.{f}", optional=True)


def _check_models(c: _Checker) -> None:
    name = c.choice("vision_model.name", BACKBONES)
    c.boolean("vision_model.pretrained")
    c.choice("vision_model.pooling_type", POOLING_TYPES)
    c.number("vision_model.unfreeze_layers", -1, integer=True)
    size = c.cfg.data.img_size
    sizes_ok = isinstance(size, Sequence) and all(map(is_int, size))
    patch = vit_patch_size(name) if name in BACKBONES else None
    if patch and sizes_ok and (size[0] != size[1] or size[0] % patch):
        c.problems.append(
            f"data.img_size={tuple(size)!r}: {name} needs a square size divisible by {patch}"
        )
    m = "multimodal_classifier"
    c.number(f"{m}.projection_dim", 1, integer=True)
    for f in ("image_projection_hidden", "text_projection_hidden", "final_hidden_sizes"):
        c.seq(f"{m}.{f}", lambda x: is_int(x) and x > 0, "a list of positive integers")
    for f in ("projection_activation", "final_activation"):
        c.choice(f"{m}.{f}", ACTIVATIONS)
    for f in ("projection_dropout", "final_dropout"):
        c.number(f"{m}.{f}", 0.0, 1.0, hi_open=True)
    c.number(f"{m}.text_projection_dropout", 0.0, 1.0, hi_open=True, optional=True)
    c.boolean(f"{m}.use_l2_normalization")
    c.choice(f"{m}.fusion_strategy", FUSION_STRATEGIES)
    c.boolean(f"{m}.use_auxiliary_loss")
    c.number(f"{m}.auxiliary_loss_weight", 0.0)
    c.number(f"{m}.auxiliary_vision_loss_weight", 0.0, optional=True)
    c.number(f"{m}.auxiliary_text_loss_weight", 0.0, optional=True)
    c.choice(f"{m}.loss_fn", LOSS_FNS)
    c.number(f"{m}.label_smoothing", 0.0, 1.0)
    c.boolean(f"{m}.use_class_weights_from_data")
    c.seq(
        f"{m}.class_weights", lambda x: _is_num(x) and x >= 0, "None or weights >= 0", optional=True
    )
    alpha = c.get(f"{m}.alpha")
    if not (alpha is None or (_is_num(alpha) and alpha >= 0)):
        c.seq(f"{m}.alpha", lambda x: _is_num(x) and x >= 0, "None, a number or a list >= 0")
    c.number(f"{m}.gamma", 0.0)
    c.choice(f"{m}.reduction", REDUCTIONS)


def _check_encoder(c: _Checker) -> None:
    e = c.cfg.encoder
    c.check("encoder.embedding_filename", lambda v: isinstance(v, str) and v, "a file name", True)
    c.check("encoder.model_name", lambda v: isinstance(v, str) and v, "a model name or path")
    c.number("encoder.max_length", 1, integer=True)
    c.number("encoder.batch_size", 1, integer=True)
    c.choice("encoder.dtype", TEXT_DTYPES)
    pooling = c.choice("encoder.pooling_type", TEXT_POOLING)
    output_dim = c.number("encoder.output_dim", 1, integer=True, optional=True)
    is_qwen = isinstance(e.model_name, str) and "qwen" in e.model_name.lower()
    if is_qwen and pooling != "last_token":
        c.problems.append(f"encoder.pooling_type={pooling!r}: Qwen models need 'last_token'")
    if not is_qwen and pooling == "last_token":
        c.problems.append("encoder.pooling_type='last_token': only for Qwen models")
    if not is_qwen and output_dim is not None:
        c.problems.append(
            f"encoder.output_dim={output_dim!r}: only for Qwen3 embedding models; set it to None"
        )


def _check_rest(c: _Checker) -> None:
    c.choice("masking.mask_complete", MASK_MODES, optional=True)
    c.boolean("masking.random_mask.enabled")
    c.prob("masking.random_mask.image_prob")
    c.prob("masking.random_mask.text_prob")
    _check_encoder(c)
    for group in ("vision_model", "multimodal_classifier"):
        p = f"optimizer.{group}"
        c.choice(f"{p}.name", OPTIMIZERS)
        c.number(f"{p}.learning_rate", 0.0, lo_open=True)
        c.number(f"{p}.weight_decay", 0.0)
        c.seq(f"{p}.betas", lambda x: _is_num(x) and 0 <= x < 1, "two numbers in [0, 1)", length=2)
        c.number(f"{p}.eps", 0.0, lo_open=True)
        c.number(f"{p}.momentum", 0.0, 1.0)
    c.check(
        "output.experiment_name",
        lambda v: isinstance(v, str) and v and "/" not in v,
        "a non-empty name without '/'",
    )
    c.number("checkpoint.save_frequency", 1, integer=True)
    c.number("checkpoint.keep_last", 1, integer=True)
    c.boolean("checkpoint.auto_resume")
    if c.cfg.checkpoint.load_from and c.cfg.checkpoint.init_from:
        c.problems.append("checkpoint.load_from and checkpoint.init_from: set at most one")


def _check_evaluation(c: _Checker) -> None:
    def name_ok(x: Any) -> bool:
        return isinstance(x, str) and bool(x)

    c.seq("evaluation.group_columns", name_ok, "None or a list of column names", optional=True)
    c.check("evaluation.groups_path", name_ok, "None or a file path", True)
    c.number("evaluation.n_boot", 0, integer=True)
    c.number("evaluation.min_group_size", 1, integer=True)
    c.check(
        "evaluation.top_k",
        lambda v: len(v) > 0 and all(is_int(x) and x >= 1 for x in v) and not isinstance(v, str),
        "a non-empty list of ints >= 1",
    )
    c.boolean("evaluation.after_training")


def _check_original_checkpoints(c: _Checker) -> None:
    """A .pth/.pt checkpoint source is the original's PyTorch file: say how to convert it."""
    for key in ("load_from", "init_from"):
        path = c.cfg.checkpoint[key]
        if is_original_checkpoint(path):
            c.problems.append(
                f"checkpoint.{key}={path!r}: a PyTorch checkpoint of the original workflow; "
                f"convert it once with `{conversion_command(path)}` and set checkpoint.{key} "
                "to the --out folder"
            )


def _check_split_ratios(c: _Checker) -> None:
    """data.per_dataset_split_ratios (a missing ratio counts as 0) and training.use_normalization."""
    c.boolean("training.use_normalization")
    ratios, field = c.cfg.data.per_dataset_split_ratios, "data.per_dataset_split_ratios"
    if ratios is None:
        return
    if not isinstance(ratios, Mapping) or not ratios:
        c.problems.append(f"{field}={ratios!r}: expected {{dataset: {{train, val, test}}}}")
        return
    for name, r in ratios.items():
        where = f"{field}.{name}"
        if name not in DATASETS:
            c.problems.append(f"{where}: unknown dataset; expected one of {list(DATASETS)}")
        unknown = sorted(map(str, set(r) - set(SPLIT_RATIO_KEYS))) if isinstance(r, Mapping) else []
        if not isinstance(r, Mapping) or unknown:
            named = f" ({', '.join(unknown)} is not one)" if unknown else ""
            c.problems.append(
                f"{where}={r!r}: expected a mapping of {list(SPLIT_RATIO_KEYS)}{named}"
            )
            continue
        if not all(_is_num(v) and 0 <= v <= 1 for v in r.values()):
            c.problems.append(f"{where}={dict(r)}: every ratio must be a number in [0, 1]")
        elif not 0.99 <= sum(r.values()) <= 1.01:
            c.problems.append(
                f"{where}={dict(r)}: train + val + test = {sum(r.values()):g} must be 1 (within "
                "0.01); a missing ratio counts as 0"
            )


def _check_schedules(c: _Checker) -> None:
    """Vision-only pre-training, aux-loss schedules, epoch masks, zeroing/ablation options."""
    t, m = "training", "multimodal_classifier"
    use_aux = c.cfg.multimodal_classifier.use_auxiliary_loss
    enabled = c.boolean(f"{t}.vision_only_pretraining.enabled")
    epochs = c.number(f"{t}.vision_only_pretraining.epochs", 0, integer=True)
    c.boolean(f"{t}.vision_only_pretraining.patience_ends_run")
    if enabled is True and is_int(epochs) and epochs > 0 and not use_aux:
        c.problems.append(
            f"{t}.vision_only_pretraining: it trains the aux vision head; set "
            f"{m}.use_auxiliary_loss=true or disable it"
        )
    for modality in ("vision", "text"):
        p = f"{t}.auxiliary_loss_schedule.{modality}"
        keys = ("schedule_type", "start_epoch", "end_epoch", "start_weight", "end_weight")
        missing = [k for k in keys if c.get(f"{p}.{k}") is None]
        if missing and len(missing) < len(keys):
            c.problems.append(f"{p}: set all of {list(keys)} or none (missing {missing})")
        c.choice(f"{p}.schedule_type", SCHEDULE_TYPES, optional=True)
        for k in ("start_epoch", "end_epoch"):
            c.number(f"{p}.{k}", 0, integer=True, optional=True)
        for k in ("start_weight", "end_weight"):
            c.number(f"{p}.{k}", 0.0, optional=True)
    c.boolean("masking.epoch_schedule.enabled")
    for modality in ("vision", "text"):
        c.seq(
            f"masking.epoch_schedule.{modality}.mask_epochs",
            lambda r: len(r) == 2 and all(map(is_int, r)) and 0 <= r[0] <= r[1],
            "a list of [start, end) epoch pairs with 0 <= start <= end",
        )
    c.boolean("masking.random_mask.in_eval")
    c.boolean(f"{m}.zero_masked_projections")
    c.boolean(f"{m}.vision_only_l2_normalization")
    if c.boolean(f"{m}.ablation_routing") is True and not use_aux:
        c.problems.append(
            f"{m}.ablation_routing=True: one-modality batches use the aux heads; set "
            f"{m}.use_auxiliary_loss=true"
        )
    c.choice(f"{m}.text_content_gating", TEXT_GATINGS)


def _check_unfreeze_rule(c: _Checker) -> None:
    """vision_model.unfreeze_rule: what unfreeze_layers counts (conv_count: resnet50/101 only)."""
    c.choice("vision_model.unfreeze_rule", UNFREEZE_RULES)


def _check_sharding(c: _Checker) -> None:
    """training.shard_params: parameters and optimizer states split over the devices."""
    c.boolean("training.shard_params")


def problems(cfg: config_dict.ConfigDict) -> list[str]:
    """Every invalid field of `cfg`, one line each (field, bad value, what is allowed)."""
    c = _Checker(cfg)
    for section in (_check_data, _check_training, _check_augmentation, _check_models, _check_rest):
        section(c)
    _check_split_ratios(c)
    _check_evaluation(c)
    _check_original_checkpoints(c)
    _check_schedules(c)
    _check_unfreeze_rule(c)
    _check_sharding(c)
    return c.problems
