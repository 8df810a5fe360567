"""Which checkpoint a path names, and its config and meta, before any array is read.

`open_checkpoint(path)` accepts a run folder, its `checkpoints/` folder, a kind folder
(`.../best`) or a step folder, picks the best step when there is one (else the latest), and
rebuilds the config saved in the checkpoint on the current schema, never from today's defaults;
command-line overrides go on top, with a warning for fields the run was trained with.
`dermjax.evaluation.inference` restores the weights from there.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

from etils import epath
from ml_collections import config_dict

from dermjax.cli import apply_overrides
from dermjax.config import load_config, validate
from dermjax.errors import UserError
from dermjax.train.checkpoint import CheckpointError, CheckpointReader, resolve_load_from
from dermjax.train.checkpoint_restore import RESTORE_PRIORITY
from dermjax.weights.original import conversion_command, is_original_checkpoint

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
    """Which checkpoint is used: its folder, step, kind (best, latest, ...) and run folder."""

    directory: str
    step: int
    kind: str
    run_dir: str | None  # the folder holding `checkpoints/`, when the layout shows it


def locate_checkpoint(path: str) -> CheckpointRef:
    """The checkpoint `path` names: the best step when present, else the latest (only reads)."""
    path = str(path).rstrip("/")
    hint = "give a run folder, its checkpoints/ folder or a step folder (RUN/checkpoints/best/120)"
    if is_original_checkpoint(path):
        raise CheckpointError(
            f"--checkpoint={path}: a PyTorch checkpoint of the original workflow; convert it "
            f"once with `{conversion_command(path)}` and pass the --out folder"
        )
    if "://" not in path and not os.path.isdir(path):
        what = " is a file" if os.path.exists(path) else ": no such folder"
        raise CheckpointError(f"--checkpoint={path}{what}; {hint}")
    try:
        directory, step = resolve_load_from(path)
    except CheckpointError as e:
        raise CheckpointError(f"--checkpoint={path}: no checkpoint there; {hint}") from e
    name = epath.Path(path).name
    with CheckpointReader(directory) as reader:
        if step is not None:
            kind = name if name in RESTORE_PRIORITY else epath.Path(path).parent.name
        elif (step := reader.best()) is not None:
            kind = "best"
        elif (step := reader.latest()) is not None:
            kind = "latest"
        else:
            raise CheckpointError(f"--checkpoint={path}: no finished checkpoint under {directory}")
    parent = os.path.dirname(directory)
    run_dir = parent if os.path.basename(directory) == "checkpoints" else None
    return CheckpointRef(directory, int(step), kind, run_dir)


def config_from_checkpoint(stored: dict[str, Any]) -> config_dict.ConfigDict:
    """The checkpoint's config on the current schema (fields it lacks keep their defaults)."""
    cfg = load_config("default")
    unknown: list[str] = []

    def fill(node: config_dict.ConfigDict, values: dict[str, Any], prefix: str) -> None:
        for key, value in values.items():
            if key not in node:
                unknown.append(prefix + key)
            elif isinstance(node[key], config_dict.ConfigDict):
                fill(node[key], value, f"{prefix}{key}.")
            else:
                node[key] = value

    try:
        fill(cfg, stored, "")
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"the checkpoint's config does not fit this dermjax: {e}") from e
    if unknown:
        log.warning("checkpoint config fields unknown to this dermjax are ignored: %s", unknown)
    return cfg


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint's reference, config (overrides applied) and meta: no arrays read yet."""

    ref: CheckpointRef
    cfg: config_dict.ConfigDict
    meta: dict[str, Any]
    trained_changes: list[str] = dataclasses.field(default_factory=list)  # by the overrides

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.meta["classes"]]

    @property
    def img_size(self) -> tuple[int, int]:
        return int(self.meta["img_size"][0]), int(self.meta["img_size"][1])

    @property
    def default_mode(self) -> str:
        """The mode the model was trained and validated in (`masking.mask_complete`)."""
        masked = self.cfg.masking.mask_complete
        return {None: "both", "text": "image_only", "image": "text_only"}[masked]

    @property
    def multimodal(self) -> bool:
        return self.default_mode == "both"


def text_input_size(ckpt: Checkpoint) -> int:
    """Values per text embedding the model takes: from the stored encoder spec or, for a run
    trained from an embeddings file without one, from the saved head's shapes."""
    dim = (ckpt.meta.get("encoder") or {}).get("dim")
    return int(dim) if dim else _saved_text_dim(ckpt.ref)


def _saved_text_dim(ref: CheckpointRef) -> int:
    import orbax.checkpoint as ocp

    for sub in RESTORE_PRIORITY:  # the kind folders
        state = epath.Path(ref.directory) / sub / str(ref.step) / "state"
        if state.exists():
            tree = ocp.StandardCheckpointHandler().metadata(state).tree
            projection = tree["params"]["head"]["text_projection"]
            hidden = projection.get("hidden") or {}
            first = hidden[min(hidden, key=int)]["linear"] if hidden else projection["out"]
            return int(first["kernel"].shape[0])
    raise CheckpointError(f"step {ref.step} under {ref.directory}: no saved state")


def open_checkpoint(
    path: str, *, overrides: Sequence[tuple[str, str]] = (), as_trained: bool = False
) -> Checkpoint:
    """The checkpoint `path` names, with its config and meta (only JSON is read).

    `overrides` are `(field, text)` pairs as on the command line (`data.local_root`, ...),
    applied on top of the checkpoint's config. With `as_trained` (prediction: the model runs
    exactly as trained), overrides of trained fields are refused, except `encoder.*`, where a
    copy of the text encoder is found and which is checked against the checkpoint's encoder.
    """
    ref = locate_checkpoint(path)
    with CheckpointReader(ref.directory) as reader:
        meta = reader.read_meta(ref.step)
    cfg = config_from_checkpoint(meta["config"])
    changed: list[str] = []
    if overrides:
        apply_overrides(cfg, overrides)
        changed = trained_changes(meta["config"], cfg)
        if as_trained:
            fixed = [c for c in changed if not c.startswith("encoder.")]
            if fixed:
                raise UserError(
                    f"the overrides change what the model was trained with ({'; '.join(fixed)}); "
                    "prediction runs the checkpoint's model, image size and normalisation as "
                    "trained: drop them"
                )
        elif changed:
            log.warning(
                "the overrides change what the run was trained or split with (%s): results are "
                "not the run's",
                "; ".join(changed),
            )
    validate(cfg)
    return Checkpoint(ref, cfg, meta, changed)


def trained_changes(stored: dict[str, Any], cfg: config_dict.ConfigDict) -> list[str]:
    """The fields of `cfg` that differ from the checkpoint's config `stored` and change what
    the run was trained or split with ("field: stored -> now"), as the resume check sees them."""
    from dermjax.runner import config_changes  # the runner imports the evaluation modules

    return config_changes(stored, cfg.to_dict())[0]
