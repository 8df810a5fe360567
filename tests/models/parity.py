"""Shared helpers for parity tests of dermjax backbones against torchvision (CPU only).

Recipe: torchvision initialises biases, BatchNorm scales and statistics, tokens and some heads
to constants (0 or 1), which would hide a wrong mapping. So every 1-D tensor, token, position
embedding and classification head is randomised and BatchNorm running statistics are calibrated
on random images, so that a wrong mapping (dropped/swapped statistics, zero head, ...) changes
the logits visibly.

Typical use::

    tv = import_torchvision()
    model = seeded_torch_model(tv, "resnet50", image_size=64)
    result = assert_parity("resnet50", model, image_size=64, batch=2)

`assert_parity` runs float32 first, then converts the torch model to float64 in place and runs
the float64 comparison (under `jax.enable_x64`), returning the measured differences.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

F64_TOL = 1e-9
RESNET_F32_TOL = 1e-4
# ResNet-101 at 64 px: torch-f32 itself is ~1.1e-4·|ref| from the float64 answer (measured).
RESNET101_F32_TOL = 2e-4
OTHER_F32_TOL = 2e-5


def import_torchvision() -> Any:
    """torchvision, skipping the test when torch or torchvision is not installed."""
    pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    from dermjax.weights.torchvision import import_torchvision as _import

    return _import()


def randomize_torch_model(model: Any, image_size: int, *, seed: int = 0, batch: int = 2) -> Any:
    """Makes every tensor of `model` non-trivial and calibrates BN stats; leaves it in eval mode.

    1-D weights become 1 + 0.2·N(0,1), 1-D biases 0.1·N(0,1); class tokens, position embeddings
    and `heads.head` 0.05·N(0,1). BatchNorm running stats are reset and re-estimated as a
    cumulative average over three train-mode forwards of N(0,1) images of `image_size`.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
                param.copy_(1 + 0.2 * noise if name.endswith("weight") else 0.1 * noise)
            elif name.endswith(("class_token", "pos_embedding")) or "heads.head" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
        norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        if norms:
            model.train()
            for _ in range(3):
                model(torch.randn(batch, 3, image_size, image_size, generator=gen))
        for m in norms:
            m.momentum = 0.1
    model.eval()
    return model


def seeded_torch_model(
    tv: Any, name: str, image_size: int, *, seed: int = 0, batch: int = 2, **kwargs: Any
) -> Any:
    """`torchvision.models.<name>(**kwargs)` built under `torch.manual_seed(seed)` (so its
    default-initialised weights are reproducible), then `randomize_torch_model`-ed."""
    import torch

    torch.manual_seed(seed)
    model = getattr(tv.models, name)(**kwargs)
    return randomize_torch_model(model, image_size, seed=seed, batch=batch)


def random_images(batch: int, image_size: int, seed: int = 0) -> np.ndarray:
    """Seeded N(0,1) images, float64, NHWC."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, image_size, image_size, 3))


def torch_state_dict(model: Any) -> dict[str, np.ndarray]:
    """The model's state_dict as numpy arrays (float tensors keep their dtype)."""
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def torch_param_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def jax_param_count(module: nnx.Module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def abstract_param_count(name: str, **kwargs: Any) -> int:
    """Parameter count of `create_backbone(name, **kwargs)` without allocating it."""
    from dermjax.models import create_backbone

    abstract = nnx.eval_shape(lambda: create_backbone(name, rngs=nnx.Rngs(0), **kwargs))
    return jax_param_count(abstract)


def torch_logits(
    model: Any, x_nhwc: np.ndarray, dtype: Any = None, forward: Callable | None = None
) -> np.ndarray:
    """Runs `forward(model, x)` (default `model(x)`) on NHWC numpy input, in `dtype`."""
    import torch

    dtype = dtype or torch.float32
    x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))).to(dtype)
    with torch.no_grad():
        out = forward(model, x) if forward is not None else model(x)
    return out.detach().numpy()


def build_loaded(
    name: str, state_dict: dict[str, np.ndarray], *, dtype: Any = jnp.float32, **kwargs: Any
) -> nnx.Module:
    """A dermjax backbone filled from `state_dict` (abstract build, no random init), eval mode."""
    from dermjax.weights.torchvision import backbone_from_state_dict

    module = backbone_from_state_dict(name, state_dict, dtype=dtype, **kwargs)
    module.eval()
    return module


def jax_logits(module: nnx.Module, x_nhwc: np.ndarray, dtype: Any = jnp.float32) -> np.ndarray:
    """Jitted forward of `module` on NHWC numpy input cast to `dtype`."""
    out = nnx.jit(lambda m, x: m(x))(module, jnp.asarray(x_nhwc, dtype))
    return np.asarray(out)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def assert_parity(
    name: str,
    torch_model: Any,
    *,
    image_size: int,
    batch: int = 2,
    seed: int = 0,
    f32_tol: float = OTHER_F32_TOL,
    f64_tol: float | None = F64_TOL,
    torch_forward: Callable | None = None,
    **backbone_kwargs: Any,
) -> dict[str, float]:
    """Asserts dermjax `name` matches an (already randomised) torch model in f64 and f32.

    float32: max|Δ| ≤ f32_tol·max(1, max|ref|). float64 (skipped when `f64_tol` is None):
    max|Δ| ≤ f64_tol·max(1, max|ref|); the torch model is converted to float64 in place, and
    each framework's float32 distance from the float64 answer is reported too.
    `backbone_kwargs` go to `create_backbone` (default include_top=True, the full classifier);
    `torch_forward(model, x_nchw)` replaces `model(x)` as the reference (e.g. for features).
    Returns the measured differences and the reference scale.
    """
    import torch

    backbone_kwargs = {"include_top": True, "image_size": image_size, **backbone_kwargs}
    x = random_images(batch, image_size, seed)
    state = torch_state_dict(torch_model)

    ref32 = torch_logits(torch_model, x, torch.float32, torch_forward)
    module = build_loaded(name, state, dtype=jnp.float32, **backbone_kwargs)
    if backbone_kwargs["include_top"]:
        assert jax_param_count(module) == torch_param_count(torch_model)
    out32 = jax_logits(module, x, jnp.float32)
    del module
    assert out32.dtype == np.float32
    scale = max(1.0, float(np.max(np.abs(ref32))))
    result = {"f32_max_abs": max_abs_diff(out32, ref32), "ref_max_abs": scale}

    if f64_tol is not None:
        torch_model.double()
        ref64 = torch_logits(torch_model, x, torch.float64, torch_forward)
        with jax.enable_x64(True):
            module = build_loaded(name, state, dtype=jnp.float64, **backbone_kwargs)
            out64 = jax_logits(module, x, jnp.float64)
            del module
        assert out64.dtype == np.float64
        result["f64_max_abs"] = max_abs_diff(out64, ref64)
        # float32 rounding noise of each framework, measured against the float64 answer.
        result["torch_f32_vs_f64"] = max_abs_diff(ref32, ref64)
        result["jax_f32_vs_f64"] = max_abs_diff(out32, ref64)
        assert result["f64_max_abs"] <= f64_tol * scale, f"{name} float64: {result}"
    assert result["f32_max_abs"] <= f32_tol * scale, f"{name} float32: {result}"
    return result
