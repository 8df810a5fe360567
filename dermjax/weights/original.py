"""Trained `.pth` checkpoints of the original PyTorch workflow as dermjax weights.

Such a file holds the backbone's state_dict (`vision_model_state_dict`, every key prefixed
`model.`), the fusion head's (`multimodal_classifier_state_dict`), both optimizers' state_dicts,
the 0-based epoch, the class list and run settings. This module reads it (`read_pth`), infers
the head's structure from its shapes (`infer_head`), fills a dermjax model (`load_into`),
and converts Adam/AdamW/SGD moments (`convert_optimizer_state`); `original_reference` rebuilds the
original model in PyTorch so that a converter can compare logits before it writes anything. torch
is optional (`pip install "dermjax[torch]"`) and imported on first use.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import logging
import math
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dermjax.errors import UserError
from dermjax.models.registry import is_vit, vit_patch_size
from dermjax.weights.torchvision import load_state_dict, to_numpy

log = logging.getLogger(__name__)

PTH_SUFFIXES = (".pth", ".pt")
_REQUIRED = ("epoch", "classes", "vision_model_state_dict", "multimodal_classifier_state_dict")
_LOSS_BUFFERS = ("class_weights_tensor", "criterion.weight")
_BUFFER_LEAVES = ("running_mean", "running_var", "num_batches_tracked")
# The children kept by the original's `Sequential(children[:-2])` that have weights.
_RESNET_CHILDREN = {
    "0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"
}  # fmt: skip
_MOMENTS = {"exp_avg": "mu", "exp_avg_sq": "nu", "momentum_buffer": "trace"}
_ADAM = ("exp_avg", "exp_avg_sq")
_TORCH_MOMENTS = {"adam": _ADAM, "adamw": _ADAM, "sgd": ("momentum_buffer",)}


class OriginalCheckpointError(UserError):
    """A `.pth` that is not a readable checkpoint of the original, or does not fit the config."""


def is_original_checkpoint(path: Any) -> bool:
    """True when `path` names a PyTorch checkpoint file (`.pth` / `.pt`)."""
    return isinstance(path, str | Path) and str(path).lower().endswith(PTH_SUFFIXES)


def conversion_command(pth: str | Path, out: str | Path | None = None) -> str:
    """The command that converts `pth` (into `out`, default `<pth without suffix>_dermjax`).
    The converter reads local files: a URL (gs://) is copied here first."""
    pth, fetch = str(pth), ""
    if "://" in pth:
        fetch = f"gcloud storage cp {shlex.quote(pth)} . && "
        pth = pth.rstrip("/").rsplit("/", 1)[-1]
    out = out if out is not None else Path(pth).with_suffix("").as_posix() + "_dermjax"
    return (
        f"{fetch}python scripts/convert_original_checkpoint.py --pth {shlex.quote(pth)} "
        f"--config ORIGINAL_YAML --out {shlex.quote(str(out))}"
    )


def import_torch() -> Any:
    """torch, or a UserError saying how to install it."""
    try:
        import torch
    except ImportError as error:
        raise UserError(
            "reading checkpoints of the original workflow needs PyTorch: "
            'pip install "dermjax[torch]"'
        ) from error
    return torch


@dataclasses.dataclass
class OriginalCheckpoint:
    """The parts of an original `.pth` a conversion uses (tensors stay torch tensors)."""

    path: str
    epoch: int
    classes: list[str]
    vision: dict[str, Any]  # the backbone state_dict as saved (`model.` prefix)
    head: dict[str, Any]  # the head state_dict without the loss buffers
    class_weights: np.ndarray | None  # `class_weights_tensor` / `criterion.weight`, if saved
    optimizers: dict[str, Any]  # {"vision", "multimodal_classifier"}: torch optimizer dicts
    info: dict[str, Any]  # the other top-level entries (config, losses, settings)


def read_pth(path: str | Path) -> OriginalCheckpoint:
    """Reads an original checkpoint with `torch.load(weights_only=True)` (no code is run)."""
    torch = import_torch()
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except OSError as error:
        if error.errno == errno.EINVAL:  # torch's zip reader seeking past a file cut short
            raise OriginalCheckpointError(f"--pth {path}: {_CUT_SHORT}") from error
        raise OriginalCheckpointError(f"--pth {path}: cannot read it ({error})") from error
    except Exception as error:  # pickle/zip errors: not a torch.save file of plain data
        raise OriginalCheckpointError(f"--pth {path}: {_load_problem(error)}") from error
    if not isinstance(raw, Mapping):
        raise OriginalCheckpointError(f"--pth {path}: holds a {type(raw).__name__}, not a dict")
    if "images_classifier_state_dict" in raw:
        raise OriginalCheckpointError(
            f"--pth {path}: legacy layout (images_classifier_state_dict, written before the "
            "multimodal classifier) is not supported: its head is not documented"
        )
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise OriginalCheckpointError(
            f"--pth {path}: not a checkpoint of the original workflow (missing {missing})"
        )
    vision = _without_data_parallel(raw["vision_model_state_dict"])
    stray = [k for k in vision if not k.startswith("model.")]
    if stray:
        raise OriginalCheckpointError(
            f"--pth {path}: vision_model_state_dict keys lack the `model.` prefix: {stray[:3]}"
        )
    head = _without_data_parallel(raw["multimodal_classifier_state_dict"])
    weights = [to_numpy(head.pop(k)) for k in _LOSS_BUFFERS if k in head]
    if len(weights) == 2 and not np.allclose(weights[0], weights[1]):
        raise OriginalCheckpointError(f"--pth {path}: the two class-weight buffers differ")
    skip = {*_REQUIRED, "vision_model_state_dict", "optimizers_state_dict"}
    return OriginalCheckpoint(
        path=str(path),
        epoch=int(raw["epoch"]),
        classes=[str(c) for c in raw["classes"]],
        vision=vision,
        head=head,
        class_weights=weights[0].astype(np.float64) if weights else None,
        optimizers=dict(raw.get("optimizers_state_dict") or {}),
        info={k: v for k, v in raw.items() if k not in skip},
    )


_CUT_SHORT = "the file is cut short or damaged (an interrupted save or copy?): copy it again"


def _numpy_globals() -> list[Any]:
    """numpy scalars, arrays and dtypes, which a checkpoint may hold (a loss saved as
    np.float64): plain data, so torch's safe loader may rebuild them (an object array's
    contents would still need globals of their own, which stay refused)."""
    multiarray = (getattr(np, "_core", None) or np.core).multiarray
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return [multiarray.scalar, multiarray._reconstruct, np.ndarray, np.dtype, *dtypes]


def _load_problem(error: Exception) -> str:
    """What torch.load's error says about the file, in one line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()  # torch colours its messages
    if found := re.search(r"Unsupported global: GLOBAL (\S+)", text):
        return (
            f"holds pickled Python objects ({found[1]}), not the original's checkpoint dict of "
            "state_dicts and plain values (a whole model saved with torch.save(model)?)"
        )
    if "central directory" in text or isinstance(error, EOFError):
        return _CUT_SHORT
    lines = text.splitlines() or [""]
    reason = next((ln for ln in lines if "Unpickler error:" in ln), lines[0])
    return (
        f"not a checkpoint torch.load(weights_only=True) can read ({type(error).__name__}: "
        f"{reason.split('. ')[0].strip()})"
    )


def _without_data_parallel(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The state_dict without the `module.` prefix torch.nn.DataParallel adds to every key."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k.removeprefix("module."): v for k, v in state_dict.items()}
    return dict(state_dict)


@dataclasses.dataclass(frozen=True)
class HeadStructure:
    """What the head's state_dict shapes fix (activations, dropout and L2 they cannot)."""

    vision_dim: int
    text_dim: int
    projection_dim: int
    num_classes: int
    image_projection_hidden: tuple[int, ...]
    text_projection_hidden: tuple[int, ...]
    final_hidden_sizes: tuple[int, ...]
    fusion_strategy: str
    use_auxiliary_loss: bool

    def config_fields(self) -> dict[str, Any]:
        """The `multimodal_classifier` fields these shapes determine."""
        names = ("projection_dim", "image_projection_hidden", "text_projection_hidden")
        names += ("final_hidden_sizes", "fusion_strategy", "use_auxiliary_loss")
        return {n: getattr(self, n) for n in names}


def _mlp_shape(head: Mapping[str, Any], prefix: str) -> tuple[int, tuple[int, ...], int]:
    """(in, hidden sizes, out) of the original MLP `prefix` (bare Linear or `layers.{4i}`)."""
    if f"{prefix}.weight" in head:
        out_dim, in_dim = head[f"{prefix}.weight"].shape
        return int(in_dim), (), int(out_dim)
    pattern = re.compile(rf"{re.escape(prefix)}\.layers\.(\d+)\.weight")
    found = sorted(
        int(m.group(1)) for k in head if (m := pattern.fullmatch(k)) and head[k].ndim == 2
    )
    if not found or found != list(range(0, 4 * len(found), 4)):
        raise OriginalCheckpointError(
            f"head state_dict: {prefix} has no Linear layers at layers.0, 4, 8, ... ({found})"
        )
    shapes = [tuple(int(d) for d in head[f"{prefix}.layers.{j}.weight"].shape) for j in found]
    for (out_dim, _), (_, in_dim) in itertools.pairwise(shapes):
        if out_dim != in_dim:
            raise OriginalCheckpointError(f"head state_dict: {prefix} layers do not chain")
    return shapes[0][1], tuple(s[0] for s in shapes[:-1]), shapes[-1][0]


def infer_head(head: Mapping[str, Any]) -> HeadStructure:
    """The head's structure from its state_dict's shapes (fusion from `alpha_*`, aux from
    `aux_*`)."""
    v_in, v_hidden, proj = _mlp_shape(head, "vision_projection")
    t_in, t_hidden, t_proj = _mlp_shape(head, "text_projection")
    f_in, f_hidden, classes = _mlp_shape(head, "final_classifier")
    weighted = "alpha_vision" in head or "alpha_text" in head
    if weighted and not ("alpha_vision" in head and "alpha_text" in head):
        raise OriginalCheckpointError("head state_dict: only one of alpha_vision/alpha_text")
    if t_proj != proj or f_in != (proj if weighted else 2 * proj):
        raise OriginalCheckpointError(
            f"head state_dict: projection sizes {proj}/{t_proj} do not fit the final "
            f"classifier's input {f_in} ({'weighted_sum' if weighted else 'concat_mlp'})"
        )
    return HeadStructure(
        vision_dim=v_in,
        text_dim=t_in,
        projection_dim=proj,
        num_classes=classes,
        image_projection_hidden=v_hidden,
        text_projection_hidden=t_hidden,
        final_hidden_sizes=f_hidden,
        fusion_strategy="weighted_sum" if weighted else "concat_mlp",
        use_auxiliary_loss="aux_vision_classifier.weight" in head,
    )


def backbone_key(name: str, key: str) -> str:
    """A saved backbone key (`model.` prefix) as the torchvision key of backbone `name`."""
    key = key.removeprefix("model.")
    if is_vit(name):
        return key
    if name.startswith("resnet"):
        child, _, rest = key.partition(".")
        return f"{_RESNET_CHILDREN.get(child, 'unknown_child_' + child)}.{rest}"
    return f"features.{key}"


def head_key(structure: HeadStructure, key: str) -> str:
    """A saved head key as dermjax's head names it (torch leaf names, see `load_state_dict`)."""
    hidden = {
        "vision_projection": structure.image_projection_hidden,
        "text_projection": structure.text_projection_hidden,
        "final_classifier": structure.final_hidden_sizes,
    }
    prefix, _, rest = key.partition(".")
    if prefix not in hidden:
        return key
    match = re.fullmatch(r"layers\.(\d+)\.(.+)", rest)
    if match is None:
        return f"{prefix}.out.{rest}"
    index, leaf = int(match.group(1)), match.group(2)
    if index == 4 * len(hidden[prefix]):
        return f"{prefix}.out.{leaf}"
    part = {0: "linear", 1: "norm"}.get(index % 4, f"stateless{index % 4}")
    return f"{prefix}.hidden.{index // 4}.{part}.{leaf}"


def renamed_state_dicts(
    ckpt: OriginalCheckpoint, *, backbone: str, structure: HeadStructure
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(backbone, head) state_dicts in dermjax naming, in the original's order."""
    vision = {backbone_key(backbone, k): v for k, v in ckpt.vision.items()}
    head = {head_key(structure, k): v for k, v in ckpt.head.items()}
    return vision, head


def load_into(
    model: nnx.Module,
    ckpt: OriginalCheckpoint,
    *,
    backbone: str,
    structure: HeadStructure,
    seed: int = 0,
) -> None:
    """Fills a `DermClassifier` (may be abstract, from `nnx.eval_shape`) from the checkpoint.

    Strict (see `load_state_dict`): every parameter and BatchNorm statistic comes from the
    checkpoint. The dropout streams are seeded from `seed`, so no abstract value is left.
    """
    vision, head = renamed_state_dicts(ckpt, backbone=backbone, structure=structure)
    for part, module, state_dict in (
        ("backbone", model.backbone, vision),
        ("head", model.head, head),
    ):
        try:
            load_state_dict(module, state_dict, drop_head=part == "backbone")
        except UserError as error:
            raise OriginalCheckpointError(
                f"--pth {ckpt.path}: its {part} does not fit the config ({error})"
            ) from error
    nnx.reseed(model, dropout=jax.random.key(seed))
    abstract = [
        path
        for path, var in nnx.to_flat_state(nnx.state(model))
        if isinstance(var.get_value(), jax.ShapeDtypeStruct)
    ]
    if abstract:
        raise ValueError(f"variables not covered by the checkpoint: {abstract}")


def _is_param(key: str) -> bool:
    return key.rsplit(".", 1)[-1] not in _BUFFER_LEAVES


def _moments(
    module: nnx.Module, weights: Mapping[str, Any], found: Mapping[str, Any], drop_head: bool
) -> dict[tuple, Any]:
    """{param path: array} of one moment, laid out like `module`'s params (zeros elsewhere)."""
    state_dict = {k: np.zeros(np.shape(v), np.float32) for k, v in weights.items()}
    state_dict.update(found)
    scratch = nnx.clone(module)
    load_state_dict(scratch, state_dict, drop_head=drop_head)
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(scratch, nnx.Param)))
    return {tuple(k.key for k in path): leaf for path, leaf in flat[0]}


def convert_optimizer_state(
    opt_state: Any,
    torch_state: Mapping[str, Any] | None,
    *,
    module: nnx.Module,
    weights: Mapping[str, Any],
    optimizer: str,
    drop_head: bool = False,
) -> tuple[Any, list[str]]:
    """`opt_state` (an optax state of `module`'s params) with the moments of a torch optimizer.

    `weights` is the module's state_dict in dermjax naming, in the original's order, so its
    parameter keys give torch's parameter positions. Parameters without torch state keep zero
    moments; the step count becomes the largest torch step. Returns (state, notes): a note says
    what was converted; moments that cannot be converted are dropped with a logged warning (the
    state is then returned unchanged: a resumed run restarts them from zero).
    """
    if not torch_state or not torch_state.get("state"):
        return opt_state, ["no optimizer moments saved (the optimizer never stepped)"]
    keys = [k for k in weights if _is_param(k)]
    positions = sorted(i for group in torch_state["param_groups"] for i in group["params"])
    per_param = {int(i): s for i, s in torch_state["state"].items()}
    saved = {name for s in per_param.values() for name in s if name != "step"}
    wanted = _TORCH_MOMENTS.get(optimizer, ())
    problem = None
    if positions != list(range(len(keys))):
        problem = f"{len(positions)} optimizer parameters for {len(keys)} weights"
    elif not wanted or saved != set(wanted):
        problem = f"saved moments {sorted(saved)} do not fit optimizer {optimizer!r}"
    if problem:
        log.warning("optimizer moments dropped (%s); a resumed run restarts them at zero", problem)
        return opt_state, [f"dropped: {problem}"]
    moments = {
        _MOMENTS[name]: _moments(
            module,
            weights,
            {keys[i]: s[name] for i, s in per_param.items() if s.get(name) is not None},
            drop_head,
        )
        for name in wanted
    }
    steps = {int(to_numpy(s["step"])) for s in per_param.values() if "step" in s}
    step = max(steps, default=0)
    notes = [f"moments of {len(per_param)}/{len(keys)} parameters converted, step {step}"]
    if len(steps) > 1:
        notes.append(f"per-parameter steps {sorted(steps)} differ: all use {step}")

    def replace(path: tuple, leaf: Any) -> Any:
        names = [getattr(k, "name", None) for k in path]
        for attr, table in moments.items():
            if attr in names:
                suffix = tuple(k.key for k in path[names.index(attr) + 1 :])
                return jnp.asarray(table[suffix], leaf.dtype)
        return jnp.asarray(step, leaf.dtype) if names[-1] == "count" else leaf

    return jax.tree_util.tree_map_with_path(replace, opt_state), notes


def vit_image_size(ckpt: OriginalCheckpoint, backbone: str) -> int | None:
    """The square image size a saved ViT's position embedding was made for (None for CNNs)."""
    if not is_vit(backbone):
        return None
    tokens = int(ckpt.vision["model.encoder.pos_embedding"].shape[1]) - 1
    return math.isqrt(tokens) * vit_patch_size(backbone)
