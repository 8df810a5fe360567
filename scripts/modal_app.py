"""dermjax on Modal GPUs: sync a dataset from GCS into a Volume, train from it (or from GCS), embed.

  modal run scripts/modal_app.py::sync_data --dataset=dataset_v1
  modal run --detach scripts/modal_app.py::train_volume --config=configs/default.py \\
      --overrides="--config.training.batch_size=128" [--run=NAME]
  modal run --detach scripts/modal_app.py::train_gcs --config=configs/default.py
  modal run --detach scripts/modal_app.py --config=my_experiment.py [--gcs]   # local files too
  modal run scripts/modal_app.py::embed --config=configs/default.py [--out=dataset_v1/embeddings/F]

Every run lives in `/<run name>` on the runs Volume (name: --run, else output.experiment_name);
launching the same run again, or Modal retrying it after a preemption or a timeout, resumes it
from its latest checkpoint. Settings (GPU types, timeout, retries, Volume and Secret names) are
`DERMJAX_MODAL_*` environment variables read at launch; see `dermjax.modal_support.ModalSettings`.
The logic lives in `dermjax.modal_support`; this file only declares the Modal objects.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shlex
import subprocess

import modal

from dermjax import modal_support as ms
from dermjax.errors import UserError

try:
    SETTINGS = ms.settings_from_env()
except UserError as e:  # at import, under `modal run`: the problems, not a traceback
    raise SystemExit(f"error: {e}") from None
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCE_IN_IMAGE = "/opt/dermjax-src"
EXTRAS = "gcs,wandb,text"
# Not part of the package source: VCS, environments, run outputs, data, caches.
NOT_SOURCE = (
    ".git",
    ".venv",
    "build",
    "workdirs",
    "data",
    "weights",
    "wandb",
    "bench_out",
    "**/__pycache__",
    "**/*.egg-info",
    "**/.pytest_cache",
    "**/.ruff_cache",
)

# The CUDA JAX build first (a cached layer), then dermjax itself, installed (not editable) from
# the local source with its packaged configs.
image = (
    modal.Image.debian_slim(python_version=SETTINGS.python_version)
    .uv_pip_install(SETTINGS.jax_requirement)
    .add_local_dir(REPO_ROOT, SOURCE_IN_IMAGE, copy=True, ignore=list(NOT_SOURCE))
    .run_commands(f"python -m pip install --no-cache-dir '{SOURCE_IN_IMAGE}[{EXTRAS}]'")
    .env({**SETTINGS.as_env(), "TOKENIZERS_PARALLELISM": "false"})
)
app = modal.App(SETTINGS.app_name, image=image)

data_volume = modal.Volume.from_name(SETTINGS.data_volume, create_if_missing=True)
runs_volume = modal.Volume.from_name(SETTINGS.runs_volume, create_if_missing=True)


def _secrets(name: str, key: str) -> list[modal.Secret]:
    return [modal.Secret.from_name(name, required_keys=[key])] if name else []


WANDB_SECRETS = _secrets(SETTINGS.wandb_secret, "WANDB_API_KEY")
GCS_SECRETS = _secrets(SETTINGS.gcs_secret, ms.GCS_CREDENTIALS_JSON)
RETRIES = (
    modal.Retries(max_retries=SETTINGS.retries, initial_delay=10.0, max_delay=60.0)
    if SETTINGS.retries
    else None
)
GPU_FUNCTION = {
    "gpu": list(SETTINGS.gpu),
    "cpu": SETTINGS.cpu,
    "timeout": SETTINGS.timeout_s,
    "retries": RETRIES,
}


@app.function(
    cpu=8.0,
    timeout=SETTINGS.timeout_s,
    retries=RETRIES,
    volumes={ms.DATA_MOUNT: data_volume},
    secrets=GCS_SECRETS,
)
def sync_data(
    dataset: str = "dataset_v1", gcs_root: str = "", workers: int = 64, commit_every: int = 2000
) -> dict:
    """Copies <gcs_root>/<dataset>/ into the data Volume's /<dataset>/ (same-size files skipped)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    ms.install_gcs_credentials()
    src = f"{(gcs_root or SETTINGS.gcs_root).rstrip('/')}/{dataset}"
    result = ms.sync_dataset(
        src,
        os.path.join(ms.DATA_MOUNT, dataset),
        workers=workers,
        commit=data_volume.commit,
        commit_every=commit_every,
    )
    return dataclasses.asdict(result)


def _train(config: str, defaults: list[str], overrides: str, run: str, inputs: str) -> dict:
    summary = ms.train(
        config,
        [*defaults, *shlex.split(overrides)],
        runs_root=ms.RUNS_MOUNT,
        run_name=run,
        inputs=json.loads(inputs) if inputs else None,
        commit=runs_volume.commit,
    )
    print(ms.results_note(summary, SETTINGS.runs_volume, ms.RUNS_MOUNT), flush=True)
    return summary


@app.function(
    **GPU_FUNCTION,
    volumes={ms.DATA_MOUNT: data_volume, ms.RUNS_MOUNT: runs_volume},
    secrets=WANDB_SECRETS,
)
def train_volume(
    config: str = "configs/default.py", overrides: str = "", run: str = "", inputs: str = ""
) -> dict:
    """Trains reading the data Volume (data.local_root=/data), like python -m dermjax.main."""
    defaults = ["--config.data.use_local=true", f"--config.data.local_root={ms.DATA_MOUNT}"]
    return _train(config, defaults, overrides, run, inputs)


@app.function(
    **GPU_FUNCTION, volumes={ms.RUNS_MOUNT: runs_volume}, secrets=[*WANDB_SECRETS, *GCS_SECRETS]
)
def train_gcs(
    config: str = "configs/default.py", overrides: str = "", run: str = "", inputs: str = ""
) -> dict:
    """Trains reading gs:// (data.use_local=false, data.gcs_root) through gcsfs and the Secret."""
    ms.install_gcs_credentials()
    return _train(config, ["--config.data.use_local=false"], overrides, run, inputs)


@app.function(**GPU_FUNCTION, volumes={ms.DATA_MOUNT: data_volume})
def embed(config: str = "configs/default.py", out: str = "", overrides: str = "") -> str:
    """Runs python -m dermjax.embed on a GPU into the data Volume (`out`: a path in it, optional)."""
    target = os.path.join(ms.DATA_MOUNT, out) if out else ""
    defaults = [f"--config.data.local_root={ms.DATA_MOUNT}"]
    command = ms.embed_command(config, target, [*defaults, *shlex.split(overrides)])
    try:
        subprocess.run(command, check=True)
    finally:
        data_volume.commit()  # a partial file is kept: the retry's --resume continues it
    print(f"embeddings written to Volume {SETTINGS.data_volume!r} ({target or 'default path'})")
    return target


@app.local_entrypoint()
def main(
    config: str = "configs/default.py", overrides: str = "", run: str = "", gcs: bool = False
) -> None:
    """Checks the config here, ships local config files, trains, prints where results land."""
    cfg = ms.read_config(config, shlex.split(overrides))
    run_dir = ms.run_dir_for(cfg, ms.RUNS_MOUNT, run)
    function = train_gcs if gcs else train_volume
    print(
        f"launching {'train_gcs' if gcs else 'train_volume'} on {'/'.join(SETTINGS.gpu)}; "
        f"results: Volume {SETTINGS.runs_volume!r}, {run_dir} "
        f"(modal volume get {SETTINGS.runs_volume} /{os.path.relpath(run_dir, ms.RUNS_MOUNT)})",
        flush=True,
    )
    inputs = ms.local_inputs(config)
    summary = function.remote(config, overrides, run, json.dumps(inputs) if inputs else "")
    print(ms.results_note(summary, SETTINGS.runs_volume, ms.RUNS_MOUNT), flush=True)
