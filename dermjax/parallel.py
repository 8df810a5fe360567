"""Device mesh and host <-> device transfer for data parallelism (one or many hosts).

Every device is on a single `data` axis; parameters are replicated and batches are split along
it. The same code runs on one CPU, one GPU, a multi-GPU box, or a multi-host TPU pod slice.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)


def maybe_initialize_distributed() -> None:
    """Starts jax.distributed when a multi-process launch is configured by the environment."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("TPU_WORKER_HOSTNAMES"):
        jax.distributed.initialize()
        log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def make_mesh() -> Mesh:
    """A 1-D mesh over all devices, axis name 'data'."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def check_batch_size(batch_size: int, field: str = "training.batch_size") -> int:
    """Returns the per-process batch size; fails early when it does not divide evenly."""
    devices, processes = jax.device_count(), jax.process_count()
    if batch_size % devices:
        raise ValueError(
            f"{field}={batch_size} must be divisible by the number of devices ({devices})"
        )
    return batch_size // processes


def replicate(tree, mesh: Mesh):
    """Places a pytree on every device of the mesh (replicated)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles this process's part of a batch into global arrays split over 'data'."""
    sharding = NamedSharding(mesh, P("data"))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def to_host(x) -> np.ndarray:
    """Gathers a (possibly sharded, multi-host) array to a numpy array on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
