"""Device mesh and host <-> device transfer for data parallelism (one or many hosts).

Every device is on a single `data` axis and batches are split along it. The train state is
replicated, or with `shard_params` its parameters and optimizer states are split over the same
axis (FSDP-style: XLA gathers a parameter where it is used); `state_shardings` is the one place
that decides, for the initial state, the checkpoint restore and the steps' outputs alike. The
same code runs on one CPU, one GPU, a multi-GPU box, or a multi-host TPU pod slice.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import socket
import sys
import threading
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dermjax import failfast
from dermjax.data import fs
from dermjax.errors import UserError

log = logging.getLogger(__name__)


class LaunchError(UserError):
    """Launch flags or DERMJAX_* variables that cannot start a multi-process run (exit status 2,
    like a bad config, but one line: they are no config fields)."""

    exit_code = 2


# Environment variables that mean "JAX finds the other processes by itself" (TPU VM pod slices,
# SLURM with several tasks, Open MPI with several ranks, an explicit JAX coordinator).
_CLUSTER_MARKERS = {
    "TPU_WORKER_HOSTNAMES": 0,
    "JAX_COORDINATOR_ADDRESS": 0,
    "SLURM_NTASKS": 1,
    "OMPI_COMM_WORLD_SIZE": 1,
}
_ENV = {
    "coordinator_address": "DERMJAX_COORDINATOR_ADDRESS",
    "num_processes": "DERMJAX_NUM_PROCESSES",
    "process_id": "DERMJAX_PROCESS_ID",
}


# TPU chips as the TPU VM kernel exposes them: on a TPU VM made by `gcloud compute tpus tpu-vm
# create` the worker list lives in the metadata server, not in the environment, and JAX's own
# detection reads it there.
_TPU_DEVICE_FILES = ("/dev/accel0", "/dev/vfio/0")


def _cluster_detected() -> bool:
    for name, above in _CLUSTER_MARKERS.items():
        value = os.environ.get(name, "")
        if value and (above == 0 or (value.isdigit() and int(value) > above)):
            return True
    return any(os.path.exists(path) for path in _TPU_DEVICE_FILES)


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Starts jax.distributed for a multi-process run; single process otherwise.

    An explicit launch gives all three of coordinator address (HOST:PORT), process count and
    this process's id, as arguments or as DERMJAX_COORDINATOR_ADDRESS / DERMJAX_NUM_PROCESSES /
    DERMJAX_PROCESS_ID. Without them, JAX's own cluster detection runs only where a cluster is
    visible (a TPU VM, SLURM or Open MPI with several tasks, JAX_COORDINATOR_ADDRESS).
    """
    given = explicit_launch(coordinator_address, num_processes, process_id)
    if given is not None:
        if given["process_id"] == 0:
            check_port_free(given["coordinator_address"])
        fix = (
            f"start every process (ids 0 to {given['num_processes'] - 1}) with the same "
            "--coordinator_address and --num_processes, process 0 on that address's host"
        )
        _initialize(given, f"at {given['coordinator_address']}", fix)
    elif _cluster_detected():
        _initialize(
            {}, "that JAX's cluster detection found", "launch the same command on every host"
        )
    else:
        return
    failfast.watch()
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def init_timeout_s() -> int:
    """How long start-up waits for every process: DERMJAX_INIT_TIMEOUT_S, default 300 (JAX's)."""
    text = os.environ.get("DERMJAX_INIT_TIMEOUT_S", "300")
    if not text.isdigit() or int(text) < 1:
        raise LaunchError(f"DERMJAX_INIT_TIMEOUT_S={text!r}: expected a whole number of seconds")
    return int(text)


def _initialize(launch: dict[str, Any], where: str, fix: str) -> None:
    """jax.distributed.initialize, said before the wait, with a one-line error when the
    processes do not all connect in time (JAX itself aborts then, with a C++ stack dump)."""
    timeout = init_timeout_s()
    print(
        f"connecting to the other processes {where} (waiting up to {timeout} s)",
        file=sys.stderr,
        flush=True,
    )
    connected = threading.Event()

    def give_up() -> None:
        if not connected.wait(timeout):
            print(
                f"error: not every process connected to the coordinator {where} within "
                f"{timeout} s: {fix} (DERMJAX_INIT_TIMEOUT_S sets the wait)",
                file=sys.stderr,
                flush=True,
            )
            os._exit(1)  # the main thread is inside JAX's C++ wait: nothing to unwind

    threading.Thread(target=give_up, name="dermjax-init-timeout", daemon=True).start()
    try:
        jax.distributed.initialize(**launch, initialization_timeout=timeout + 60)
    finally:  # an error JAX raises is reported as it is, not by the timer later
        connected.set()


def check_port_free(address: str) -> None:
    """LaunchError when process 0's coordinator port is taken on this host (jax.distributed
    segfaults then); a port only in TIME_WAIT after an earlier run counts as free."""
    port = int(address.rpartition(":")[2])
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((host, port))
            return
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise LaunchError(
                    f"--coordinator_address={address}: port {port} is already in use on this "
                    "host (another run's coordinator?): give every process another free port"
                ) from None  # anything else (no IPv6 here): try IPv4, else let JAX say


def explicit_launch(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> dict[str, Any] | None:
    """The checked launch values of the flags or DERMJAX_* variables; None when none is given."""
    given = {"coordinator_address": coordinator_address}
    given.update(num_processes=num_processes, process_id=process_id)
    for key, env in _ENV.items():
        if given[key] is None and os.environ.get(env):
            value = os.environ[env]
            if key != "coordinator_address" and not value.isdigit():
                raise LaunchError(f"{env}={value!r}: expected a non-negative integer")
            given[key] = value if key == "coordinator_address" else int(value)
    if all(v is None for v in given.values()):
        return None
    missing = [f"--{k} (or {_ENV[k]})" for k, v in given.items() if v is None]
    if missing:
        raise LaunchError(f"a multi-process launch also needs {', '.join(missing)}")
    _check_launch(**given)
    return given


def _check_launch(coordinator_address: str, num_processes: int, process_id: int) -> None:
    """LaunchError for launch values jax.distributed would crash or hang on."""
    host, _, port = str(coordinator_address).rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise LaunchError(
            f"--coordinator_address={coordinator_address!r}: expected HOST:PORT with a port "
            "from 1 to 65535 (process 0's host, e.g. 10.0.0.2:1234)"
        )
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise LaunchError(
            f"--num_processes={num_processes} --process_id={process_id}: give every process "
            "the same count (1 or more) and its own id from 0 to count - 1"
        )


def check_same_launch(launch: dict[str, Any]) -> None:
    """Raises UserError on every process when the processes were launched with different
    settings (`launch`: the config), naming the fields; a no-op in a single-process run.

    Different settings per process train silently wrong (label smoothing), deadlock (batch
    size) or fail deep in JAX without naming the field (seed), so they are compared before
    anything else. Every process takes part: an all-gather of a 32-byte hash, and only when
    the hashes differ, of the settings themselves.
    """
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    text = json.dumps(launch, sort_keys=True, default=str).encode()
    digest = np.frombuffer(hashlib.sha256(text).digest(), np.uint8)
    digests = np.asarray(multihost_utils.process_allgather(digest))
    if (digests == digests[0]).all():
        return
    size = int(np.asarray(multihost_utils.process_allgather(np.int64(len(text)))).max())
    padded = np.zeros(size, np.uint8)
    padded[: len(text)] = np.frombuffer(text, np.uint8)
    texts = np.asarray(multihost_utils.process_allgather(padded))
    launches = [json.loads(bytes(row).rstrip(b"\0")) for row in texts]
    differing = []
    for key in sorted(_flat(launches[0]).keys() | _flat(launch).keys()):
        values = [_flat(other).get(key) for other in launches]
        if len({json.dumps(v, sort_keys=True) for v in values}) > 1:
            shown = ", ".join(f"process {i}: {v!r}" for i, v in enumerate(values))
            differing.append(f"{key} ({shown})")
    raise UserError(
        f"the processes were launched with different settings: {'; '.join(differing[:5])}"
        f"{f'; and {len(differing) - 5} more' if len(differing) > 5 else ''}: launch every "
        "process with the same config file and --config overrides"
    )


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def make_mesh() -> Mesh:
    """A 1-D mesh over all devices, axis name 'data'."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


# Arrays with fewer elements stay replicated under `shard_params`: splitting them saves little
# memory and costs a gather per use.
MIN_SHARDED_SIZE = 2**12
# Train-state entries split under `shard_params` (batch statistics and the step stay replicated).
SHARDED_ENTRIES = ("params", "opt_backbone", "opt_head")


def array_sharding(shape: tuple[int, ...], mesh: Mesh, *, shard: bool) -> NamedSharding:
    """Replicated, or (`shard`) split over 'data' along the largest dimension the device count
    divides; small arrays (< MIN_SHARDED_SIZE elements) and indivisible ones stay replicated.

    It depends on the shape alone, so an optimizer moment is laid out like its parameter.
    """
    n = mesh.shape["data"]
    size = int(np.prod(shape))
    dims = [d for d, length in enumerate(shape) if length % n == 0]
    if not shard or n == 1 or size < MIN_SHARDED_SIZE or not dims:
        return NamedSharding(mesh, P())
    axis = max(dims, key=lambda d: shape[d])  # the first of equal lengths
    # No trailing None: the form jit gives its outputs, so a step's outputs keep this layout.
    return NamedSharding(mesh, P(*(None,) * axis, "data"))


def state_shardings(state: dict[str, Any], mesh: Mesh, *, shard_params: bool) -> dict[str, Any]:
    """The sharding of every leaf of a train state {params, batch_stats, opt_*, step}.

    Parameters and optimizer states follow `array_sharding` (split when `shard_params`); batch
    statistics and the step counter are replicated.
    """
    out = {}
    for key, value in state.items():
        shard = shard_params and key in SHARDED_ENTRIES
        out[key] = jax.tree.map(
            lambda x, s=shard: array_sharding(np.shape(x), mesh, shard=s), value
        )
    return out


def place_state(state: dict[str, Any], mesh: Mesh, *, shard_params: bool) -> dict[str, Any]:
    """Puts a (host or single-device) train state on the mesh with `state_shardings`."""
    return jax.device_put(state, state_shardings(state, mesh, shard_params=shard_params))


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


def is_writer(path: str) -> bool:
    """Whether this process writes the file `path` that every process computes: all of them for
    a local path (it may be each host's own disk), process 0 alone for a URL (storage every host
    sees, where several writers would only repeat one another's uploads)."""
    return fs.is_local(path) or jax.process_index() == 0
