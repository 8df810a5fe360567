"""Loader lifecycle: closing iterators (twice, by exhaustion, via the loader), and grain workers
that neither outlive a killed main process nor leave shared memory or tracebacks at exit."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dermjax.data import pipeline
from tests.data.test_pipeline import ROOT, SIZE, make_records, train


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return make_records(str(tmp_path_factory.mktemp("imgs")), 10)


def test_closing_an_iterator_twice_is_safe_and_stops_it(records):
    loader = train(records)
    first, second = iter(loader), iter(loader)
    next(first)
    pipeline.close_iterator(first)
    first.close()
    pipeline.close_iterator(None)
    with pytest.raises(ValueError, match="closed"):
        next(first)
    next(second)
    loader.close()
    loader.close()
    with pytest.raises(ValueError, match="closed"):
        next(second)


def test_an_exhausted_eval_iterator_closes_itself(records):
    it = iter(pipeline.eval_loader(records, batch_size=4, img_size=SIZE, split="val"))
    assert len(list(it)) == 3
    with pytest.raises(ValueError, match="closed"):
        next(it)


def run_child(tmp_path, mode: str) -> tuple[subprocess.Popen, str]:
    """Starts tests/data/loader_child.py; its stderr goes to the returned file, not a pipe."""
    err = str(tmp_path / f"{mode}.stderr")
    with open(err, "w") as f:
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.data.loader_child", mode, str(tmp_path)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=f,
            text=True,
        )
    return child, err


def alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie, already dead but not yet reaped, does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_grain_workers_and_resource_tracker_die_with_a_killed_main_process(tmp_path):
    child, err = run_child(tmp_path, "kill")
    with child.stdout:  # orphaned workers would hold the pipe open: read one line, not to EOF
        line = child.stdout.readline()
    assert child.wait(timeout=60) == -signal.SIGKILL, Path(err).read_text()
    pids = json.loads(line)
    assert len(pids["workers"]) == 2 and pids["tracker"]
    everyone = [*pids["workers"], pids["tracker"]]
    deadline = time.monotonic() + 15
    while any(map(alive, everyone)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in everyone if alive(pid)]
    for pid in left:  # do not leave them running when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not left, f"still running 15 s after the main process was killed: {left}"


@pytest.mark.parametrize("mode", ["close", "resume"])
def test_a_run_with_workers_exits_without_leaks_or_tracebacks(tmp_path, mode):
    """close: closed twice, a batch still referenced; resume: restored and never closed."""
    child, err_file = run_child(tmp_path, mode)
    child.communicate(timeout=120)
    err = Path(err_file).read_text()
    assert child.returncode == 0, err
    assert "leaked shared_memory" not in err and "Traceback" not in err, err
