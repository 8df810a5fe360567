"""The original PyTorch model rebuilt from its checkpoint, and a logit check against dermjax.

A converter loads an original `.pth` into dermjax (`dermjax.weights.original`), then builds the
same model the original code builds (torchvision backbone + fusion head, strictly loaded:
`torch_reference`) and compares both on one seeded batch (`compare_logits`) before it writes
anything. torch is optional (`pip install "dermjax[torch]"`) and imported on first use.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dermjax.models.registry import is_vit
from dermjax.weights.original import (
    HeadStructure,
    OriginalCheckpoint,
    OriginalCheckpointError,
    import_torch,
    vit_image_size,
)
from dermjax.weights.torchvision import import_torchvision

RELATIVE_TOLERANCE = 1e-4  # max|logit diff| <= 1e-4 * max(1, max|reference logit|), float32


def _torch_mlp(nn: Any, in_dim: int, hidden: Sequence[int], out_dim: int, activation: str):
    if not hidden:
        return nn.Linear(in_dim, out_dim)
    acts = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU}
    make_act = acts.get(activation, lambda: nn.LeakyReLU(0.01))
    layers, sizes = [], [in_dim, *hidden]
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.BatchNorm1d(b), make_act(), nn.Dropout(0.0)]
    mlp = nn.Module()
    mlp.layers = nn.Sequential(*layers, nn.Linear(sizes[-1], out_dim))
    return mlp


def _run_mlp(mlp: Any, x: Any) -> Any:
    return mlp.layers(x) if hasattr(mlp, "layers") else mlp(x)


@dataclasses.dataclass
class TorchReference:
    """The original model in PyTorch (float32, eval mode), loaded from the checkpoint."""

    backbone: Any  # module with the original's `model` attribute
    head: Any
    name: str
    pooling_type: str
    use_l2_normalization: bool

    def __call__(self, images_nhwc: np.ndarray, text: np.ndarray) -> dict[str, np.ndarray]:
        torch = import_torch()
        functional = torch.nn.functional
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
            m = self.backbone.model
            if is_vit(self.name):
                x = m._process_input(x)
                x = torch.cat([m.class_token.expand(x.shape[0], -1, -1), x], dim=1)
                features = m.encoder(x)[:, 0]
            else:
                f = m(x)
                pooled = {"avg": f.mean(dim=(2, 3)), "max": f.amax(dim=(2, 3))}
                pooled["concat"] = torch.cat([pooled["avg"], pooled["max"]], dim=1)
                features = pooled[self.pooling_type]
            h = self.head
            pv = _run_mlp(h.vision_projection, features)
            pt = _run_mlp(h.text_projection, torch.from_numpy(text))
            if self.use_l2_normalization:
                pv, pt = functional.normalize(pv, dim=1), functional.normalize(pt, dim=1)
            if hasattr(h, "alpha_vision"):
                w = torch.softmax(torch.stack([h.alpha_vision, h.alpha_text]), dim=0)
                fused = w[0] * pv + w[1] * pt
            else:
                fused = torch.cat([pv, pt], dim=1)
            out = {"logits": _run_mlp(h.final_classifier, fused)}
            if hasattr(h, "aux_vision_classifier"):
                out["aux_vision_logits"] = h.aux_vision_classifier(pv)
                out["aux_text_logits"] = h.aux_text_classifier(pt)
        return {k: v.numpy() for k, v in out.items()}


def torch_reference(
    ckpt: OriginalCheckpoint,
    *,
    backbone: str,
    pooling_type: str,
    structure: HeadStructure,
    projection_activation: str,
    final_activation: str,
    use_l2_normalization: bool,
) -> TorchReference:
    """The original model as its code builds it (torchvision + the head), strictly loaded."""
    torch, tv = import_torch(), import_torchvision()
    nn = torch.nn
    wrapper = nn.Module()
    if is_vit(backbone):
        size = vit_image_size(ckpt, backbone)
        wrapper.model = tv.models.get_model(backbone, image_size=size)
    elif backbone.startswith("resnet"):
        wrapper.model = nn.Sequential(*list(tv.models.get_model(backbone).children())[:-2])
    else:
        wrapper.model = tv.models.get_model(backbone).features
    s = structure
    head = nn.Module()
    if s.fusion_strategy == "weighted_sum":
        head.alpha_vision = nn.Parameter(torch.tensor(0.5))
        head.alpha_text = nn.Parameter(torch.tensor(0.5))
    proj, act = s.projection_dim, projection_activation.lower()
    head.vision_projection = _torch_mlp(nn, s.vision_dim, s.image_projection_hidden, proj, act)
    head.text_projection = _torch_mlp(nn, s.text_dim, s.text_projection_hidden, proj, act)
    final_in = proj if s.fusion_strategy == "weighted_sum" else 2 * proj
    head.final_classifier = _torch_mlp(
        nn, final_in, s.final_hidden_sizes, s.num_classes, final_activation.lower()
    )
    if s.use_auxiliary_loss:
        head.aux_vision_classifier = nn.Linear(proj, s.num_classes)
        head.aux_text_classifier = nn.Linear(proj, s.num_classes)
    for part, module, state_dict in (("backbone", wrapper, ckpt.vision), ("head", head, ckpt.head)):
        try:
            module.load_state_dict(state_dict, strict=True)
        except RuntimeError as error:
            raise OriginalCheckpointError(
                f"--pth {ckpt.path}: its {part} does not fit vision_model.name={backbone!r} and "
                f"the head its shapes imply: {str(error).splitlines()[0][:300]}"
            ) from error
    return TorchReference(
        wrapper.float().eval(), head.float().eval(), backbone, pooling_type, use_l2_normalization
    )


@nnx.jit
def _eval_forward(model: nnx.Module, images: jax.Array, text: jax.Array) -> dict[str, jax.Array]:
    return model(images, text)


def compare_logits(
    model: nnx.Module,
    reference: Callable[[np.ndarray, np.ndarray], Mapping[str, np.ndarray]],
    *,
    image_size: tuple[int, int],
    text_dim: int,
    batch: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
    """`model` (eval mode) against `reference` (e.g. a `TorchReference`) in float32, on one
    seeded N(0, 1) batch of NHWC images and text embeddings.

    Returns the largest difference over logits and aux logits and the tolerance
    (`RELATIVE_TOLERANCE` * max(1, max|reference|)); `ok` says whether it is met.
    """
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch, *image_size, 3)).astype(np.float32)
    text = rng.standard_normal((batch, text_dim)).astype(np.float32)
    expected = reference(images, text)
    model.eval()
    with jax.default_matmul_precision("highest"):
        got = _eval_forward(model, jnp.asarray(images), jnp.asarray(text))
    if set(got) != set(expected):
        raise OriginalCheckpointError(
            f"outputs differ: dermjax {sorted(got)}, torch {sorted(expected)}"
        )
    diff = max(float(np.abs(np.asarray(got[k]) - expected[k]).max()) for k in expected)
    scale = max(1.0, *(float(np.abs(v).max()) for v in expected.values()))
    tolerance = RELATIVE_TOLERANCE * scale
    return {
        "max_abs_diff": diff,
        "tolerance": tolerance,
        "ok": bool(diff <= tolerance),
        "batch": batch,
        "image_size": list(image_size),
        "seed": seed,
    }
