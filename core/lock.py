"""One writer per output directory: an advisory lock on ``<out>/.edgebuild.lock``.

``fcntl.flock`` on a file in the output directory: the kernel releases it when the holder's file is
closed or its process dies, so a crashed build never leaves a stale lock behind. The holder writes
its pid, start time and command line into the file, so whoever waits can say for whom::

    with OutputLock(out, "edgebuild all ...").hold(wait=True, on_wait=print):
        ...   # the build, its manifest and reports

A second holder in the same process is refused like any other (flock locks belong to one open
file, not to a process), so nested use must share one ``OutputLock``.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Callable

from edgebuild.core.errors import BusyError

LOCK_NAME = ".edgebuild.lock"
POLL_S = 0.5


class OutputLock:
    """The lock of output directory ``out`` for a holder described by ``what``."""

    def __init__(self, out, what: str = "edgebuild"):
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self.what = what
        self._fd: int | None = None

    def holder(self) -> dict:
        """What the current holder wrote about itself (``{}`` when nothing readable is there)."""
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def describe_holder(self) -> str:
        """``pid N, started T: COMMAND`` of the holder, as far as it is known."""
        info = self.holder()
        if not info:
            return "pid unknown"
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
        return f"pid {info.get('pid', '?')}, started {started}: {info.get('what', '?')}"

    def acquire(self, wait: bool = True, on_wait: Callable[[str], None] | None = None,
                timeout_s: float | None = None) -> None:
        """Take the lock. When another holds it: raise ``BusyError`` naming it (``wait=False``, or
        after ``timeout_s``), else call ``on_wait(message)`` once and wait until it is free."""
        self.out.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        told = False
        try:
            while not _try_lock(fd):
                if not wait or (deadline is not None and time.monotonic() > deadline):
                    raise BusyError(f"output directory {self.out} is in use by another edgebuild "
                                    f"({self.describe_holder()})",
                                    hint="wait for it to finish, or run without --no-wait to queue behind it")
                if not told and on_wait is not None:
                    on_wait(f"waiting for the build holding {self.out} ({self.describe_holder()})")
                told = True
                time.sleep(POLL_S)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        _write_holder(fd, self.what)

    def release(self) -> None:
        """Let go of the lock (closing the file releases it). Safe to call twice."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)

    @contextlib.contextmanager
    def hold(self, wait: bool = True, on_wait: Callable[[str], None] | None = None):
        """The lock for the length of a ``with`` block."""
        self.acquire(wait=wait, on_wait=on_wait)
        try:
            yield self
        finally:
            self.release()


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _write_holder(fd: int, what: str) -> None:
    """Put this process's pid, start time and command into the (locked) file."""
    info = json.dumps({"pid": os.getpid(), "started": time.time(), "what": what}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, info, 0)
