"""Loads an original ml_workflow YAML experiment file onto the dermjax defaults.

  python -m dermjax.main --config=configs/from_yaml.py:path/to/experiment.yaml

Sections and keys are the original's, the later original's included (per_dataset_split_ratios,
use_normalization, vision_only_pretraining, auxiliary_loss_schedule, masking.epoch_schedule,
per-modality auxiliary weights). Beyond copying values, the loader:

* drops the keys dermjax derives or the original never read (`IGNORED_KEYS`: num_classes,
  sample_weights, both embedding dims, checkpoint.gcs_uri, ...) with one warning naming them;
* lower-cases the names the original lower-cased itself (optimizer names, activations), so
  `AdamW` and `ReLU` load;
* requires the keys the original cannot run without (`REQUIRED_KEYS`; no data.dataset means the
  older files' data.metadata_path and data.img_prefix), and gives keys the file
  omits the original's own defaults where they differ from dermjax's (`ORIGINAL_DEFAULTS`: the
  head's hidden sizes, dropout and label smoothing), so a file means what it meant there;
* reads the legacy encoder.pre_existing_path as data.embeddings_path when the file has no
  encoder.embedding_filename (the original's precedence);
* keeps the original's selection rule: early stopping and the best checkpoint on validation
  loss (training.monitor = "val/loss"), unless the file sets training.monitor;
* picks the ResNet unfreeze rule of the original that ran the file, unless the file sets
  vision_model.unfreeze_rule: "conv_count" (the later original counts Conv2d layers, from
  commit 8d979e9) when the file uses any key of `LATER_KEYS`, which only the later original
  reads, else "children" (the last N top-level children, as at 700cca3). A later key marks a
  file written for the later code. The first later keys predate 8d979e9 by four days, but the
  files of those days that use a ResNet set unfreeze_layers to -1, where both rules agree;
* routes masked modalities as the file's era did: a later file zeroes the projections of masked
  samples (multimodal_classifier.zero_masked_projections) and, with auxiliary heads, sends
  batches that lost a whole modality through the other modality's auxiliary head
  (multimodal_classifier.ablation_routing); a seed-era file keeps 700cca3's path. The later
  original's accidents stay off (random masking in evaluation, text gating tied to the text
  auxiliary weight); masking.random_mask.in_eval and multimodal_classifier.text_content_gating
  turn them on for its exact numbers.

The rules and the defaults are stated in one warning (the config loads before logging is set up, when only
warnings show). Every problem of the file (YAML syntax with its line, unknown keys, values of
the wrong type, missing required keys, values `dermjax.config.validate` rejects) is reported
together in one ConfigError; a file that cannot be read, or is in the original's oldest layout, is
one line.
"""

import difflib
import logging
import pathlib
import re

import yaml
from ml_collections import config_dict

from dermjax.config import validate
from dermjax.configs import default
from dermjax.errors import ConfigError

log = logging.getLogger("dermjax.configs.from_yaml")  # also when loaded as a config file

# Keys the original's files carry that dermjax does not read, and why.
IGNORED_KEYS = {
    "multimodal_classifier.num_classes": "derived from the data",
    "multimodal_classifier.sample_weights": "derived from the data",
    "multimodal_classifier.vision_embedding_dim": "derived from the backbone",
    "multimodal_classifier.text_embedding_dim": "derived from the embeddings",
    "checkpoint.gcs_uri": "read only by the original's evaluation script",
    "data.validation_exclude_datasets": "never read by the original",
    "data.test_exclude_datasets": "never read by the original",
}
# Names the original compared after lower-casing them.
LOWERCASE_KEYS = (
    "optimizer.vision_model.name",
    "optimizer.multimodal_classifier.name",
    "multimodal_classifier.projection_activation",
    "multimodal_classifier.final_activation",
)
# Keys that only the original after 700cca3 reads: their presence dates a file.
LATER_KEYS = (
    "data.per_dataset_split_ratios",
    "training.use_normalization",
    "training.vision_only_pretraining",
    "training.auxiliary_loss_schedule",
    "masking.epoch_schedule",
    "multimodal_classifier.auxiliary_vision_loss_weight",
    "multimodal_classifier.auxiliary_text_loss_weight",
    "checkpoint.gcs_uri",
)
# Keys the original stops without (ValueError or KeyError when the file lacks one). A file
# without data.dataset has none (not dermjax's default): it must name data.metadata_path and
# data.img_prefix, as the original's older files did, which `validate` checks.
REQUIRED_KEYS = (
    "multimodal_classifier.projection_dim",
    "multimodal_classifier.fusion_strategy",
    "multimodal_classifier.loss_fn",
    "optimizer.vision_model.learning_rate",
    "optimizer.vision_model.weight_decay",
    "optimizer.multimodal_classifier.learning_rate",
    "optimizer.multimodal_classifier.weight_decay",
)
# The original's defaults for keys a file omits, where dermjax's (exp_arch_009's values) differ.
ORIGINAL_DEFAULTS = {
    "multimodal_classifier.image_projection_hidden": (),
    "multimodal_classifier.text_projection_hidden": (),
    "multimodal_classifier.final_hidden_sizes": (),
    "multimodal_classifier.projection_dropout": 0.2,
    "multimodal_classifier.label_smoothing": 0.0,
}
# Loss keys each loss_fn never reads (the original ignores them too): said once, not an error.
UNUSED_BY_LOSS = {
    "cross_entropy": ("alpha", "gamma"),
    "focal": ("label_smoothing",),
}
# YAML 1.1 reads an exponent without a decimal point (1e-3) as a string.
_EXPONENT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")
_TYPE_NAMES = {tuple: "a list", dict: "a mapping", int: "an integer", float: "a number"}
LATER_UNFREEZE_RULE, SEED_UNFREEZE_RULE = "conv_count", "children"
ORIGINAL_MONITOR = "val/loss"


def _tuples(value):
    """YAML lists become tuples, the type dermjax's sequence fields hold."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def _numbers(value):
    """Exponent strings YAML 1.1 left unread (`1e-3`) become floats, in lists and mappings too."""
    if isinstance(value, str) and _EXPONENT.fullmatch(value):
        return float(value)
    if isinstance(value, tuple):
        return tuple(_numbers(v) for v in value)
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    return value


def _coerce(field_type, value):
    """The YAML value for a field of `field_type`: float fields also take ints and `1e-7`."""
    if field_type is str:
        return value
    value = _numbers(value)
    numeric = isinstance(value, int) or (isinstance(value, str) and _is_float(value))
    if field_type is float and numeric and not isinstance(value, bool):
        return float(value)
    return value


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _unknown(root: config_dict.ConfigDict, node: config_dict.ConfigDict, path: str) -> str:
    """The unknown-key problem, with the likely key: a close name in the section, or the same
    name in another section (`training.seed` -> data.seed)."""
    *sections, key = path.split(".")
    close = difflib.get_close_matches(key, list(node.keys()), n=1)
    if close:
        return f"{path}: unknown key (did you mean {'.'.join([*sections, close[0]])}?)"
    elsewhere = [
        f"{name}.{key}"
        for name, section in root.items()
        if isinstance(section, config_dict.ConfigDict) and key in section
    ]
    hint = f" (did you mean {' or '.join(elsewhere)}?)" if elsewhere else ""
    return f"{path}: unknown key{hint}"


def _merge(
    root: config_dict.ConfigDict,
    node: config_dict.ConfigDict,
    values: dict,
    prefix: str,
    problems: list[str],
) -> None:
    """Sets every known key; collects unknown keys and wrongly typed values in `problems`."""
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in node:
            problems.append(_unknown(root, node, path))
        elif isinstance(node[key], config_dict.ConfigDict):
            if isinstance(value, dict):
                _merge(root, node[key], value, f"{path}.", problems)
            else:
                problems.append(f"{path}={value!r}: expected a section of keys")
        else:
            field_type = node.get_type(key)
            try:
                node[key] = _coerce(field_type, value)
            except TypeError:
                wanted = _TYPE_NAMES.get(field_type, f"a value of type {field_type.__name__}")
                problems.append(f"{path}={value!r}: expected {wanted}")


class YamlFileError(ConfigError):
    """The file as a whole cannot be loaded (or is not named): one line, exit status 2."""

    def __str__(self) -> str:
        return self.problems[0]


def _read(path: pathlib.Path) -> dict:
    """Parses the file; a missing file, bad syntax or a non-mapping is a YamlFileError."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise YamlFileError(f"cannot read the YAML file {path} ({e.strerror})") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = getattr(e, "problem", None) or str(e)
        context = getattr(e, "context_mark", None)
        if context:
            what += f" ({e.context} at line {context.line + 1})"
        raise YamlFileError(f"{where}: YAML syntax error: {what}") from e
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise YamlFileError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    if "model" in raw and "vision_model" not in raw:
        raise OldLayoutError(
            f"{path} is in the original's oldest layout (sections {', '.join(map(str, raw))}), "
            "which dermjax does not read: rewrite it in the layout of the original's README "
            "(data, training, augmentation, vision_model, multimodal_classifier, ...)"
        )
    return raw


class OldLayoutError(YamlFileError):
    """A file of the original's oldest layout (`model`, `splits`, `image` sections)."""


def _parent(raw: dict, dotted: str) -> tuple[dict | None, str]:
    """(the mapping holding the last key of `dotted`, that key); None if a section is missing."""
    *sections, key = dotted.split(".")
    node = raw
    for section in sections:
        node = node.get(section) if isinstance(node, dict) else None
    return (node if isinstance(node, dict) else None), key


def _has(raw: dict, dotted: str) -> bool:
    node, key = _parent(raw, dotted)
    return node is not None and key in node


def _adapt(raw: dict) -> None:
    """Renames legacy keys, drops ignored ones (one warning) and lower-cases names, in place."""
    dropped = []
    encoder = raw.get("encoder")
    if isinstance(encoder, dict) and "pre_existing_path" in encoder:
        legacy = encoder.pop("pre_existing_path")
        data = raw.setdefault("data", {})
        if encoder.get("embedding_filename") is not None:
            dropped.append(
                f"encoder.pre_existing_path={legacy!r} (encoder.embedding_filename is set, "
                "which the original reads first)"
            )
        elif isinstance(data, dict):
            data.setdefault("embeddings_path", legacy)
    for dotted, why in IGNORED_KEYS.items():
        node, key = _parent(raw, dotted)
        if node is not None and key in node:
            dropped.append(f"{dotted}={node.pop(key)!r} ({why})")
    if dropped:
        log.warning("original config keys ignored: %s", "; ".join(dropped))
    for dotted in LOWERCASE_KEYS:
        node, key = _parent(raw, dotted)
        if node is not None and isinstance(node.get(key), str):
            node[key] = node[key].lower()


def _missing(raw: dict) -> list[str]:
    return [
        f"{key}: missing; the original stops without it, so the file must set it"
        for key in REQUIRED_KEYS
        if not _has(raw, key)
    ]


def _unused_loss_keys(cfg: config_dict.ConfigDict, raw: dict) -> list[str]:
    head = cfg.multimodal_classifier
    unused = UNUSED_BY_LOSS.get(head.loss_fn, ())
    return [
        f"multimodal_classifier.{key}={head[key]!r} (loss_fn {head.loss_fn!r} does not use it)"
        for key in unused
        if _has(raw, f"multimodal_classifier.{key}") and head[key] not in (None, 0, 0.0)
    ]


def _original_rules(cfg: config_dict.ConfigDict, raw: dict, later: list[str]) -> None:
    """The original's defaults for omitted keys; early stopping on val loss, the unfreeze rule
    and masking path of the file's era (`later`: its later keys), each unless the file sets it;
    one warning says what was chosen."""
    chosen = []
    defaults = []
    for dotted, value in ORIGINAL_DEFAULTS.items():
        if not _has(raw, dotted):
            section, key = dotted.split(".")
            cfg[section][key] = value
            defaults.append(f"{dotted}={value!r}")
    if defaults:
        chosen.append(f"the original's defaults for keys the file omits: {', '.join(defaults)}")
    if not _has(raw, "training.monitor"):
        cfg.training.monitor = ORIGINAL_MONITOR
        chosen.append(
            f"training.monitor={ORIGINAL_MONITOR!r} (early stopping and best checkpoint on "
            "validation loss)"
        )
    if not _has(raw, "vision_model.unfreeze_rule"):
        rule = LATER_UNFREEZE_RULE if later else SEED_UNFREEZE_RULE
        cfg.vision_model.unfreeze_rule = rule
        why = f"later keys: {', '.join(later)}" if later else "no later key"
        chosen.append(f"vision_model.unfreeze_rule={rule!r} ({why})")
    head = cfg.multimodal_classifier
    for field, value in (
        ("zero_masked_projections", bool(later)),
        ("ablation_routing", bool(later) and head.use_auxiliary_loss),
    ):
        if not _has(raw, f"multimodal_classifier.{field}"):
            head[field] = value
            chosen.append(f"multimodal_classifier.{field}={value}")
    if chosen:
        log.warning("the original's rules for this file: %s", "; ".join(chosen))


def get_config(path: str | None = None) -> config_dict.ConfigDict:
    """Returns the default config updated with the YAML file at `path`."""
    if not path:  # ml_collections calls get_config() when --config has no `:path`
        raise YamlFileError(
            "configs/from_yaml.py needs the YAML file: "
            "--config=configs/from_yaml.py:path/to/experiment.yaml"
        )
    raw = _tuples(_read(pathlib.Path(path)))
    later = [k for k in LATER_KEYS if _has(raw, k)]
    _adapt(raw)
    cfg = default.get_config()
    if not _has(raw, "data.dataset"):
        cfg.data.dataset = None
    problems: list[str] = []
    _merge(cfg, cfg, raw, "", problems)
    problems += _missing(raw)
    if problems:
        problems = [f"{path}: {p}" for p in problems]
        try:
            validate(cfg)  # the fields that did load may be wrong too: report them at once
        except ConfigError as e:
            problems.extend(e.problems)
        raise ConfigError(problems)
    _original_rules(cfg, raw, later)
    unused = _unused_loss_keys(cfg, raw)
    if unused:
        log.warning("original config keys without effect: %s", "; ".join(unused))
    return cfg
