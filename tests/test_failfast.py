"""One process's error stops every process of a run: the protocol over a stand-in key-value store.

`tests/test_multiprocess.py` runs it for real: two `python -m dermjax.main` processes, one with a
config only it rejects.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from dermjax import cli, failfast
from dermjax.errors import DataError


class Store:
    """The two calls of jax.distributed's key-value client that failfast uses."""

    def __init__(self):
        self.values: dict[str, str] = {}
        self.closed = False

    def key_value_set(self, key, value, allow_overwrite=False):
        assert allow_overwrite or key not in self.values
        self.values[key] = value

    def key_value_dir_get(self, prefix):
        if self.closed:
            raise RuntimeError("UNAVAILABLE: the coordination service has stopped")
        return sorted((k, v) for k, v in self.values.items() if k.startswith(prefix))


class Exited(Exception):
    def __init__(self, status):
        super().__init__(status)
        self.status = status


@pytest.fixture
def process(monkeypatch):
    """`process(pid, n)`: failfast sees itself as process pid of n; leaving raises Exited."""
    store = Store()

    def exit_now(status):
        raise Exited(status)

    monkeypatch.setattr(failfast, "_leaving", threading.Event())
    monkeypatch.setattr(failfast, "_exit", exit_now)

    def make(pid, n):
        state = SimpleNamespace(client=store, process_id=pid, num_processes=n)
        monkeypatch.setattr(failfast, "_state", lambda: state)
        return state

    return make


def test_a_single_process_run_is_left_alone():
    assert failfast._state() is None  # jax.distributed is not initialised in the tests
    failfast.stop("anything", 2)  # returns: the caller exits as usual
    failfast.stop_on_bug(KeyError("x"))
    failfast.watch()
    assert not any(t.name == "dermjax-failfast" for t in threading.enumerate())


def test_stop_publishes_the_error_and_leaves_with_its_status(process):
    state = process(1, 2)
    with pytest.raises(Exited) as exited:
        failfast.stop("training.batch_size=18: must be divisible by 4", 2)
    assert exited.value.status == 2
    assert state.client.values == {
        "dermjax/failed/1": "2 training.batch_size=18: must be divisible by 4",
        "dermjax/seen/1": "",
    }


def test_a_long_message_is_cut(process):
    state = process(1, 2)
    with pytest.raises(Exited):
        failfast.stop("x" * 5000, 1)
    assert len(state.client.values["dermjax/failed/1"]) == 2 + failfast.MESSAGE_LIMIT


def test_the_watcher_prints_the_peer_error_and_leaves_with_its_status(process, capsys):
    state = process(1, 3)
    state.client.values["dermjax/failed/2"] = "2 bad batch size"
    state.client.values["dermjax/failed/0"] = "1 embeddings file gs://b/e.parquet: cannot write"
    with pytest.raises(Exited) as exited:
        failfast._watch(state, 0.01)
    assert exited.value.status == 1  # the lowest-numbered failed process is the one reported
    err = capsys.readouterr().err
    assert err == (
        "error: process 0 of 3 stopped the run: embeddings file gs://b/e.parquet: cannot write\n"
    )
    assert "dermjax/seen/1" in state.client.values


def test_the_watcher_ends_quietly_when_the_run_ends(process, capsys):
    state = process(1, 2)
    state.client.closed = True
    failfast._watch(state, 0.01)  # returns instead of raising Exited
    assert capsys.readouterr().err == ""


def test_the_watcher_says_nothing_once_its_own_process_is_leaving(process, capsys):
    state = process(0, 2)
    state.client.values["dermjax/failed/0"] = "2 its own error"
    failfast._leaving.set()
    failfast._watch(state, 0.01)
    assert capsys.readouterr().err == ""


def test_an_error_raised_while_the_watcher_is_leaving_is_neither_printed_nor_published(
    process, monkeypatch, capsys
):
    """The watcher reports a peer's failure; this process's own error then is its consequence."""
    monkeypatch.setattr(failfast, "LAST_WAIT_S", -4.9)  # wait 0.1 s for the watcher's exit
    state = process(0, 2)
    assert failfast._claim()  # the watcher got there first
    assert not failfast._claim()
    with pytest.raises(Exited) as exited:
        failfast.stop_on_bug(RuntimeError("Gloo AllGather failed"))
    assert exited.value.status == 1
    assert capsys.readouterr().err == ""
    assert state.client.values == {}


def test_process_zero_leaves_after_the_others_have_read_the_failure(process, monkeypatch):
    """Process 0 hosts the store: leaving earlier would kill the others before they print."""
    state = process(0, 3)

    def others_read_it():
        time.sleep(0.3)
        state.client.values["dermjax/seen/1"] = ""
        state.client.values["dermjax/seen/2"] = ""

    threading.Thread(target=others_read_it).start()
    start = time.monotonic()
    with pytest.raises(Exited):
        failfast.stop("no such file", 1)
    assert 0.25 < time.monotonic() - start < 2


def test_process_zero_waits_for_silent_processes_only_so_long(process, monkeypatch):
    monkeypatch.setattr(failfast, "LAST_WAIT_S", 0.3)
    process(0, 2)
    start = time.monotonic()
    with pytest.raises(Exited):
        failfast.stop("no such file", 1)
    assert 0.25 < time.monotonic() - start < 2


def test_a_bug_prints_its_traceback_and_is_published(process, capsys):
    state = process(1, 2)
    try:
        {}["lesion_id"]
    except KeyError as e:
        with pytest.raises(Exited) as exited:
            failfast.stop_on_bug(e)
    assert exited.value.status == 1
    assert "Traceback" in capsys.readouterr().err
    assert state.client.values["dermjax/failed/1"] == (
        "1 KeyError: 'lesion_id' (a bug; traceback in that process's log)"
    )


def test_an_error_after_a_peer_failed_reports_the_peer(process, capsys):
    """A collective whose peer left fails here too (gloo: connection reset); the cause is there."""
    state = process(0, 2)
    state.client.values["dermjax/failed/1"] = "2 training.batch_size=18: must be divisible by 4"
    state.client.values["dermjax/seen/1"] = ""
    with pytest.raises(Exited) as exited:
        failfast.stop_on_bug(RuntimeError("Gloo AllGather failed: Connection reset by peer"))
    assert exited.value.status == 2
    assert capsys.readouterr().err == (
        "error: process 1 of 2 stopped the run: training.batch_size=18: must be divisible by 4 "
        "(here: RuntimeError: Gloo AllGather failed: Connection reset by peer)\n"
    )
    assert "dermjax/failed/0" not in state.client.values


def test_a_count_that_stands_still_is_a_silent_process_and_an_exited_one_is_not():
    counts = failfast.Counts(silent_s=10, num_processes=4, now=0)
    first = [(f"dermjax/alive/{i}", "1") for i in range(3)]  # process 3 has not counted yet
    assert counts.silent(first, now=1) is None
    beat = [("dermjax/alive/0", "2"), ("dermjax/alive/1", "2"), ("dermjax/alive/2", "1")]
    assert counts.silent([*beat, ("dermjax/alive/3", "1")], now=10.9) is None
    assert counts.silent([*beat, ("dermjax/alive/3", "exited")], now=11.0) == 2

    never = failfast.Counts(silent_s=10, num_processes=2, now=0)
    assert never.silent([("dermjax/alive/0", "1")], now=9.9) is None
    assert never.silent([("dermjax/alive/0", "2")], now=10) == 1  # it never counted at all


def test_the_watcher_speaks_for_a_silent_process(process, monkeypatch, capsys):
    monkeypatch.setenv("DERMJAX_SILENT_S", "0.05")
    state = process(0, 2)
    state.client.values["dermjax/alive/1"] = "7"  # and never again
    with pytest.raises(Exited) as exited:
        failfast._watch(state, 0.01)
    assert exited.value.status == 1
    assert capsys.readouterr().err.startswith(
        "error: process 1 of 2 stopped the run: it stopped responding 0 s ago (killed, out of "
        "memory, or its host went down); re-run the same command on every host"
    )
    assert "dermjax/seen/1" in state.client.values  # process 0 does not wait for it
    assert int(state.client.values["dermjax/alive/0"]) > 1


WATCHED = """
import sys, time
import jax
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from dermjax import failfast
failfast.watch()
print("watching", flush=True)
time.sleep(float(sys.argv[3]))
"""


def _watched(port: int, pid: int, seconds: float) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "DERMJAX_SILENT_S": "3"}
    return subprocess.Popen(
        [sys.executable, "-c", WATCHED, f"127.0.0.1:{port}", str(pid), str(seconds)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_process_killed_without_a_word_ends_the_others_with_one_line():
    """kill -9 of process 1: process 0 prints one line within seconds, not JAX's stack dump after
    its 100 s heartbeat limit."""
    port = _port()
    procs = [_watched(port, pid, 120) for pid in (0, 1)]
    for p in procs:
        assert p.stdout.readline() == "watching\n"
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    _, err = procs[0].communicate(timeout=60)
    assert time.monotonic() - killed < 15
    assert procs[0].returncode == 1, err
    assert err.splitlines()[-1].startswith(
        "error: process 1 of 2 stopped the run: it stopped responding 3 s ago"
    )
    assert "Check failure stack trace" not in err
    procs[1].wait()


@pytest.mark.slow
def test_a_process_that_ends_first_is_not_taken_for_a_silent_one():
    port = _port()
    procs = [_watched(port, 0, 8), _watched(port, 1, 0)]  # process 1 ends at once, 0 in 8 s
    for p in procs:
        _, err = p.communicate(timeout=90)
        assert p.returncode == 0, err
        assert "stopped the run" not in err


def test_the_command_line_tells_the_other_processes(monkeypatch):
    told = []
    monkeypatch.setattr(failfast, "stop", lambda message, status: told.append((message, status)))
    monkeypatch.setattr(failfast, "stop_on_bug", told.append)
    monkeypatch.setattr("sys.argv", ["prog"])
    bug = KeyError("lesion_id")

    def fails_with(error):
        def main(argv):
            raise error

        return main

    with pytest.raises(SystemExit) as exited:
        cli.run_main(fails_with(DataError("metadata.csv: no such file")))
    assert exited.value.code == 1
    with pytest.raises(KeyError):
        cli.run_main(fails_with(bug))
    assert told == [("metadata.csv: no such file", 1), bug]
