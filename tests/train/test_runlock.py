"""RunLock: one process per run folder, the holder named, a killed holder never blocks."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from dermjax.errors import RunFolderError, UserError
from dermjax.train.runlock import LOCK_FILE, RunLock

HOLDER = """
import sys, time
from dermjax.train.runlock import RunLock
RunLock(sys.argv[2]).acquire()
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """A separate process holding the lock on `tmp_path / "run"`; killed at the end."""
    folder, script = tmp_path / "run", tmp_path / "holder.py"
    script.write_text(HOLDER)
    proc = subprocess.Popen(
        # --marker before the long folder path: the message shortens commands past 200 characters
        [sys.executable, str(script), "--marker", str(folder)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        yield folder, proc
    finally:
        proc.kill()
        proc.wait()


def test_second_process_is_refused_with_one_line_naming_the_holder(holder):
    folder, proc = holder
    with pytest.raises(RunFolderError) as raised:
        RunLock(str(folder)).acquire()
    message = str(raised.value)
    assert isinstance(raised.value, UserError) and "\n" not in message
    assert message.startswith(f"run folder {folder} is in use by pid {proc.pid} on host ")
    assert socket.gethostname() in message and "--marker" in message
    assert message.endswith("wait for it to finish, stop it, or use another --workdir")


def test_lock_of_a_killed_holder_is_free_at_once_and_its_file_does_not_block(holder):
    folder, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = json.loads((folder / LOCK_FILE).read_text())
    assert left["pid"] == proc.pid  # the dead holder's details are still in the file
    with RunLock(str(folder)) as lock:
        assert lock.held
        assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_release_then_acquire_again_in_one_process(tmp_path):
    lock = RunLock(str(tmp_path / "new" / "run"))
    lock.acquire()
    with pytest.raises(RunFolderError, match=f"pid {os.getpid()}"):
        RunLock(str(tmp_path / "new" / "run")).acquire()  # a second open file is refused too
    lock.release()
    lock.release()  # idempotent
    assert not lock.held and (tmp_path / "new" / "run" / LOCK_FILE).read_text() == ""
    with RunLock(str(tmp_path / "new" / "run")):
        pass
    lock.acquire()
    holder = json.loads((tmp_path / "new" / "run" / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["started"].endswith("+00:00")
    lock.release()
