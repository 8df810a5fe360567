"""Config validation and derived paths.

`validate` checks every field before any data is touched and raises one `ConfigError` that names
every problem (field, bad value, what is allowed), so a long run never dies on a typo an hour in.
`validate_for_run` adds the checks that need the machine (device count, paths). `data_paths`
derives the metadata, image and embedding locations from `data.dataset` and `data.use_local` as
the original did, with explicit paths taking precedence. The field rules are in `config_rules`.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import importlib.util
import math
import os
import pathlib
import posixpath
from typing import Any

from ml_collections import config_dict

from dermjax import config_rules
from dermjax.data.encoders import EncoderSettings
from dermjax.errors import ConfigError


def packaged_config_path(name: str) -> pathlib.Path:
    """Path of the config `name` shipped in the `dermjax.configs` package (may not exist)."""
    return pathlib.Path(str(importlib.resources.files("dermjax.configs"))) / f"{name}.py"


def load_config(name: str, arg: str | None = None) -> config_dict.ConfigDict:
    """Loads the packaged config `name` (or a path ending in .py) and calls its get_config."""
    path = pathlib.Path(name) if name.endswith(".py") else packaged_config_path(name)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    spec = importlib.util.spec_from_file_location(f"dermjax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)


def validate(cfg: config_dict.ConfigDict) -> None:
    """Raises ConfigError listing every invalid field of `cfg` (no I/O is done).

    `data.val_size=None` is valid and means no validation split, as in the original: nothing is
    validated or monitored (`training.monitor` is unused, no early stopping), and the run keeps
    its last epoch as the final model.
    """
    problems = config_rules.problems(cfg)
    if problems:
        raise ConfigError(problems)


def validate_for_run(
    cfg: config_dict.ConfigDict, *, device_count: int, process_count: int = 1
) -> None:
    """`validate` plus the checks that need this machine, all in one ConfigError.

    Batch sizes must split evenly over the devices (and processes); local checkpoint sources must
    be readable and local output folders writable or creatable (gs:// paths are not checked).
    """
    problems = config_rules.problems(cfg)
    multiple = math.lcm(device_count, process_count)
    where = f"{device_count} device(s)"
    if process_count > 1:
        where += f" over {process_count} processes"
    for key in ("batch_size", "eval_batch_size"):  # eval_batch_size None: batch_size is used
        size = cfg.training[key]
        if config_rules.is_int(size) and size >= 1 and size % multiple:
            problems.append(
                f"training.{key}={size}: must be divisible by {multiple} ({where}); "
                f"use {_nearest_multiples(size, multiple)}"
            )
    for key in ("load_from", "init_from"):
        path = cfg.checkpoint[key]
        if _is_local(path) and not os.path.exists(path):
            problems.append(f"checkpoint.{key}={path!r}: no such file or folder")
        elif _is_local(path) and not os.access(path, os.R_OK):
            problems.append(f"checkpoint.{key}={path!r}: not readable (check its permissions)")
    for key in ("save_dir", "log_dir"):
        path = cfg.output[key]
        problem = _unwritable(path) if _is_local(path) else None
        if problem:
            problems.append(f"output.{key}={path!r}: {problem}")
    if problems:
        raise ConfigError(problems)


def _nearest_multiples(size: int, multiple: int) -> str:
    below = size // multiple * multiple
    above = below + multiple
    return f"{below} or {above}" if below else str(above)


def _is_local(path: Any) -> bool:
    return isinstance(path, str) and bool(path) and "://" not in path


def _unwritable(path: str) -> str | None:
    """Why the folder `path` cannot be written or created, or None when it can."""
    target = pathlib.Path(path).absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        return f"{str(existing)!r} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        verb = "written" if existing == target else f"created (in {str(existing)!r})"
        return f"cannot be {verb}: permission denied"
    return None


@dataclasses.dataclass(frozen=True)
class DataPaths:
    """Where a run reads its data (local paths or gs:// URLs)."""

    root: str
    metadata: str
    img_prefix: str
    embeddings: str | None
    cache_dir: str


def encoder_settings(cfg: config_dict.ConfigDict) -> EncoderSettings:
    """The configured text encoder, as stored in and compared with embeddings files."""
    e = cfg.encoder
    return EncoderSettings.create(
        e.model_name,
        max_length=e.max_length,
        pooling_type=e.pooling_type,
        instruction=e.qwen_instr,
        output_dim=e.output_dim,
        dtype=e.dtype,
    )


def data_paths(cfg: config_dict.ConfigDict) -> DataPaths:
    """Derives paths from data.dataset + data.use_local; explicit fields win.

    Without a data.dataset the root is the folder of data.metadata_path. The embeddings file is
    data.embeddings_path, else <root>/embeddings/ with encoder.embedding_filename or, when that
    is None, the name derived from the encoder settings (`EncoderSettings.filename`), so that
    two encoders never share a file.
    """
    d = cfg.data
    base = _local(d.local_root) if d.use_local else d.gcs_root
    if d.dataset:
        root = f"{base.rstrip('/')}/{d.dataset}"
    else:
        root = posixpath.dirname(_local(d.metadata_path)) if d.metadata_path else ""
    emb_file = cfg.encoder.embedding_filename or encoder_settings(cfg).filename()
    return DataPaths(
        root=root,
        metadata=_local(d.metadata_path or f"{root}/metadata_all_harmonized.csv"),
        img_prefix=_local(d.img_prefix or f"{root}/imgs"),
        embeddings=_local(d.embeddings_path or (f"{root}/embeddings/{emb_file}" if root else ""))
        or None,
        cache_dir=_local(d.cache_dir or f"{root or '.'}/cache"),
    )


def _local(path: str) -> str:
    """A local path made absolute (with `~` expanded: fsspec expands it, ArrayRecord not), so
    that `data/x` and `/home/me/data/x` name the same images and the same prepared cache;
    URLs (gs://, file://) and "" unchanged."""
    if not path or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))
