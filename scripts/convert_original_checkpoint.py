"""Convert a trained checkpoint of the original PyTorch workflow into a dermjax checkpoint.

    python scripts/convert_original_checkpoint.py --pth runs/exp_best.pth \
        --config experiments/exp.yaml --out converted/exp

`--config` is the run's original YAML (or a dermjax .py config). The checkpoint must agree with
it: head structure (inferred from the weights' shapes), classes, class weights, backbone,
pooling and activations. Both models, the original rebuilt in PyTorch and the converted one, then
run one seeded float32 batch of images and text embeddings in eval mode; unless every logit and
aux logit agrees within 1e-4 * max(1, max|logit|), nothing is written (exit 1).

OUT/checkpoints holds one dermjax checkpoint (step 0) with the weights, BatchNorm statistics and,
when saved, both optimizers' moments; OUT/conversion.json records the checks. Its meta records
`epoch` = the .pth's epoch + 1 (the next epoch to train) and `finished: null`. Use it as

    --config.checkpoint.init_from=OUT   weights only, for fine-tuning
    --config.checkpoint.load_from=OUT   resume at that epoch: weights, moments, LR schedule,
                                        early-stopping counter; the data order restarts
    load_from with --config.training.num_epochs=<that epoch>: evaluation only

Resume requires the same config as the conversion (e.g. vision_model.pretrained as in the YAML).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # lets a plain checkout run the script without installing
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import yaml  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import config_dict  # noqa: E402

import dermjax  # noqa: E402
from dermjax import experiment  # noqa: E402
from dermjax.config import encoder_settings, load_config, validate  # noqa: E402
from dermjax.configs import from_yaml  # noqa: E402
from dermjax.data import stats  # noqa: E402
from dermjax.errors import ConfigError, UserError  # noqa: E402
from dermjax.models import registry  # noqa: E402
from dermjax.train.checkpoint import Checkpointer  # noqa: E402
from dermjax.weights import original, original_reference  # noqa: E402

log = logging.getLogger("convert_original_checkpoint")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pth", required=True, type=Path, help="the original's .pth checkpoint")
    parser.add_argument("--config", required=True, type=Path, help="the run's original YAML")
    parser.add_argument("--out", required=True, type=Path, help="new folder for the checkpoint")
    return parser.parse_args(argv)


def read_config(path: Path) -> tuple[config_dict.ConfigDict, int | None]:
    """(validated config, `multimodal_classifier.num_classes` of an original YAML, if set)."""
    if path.suffix == ".py":
        cfg = load_config(str(path))
        validate(cfg)
        return cfg, None
    cfg = from_yaml.get_config(str(path))
    head = (yaml.safe_load(path.read_text()) or {}).get("multimodal_classifier") or {}
    return cfg, head.get("num_classes")


def _norm(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_norm(v) for v in value)
    return value.lower() if isinstance(value, str) else value


def _class_weight_problems(ckpt: original.OriginalCheckpoint, m: Any) -> list[str]:
    saved = ckpt.class_weights
    uses_weights = m.loss_fn == "cross_entropy" and (
        m.class_weights is not None or m.use_class_weights_from_data
    )
    if saved is None:
        return ["the checkpoint has no class-weight buffer: cross_entropy was unweighted"] * bool(
            uses_weights
        )
    if not uses_weights:
        return [
            "the checkpoint was trained with class-weighted cross_entropy; set "
            "multimodal_classifier.loss_fn=cross_entropy with class_weights or "
            "use_class_weights_from_data"
        ]
    if m.class_weights is not None and not np.allclose(saved, np.asarray(m.class_weights)):
        return [f"multimodal_classifier.class_weights differ from the saved {saved.tolist()}"]
    return []


def config_problems(
    ckpt: original.OriginalCheckpoint,
    structure: original.HeadStructure,
    cfg: config_dict.ConfigDict,
    yaml_num_classes: int | None = None,
) -> list[str]:
    """Every way the checkpoint disagrees with the config ([] when it fits)."""
    v, m = cfg.vision_model, cfg.multimodal_classifier
    problems = [
        f"multimodal_classifier.{name}={m[name]!r}, but the checkpoint's head has {value!r}"
        for name, value in structure.config_fields().items()
        if _norm(m[name]) != _norm(value)
    ]
    saved = ckpt.info.get("config") or {}
    for section, name, value in (
        ("vision_model", "name", v.name),
        ("vision_model", "pooling_type", v.pooling_type),
        ("multimodal_classifier", "projection_activation", m.projection_activation),
        ("multimodal_classifier", "final_activation", m.final_activation),
        ("multimodal_classifier", "loss_fn", m.loss_fn),
        ("multimodal_classifier", "label_smoothing", m.label_smoothing),
        ("optimizer", "vision_model", cfg.optimizer.vision_model.name),
        ("optimizer", "multimodal_classifier", cfg.optimizer.multimodal_classifier.name),
    ):
        stored = (saved.get(section) or {}).get(name)
        stored = stored.get("name") if isinstance(stored, dict) else stored
        if stored is not None and _norm(stored) != _norm(value):
            field = f"{section}.{name}" + (".name" if section == "optimizer" else "")
            problems.append(f"{field}={value!r}, but the checkpoint was trained with {stored!r}")
    dim = registry.feature_dim(v.name, v.pooling_type)
    if dim != structure.vision_dim:
        problems.append(
            f"vision_model.name={v.name!r} with pooling_type={v.pooling_type!r} gives {dim} "
            f"features, the checkpoint's vision projection takes {structure.vision_dim}"
        )
    size = original.vit_image_size(ckpt, v.name)
    if size is not None and tuple(cfg.data.img_size) != (size, size):
        problems.append(f"data.img_size={tuple(cfg.data.img_size)}: the saved ViT is {size} px")
    trained_size = (saved.get("vision_model") or {}).get("img_size")
    if size is None and trained_size is not None:
        sides = trained_size if isinstance(trained_size, list | tuple) else [trained_size] * 2
        trained = tuple(int(x) for x in sides)
        if trained != tuple(cfg.data.img_size):
            problems.append(
                f"data.img_size={tuple(cfg.data.img_size)}, but the checkpoint was trained at "
                f"{trained}"
            )
    problems += _normalization_problems(ckpt.info, cfg.training)
    count = len(ckpt.classes)
    for what, n in (
        ("the head's output", structure.num_classes),
        ("the saved num_classes", ckpt.info.get("num_classes")),
        ("multimodal_classifier.num_classes in the YAML", yaml_num_classes),
    ):
        if n is not None and int(n) != count:
            problems.append(f"{what} is {n}, but the checkpoint has {count} classes")
    index = ckpt.info.get("class_to_idx")
    if index is not None and dict(index) != {c: i for i, c in enumerate(ckpt.classes)}:
        problems.append("the checkpoint's class_to_idx does not number its classes in order")
    return problems + _class_weight_problems(ckpt, m)


def _normalization_problems(info: dict, t: Any) -> list[str]:
    """How the saved input statistics disagree with training.use_normalization/compute_stats:
    a resumed or fine-tuned run would otherwise see its images on another scale."""
    saved = _normalization(info)
    mean = [round(x, 4) for x in saved["normalization_mean"]]
    std = [round(x, 4) for x in saved["normalization_std"]]
    unnormalised = mean == [0.0] * 3 and std == [1.0] * 3
    imagenet = np.allclose(saved["normalization_mean"], stats.IMAGENET_MEAN) and np.allclose(
        saved["normalization_std"], stats.IMAGENET_STD
    )
    if t.use_normalization and unnormalised:
        return [
            "training.use_normalization=True, but the checkpoint was trained without Normalize "
            "(normalization_mean None): set training.use_normalization=false"
        ]
    if not t.use_normalization and not unnormalised:
        return [
            f"training.use_normalization=False, but the checkpoint was trained with Normalize "
            f"(mean {mean}, std {std}): set training.use_normalization=true"
        ]
    if t.use_normalization and not t.compute_stats and not imagenet:
        return [
            f"training.compute_stats=False (ImageNet statistics), but the checkpoint was trained "
            f"with mean {mean}, std {std} computed from its images: set training.compute_stats=true"
        ]
    return []


def _early_stopping(ckpt: original.OriginalCheckpoint, cfg: config_dict.ConfigDict) -> dict:
    """The original's early-stopping state when this config also monitors val loss."""
    t = cfg.training
    best = ckpt.info.get("best_val_loss")
    on_loss = t.monitor == "val/loss" and best is not None and math.isfinite(float(best))
    return {
        "monitor": t.monitor,
        "mode": "min" if t.monitor == "val/loss" else "max",
        "best": float(best) if on_loss else None,
        "best_epoch": None,
        "counter": int(ckpt.info.get("patience_counter") or 0) if on_loss else 0,
        "events": (ckpt.epoch + 1) // t.validation_interval,
    }


def _normalization(info: dict) -> dict[str, list[float]]:
    """The input statistics the run used: saved ones; None (use_normalization: false) means
    none, i.e. mean 0 and std 1; a file without them used ImageNet's (the original's default)."""
    if "normalization_mean" not in info:
        mean, std = stats.IMAGENET_MEAN, stats.IMAGENET_STD
    elif info["normalization_mean"] is None:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    else:
        mean, std = info["normalization_mean"], info["normalization_std"]
    return {
        "normalization_mean": [float(x) for x in mean],
        "normalization_std": [float(x) for x in std],
    }


def _original_info(ckpt: original.OriginalCheckpoint) -> dict:
    keys = ("experiment_name", "timestamp", "loss", "best_val_loss", "patience_counter")
    keys += ("vision_frozen", "n_warmup_epochs", "normalization_mean", "normalization_std")
    keys += ("current_aux_vision_weight", "current_aux_text_weight")
    info = {k: ckpt.info.get(k) for k in keys if k in ckpt.info}
    return json.loads(json.dumps({"path": ckpt.path, "epoch": ckpt.epoch, **info}, default=float))


def convert(
    pth: Path, cfg: config_dict.ConfigDict, out: Path, *, yaml_num_classes: int | None = None
) -> dict[str, Any]:
    """Converts `pth` under `cfg` into the new folder `out`; returns the conversion report."""
    out = Path(out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        unfinished = out.is_dir() and any(out.rglob("*.orbax-checkpoint-tmp*"))
        what = (
            "holds an unfinished conversion (stopped?): delete it"
            if unfinished
            else ("exists and is not an empty folder")
        )
        raise UserError(f"--out {out}: {what}; choose a new one")
    ckpt = original.read_pth(pth)
    structure = original.infer_head(ckpt.head)
    problems = config_problems(ckpt, structure, cfg, yaml_num_classes)
    if problems:
        raise ConfigError([f"--pth {pth} does not fit --config: {p}" for p in problems])
    v, m = cfg.vision_model, cfg.multimodal_classifier
    build = cfg.copy_and_resolve_references()
    build.training.dtype = "float32"
    model = nnx.eval_shape(  # no random init: every weight comes from the checkpoint
        lambda: experiment.make_model(
            build,
            num_classes=len(ckpt.classes),
            text_dim=structure.text_dim,
            rngs=nnx.Rngs(params=0, dropout=0),
            weights_from_checkpoint=True,
        )
    )
    log.info(
        "multimodal_classifier.use_l2_normalization=%s is taken from --config: it has no "
        "weights, so the checkpoint cannot confirm it",
        m.use_l2_normalization,
    )
    original.load_into(model, ckpt, backbone=v.name, structure=structure)
    reference = original_reference.torch_reference(
        ckpt,
        backbone=v.name,
        pooling_type=v.pooling_type,
        structure=structure,
        projection_activation=m.projection_activation,
        final_activation=m.final_activation,
        use_l2_normalization=m.use_l2_normalization,
    )
    check = original_reference.compare_logits(
        model, reference, image_size=tuple(cfg.data.img_size), text_dim=structure.text_dim
    )
    log.info("max|logit diff| %.3g (tolerance %.3g)", check["max_abs_diff"], check["tolerance"])
    if not check["ok"]:
        raise UserError(
            f"--pth {pth}: converted logits differ from the original's by "
            f"{check['max_abs_diff']:.3g} > {check['tolerance']:.3g}; nothing written"
        )
    _, state, _, _ = experiment.init_training(build, model)
    vision_sd, head_sd = original.renamed_state_dicts(ckpt, backbone=v.name, structure=structure)
    notes = {}
    for group, key, module, weights, drop_head in (
        ("vision", "opt_backbone", model.backbone, vision_sd, True),
        ("multimodal_classifier", "opt_head", model.head, head_sd, False),
    ):
        state[key], notes[group] = original.convert_optimizer_state(
            state[key],
            ckpt.optimizers.get(group),
            module=module,
            weights=weights,
            optimizer=cfg.optimizer[group if group != "vision" else "vision_model"].name,
            drop_head=drop_head,
        )
        log.info("optimizer %s: %s", group, "; ".join(notes[group]))
    epoch, info = ckpt.epoch + 1, _original_info(ckpt)
    meta = {
        "classes": ckpt.classes,
        "class_to_idx": {c: i for i, c in enumerate(ckpt.classes)},
        **_normalization(info),
        "img_size": list(cfg.data.img_size),
        "encoder": encoder_settings(cfg).as_dict(),
        "config": cfg.to_dict(),
        "epoch": epoch,
        "step_in_epoch": 0,
        "early_stopping": _early_stopping(ckpt, cfg),
        "frozen": epoch < cfg.training.n_warmup_epochs,
        "finished": None,
        "counters": {"skipped_nonfinite_steps": 0, "bad_images_train": 0},
        "train_accumulator": None,
        "dermjax_version": dermjax.__version__,
        "converted_from": info,
    }
    mode = "min" if cfg.training.monitor == "val/loss" else "max"
    with Checkpointer(
        str(out / "checkpoints"), save_frequency=1, keep_last=1, monitor_mode=mode, async_save=False
    ) as writer:
        writer.save(0, state=state, meta=meta, kind="final")
    report = {
        "pth": str(pth),
        "out": str(out),
        "epoch": epoch,
        "classes": ckpt.classes,
        "head": dataclasses.asdict(structure),
        "verification": check,
        "unverifiable": {"use_l2_normalization": m.use_l2_normalization},
        "optimizers": notes,
        "converted_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    (out / "conversion.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)  # an import set one
    for noisy in ("absl", "orbax"):  # their INFO lines (checkpoint internals) would drown ours
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cfg, yaml_num_classes = read_config(args.config)
    report = convert(args.pth, cfg, args.out, yaml_num_classes=yaml_num_classes)
    check = report["verification"]
    print(
        f"wrote {report['out']} (epoch {report['epoch']}, {len(report['classes'])} classes; "
        f"max|logit diff| {check['max_abs_diff']:.3g} <= {check['tolerance']:.3g})\n"
        f"resume: --config.checkpoint.load_from={report['out']}; "
        f"fine-tune: --config.checkpoint.init_from={report['out']}"
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
