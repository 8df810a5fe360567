"""Command-line entry: validate the config, train, evaluate on the test split.

  python -m dermjax.main --config=configs/demo.py [--config.a.b=V ...] [--workdir=DIR]
      [--dry_run]

A config with bad values exits with status 2 and one message naming every bad field, before any
data is read. Re-running the same command with the same --workdir resumes from its latest
checkpoint.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys

import jax
import yaml
from absl import flags
from ml_collections import config_flags

from dermjax import compile_cache, parallel, runner
from dermjax.cli import run_main, typed_arguments
from dermjax.config import data_paths, packaged_config_path, validate_for_run
from dermjax.weights.torchvision import WeightsNotFoundError, resolve_weights_path

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(packaged_config_path("default")), "Config file (default: configs/default.py)."
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Folder holding everything of this run (logs, metrics, summary, checkpoints); default: "
    "<output.log_dir or workdirs>/<experiment_name>, checkpoints under output.save_dir/<name>.",
)

_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Validate, print the resolved config and every derived path, read no data."
)

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process runs: HOST:PORT of process 0's coordinator."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process runs: process count.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's id.")


def _print_plan(cfg, devices: int) -> None:
    """The resolved config and where the run would read and write (no file is touched)."""
    folders = runner.run_folders(cfg, _WORKDIR.value)
    paths = data_paths(cfg)
    plain = json.loads(json.dumps(cfg.to_dict(), default=str))  # tuples as lists: plain YAML
    print(yaml.safe_dump(plain, sort_keys=False), end="", flush=True)
    rows = {
        "metadata": paths.metadata,
        "images": paths.img_prefix,
        "embeddings": paths.embeddings,
        "prepared cache": paths.cache_dir,
        "run folder (logs, metrics, summary)": folders.run_dir,
        "checkpoints": folders.checkpoint_dir,
        "load_from": cfg.checkpoint.load_from,
        "init_from": cfg.checkpoint.init_from,
        "compilation cache": compile_cache.resolve(cfg.training.compilation_cache_dir),
    }
    if cfg.vision_model.pretrained:
        try:
            rows["pretrained weights"] = resolve_weights_path(
                cfg.vision_model.name, cfg.vision_model.weights_path
            )
        except WeightsNotFoundError as e:  # not needed when the run resumes: no error here
            rows["pretrained weights"] = str(e)
    for name, value in rows.items():
        if value is not None:
            print(f"{name}: {value}")
    print(f"devices: {devices} ({jax.devices()[0].platform}); config is valid")


def setup_logging() -> None:
    """Console logging; `runner.run` adds the run folder's train.log once it holds the lock."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):  # absl's own handler would print every line twice
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(fmt)
    root.addHandler(handler)
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str]) -> None:
    del argv
    cfg = _CONFIG.value
    launch = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if _DRY_RUN.value:  # alone: no runtime to start, no other process to wait for
        processes = (parallel.explicit_launch(*launch) or {}).get("num_processes", 1)
        devices = jax.local_device_count() * processes  # as many on every host
        validate_for_run(cfg, device_count=devices, process_count=processes)
        _print_plan(cfg, devices)
        return
    parallel.maybe_initialize_distributed(*launch)
    # Before validation: a config only one process got wrong would leave the others waiting.
    parallel.check_same_launch({"config": cfg.to_dict()})
    validate_for_run(cfg, device_count=jax.device_count(), process_count=jax.process_count())
    setup_logging()
    compile_cache.enable(cfg.training.compilation_cache_dir)
    summary = runner.run(cfg, _WORKDIR.value)
    if summary.get("preempted"):
        folders = runner.run_folders(cfg, _WORKDIR.value)
        done = (
            f"saved step {summary['step']} to {folders.checkpoint_dir}"
            if summary.get("trained", True)
            else "stopped before training, nothing new to save"
        )
        command = shlex.join(["python", "-m", "dermjax.main", *typed_arguments()])
        line = f"Preempted: {done}. Resume with the same command: {command}"
        runner.log_after_run(folders, line)
        print(line, flush=True)
        return
    if summary.get("already_finished"):
        print("This run had already finished; its summary:", flush=True)
    if "test" in summary:
        brief = {k: summary[k] for k in ("val", "test", "baseline") if k in summary}
        print(json.dumps(brief, indent=1, default=str))


def run() -> None:
    """Console-script entry point (`dermjax --config=...`)."""
    run_main(main)


if __name__ == "__main__":
    run()
