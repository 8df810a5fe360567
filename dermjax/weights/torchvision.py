"""Strict, mechanical loading of torchvision state_dicts into dermjax backbones.

dermjax modules are named like torchvision's state_dict keys, so a key maps to an NNX path by
splitting on dots (digits become list indices) and renaming the leaf: `weight` -> `kernel` for
Conv (OIHW -> HWIO) and Linear (transposed), `weight` -> `scale` for BatchNorm/LayerNorm,
`running_mean/var` -> `mean/var`; `num_batches_tracked` is dropped; other leaves
(`class_token`, `pos_embedding`) keep their names. Converted weights are stored as safetensors
of the torch-keyed state_dict (see scripts/convert_torchvision.py).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dermjax.errors import UserError, first_line
from dermjax.models.registry import HEAD_NAMES

log = logging.getLogger(__name__)

_DENSENET_LEGACY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)
_LEGACY_RENAMES = (
    (re.compile(r"\.mlp\.linear_1\."), ".mlp.0."),
    (re.compile(r"\.mlp\.linear_2\."), ".mlp.3."),
)
_IN_PROJ = re.compile(r"\.self_attention\.in_proj_(weight|bias)$")
_LEAF_NAMES = {"bias": "bias", "running_mean": "mean", "running_var": "var"}
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}

DEFAULT_WEIGHTS_DIR = "~/.cache/dermjax/weights"
SHOWN_KEYS = 6  # per kind of problem in an error message; the rest are counted
_TV_LIBRARY = None  # keeps the torchvision op-schema shim alive (see import_torchvision)


class WeightsNotFoundError(UserError, FileNotFoundError):
    """No converted weights file where the config (or the weights folder) points."""


class WeightsMismatchError(UserError, ValueError):
    """A converted weights file that does not fit the configured backbone."""


def import_torchvision() -> Any:
    """Imports torchvision, working around CUDA wheels beside a CPU-only torch.

    Such wheels fail at import with "operator torchvision::nms does not exist"; defining the two
    op schemas first makes every classification model and weights enum usable.
    """
    global _TV_LIBRARY
    try:
        import torchvision

        return torchvision
    except RuntimeError as error:
        if "torchvision::" not in str(error):
            raise
    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _TV_LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        _TV_LIBRARY.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision

    return torchvision


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (any device, bf16 included) or array-like as a numpy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if not value.dtype.is_floating_point or value.dtype.itemsize >= 4:
            return value.numpy()
        return value.float().numpy()
    return np.asarray(value)


def fix_legacy_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Renames legacy checkpoint keys to torchvision's current layout (still torch-loadable).

    DenseNet `denselayerK.norm.1.weight` -> `denselayerK.norm1.weight` (also relu/conv and .2),
    the fix torchvision applies when loading its own DenseNet files; ViT `mlp.linear_1/2` ->
    `mlp.0/3` (pre-v2 MLPBlock).
    """
    fixed = {}
    for key, value in state_dict.items():
        match = _DENSENET_LEGACY.match(key)
        if match:
            key = match.group(1) + match.group(2)
        for pattern, replacement in _LEGACY_RENAMES:
            key = pattern.sub(replacement, key)
        fixed[key] = value
    return fixed


def _dermjax_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Current-layout keys as dermjax names them: no `num_batches_tracked`; ViT attention's
    `in_proj_weight/bias` -> `in_proj.weight/bias` (dermjax holds `in_proj` as a Linear)."""
    return {
        _IN_PROJ.sub(r".self_attention.in_proj.\1", key): value
        for key, value in fix_legacy_keys(state_dict).items()
        if not key.endswith("num_batches_tracked")
    }


def _child(module: Any, name: str | int) -> Any:
    try:
        return module[name] if isinstance(name, int) else getattr(module, name, None)
    except (IndexError, KeyError, TypeError):
        return None


def _target(module: nnx.Module, key: str) -> tuple[tuple, Any] | None:
    """(NNX path, transform) for a torch key, or None when the module has no such submodule."""
    parts = [int(p) if p.isdigit() else p for p in key.split(".")]
    owner = module
    for name in parts[:-1]:
        owner = _child(owner, name)
        if owner is None:
            return None
    leaf = parts[-1]
    transform = None
    if leaf == "weight":
        if isinstance(owner, nnx.Conv):
            leaf, transform = "kernel", lambda a: np.transpose(a, (2, 3, 1, 0))
        elif isinstance(owner, nnx.Linear):
            leaf, transform = "kernel", np.transpose
        elif isinstance(owner, (nnx.BatchNorm, nnx.LayerNorm)):
            leaf = "scale"
        else:
            return None
    else:
        leaf = _LEAF_NAMES.get(leaf, leaf)
    return (*parts[:-1], leaf), transform


def torch_key(path: tuple) -> str:
    """The torchvision-style key for an NNX parameter path (for error messages)."""
    *owner, leaf = path
    return ".".join([*(str(p) for p in owner), _TORCH_LEAF.get(leaf, leaf)])


def _variable(module: nnx.Module, path: tuple) -> nnx.Variable:
    owner = module
    for name in path[:-1]:
        owner = _child(owner, name)
    return getattr(owner, path[-1])


def _is_head(path_or_key: tuple | str) -> bool:
    first = path_or_key.split(".")[0] if isinstance(path_or_key, str) else path_or_key[0]
    return first in HEAD_NAMES


def _resize_pos_embedding(array: np.ndarray, shape: tuple) -> np.ndarray | None:
    if array.ndim != 3 or len(shape) != 3 or array.shape[::2] != tuple(shape[::2]):
        return None
    from dermjax.models.vit import resize_pos_embedding

    return np.asarray(resize_pos_embedding(array, shape[1]))


def load_state_dict(
    module: nnx.Module, state_dict: Mapping[str, Any], *, drop_head: bool = False
) -> None:
    """Copies a torchvision state_dict (torch tensors or numpy arrays) into `module` in place.

    Strict: every Param/BatchStat must be filled and every key used with a matching shape, else
    one `WeightsMismatchError` names the missing, unexpected, mis-shaped and non-float keys
    (the first `SHOWN_KEYS` of each, counting the rest; nothing is modified). `drop_head` ignores the classification head (`fc.*`, `classifier.*`, `heads.*`)
    on both sides, for include_top=False backbones or new heads. `encoder.pos_embedding` with
    another token count is resized (bicubic, torchvision-exact). Values are cast to the module's
    dtypes.
    """
    expected = {
        tuple(path): var.get_value()
        for path, var in nnx.to_flat_state(nnx.state(module, (nnx.Param, nnx.BatchStat)))
    }
    if drop_head:
        expected = {p: v for p, v in expected.items() if not _is_head(p)}
    updates, unexpected, mis_shaped, not_float, seen = {}, [], [], [], set()
    for key, value in _dermjax_keys(state_dict).items():
        if drop_head and _is_head(key):
            continue
        target = _target(module, key)
        if target is None or target[0] not in expected:
            unexpected.append(key)
            continue
        path, transform = target
        seen.add(path)
        array = to_numpy(value)
        want = tuple(expected[path].shape)
        if transform is not None and array.ndim != len(want):  # the layout change needs it
            mis_shaped.append(f"{key}: got {array.shape} ({array.ndim}-D), model has {want}")
            continue
        array = transform(array) if transform is not None else array
        if array.shape != want and path[-1] == "pos_embedding":
            resized = _resize_pos_embedding(array, want)
            array = array if resized is None else resized
        if array.shape != want:
            mis_shaped.append(f"{key}: got {array.shape} (as stored in dermjax), model has {want}")
            continue
        if jnp.issubdtype(expected[path].dtype, jnp.floating) and not jnp.issubdtype(
            array.dtype, jnp.floating
        ):
            not_float.append(f"{key}: {array.dtype}")  # a cast would train on garbage
            continue
        updates[path] = array
    missing = [torch_key(p) for p in expected if p not in seen]
    if missing or unexpected or mis_shaped or not_float:
        problems = key_problems(
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mis_shaped),
            ("not floating-point", not_float),
        )
        raise WeightsMismatchError(f"state_dict does not match {type(module).__name__}: {problems}")
    for path, array in updates.items():
        var = _variable(module, path)
        var.set_value(jnp.asarray(array, dtype=expected[path].dtype))


def key_problems(*groups: tuple[str, list[str]]) -> str:
    """`title (count): key, key, ..., and N more` for each non-empty (title, keys) group, joined
    by "; " (the first `SHOWN_KEYS` keys of each are named)."""
    parts = []
    for title, keys in groups:
        if keys:
            more = f", and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
            parts.append(f"{title} ({len(keys)}): {', '.join(keys[:SHOWN_KEYS])}{more}")
    return "; ".join(parts)


def _concrete_rng_state(module: nnx.Module, seed: int) -> None:
    """Gives an abstract module's dropout/stochastic-depth RNG streams real keys and counts."""
    state = nnx.state(module, nnx.RngState)
    flat = nnx.to_flat_state(state)
    for index, (_, var) in enumerate(flat):
        if isinstance(var, nnx.RngKey):
            var.set_value(jax.random.fold_in(jax.random.key(seed), index))
        else:
            var.set_value(jnp.zeros(var.get_value().shape, var.get_value().dtype))
    nnx.update(module, nnx.from_flat_state(flat))


def backbone_from_state_dict(
    name: str, state_dict: Mapping[str, Any], *, seed: int = 0, **backbone_kwargs: Any
) -> nnx.Module:
    """`create_backbone(name, **backbone_kwargs)` filled from a torchvision state_dict.

    Much cheaper than building and then loading: the module is traced abstractly (no random
    init) and every parameter comes from `state_dict`. The head is dropped from the state_dict
    when include_top=False. Dropout RNG streams are seeded from `seed`.
    """
    from dermjax.models import create_backbone

    module = nnx.eval_shape(lambda: create_backbone(name, rngs=nnx.Rngs(seed), **backbone_kwargs))
    load_state_dict(module, state_dict, drop_head=not backbone_kwargs.get("include_top", False))
    _concrete_rng_state(module, seed)
    abstract = [
        path
        for path, var in nnx.to_flat_state(nnx.state(module))
        if isinstance(var.get_value(), jax.ShapeDtypeStruct)
    ]
    if abstract:
        raise ValueError(f"{name}: variables not covered by the state_dict: {abstract}")
    return module


def pretrained_backbone(
    name: str, weights_path: str | os.PathLike | None = None, **backbone_kwargs: Any
) -> nnx.Module:
    """Backbone `name` with converted torchvision weights (see `resolve_weights_path`).

    A file that is no safetensors file, or does not fit `name`, raises `WeightsMismatchError`
    naming the file, what is wrong and the command that converts weights for `name` (to the
    weights folder: never over the file the user pointed at, unless that is the folder's file).
    """
    path = resolve_weights_path(name, weights_path)
    default = weights_dir() / f"{name}.safetensors"
    fix = (
        f"point vision_model.weights_path at a file converted for {name}, or convert one: "
        f"{conversion_command(name, default, force=path.resolve() == default.resolve())}"
    )
    state_dict, meta = read_converted(path, name)
    stored = meta.get("arch")
    if stored and stored != name:
        raise WeightsMismatchError(f"{path} holds {stored} weights, not {name}; {fix}")
    try:
        module = backbone_from_state_dict(name, state_dict, **backbone_kwargs)
    except WeightsMismatchError as error:
        raise WeightsMismatchError(
            f"{path} does not hold {name} weights ({error}); {fix}"
        ) from error
    source = f" ({meta['weights']})" if meta.get("weights") else ""
    log.info("backbone %s: torchvision weights%s from %s", name, source, path)
    return module


def read_converted(path: Path, name: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The arrays and metadata of a converted weights file; `WeightsMismatchError` when `path`
    is no readable safetensors file (a torch .pth, a cut-off copy)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            arrays = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (no __iter__)
            return arrays, dict(f.metadata() or {})
    except (SafetensorError, OSError) as error:
        out = weights_dir() / f"{name}.safetensors"
        if path.suffix == ".safetensors":  # damaged: convert again
            fix = f"convert it again: {conversion_command(name, out, force=path == out)}"
        else:
            fix = (
                f"a torch .pth state_dict converts with: python scripts/convert_torchvision.py "
                f"--arch {name} --state-dict {shlex.quote(str(path))} --out {shlex.quote(str(out))}"
            )
        raise WeightsMismatchError(
            f"{path} is not a readable safetensors file ({first_line(error)}); {fix}"
        ) from None


def save_converted(
    state_dict: Mapping[str, Any],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes the torch-keyed state_dict (legacy keys fixed, no `num_batches_tracked`), readable
    by others as the umask allows (safetensors itself creates owner-only files)."""
    from safetensors.numpy import save_file

    arrays = {
        key: np.ascontiguousarray(to_numpy(value))
        for key, value in fix_legacy_keys(state_dict).items()
        if not key.endswith("num_batches_tracked")
    }
    save_file(arrays, str(path), metadata=dict(metadata or {}))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def weights_dir() -> Path:
    """`$DERMJAX_WEIGHTS_DIR`, default ~/.cache/dermjax/weights."""
    return Path(os.environ.get("DERMJAX_WEIGHTS_DIR") or DEFAULT_WEIGHTS_DIR).expanduser()


def conversion_command(name: str, out: str | os.PathLike, *, force: bool = False) -> str:
    """The command that writes converted default torchvision weights for `name` to `out`
    (`force`: over the file there)."""
    return (
        f"python scripts/convert_torchvision.py --arch {shlex.quote(name)} --weights DEFAULT "
        f"--out {shlex.quote(str(out))}" + (" --force" if force else "")
    )


def resolve_weights_path(name: str, weights_path: str | os.PathLike | None = None) -> Path:
    """Converted weights for backbone `name`: `weights_path`, else `weights_dir()/<name>.safetensors`.

    Raises `WeightsNotFoundError` with the exact conversion command when the file does not exist.
    """
    path = (
        Path(weights_path).expanduser() if weights_path else weights_dir() / f"{name}.safetensors"
    )
    if not path.is_file():
        out = path / f"{name}.safetensors" if path.is_dir() else path  # a folder: a file in it
        raise WeightsNotFoundError(
            f"no converted torchvision weights for {name!r} at {path}; convert them once on a "
            f"machine with internet and torch + torchvision: {conversion_command(name, out)}"
        )
    return path
