"""fsspec helpers: read local or gs:// paths with one filesystem per protocol per process.

The filesystems live in a module-level cache keyed by process id, so they are never pickled into
grain workers (each spawned worker builds its own on first use) and never shared across a fork.
gcsfs reads its settings from the environment (`STORAGE_EMULATOR_HOST`, `FSSPEC_GCS_TOKEN`); set
`GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false` before gcsfs is imported when talking to an emulator.
"""

from __future__ import annotations

import os
from typing import IO

import fsspec
from fsspec.utils import get_protocol

_FILESYSTEMS: dict[tuple[int, str], fsspec.AbstractFileSystem] = {}


def is_local(path: str) -> bool:
    """True for plain paths and file:// URLs."""
    return get_protocol(path) in ("file", "local")


def filesystem(path: str) -> fsspec.AbstractFileSystem:
    """The filesystem serving `path`, created once per protocol in this process."""
    key = (os.getpid(), get_protocol(path))
    fs = _FILESYSTEMS.get(key)
    if fs is None:
        fs = fsspec.filesystem(key[1], skip_instance_cache=True)
        _FILESYSTEMS[key] = fs
    return fs


def open_file(path: str, mode: str = "rb") -> IO:
    """Open `path` (local or remote) as a file object; use it as a context manager."""
    return filesystem(path).open(path, mode)


def read_bytes(path: str) -> bytes:
    """The whole content of `path`."""
    return filesystem(path).cat_file(path)


def read_many(paths: list[str]) -> list[bytes | Exception]:
    """Contents of `paths` in order; a failed read gives its exception instead of raising.

    Remote paths are fetched concurrently (gcsfs runs the requests in parallel), which is what
    keeps a worker busy when every image is a network round trip away.
    """
    out: list[bytes | Exception] = [b""] * len(paths)
    remote: dict[str, dict[str, list[int]]] = {}  # protocol -> path -> positions
    for i, path in enumerate(paths):
        if is_local(path):
            try:
                out[i] = read_bytes(path)
            except OSError as e:
                out[i] = e
        else:
            remote.setdefault(get_protocol(path), {}).setdefault(path, []).append(i)
    for group in remote.values():
        fs = filesystem(next(iter(group)))
        fetched = fs.cat(list(group), on_error="return")
        for path, positions in group.items():
            data = fetched.get(fs._strip_protocol(path), FileNotFoundError(path))
            for i in positions:
                out[i] = data
    return out


def exists(path: str) -> bool:
    """Whether `path` exists."""
    return filesystem(path).exists(path)
