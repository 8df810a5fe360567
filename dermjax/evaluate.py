"""Command-line entry: evaluate a trained checkpoint on its test (or validation) split.

  python -m dermjax.evaluate --checkpoint=RUN_OR_CHECKPOINT_DIR [--split=test|val] [--out=DIR]
      [--config.a.b=V ...]

Works from the checkpoint alone: the model, classes, image size, normalisation, text encoder
and the data split come from the config saved in it; `--config.*` overrides apply on top (e.g.
`--config.data.local_root=/mnt/data` when the data moved). Writes evaluation.json,
predictions.parquet and report.html into --out (default `<run>/evaluation/<split>/`).
"""

from __future__ import annotations

import logging
import sys

from absl import flags

from dermjax.cli import run_main, split_overrides
from dermjax.errors import UserError

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint",
    None,
    "Run folder, its checkpoints/ folder, or a checkpoint step folder (best, else latest).",
    allow_override=True,  # dermjax.predict defines it too
)
_SPLIT = flags.DEFINE_enum("split", "test", ["test", "val"], "Split to evaluate.")
_OUT = flags.DEFINE_string("out", None, "Output folder; default <run>/evaluation/<split>/.")


def setup_logging() -> None:
    """Progress and INFO lines on stderr, without the libraries' chatter (as dermjax.main)."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):  # removed, not closed: absl's writes to stderr
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt, "%H:%M:%S"))
    root.addHandler(handler)
    for noisy in ("jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax: "directory is read only"


def _line(name: str, m: dict) -> str:
    top = ", ".join(f"top-{k} {v:.3f}" for k, v in m["top_k_accuracy"].items())
    auroc = "n/a" if m["auroc_macro"] is None else f"{m['auroc_macro']:.3f}"
    return (
        f"{name}: accuracy {m['accuracy']:.4f}, balanced accuracy {m['balanced_accuracy']:.4f}, "
        f"macro-F1 {m['macro_f1']:.4f} (sklearn {m['macro_f1_sklearn']:.4f}), {top}, "
        f"AUROC {auroc}, ECE {m['ece']:.4f}, Brier {m['brier']:.4f} (n={m['n']})"
    )


def main(argv: list[str], overrides: list[tuple[str, str]]) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; see --help")
    if not _CHECKPOINT.value:
        raise UserError("--checkpoint=RUN_OR_CHECKPOINT_DIR is required")
    setup_logging()
    from dermjax import compile_cache  # after flags: jax loads here
    from dermjax.data import fs
    from dermjax.evaluation.checkpoint_source import open_checkpoint
    from dermjax.evaluation.run import evaluate_checkpoint

    if _OUT.value:  # before the work, not after it
        fs.ensure_writable_folder(_OUT.value, "--out folder", "give --out a folder you can write")
    ckpt = open_checkpoint(_CHECKPOINT.value, overrides=overrides)
    compile_cache.enable(ckpt.cfg.training.compilation_cache_dir)
    out_dir, ev = evaluate_checkpoint(ckpt, split=_SPLIT.value, out_dir=_OUT.value)
    ref = ev["checkpoint"]
    print(f"{ref['kind']} checkpoint, step {ref['step']}, of {ref['directory']}")
    print(_line(f"{ev['split']} ({ev['mode'].replace('_', ' ')})", ev["overall"]))
    for mode, m in ev.get("ablation", {}).items():
        if mode != "both" and m is not None:
            print(_line(f"  {mode.replace('_', ' ')}", m))
    for column, result in ev["groups"].items():
        gap = result["worst_group_gap"].get("accuracy")
        if gap is not None:
            print(f"  by {column}: worst-group accuracy gap {gap:.3f}")
        if result.get("small_groups"):
            print(
                f"  by {column}: left out of the gap (under {result['min_group_size']} samples): "
                + ", ".join(map(str, result["small_groups"]))
            )
    if ev["bad_images"]:
        print(f"  {len(ev['bad_images'])} unreadable image(s) left out")
    for note in ev.get("notes", []):
        print(f"  note: {note}")
    print(f"wrote {out_dir}/{{evaluation.json,predictions.parquet,report.html}}")


def run() -> None:
    """Console entry point; `--config.*` overrides go on top of the checkpoint's config."""
    sys.argv, overrides = split_overrides(list(sys.argv))
    run_main(lambda argv: main(argv, overrides))


if __name__ == "__main__":
    run()
