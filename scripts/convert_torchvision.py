"""Convert torchvision ImageNet weights into dermjax safetensors, verified against torchvision.

Run once where torchvision can download its weights (needs torch + torchvision):

    python scripts/convert_torchvision.py --arch resnet50 --weights DEFAULT \
        --out ~/.cache/dermjax/weights/resnet50.safetensors

or, without internet, from a state_dict saved with `torch.save(model.state_dict(), FILE)` (a
`{"state_dict": ...}` or `{"model": ...}` wrapper and DataParallel's `module.` prefix are
accepted):

    python scripts/convert_torchvision.py --arch densenet121 --state-dict densenet.pth \
        --out densenet121.safetensors

An existing OUT is replaced only with --force.

The converted model is checked on a fixed seeded float32 input against torchvision; nothing is
written (exit 1) if max|Δ| exceeds 1e-4·max(1, max|ref|). Output: OUT (safetensors of the
torch-keyed state_dict) and OUT with suffix .json (arch, weights enum, versions, transforms,
category and parameter counts, measured difference). Training finds OUT through
`dermjax.weights.torchvision.resolve_weights_path` ($DERMJAX_WEIGHTS_DIR/<arch>.safetensors).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # lets a plain checkout run the script without installing
    sys.path.insert(0, str(REPO_ROOT))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from dermjax.errors import UserError, first_line  # noqa: E402
from dermjax.models.registry import BACKBONES, default_image_size, is_vit  # noqa: E402
from dermjax.weights.torchvision import (  # noqa: E402
    backbone_from_state_dict,
    fix_legacy_keys,
    import_torchvision,
    key_problems,
    save_converted,
    to_numpy,
)

RELATIVE_TOLERANCE = 1e-4
VERIFY_BATCH = 2
VERIFY_SEED = 0
_HEAD_WEIGHTS = ("fc.weight", "classifier.weight", "classifier.1.weight", "classifier.6.weight")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", required=True, choices=BACKBONES)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", help="weights enum member, e.g. DEFAULT or IMAGENET1K_V2")
    source.add_argument("--state-dict", type=Path, help="file saved with torch.save(state_dict)")
    parser.add_argument("--out", required=True, type=Path, help="output .safetensors file")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT")
    parser.add_argument(
        "--image-size",
        type=int,
        help="verification size (and ViT image size with --state-dict); default: the weights'",
    )
    args = parser.parse_args(argv)
    check_out(args.out, force=args.force)
    return args


def check_out(out: Path, *, force: bool) -> None:
    """UserError, before any work, for an OUT that cannot or should not be written."""
    if out.suffix != ".safetensors":
        raise UserError(
            f"--out {out}: name the file NAME.safetensors (NAME.json is written beside)"
        )
    if out.is_dir():
        raise UserError(
            f"--out {out} is a folder: give the file to write, e.g. {out / 'x.safetensors'}"
        )
    if out.exists() and not force:
        raise UserError(f"--out {out} exists: add --force to replace it, or choose another file")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"--out {out}: cannot create its folder ({first_line(error)})") from None
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"--out {out}: its folder {out.parent} is not writable")


def _num_classes(state_dict: dict[str, Any]) -> int:
    for key in (*_HEAD_WEIGHTS, "heads.head.weight"):
        if key in state_dict:
            return int(state_dict[key].shape[0])
    return 1000


def build_torch_model(tv: Any, args: argparse.Namespace) -> tuple[Any, Any, int]:
    """(torchvision model in eval mode, weights enum member or None, image size)."""
    if args.weights is not None:
        enum = tv.models.get_model_weights(args.arch)
        if args.weights not in enum.__members__:
            raise SystemExit(f"--weights {args.weights}: expected one of {list(enum.__members__)}")
        weights = enum[args.weights]
        try:
            model = tv.models.get_model(args.arch, weights=weights)
        except OSError as error:  # urllib's URLError included: no internet here
            raise UserError(
                f"cannot download torchvision's {args.arch} {args.weights} weights "
                f"({first_line(error)}): where there is internet, save them with "
                f"torch.save(torchvision.models.get_model({args.arch!r}, weights={args.weights!r})"
                ".state_dict(), FILE), then convert here with --state-dict FILE"
            ) from None
        size = args.image_size or weights.transforms().crop_size[0]
        if is_vit(args.arch):
            size = weights.meta["min_size"][0]
        return model.eval(), weights, size
    state_dict = read_state_dict(args.state_dict)
    size = args.image_size or default_image_size(args.arch)
    kwargs = {"image_size": size} if is_vit(args.arch) else {}
    model = tv.models.get_model(args.arch, num_classes=_num_classes(state_dict), **kwargs)
    expected = model.state_dict()
    old_bn = "num_batches_tracked"  # absent from files saved before torch 0.4.1; not needed
    missing = [k for k in expected if k not in state_dict and not k.endswith(old_bn)]
    unexpected = [k for k in state_dict if k not in expected]
    mis_shaped = [
        f"{k}: {tuple(v.shape)} (model: {tuple(expected[k].shape)})"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mis_shaped:
        problems = key_problems(
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mis_shaped),
        )
        raise UserError(
            f"--state-dict {args.state_dict} does not hold {args.arch} weights: {problems}; "
            "check --arch (and --image-size for a ViT)"
        )
    model.load_state_dict(state_dict, strict=False)  # keys checked above
    return model.eval(), None, size


def read_state_dict(path: Path) -> dict[str, Any]:
    """The tensors of a `torch.save`d state_dict, unwrapped from {"state_dict"|"model": ...} and
    without DataParallel's `module.` prefix; UserError for a file that is none."""
    import torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"--state-dict {path}: no such file") from None
    except pickle.UnpicklingError as error:  # torch's message is long and holds ANSI codes
        if "Unsupported global" in str(error):
            raise UserError(
                f"--state-dict {path} holds a pickled object such as a whole model, not a "
                "state_dict: save it as torch.save(model.state_dict(), FILE) and convert that"
            ) from None
        raise UserError(f"--state-dict {path} is no file torch.save wrote (damaged?)") from None
    except Exception as error:  # torch.load meets garbage with any error type (KeyError, ...)
        raise UserError(f"--state-dict {path} cannot be read ({first_line(error)})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
    if not isinstance(loaded, dict) or not all(hasattr(v, "shape") for v in loaded.values()):
        raise UserError(f"--state-dict {path} holds no state_dict (a dict of tensors)")
    if loaded and all(k.startswith("module.") for k in loaded):
        loaded = {k.removeprefix("module."): v for k, v in loaded.items()}
    return fix_legacy_keys(loaded)


@nnx.jit
def _forward(model: nnx.Module, x: Any) -> Any:
    return model(x)


def verify(tv_model: Any, state: dict[str, np.ndarray], arch: str, size: int) -> dict[str, Any]:
    """Measured float32 difference between torchvision and the converted dermjax model."""
    import torch

    x = np.random.default_rng(VERIFY_SEED).standard_normal((VERIFY_BATCH, size, size, 3))
    x = x.astype(np.float32)
    with torch.no_grad():
        ref = tv_model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    model = backbone_from_state_dict(
        arch, state, include_top=True, num_classes=ref.shape[-1], image_size=size
    )
    model.eval()
    out = np.asarray(_forward(model, jnp.asarray(x)))
    scale = max(1.0, float(np.abs(ref).max()))
    diff = float(np.abs(out - ref).max())
    return {
        "max_abs_diff": diff,
        "tolerance": RELATIVE_TOLERANCE * scale,
        "ref_max_abs": float(np.abs(ref).max()),
        "top1_agree": bool((out.argmax(-1) == ref.argmax(-1)).all()),
        "batch": VERIFY_BATCH,
        "image_size": size,
        "seed": VERIFY_SEED,
    }


def transforms_meta(weights: Any) -> dict[str, Any] | None:
    """The enum's eval preprocessing (resize on the shorter side, centre crop, normalise)."""
    if weights is None:
        return None
    transform = weights.transforms()
    return {
        "resize_size": list(transform.resize_size),
        "crop_size": list(transform.crop_size),
        "interpolation": transform.interpolation.value,
        "antialias": transform.antialias,
        "mean": list(transform.mean),
        "std": list(transform.std),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tv = import_torchvision()
    import torch

    tv_model, weights, size = build_torch_model(tv, args)
    state = {k: to_numpy(v) for k, v in tv_model.state_dict().items()}
    check = verify(tv_model, state, args.arch, size)
    print(f"{args.arch}: max|Δ| = {check['max_abs_diff']:.3g} (tolerance {check['tolerance']:.3g})")
    if check["max_abs_diff"] > check["tolerance"]:
        print(f"verification failed; nothing written to {args.out}", file=sys.stderr)
        return 1
    sidecar = {
        "arch": args.arch,
        "weights": str(weights) if weights is not None else None,
        "source": weights.url if weights is not None else str(args.state_dict),
        "torch_version": torch.__version__,
        "torchvision_version": tv.__version__,
        "image_size": size,
        "transforms": transforms_meta(weights),
        "num_categories": (
            len(weights.meta["categories"]) if weights is not None else _num_classes(state)
        ),
        "num_params": sum(p.numel() for p in tv_model.parameters()),
        "verification": check,
    }
    save_converted(
        state, args.out, metadata={"arch": args.arch, "weights": sidecar["weights"] or ""}
    )
    args.out.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as error:  # e.g. a --state-dict file of another architecture
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
