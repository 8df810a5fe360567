"""JAX's persistent compilation cache for training runs (`training.compilation_cache_dir`).

A run compiles its train and eval steps before the first batch: ~25 s of the CPU demo's 95 s,
and on a GPU 19 s (ResNet-50) to 67 s (EfficientNet-B0) per start. With the cache, a resumed or
relaunched run, or another run of the same shapes, loads those programs instead (the demo in a
fresh folder: 95 -> 74 s). The cache is an optimisation: a folder that cannot be created is
logged and the run goes on without it.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)

AUTO = "auto"
ENV = "JAX_COMPILATION_CACHE_DIR"


def user_cache_dir() -> str:
    """$XDG_CACHE_HOME/dermjax/jax, else ~/.cache/dermjax/jax."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dermjax", "jax")


def resolve(setting: str | None) -> str | None:
    """The folder `setting` names: "auto" is $JAX_COMPILATION_CACHE_DIR when set, else the user
    cache folder; None or "" is no cache; anything else is a folder (local, `~`, or gs://)."""
    if not setting:
        return None
    if setting == AUTO:
        return os.environ.get(ENV) or user_cache_dir()
    return setting if "://" in setting else os.path.abspath(os.path.expanduser(setting))


def enable(setting: str | None) -> str | None:
    """Points JAX's persistent compilation cache at `resolve(setting)` (or turns it off); returns
    the folder in use. Call before the first compilation of the process."""
    folder = resolve(setting)
    if folder is not None and "://" not in folder:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            log.warning(
                "compilation cache: cannot create %s (%s); compiling without it. Set "
                "training.compilation_cache_dir to a writable folder, or None.",
                folder,
                e.strerror or e,
            )
            folder = None
    jax.config.update("jax_compilation_cache_dir", folder)
    if folder is not None:
        log.info("compilation cache: %s", folder)
    return folder
