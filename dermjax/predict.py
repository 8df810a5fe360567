"""Command-line entry: top-k labels with probabilities for new images, from a checkpoint alone.

  python -m dermjax.predict --checkpoint=DIR IMAGE [IMAGE ...] [--text="description"]
      [--top-k=K] [--json] [--config.a.b=V ...]

No training data is read: classes, image size, normalisation and the text encoder come from the
checkpoint, and overrides may not change them. Images are decoded and resized as evaluation
does. `--text` is embedded with the checkpoint's encoder (the built-in hashing encoder works
offline; a transformer model must be available locally, e.g.
`--config.encoder.model_name=/path/to/model`) and used for every image; as in training, only an
empty text is no text. Without text a multimodal model runs image-only through the masking
path, and says so. The output names the checkpoint step used. An unreadable image is reported
on stderr (and in the JSON, in its place) and the others are still predicted (exit status 1).
"""

from __future__ import annotations

import json
import logging
import sys

from absl import flags

from dermjax.cli import run_main, split_overrides
from dermjax.errors import UserError

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint",
    None,
    "Run folder, its checkpoints/ folder, or a checkpoint step folder (best, else latest).",
    allow_override=True,  # dermjax.evaluate defines it too
)
_TEXT = flags.DEFINE_string("text", None, "Description used with every image; none: image only.")
_TOP_K = flags.DEFINE_integer("top-k", 3, "Labels shown per image.", lower_bound=1)
_JSON = flags.DEFINE_bool(
    "json", False, "Print JSON (checkpoint, notes, one entry per image) instead of a table."
)


def choose_mode(default_mode: str, has_text: bool) -> tuple[str, str | None]:
    """(mode, note for the user) for a model trained in `default_mode`."""
    if default_mode == "text_only":
        if not has_text:
            raise UserError("this model was trained on text only (masking.mask_complete=image): "
                            "pass --text")  # fmt: skip
        return "text_only", None
    if default_mode == "image_only":
        note = "the model was trained on images only: --text is ignored" if has_text else None
        return "image_only", note
    if has_text:
        return "both", None
    return "image_only", "no --text given (or an empty one): predicting from the image only"


def _table(results: list[dict]) -> str:
    width = max((len(r["label"]) for item in results for r in item.get("top_k", ())), default=5)
    lines = []
    for item in results:
        if "error" in item:  # reported on stderr
            continue
        lines.append(item["image"])
        for rank, r in enumerate(item["top_k"], 1):
            lines.append(f"  {rank:>2}  {r['label']:<{width}}  {r['prob']:.4f}")
    return "\n".join(lines)


def main(argv: list[str], overrides: list[tuple[str, str]]) -> None:
    paths = argv[1:]
    if not _CHECKPOINT.value:
        raise UserError("--checkpoint=DIR is required")
    if not paths:
        raise UserError("no image given: python -m dermjax.predict --checkpoint=DIR IMAGE ...")
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax: "directory is read only"
    from dermjax import compile_cache  # after flags: jax loads here
    from dermjax.evaluation import inference
    from dermjax.evaluation.checkpoint_source import open_checkpoint

    ckpt = open_checkpoint(_CHECKPOINT.value, overrides=overrides, as_trained=True)
    compile_cache.enable(ckpt.cfg.training.compilation_cache_dir)
    model = inference.load_model(ckpt)
    text = _TEXT.value or None  # "" is no text; any other text is embedded, as in training
    mode, note = choose_mode(model.default_mode, text is not None)
    vector = None if text is None else inference.text_vector(model, text)
    arrays, errors = inference.load_images(paths, model.img_size)
    for path, reason in errors.items():
        print(f"error: cannot read image {path}: {reason}", file=sys.stderr)
    good = [a for a in arrays if a is not None]
    probs = iter(inference.predict_images(model, good, vector, mode))
    k = min(_TOP_K.value, len(model.classes))
    results = []
    for path, array in zip(paths, arrays, strict=True):
        if array is None:
            results.append({"image": path, "error": errors[path]})
            continue
        row = next(probs)
        order = (-row).argsort(kind="stable")[:k]
        top = [{"label": model.classes[c], "prob": float(row[c])} for c in order]
        results.append({"image": path, "mode": mode, "top_k": top})
    ref = model.ref
    if _JSON.value:
        used = {"path": ref.directory, "kind": ref.kind, "step": ref.step}
        out = {"checkpoint": used, "notes": [note] if note else [], "predictions": results}
        print(json.dumps(out, indent=1), flush=True)
    else:
        print(f"checkpoint: {ref.directory} ({ref.kind} checkpoint, step {ref.step})")
        if note:
            print(f"note: {note}")
        print(_table(results), flush=True)
    if errors:
        sys.exit(1)


def run() -> None:
    """Console entry point; `--config.*` overrides go on top of the checkpoint's config."""
    sys.argv, overrides = split_overrides(list(sys.argv))
    run_main(lambda argv: main(argv, overrides))


if __name__ == "__main__":
    run()
