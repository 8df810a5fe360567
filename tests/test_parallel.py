"""Multi-process start-up: explicit launches, JAX's cluster detection only where a cluster is seen."""

import os
import re
import socket
import subprocess
import sys

import jax
import pytest

from dermjax import parallel
from dermjax.errors import UserError

_VARS = (
    "DERMJAX_COORDINATOR_ADDRESS", "DERMJAX_NUM_PROCESSES", "DERMJAX_PROCESS_ID",
    "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
)  # fmt: skip


@pytest.fixture
def calls(monkeypatch):
    for name in _VARS:
        monkeypatch.delenv(name, raising=False)
    made = []
    monkeypatch.setattr(
        jax.distributed,
        "initialize",
        lambda initialization_timeout, **kw: made.append(kw),
    )
    monkeypatch.setattr(parallel, "_TPU_DEVICE_FILES", ())  # this machine is no TPU VM
    return made


def test_single_process_without_flags_or_a_cluster(calls, monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "1")  # one task is no cluster
    parallel.maybe_initialize_distributed()
    assert calls == []


def test_explicit_flags_start_the_distributed_runtime(calls):
    parallel.maybe_initialize_distributed("127.0.0.1:1234", 2, 1)
    assert calls == [dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=1)]


def test_environment_variables_stand_for_the_flags(calls, monkeypatch):
    monkeypatch.setenv("DERMJAX_COORDINATOR_ADDRESS", "10.0.0.2:8476")
    monkeypatch.setenv("DERMJAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("DERMJAX_PROCESS_ID", "3")
    parallel.maybe_initialize_distributed(process_id=2)  # a flag wins over its variable
    assert calls == [dict(coordinator_address="10.0.0.2:8476", num_processes=4, process_id=2)]


@pytest.mark.parametrize(
    "marker", [("TPU_WORKER_HOSTNAMES", "t0,t1"), ("OMPI_COMM_WORLD_SIZE", "4")]
)
def test_a_detected_cluster_lets_jax_find_its_processes(calls, monkeypatch, marker):
    monkeypatch.setenv(*marker)
    parallel.maybe_initialize_distributed()
    assert calls == [{}]


def test_a_tpu_vm_is_detected_by_its_chips(calls, monkeypatch, tmp_path):
    (tmp_path / "accel0").touch()
    monkeypatch.setattr(parallel, "_TPU_DEVICE_FILES", (str(tmp_path / "accel0"),))
    parallel.maybe_initialize_distributed()
    assert calls == [{}]


def test_an_incomplete_launch_names_what_is_missing(calls, monkeypatch):
    with pytest.raises(parallel.LaunchError, match=r"--num_processes .*--process_id"):
        parallel.maybe_initialize_distributed("127.0.0.1:1234")
    monkeypatch.setenv("DERMJAX_NUM_PROCESSES", "two")
    with pytest.raises(parallel.LaunchError, match="DERMJAX_NUM_PROCESSES='two'"):
        parallel.maybe_initialize_distributed()
    assert calls == []


@pytest.mark.parametrize(
    "address, count, index, named",
    [
        ("localhost", 2, 0, "--coordinator_address='localhost': expected HOST:PORT"),
        ("127.0.0.1:99999", 2, 0, "with a port from 1 to 65535"),
        ("127.0.0.1:1234", 2, 2, "--num_processes=2 --process_id=2: give every process"),
        ("127.0.0.1:1234", 0, 0, "--num_processes=0 --process_id=0"),
    ],
)
def test_launch_values_jax_would_crash_or_hang_on_are_one_error(
    calls, address, count, index, named
):
    # They gave an IndexError or ValueError traceback, or hung without a message.
    with pytest.raises(parallel.LaunchError, match=re.escape(named)):
        parallel.maybe_initialize_distributed(address, count, index)
    assert calls == []


def test_a_coordinator_port_in_use_is_one_error_before_jax_segfaults_on_it(calls):
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(UserError, match=rf"--coordinator_address={address}: port .* in use"):
            parallel.maybe_initialize_distributed(address, 2, 0)
        assert calls == []
        parallel.maybe_initialize_distributed(address, 2, 1)  # only process 0 binds it
    parallel.maybe_initialize_distributed(address, 2, 0)  # closed: free again
    assert len(calls) == 2


def test_processes_that_never_all_connect_end_in_one_line_not_a_jax_abort(tmp_path):
    with socket.socket() as free:
        free.bind(("", 0))
        port = free.getsockname()[1]
    code = "from dermjax import parallel; parallel.maybe_initialize_distributed(%r, 2, 0)"
    code %= f"127.0.0.1:{port}"
    env = {**os.environ, "DERMJAX_INIT_TIMEOUT_S": "3"}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line[:1] not in "IW"]  # absl INFO/WARN
    assert lines == [
        f"connecting to the other processes at 127.0.0.1:{port} (waiting up to 3 s)",
        f"error: not every process connected to the coordinator at 127.0.0.1:{port} within 3 s: "
        "start every process (ids 0 to 1) with the same --coordinator_address and "
        "--num_processes, process 0 on that address's host (DERMJAX_INIT_TIMEOUT_S sets the wait)",
    ], proc.stderr


@pytest.mark.parametrize(
    "path, process, writes",
    [
        ("/data/e.parquet", 3, True),
        ("file:///data/e.parquet", 3, True),
        ("gs://bucket/e.parquet", 0, True),
        ("gs://bucket/e.parquet", 3, False),
    ],
)
def test_every_process_writes_a_local_path_and_process_zero_alone_a_url(
    monkeypatch, path, process, writes
):
    monkeypatch.setattr(jax, "process_index", lambda: process)
    assert parallel.is_writer(path) is writes
