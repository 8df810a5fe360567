"""The logic behind `scripts/modal_app.py`, kept free of `modal` so it runs and is tested anywhere.

* `ModalSettings` / `settings_from_env`: GPU types, timeout, retries, Volume and Secret names,
  read from `DERMJAX_MODAL_*` environment variables (defaults in `ModalSettings`).
* `sync_folder` / `sync_dataset`: copy a dataset folder (gs:// or any fsspec URL) into a local
  folder (the mounted Volume) with a thread pool, skipping files already there with the same
  size, calling `commit` every `commit_every` copied files and at the end; every failed file is
  logged and counted, and `sync_dataset` raises when any failed.
* `train`: what `python -m dermjax.main` does (config file, `--config.*` overrides, validation,
  `runner.run`) in the run folder `<runs_root>/<run name>`, so a retried or re-launched call with
  the same run name resumes that run. A `CommitWatcher` commits the Volume from a background
  thread whenever a checkpoint, metrics.jsonl or summary.json appears or changes, and once more
  at the end, whatever the outcome.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import os
import pathlib
import re
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ml_collections import config_dict

from dermjax.errors import ConfigError, DataError, UserError

log = logging.getLogger(__name__)

DATA_MOUNT = "/data"  # data Volume inside the container (= the configs' default data.local_root)
RUNS_MOUNT = "/runs"  # runs Volume inside the container: one folder per run
GCS_CREDENTIALS_JSON = "GOOGLE_APPLICATION_CREDENTIALS_JSON"  # key of the GCS Secret (original's)
ENV_PREFIX = "DERMJAX_MODAL_"


@dataclasses.dataclass(frozen=True)
class ModalSettings:
    """Deployment settings; each is read from `DERMJAX_MODAL_<FIELD IN CAPITALS>` when set."""

    app_name: str = "dermjax"
    gpu: tuple[str, ...] = ("H100", "A100-80GB")  # tried in this order (comma-separated)
    cpu: float = 16.0  # cores for the grain decode workers
    timeout_s: int = 24 * 3600  # per attempt; Modal's maximum is 24 h
    retries: int = 4  # new attempts after a failure, preemption or timeout; each resumes
    data_volume: str = "training-data"  # the original's Volume names, so its synced data is reused
    runs_volume: str = "training-checkpoints"
    wandb_secret: str = "wandb-secret"  # provides WANDB_API_KEY; empty: no Secret
    gcs_secret: str = "gcs-secret"  # provides GOOGLE_APPLICATION_CREDENTIALS_JSON; empty: none
    gcs_root: str = "gs://apcomp215-datasets"  # bucket root sync_data copies from
    python_version: str = "3.11"
    jax_requirement: str = "jax[cuda13]>=0.10.2"

    def as_env(self) -> dict[str, str]:
        """The settings as environment variables (passed to the containers, which re-import)."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[ENV_PREFIX + field.name.upper()] = (
                ",".join(value) if isinstance(value, tuple) else str(value)
            )
        return out


# Modal's rule for Volume names; a GPU is a type with an optional ":count".
_VOLUME_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_GPU = re.compile(r"[A-Za-z0-9._-]+(:[1-9][0-9]*)?")


def settings_from_env(environ: Mapping[str, str] | None = None) -> ModalSettings:
    """ModalSettings with every `DERMJAX_MODAL_*` variable of `environ` (default os.environ).

    Raises UserError naming every bad or unknown variable (a misspelled one used to be
    ignored, leaving the default in place).
    """
    environ = os.environ if environ is None else environ
    fields = {ENV_PREFIX + f.name.upper(): f for f in dataclasses.fields(ModalSettings)}
    problems = [
        f"{name} is not a setting (known: {', '.join(sorted(fields))})"
        for name in sorted(environ)
        if name.startswith(ENV_PREFIX) and name not in fields
    ]
    values: dict[str, Any] = {}
    for name, field in fields.items():
        if name not in environ:
            continue
        text = environ[name].strip()
        kind = type(field.default)
        try:
            if kind is tuple:
                values[field.name] = tuple(p.strip() for p in text.split(",") if p.strip())
            else:
                values[field.name] = kind(text)
        except ValueError:
            problems.append(f"{name}={text!r}: expected a value of type {kind.__name__}")
    settings = ModalSettings(**values)
    if not settings.gpu:
        problems.append(f"{ENV_PREFIX}GPU is empty: name a GPU type, e.g. H100,A100-80GB")
    problems += [
        f"{ENV_PREFIX}GPU: {gpu!r} is not TYPE or TYPE:COUNT (e.g. A100-80GB or H100:2)"
        for gpu in settings.gpu
        if not _GPU.fullmatch(gpu)
    ]
    if not (math.isfinite(settings.cpu) and settings.cpu > 0):
        problems.append(f"{ENV_PREFIX}CPU={settings.cpu}: must be a number of cores above 0")
    if not 1 <= settings.timeout_s <= 24 * 3600:
        problems.append(f"{ENV_PREFIX}TIMEOUT_S={settings.timeout_s}: must be 1..86400 s")
    if not 0 <= settings.retries <= 10:
        problems.append(f"{ENV_PREFIX}RETRIES={settings.retries}: must be 0..10")
    problems += [
        f"{ENV_PREFIX}{field.upper()}={getattr(settings, field)!r}: a Volume name is 1-64 "
        "letters, digits, '.', '_' or '-'"
        for field in ("data_volume", "runs_volume")
        if not _VOLUME_NAME.fullmatch(getattr(settings, field))
    ]
    if problems:
        raise UserError(f"Modal settings: {'; '.join(problems)}")
    return settings


def install_gcs_credentials(environ: dict[str, str] | None = None, folder: str = "/tmp") -> None:
    """Writes the GCS Secret's service-account JSON to a file gcsfs finds (GOOGLE_APPLICATION_...).

    Does nothing when the Secret is absent (a public bucket with FSSPEC_GCS_TOKEN=anon, or other
    credentials already set).
    """
    environ = os.environ if environ is None else environ
    text = environ.get(GCS_CREDENTIALS_JSON)
    if not text:
        return
    path = os.path.join(folder, "gcs-service-account.json")
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(text)
    environ["GOOGLE_APPLICATION_CREDENTIALS"] = path


# --------------------------------------------------------------------------- sync


@dataclasses.dataclass
class SyncResult:
    """What a sync did: files copied, skipped (same size already there), failed (path, error)."""

    copied: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    bytes_copied: int = 0

    def summary(self) -> str:
        return (
            f"copied {self.copied} ({self.bytes_copied / 1e9:.2f} GB), skipped {self.skipped} "
            f"(same size already there), failed {len(self.failed)}"
        )


def _copy_one(fs, remote: str, local: str, size: int) -> int:
    """Downloads `remote` to `local` through a temporary file; returns the bytes written."""
    os.makedirs(os.path.dirname(local), exist_ok=True)
    partial = local + ".part"
    fs.get_file(remote, partial)
    got = os.path.getsize(partial)
    if got != size:
        os.remove(partial)
        raise OSError(f"downloaded {got} bytes, the bucket lists {size}")
    os.replace(partial, local)
    return got


def sync_folder(
    src: str,
    dest: str,
    *,
    workers: int = 64,
    commit: Callable[[], None] | None = None,
    commit_every: int = 2000,
    progress_every: int = 1000,
) -> SyncResult:
    """Copies every file under `src` (a gs:// or local folder) to the same place under `dest`.

    Files already in `dest` with the listed size are skipped; others are downloaded in parallel
    (`workers` threads). `commit` runs after every `commit_every` copied files and at the end.
    A file that fails is logged with its error and listed in the result, never dropped.
    """
    from dermjax.data import fs as dfs

    fs = dfs.filesystem(src)
    root = fs._strip_protocol(src).rstrip("/")
    listing = fs.find(src, detail=True)
    files = {
        path: int(info["size"])
        for path, info in listing.items()
        if info.get("type", "file") != "directory"
    }
    log.info("sync %s -> %s: %d files listed", src, dest, len(files))
    result = SyncResult()
    todo = []
    for path, size in sorted(files.items()):
        local = os.path.join(dest, os.path.relpath(path, root))
        if os.path.isfile(local) and os.path.getsize(local) == size:
            result.skipped += 1
        else:
            todo.append((path, local, size))
    since_commit = 0
    done = result.skipped
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        futures = {pool.submit(_copy_one, fs, *job): job[0] for job in todo}
        for future in concurrent.futures.as_completed(futures):
            path = futures[future]
            try:
                result.bytes_copied += future.result()
                result.copied += 1
                since_commit += 1
            except Exception as e:  # every failure is reported, whatever its kind
                result.failed.append((path, f"{type(e).__name__}: {e}"))
                log.error("sync: could not copy %s: %s", path, result.failed[-1][1])
            done += 1
            if commit is not None and since_commit >= commit_every:
                commit()
                since_commit = 0
            if done % progress_every == 0:
                log.info("sync: %d/%d files; %s", done, len(files), result.summary())
    if commit is not None:
        commit()
    log.info("sync %s -> %s done: %s", src, dest, result.summary())
    return result


def sync_dataset(src: str, dest: str, **kwargs: Any) -> SyncResult:
    """`sync_folder`, raising DataError when `src` is empty or any file failed (after committing)."""
    result = sync_folder(src, dest, **kwargs)
    if not (result.copied or result.skipped or result.failed):
        raise DataError(f"{src} holds no files: check the bucket and dataset names")
    if result.failed:
        first = "; ".join(f"{p} ({e})" for p, e in result.failed[:5])
        raise DataError(
            f"{len(result.failed)} file(s) could not be copied from {src} ({result.summary()}); "
            f"first: {first}. Re-run sync_data: copied files are skipped, failed ones retried."
        )
    return result


# --------------------------------------------------------------------------- train


class RunInterrupted(RuntimeError):
    """The run saved a checkpoint and stopped on a termination signal: raised so Modal retries."""


class CommitWatcher:
    """Commits a Volume from a background thread whenever the run folder's results change.

    The fingerprint is the list of entries of `checkpoints/` (a finished Orbax save renames its
    step folder into place) and the sizes of metrics.jsonl and summary.json, polled every
    `interval_s`; on exit one last commit is made whatever happened.
    """

    def __init__(self, run_dir: str, commit: Callable[[], None], interval_s: float = 30.0):
        self._run_dir = run_dir
        self._commit = commit
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.commits = 0

    def fingerprint(self) -> tuple:
        def size(name: str) -> int:
            path = os.path.join(self._run_dir, name)
            return os.path.getsize(path) if os.path.exists(path) else -1

        checkpoints = os.path.join(self._run_dir, "checkpoints")
        entries = sorted(os.listdir(checkpoints)) if os.path.isdir(checkpoints) else []
        return (tuple(entries), size("metrics.jsonl"), size("summary.json"))

    def _do_commit(self) -> None:
        self._commit()
        self.commits += 1

    def _loop(self, seen: tuple) -> None:
        while not self._stop.wait(self._interval_s):
            now = self.fingerprint()
            if now != seen:
                try:
                    self._do_commit()
                    seen = now
                except Exception as e:  # a failed commit is retried at the next change or exit
                    log.warning("volume commit failed (retried later): %s", e)

    def __enter__(self) -> CommitWatcher:
        self._thread = threading.Thread(
            target=self._loop, args=(self.fingerprint(),), name="volume-commit", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._do_commit()


def local_inputs(config: str) -> dict[str, str]:
    """Texts of the local files `config` ("FILE.py[:ARG]") names, to ship to the container.

    Packaged configs (`configs/NAME.py` absent here) are not shipped: the image has them.
    """
    file, _, arg = config.partition(":")
    paths = [p for p in (file, arg) if p and os.path.isfile(p)]
    return {os.path.basename(p): pathlib.Path(p).read_text() for p in paths}


def _config_with_inputs(config: str, inputs: Mapping[str, str], folder: str) -> str:
    """Writes shipped files into `folder` and points `config` at them."""
    if not inputs:
        return config
    os.makedirs(folder, exist_ok=True)
    for name, text in inputs.items():
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    parts = config.split(":", 1)
    shipped = [
        os.path.join(folder, os.path.basename(p)) if os.path.basename(p) in inputs else p
        for p in parts
    ]
    return ":".join(shipped)


def read_config(config: str, overrides: Sequence[str]) -> config_dict.ConfigDict:
    """The config `python -m dermjax.main --config=CONFIG OVERRIDES...` reads, validated."""
    from dermjax.cli import apply_overrides, resolve_config_arg, split_overrides
    from dermjax.config import load_config, validate

    argv = resolve_config_arg(["modal", f"--config={config}", *overrides])
    rest, parsed = split_overrides(argv)
    unexpected = [a for a in rest[1:] if not a.startswith("--config=")]
    if unexpected:
        raise ConfigError(
            f"unexpected argument(s) {' '.join(unexpected)}: overrides are --config.FIELD=VALUE"
        )
    file, _, arg = rest[1].removeprefix("--config=").partition(":")
    cfg = load_config(file, arg or None)
    apply_overrides(cfg, parsed)
    validate(cfg)
    return cfg


def run_dir_for(cfg: config_dict.ConfigDict, runs_root: str, run_name: str = "") -> str:
    """The run folder: `<runs_root>/<run_name or output.experiment_name>`."""
    return os.path.join(runs_root, run_name or cfg.output.experiment_name)


def train(
    config: str,
    overrides: Sequence[str] = (),
    *,
    runs_root: str,
    run_name: str = "",
    inputs: Mapping[str, str] | None = None,
    commit: Callable[[], None] = lambda: None,
    commit_interval_s: float = 30.0,
) -> dict[str, Any]:
    """Trains (or resumes, or reports a finished) run in `<runs_root>/<run_name>`; its summary.

    `overrides` are `--config.FIELD=VALUE` strings applied in order (a later one wins), so
    defaults a caller puts first can be overridden by the user's. `run_name` defaults to
    `output.experiment_name`. `inputs` ({file name: text}) are local config/YAML files shipped
    by the launcher; `config` names them by their local paths.
    The returned summary gains `run_dir`. Raises RunInterrupted after a termination signal.
    """
    import jax

    from dermjax import parallel, runner
    from dermjax.config import validate_for_run
    from dermjax.main import setup_logging

    parallel.maybe_initialize_distributed()
    with tempfile.TemporaryDirectory() as folder:
        cfg = read_config(_config_with_inputs(config, inputs or {}, folder), overrides)
    validate_for_run(cfg, device_count=jax.device_count(), process_count=jax.process_count())
    run_dir = run_dir_for(cfg, runs_root, run_name)
    setup_logging()
    log.info("run folder %s (config %s, overrides %s)", run_dir, config, list(overrides))
    with CommitWatcher(run_dir, commit, commit_interval_s):
        summary = runner.run(cfg, run_dir)
    if summary.get("preempted"):
        raise RunInterrupted(
            f"stopped by a termination signal at step {summary['step']}; its checkpoint is in "
            f"{run_dir}: a retry or the same command resumes it"
        )
    return {**summary, "run_dir": run_dir}


def embed_command(config: str, out: str = "", overrides: Sequence[str] = ()) -> list[str]:
    """The `python -m dermjax.embed` command line; `--resume` makes a retried call continue.

    Without `out`, the file is the one training reads (under data.local_root).
    """
    target = [f"--out={out}"] if out else []
    return [
        sys.executable,
        "-m",
        "dermjax.embed",
        f"--config={config}",
        *target,
        "--resume",
        *overrides,
    ]


def results_note(summary: Mapping[str, Any], volume: str, mount: str) -> str:
    """Where a run's results are, for the launcher to print."""
    rel = os.path.relpath(summary["run_dir"], mount)
    brief = {k: summary[k] for k in ("val", "test") if k in summary}
    return (
        f"run folder: Volume {volume!r}, /{rel} (metrics.jsonl, summary.json, checkpoints/); "
        f"download: modal volume get {volume} /{rel} .\n" + json.dumps(brief, default=str)
    )
