"""One run per local run folder: an exclusive `flock` on `<folder>/.dermjax.lock`.

The runner also locks a run's checkpoint folder when it lies elsewhere (`output.save_dir`), so
two runs that share it through different log folders cannot both write there.

The kernel drops a `flock` when its holder's last file descriptor closes, so a crashed or
SIGKILLed run never leaves the folder locked; the lock file itself stays behind and is harmless.
While held, the file names the holder (pid, host, start time in UTC, command line), so a second
run that finds the folder taken can say who has it. Only local folders: `flock` on a gs:// URL
is not possible, and on network file systems it may not be honoured.

Processes forked by the holder (data-loader workers) share its lock; they never release it, and
a holder killed with such children alive keeps the folder locked until they exit too.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shlex
import socket
import sys
import time

from dermjax.errors import RunFolderError

LOCK_FILE = ".dermjax.lock"
_HOLDER_WAIT_S = 1.0  # how long to wait for a new holder to write its details


def _command_line() -> str:
    """This process's command line as typed (`python -m dermjax.main ...`) where Linux tells."""
    try:
        with open("/proc/self/cmdline", "rb") as f:
            args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        args = [sys.executable, *sys.argv]
    return shlex.join(args)


class RunLock:
    """Exclusive use of a local run folder by one process; a context manager.

    `acquire()` raises `RunFolderError` naming the holder when another process has the folder.
    """

    def __init__(
        self,
        folder: str,
        *,
        what: str = "run folder",
        fix: str = "wait for it to finish, stop it, or use another --workdir",
    ) -> None:
        if "://" in str(folder):
            raise ValueError(f"RunLock needs a local folder, got {folder}.")
        self.folder = os.path.abspath(folder)
        self.what, self.fix = what, fix
        self.path = os.path.join(self.folder, LOCK_FILE)
        self._fd: int | None = None
        self._owner_pid: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock (creating the folder if needed) and record this process as the holder."""
        if self.held:
            raise RuntimeError(f"{self.path} is already held by this RunLock.")
        try:
            os.makedirs(self.folder, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunFolderError(
                f"{self.what} {self.folder} cannot be locked ({e.strerror}): check that it is a "
                "writable local folder, or use another --workdir"
            ) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderError(self._in_use_message()) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": _command_line(),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd, self._owner_pid = fd, os.getpid()
        return self

    def _in_use_message(self) -> str:
        holder = None
        deadline = time.monotonic() + _HOLDER_WAIT_S
        while holder is None:  # the holder may not have written its details yet
            try:
                with open(self.path, encoding="utf-8") as f:
                    holder = json.loads(f.read())
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        if not isinstance(holder, dict):
            return f"{self.what} {self.folder} is in use by another process: {self.fix}"
        command = " ".join(str(holder.get("command", "?")).split())  # one line
        command = command if len(command) <= 200 else command[:197] + "..."
        return (
            f"{self.what} {self.folder} is in use by pid {holder.get('pid', '?')} on host "
            f"{holder.get('host', '?')} since {holder.get('started', '?')} ({command}): {self.fix}"
        )

    def release(self) -> None:
        """Give the folder back (idempotent). The lock file stays, emptied."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if os.getpid() == self._owner_pid:  # a forked child must not unlock its parent's lock
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
