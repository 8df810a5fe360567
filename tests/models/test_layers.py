"""layers.BatchNorm against torch.nn.BatchNorm1d/2d: outputs and running statistics after
several train steps (unbiased running variance), eval mode, dtypes, and a 2-device global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dermjax.models.fusion import MLP
from dermjax.models.layers import BatchNorm, batch_norm

STEPS = 4


def _batches(shape: tuple[int, ...], seed: int = 0) -> list[np.ndarray]:
    """Random batches with per-feature scale and offset, so each channel has its own stats."""
    rng = np.random.default_rng(seed)
    scale, shift = 0.5 + rng.random(shape[-1]), rng.standard_normal(shape[-1])
    return [rng.standard_normal(shape) * scale + shift for _ in range(STEPS)]


def _torch_run(batches: list[np.ndarray], dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(last train output in NHWC/NC, running_mean, running_var) of a fresh torch BatchNorm."""
    torch = pytest.importorskip("torch")
    two_d = batches[0].ndim == 4
    features = batches[0].shape[-1]
    norm = (torch.nn.BatchNorm2d if two_d else torch.nn.BatchNorm1d)(features).to(dtype).train()
    for x in batches:
        t = torch.from_numpy(x.transpose(0, 3, 1, 2) if two_d else x).to(dtype)
        out = norm(t).detach().numpy()
    out = out.transpose(0, 2, 3, 1) if two_d else out
    return out, norm.running_mean.numpy(), norm.running_var.numpy()


def _jax_run(norm: BatchNorm, batches: list[np.ndarray], dtype) -> np.ndarray:
    """Train-mode jitted steps (the running statistics update in place); the last output."""
    norm.train()
    step = nnx.jit(lambda m, x: m(x))
    for x in batches:
        out = step(norm, jnp.asarray(x, dtype))
    return np.asarray(out)


def test_running_stats_after_train_steps_equal_torch_batchnorm2d_float32() -> None:
    import torch

    batches = _batches((4, 5, 5, 3))
    norm = batch_norm(3, rngs=nnx.Rngs(0))
    out = _jax_run(norm, batches, jnp.float32)
    ref, mean, var = _torch_run([b.astype(np.float32) for b in batches], torch.float32)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(norm.mean[...]), mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(norm.var[...]), var, rtol=0, atol=1e-6)
    biased = np.ones(3)  # nnx.BatchNorm's update: visibly off with 100 values per channel
    for x in batches:
        biased = 0.9 * biased + 0.1 * x.var(axis=(0, 1, 2))
    assert np.abs(biased - var).max() > 1e-3


def test_running_stats_after_train_steps_equal_torch_batchnorm2d_float64() -> None:
    import torch

    batches = _batches((2, 3, 3, 4), seed=1)
    ref, mean, var = _torch_run(batches, torch.float64)
    with jax.enable_x64(True):
        norm = batch_norm(4, rngs=nnx.Rngs(0), dtype=jnp.float64)
        out = _jax_run(norm, batches, jnp.float64)
        assert norm.var[...].dtype == jnp.float64
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.asarray(norm.mean[...]), mean, rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.asarray(norm.var[...]), var, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_head_batchnorm1d_running_stats_equal_torch(dtype: str) -> None:
    import torch

    batches = _batches((6, 5), seed=2)
    tol = 1e-6 if dtype == "float32" else 1e-12
    if dtype == "float32":
        batches = [b.astype(np.float32) for b in batches]
    _, mean, var = _torch_run(batches, getattr(torch, dtype))
    with jax.enable_x64(dtype == "float64"):
        mlp = MLP(4, (5,), 2, rngs=nnx.Rngs(0))
        norm = mlp.hidden[0].norm
        assert isinstance(norm, BatchNorm)
        if dtype == "float64":  # the head keeps float32 statistics; a float64 twin for parity
            norm = BatchNorm(5, dtype=jnp.float64, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        _jax_run(norm, batches, getattr(jnp, dtype))
        np.testing.assert_allclose(np.asarray(norm.mean[...]), mean, rtol=0, atol=tol)
        np.testing.assert_allclose(np.asarray(norm.var[...]), var, rtol=0, atol=tol)


def test_eval_mode_normalises_with_running_stats_and_leaves_them_alone() -> None:
    norm = batch_norm(3, rngs=nnx.Rngs(0))
    _jax_run(norm, _batches((2, 4, 4, 3)), jnp.float32)
    mean, var = np.asarray(norm.mean[...]), np.asarray(norm.var[...])
    norm.eval()
    x = _batches((2, 4, 4, 3), seed=3)[0].astype(np.float32)
    out = np.asarray(norm(jnp.asarray(x)))
    np.testing.assert_allclose(out, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(norm.var[...]), var)


def test_output_dtype_follows_dtype_and_a_single_value_keeps_the_variance_finite() -> None:
    head = BatchNorm(3, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert head(jnp.ones((4, 3), jnp.bfloat16)).dtype == jnp.bfloat16
    assert head.var[...].dtype == jnp.float32
    backbone = batch_norm(3, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    assert backbone(jnp.ones((2, 2, 2, 3), jnp.bfloat16)).dtype == jnp.bfloat16
    assert backbone.var[...].dtype == jnp.float32
    single = BatchNorm(3, rngs=nnx.Rngs(0))
    single(jnp.ones((1, 3)))  # torch raises here; the running variance decays towards 0
    np.testing.assert_allclose(np.asarray(single.var[...]), 0.9)


_SHARDED = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from dermjax.models.layers import batch_norm

    assert jax.device_count() == 2
    x = np.asarray(json.loads(sys.stdin.read()), np.float32)
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    norm = batch_norm(x.shape[-1], rngs=nnx.Rngs(0))
    norm.train()
    batch = jax.device_put(jnp.asarray(x), NamedSharding(mesh, P("data")))
    nnx.jit(lambda m, b: m(b))(norm, batch)
    print(json.dumps([np.asarray(norm.mean[...]).tolist(), np.asarray(norm.var[...]).tolist()]))
    """
)


def test_a_batch_sharded_over_two_devices_updates_with_global_statistics() -> None:
    import torch

    x = _batches((4, 3, 3, 2), seed=4)[0].astype(np.float32)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run(
        [sys.executable, "-c", _SHARDED],
        input=json.dumps(x.tolist()),
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    mean, var = json.loads(done.stdout.strip().splitlines()[-1])
    _, ref_mean, ref_var = _torch_run([x], torch.float32)
    np.testing.assert_allclose(mean, ref_mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(var, ref_var, rtol=0, atol=1e-6)
