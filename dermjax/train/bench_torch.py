"""PyTorch's version of bench.py's step, on the same device, for a same-process comparison.

torchvision backbone + the same head (Linear-BatchNorm1d-ReLU-Dropout MLPs), uint8 NHWC batch
converted and normalised inside the step, the same augmentation family when asked (per-sample
flip, rotation and scale as one nearest-neighbour resampling, then brightness/contrast/
saturation/hue), label-smoothed cross-entropy, AdamW (fused on CUDA) on two parameter groups;
bf16 autocast for the backbone, head and loss in float32, channels_last, cudnn.benchmark.
torch.compile compiles that forward + loss (augmentation included) and, through AOTAutograd, its
backward; the optimizer step runs eagerly (one fused AdamW kernel on CUDA). torch is imported
inside the functions: it is an optional extra.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from typing import Any

from dermjax.errors import first_line
from dermjax.models import registry
from dermjax.train.bench import (
    HEAD,
    LABEL_SMOOTHING,
    LR_BACKBONE,
    LR_HEAD,
    MEAN,
    NUM_CLASSES,
    STD,
    TEXT_DIM,
    WEIGHT_DECAY,
    rates,
    synthetic_batch,
    timed_windows,
)


def _torch_net(torch: Any, torchvision: Any, name: str, size: int) -> Any:
    """torchvision's `name` (a ViT built for `size` px) without its classifier + the HEAD fusion
    MLPs, as one module."""
    nn = torch.nn

    def mlp(sizes: tuple[int, ...], out_dim: int, dropout: float) -> Any:
        layers = []
        for a, b in itertools.pairwise(sizes):
            layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU(), nn.Dropout(dropout)]
        return nn.Sequential(*layers, nn.Linear(sizes[-1], out_dim))

    kwargs = {"image_size": size} if registry.is_vit(name) else {}
    backbone = torchvision.models.get_model(name, **kwargs)
    for attr in ("fc", "classifier", "heads"):
        if hasattr(backbone, attr):
            setattr(backbone, attr, nn.Identity())
    h, dim = HEAD, HEAD["projection_dim"]
    vision_in = (registry.feature_dim(name), *h["image_projection_hidden"])
    return nn.ModuleDict(
        {
            "backbone": backbone,
            "vision": mlp(vision_in, dim, h["projection_dropout"]),
            "text": mlp((TEXT_DIM, *h["text_projection_hidden"]), dim, h["projection_dropout"]),
            "final": mlp((2 * dim, *h["final_hidden_sizes"]), NUM_CLASSES, h["final_dropout"]),
        }
    )


def _torch_augment(torch: Any, x: Any) -> Any:
    """AUGMENT's family on a float [B,3,H,W] batch in [0, 1], parameters drawn per sample: flip,
    rotation and scale as one nearest-neighbour resampling (fill 0), then brightness, contrast,
    saturation and hue (dermjax draws the jitter order per sample; here it is fixed)."""
    from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

    f, b, dev = torch.nn.functional, x.shape[0], x.device

    def uniform(low: float, high: float, shape: tuple = (1, 1, 1)) -> Any:
        return torch.empty(b, *shape, device=dev).uniform_(low, high)

    angle = uniform(-25.0, 25.0, ()).deg2rad()
    inv_scale = 1 / uniform(0.9, 1.1, ())
    flip = torch.where(torch.rand(b, device=dev) < 0.5, -1.0, 1.0)
    cos, sin, zero = angle.cos() * inv_scale, angle.sin() * inv_scale, torch.zeros_like(angle)
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, zero], -1), torch.stack([sin * flip, cos, zero], -1)], 1
    )
    grid = f.affine_grid(theta, list(x.shape), align_corners=False)
    x = f.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    weights = torch.tensor((0.2989, 0.587, 0.114), device=dev).view(1, 3, 1, 1)

    def gray(im: Any) -> Any:
        return (im * weights).sum(1, keepdim=True)

    x = (x * uniform(0.9, 1.1)).clamp(0, 1)
    c = uniform(0.9, 1.1)
    x = (c * x + (1 - c) * gray(x).mean((2, 3), keepdim=True)).clamp(0, 1)
    s = uniform(0.9, 1.1)
    x = (s * x + (1 - s) * gray(x)).clamp(0, 1)
    hsv = _rgb_to_hsv(x)
    return _hsv_to_rgb(torch.cat([(hsv[:, :1] + uniform(-0.01, 0.01)) % 1.0, hsv[:, 1:]], 1))


def torch_step_rates(
    name: str,
    size: int,
    batch: int,
    dtype: str,
    steps: int,
    windows: int,
    *,
    augment: bool = False,
    compile_mode: str = "default",
    compile_backend: str = "inductor",
    profile_dir: str | None = None,
    profile_steps: int = 5,
    report: Callable[[dict], None] | None = None,
) -> dict | None:
    """The same step in PyTorch (module docstring), eager and torch.compile (`compile_backend`,
    `compile_mode` for inductor), on CUDA when available else the CPU; None without torch or
    torchvision. A torch.compile that fails is reported as {"error": "compile failed: ..."};
    compile seconds = the first compiled step (Dynamo, AOTAutograd and backend compilation, plus
    that step's run). `report` gets the result so far after each variant, so the eager figures
    outlive a compile that a time box cuts off."""
    try:
        import torch
        import torchvision
    except ImportError:
        return None
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    torch.manual_seed(0)
    net = _torch_net(torch, torchvision, name, size).to(dev).to(memory_format=torch.channels_last)
    host = synthetic_batch(batch, size)
    data = tuple(torch.from_numpy(host[k]).to(dev) for k in ("image", "text", "label"))
    head = [p for k in ("vision", "text", "final") for p in net[k].parameters()]
    groups = [{"params": net["backbone"].parameters(), "lr": LR_BACKBONE}, {"params": head}]
    opt = torch.optim.AdamW(groups, lr=LR_HEAD, weight_decay=WEIGHT_DECAY, fused=cuda)
    mean = torch.tensor(MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=dev).view(1, 3, 1, 1)

    def loss_fn(images: Any, text: Any, labels: Any) -> Any:
        x = images.permute(0, 3, 1, 2).float() / 255
        x = _torch_augment(torch, x) if augment else x
        x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            feats = net["backbone"](x)
        fused = torch.cat([net["vision"](feats.float()), net["text"](text)], 1)
        return torch.nn.functional.cross_entropy(
            net["final"](fused), labels.long(), label_smoothing=LABEL_SMOOTHING
        )

    def run(fn: Callable, n: int) -> None:
        for _ in range(n):
            loss = fn(*data)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if cuda:
            torch.cuda.synchronize()

    result: dict[str, Any] = {"torch": torch.__version__, "compile_backend": compile_backend}
    result["compile_mode"] = compile_mode if compile_backend == "inductor" else None
    result["device"] = torch.cuda.get_device_name() if cuda else "cpu"
    for variant in ("eager", "compile"):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        entry: dict[str, Any] = {}
        start = time.perf_counter()
        try:
            fn = loss_fn
            if variant == "compile":
                mode = compile_mode if compile_backend == "inductor" else None
                fn = torch.compile(loss_fn, backend=compile_backend, mode=mode)
            run(fn, 1)  # torch.compile compiles forward and backward here
        except Exception as error:  # reported in the table, not hidden
            if variant == "eager":
                raise
            result[variant] = {"error": f"compile failed: {first_line(error)}"}
            continue
        if variant == "compile":
            entry["compile_s"] = round(time.perf_counter() - start, 1)
        run(fn, steps)  # warm caches / autotuning
        entry.update(rates(steps, batch, timed_windows(lambda fn=fn: run(fn, steps), windows)))
        entry["peak_bytes"] = torch.cuda.max_memory_allocated() if cuda else None
        if profile_dir:
            path = os.path.join(profile_dir, f"torch_{name}_{variant}.txt")
            try:
                entry["profile"] = _torch_profile(
                    torch, lambda f=fn: run(f, profile_steps), cuda, path
                )
            except Exception as error:  # a failed profile must not cost the figures above
                entry["profile_error"] = first_line(error)
        result[variant] = entry
        if report is not None:
            report(dict(result))
    if cuda:
        torch.cuda.empty_cache()
    return result


def _torch_profile(torch: Any, run: Callable[[], None], cuda: bool, path: str) -> str:
    """torch.profiler over `run`; writes key_averages' top 15 by self time to `path`."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    activities += [torch.profiler.ProfilerActivity.CUDA] if cuda else []
    with torch.profiler.profile(activities=activities) as prof:
        run()
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by=sort, row_limit=15))
    return path
