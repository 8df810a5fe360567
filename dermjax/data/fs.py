"""fsspec helpers: read local or gs:// paths with one filesystem per protocol per process.

The filesystems live in a module-level cache keyed by process id, so they are never pickled into
grain workers (each spawned worker builds its own on first use) and never shared across a fork.
gcsfs reads its settings from the environment (`STORAGE_EMULATOR_HOST`, `FSSPEC_GCS_TOKEN`); set
`GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false` before gcsfs is imported when talking to an emulator.

gs:// paths are refused at once, with a hint, when no credentials can be found: gcsfs would
otherwise fall back to anonymous access and retry the refused requests for about a minute.
"""

from __future__ import annotations

import functools
import os
import uuid
from typing import IO

import fsspec
from fsspec.utils import get_protocol

from dermjax.errors import DataError

_FILESYSTEMS: dict[tuple[int, str], fsspec.AbstractFileSystem] = {}
GCS_PROTOCOLS = ("gs", "gcs")
_LOGIN_HINT = (
    "run `gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS to a "
    "service-account key file (FSSPEC_GCS_TOKEN=anon for a public bucket)"
)


@functools.cache
def _on_google_cloud() -> bool:
    """Whether this machine gets credentials from a Google Cloud metadata server (no network)."""
    if any(os.environ.get(v) for v in ("GCE_METADATA_HOST", "GCE_METADATA_IP", "K_SERVICE")):
        return True
    try:
        with open("/sys/class/dmi/id/product_name") as f:
            return "Google" in f.read()
    except OSError:
        return False


def _gcloud_credentials_file() -> str:
    """Where `gcloud auth application-default login` stores the user's credentials."""
    config = os.environ.get("CLOUDSDK_CONFIG")
    if not config:
        base = os.environ.get("APPDATA") if os.name == "nt" else None
        config = os.path.join(base, "gcloud") if base else os.path.expanduser("~/.config/gcloud")
    return os.path.join(config, "application_default_credentials.json")


def check_credentials(path: str, storage_options: dict | None = None) -> None:
    """Raises DataError for a gs:// `path` when no Google Cloud credentials can be found.

    Accepted without a network call: an explicit token (`storage_options["token"]` or
    FSSPEC_GCS_TOKEN, "anon" included), an emulator (STORAGE_EMULATOR_HOST), an existing
    GOOGLE_APPLICATION_CREDENTIALS file, gcloud's application-default credentials, or a
    Google Cloud machine with a metadata server. Other paths are not checked.
    """
    if get_protocol(str(path)) not in GCS_PROTOCOLS:
        return
    token = (storage_options or {}).get("token") or os.environ.get("FSSPEC_GCS_TOKEN")
    if token or os.environ.get("STORAGE_EMULATOR_HOST"):
        return
    key = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if key:
        if os.path.exists(key):
            return
        raise DataError(
            f"cannot read {path}: GOOGLE_APPLICATION_CREDENTIALS={key} does not exist; {_LOGIN_HINT}"
        )
    if os.path.exists(_gcloud_credentials_file()) or _on_google_cloud():
        return
    raise DataError(f"cannot read {path}: no Google Cloud credentials found; {_LOGIN_HINT}")


def storage_options(path: str) -> dict | None:
    """fsspec options for `path`: the FSSPEC_GCS_TOKEN for gs:// URLs, else None."""
    return {"token": os.environ.get("FSSPEC_GCS_TOKEN")} if path.startswith("gs://") else None


def is_local(path: str) -> bool:
    """True for plain paths and file:// URLs."""
    return get_protocol(path) in ("file", "local")


def filesystem(path: str) -> fsspec.AbstractFileSystem:
    """The filesystem serving `path`, created once per protocol in this process."""
    check_credentials(path)
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


def ensure_writable_folder(path: str, what: str, fix: str) -> None:
    """Creates the local folder `path` when missing and checks a file can be written in it.

    Raises one DataError naming `what` (e.g. "--out folder") with the OS's reason and `fix`, so a bad
    output place is reported before any work is done rather than lost after it. URLs are left
    to the writes themselves (object stores have no folders to create).
    """
    if not is_local(path):
        return
    path = path.removeprefix("file://")
    # Unique per call: hosts of a multi-process run share folders and may share pids too.
    probe = os.path.join(path, f".dermjax-write-check-{uuid.uuid4().hex}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        reason = e.strerror or str(e)
        if os.path.exists(path) and not os.path.isdir(path):
            reason = "it is a file, not a folder"
        elif isinstance(e, FileExistsError | NotADirectoryError):
            reason = "a part of the path is a file, not a folder"
        raise DataError(f"{what} {path}: cannot write there ({reason}); {fix}") from e
