"""The local transport: the agent as a subprocess of the host, its root a local folder.

The stand-in for a device in development and tests; it has the same interface as the SSH
transport, so everything above it (client, staging, benchmarks) runs unchanged.
"""
from __future__ import annotations

import collections
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from edgebuild.core.errors import DeviceError
from edgebuild.core.files import atomic_path
from edgebuild.targets.transport import Transport

log = logging.getLogger(__name__)

STDERR_LINES = 200


def agent_command(python: str, root) -> list[str]:
    """The command line that starts the agent on stdio with ``root`` as its folder."""
    return [python, "-m", "edgebuild.device_agent", "serve", "--stdio", "--root", str(root)]


def drain_lines(stream, sink: collections.deque) -> threading.Thread:
    """Read ``stream`` line by line into ``sink`` on a daemon thread (keeps a pipe from filling)."""
    def run():
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
            sink.append(line.rstrip("\n"))
            log.debug("agent: %s", sink[-1])
    thread = threading.Thread(target=run, name="agent-stderr", daemon=True)
    thread.start()
    return thread


def _close_quietly(stream) -> None:
    try:
        stream.close()
    except OSError:     # e.g. a broken pipe while flushing to an agent that has died
        pass


class LocalTransport(Transport):
    """Runs ``python -m edgebuild.device_agent serve --stdio --root ROOT`` as a subprocess."""

    def __init__(self, root, python: str | None = None, command: list[str] | None = None,
                 stop_timeout_s: float = 5.0):
        self.root = Path(root).expanduser().resolve()
        self.command = command or agent_command(python or sys.executable, self.root)
        self.stop_timeout_s = stop_timeout_s
        self.proc: subprocess.Popen | None = None
        self._stderr: collections.deque = collections.deque(maxlen=STDERR_LINES)
        self._drain: threading.Thread | None = None

    def open(self):
        """Start the agent subprocess; return its ``(stdin, stdout)``."""
        if self.proc is not None:
            raise DeviceError("local agent is already running; close the transport before reopening")
        try:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE)
        except OSError as err:
            raise DeviceError(f"cannot start the local agent {self.command[0]}: {err.strerror}") from None
        self._drain = drain_lines(self.proc.stderr, self._stderr)
        log.info("started local agent (pid %d) in %s", self.proc.pid, self.root)
        return self.proc.stdin, self.proc.stdout

    def upload(self, local_path, remote_name: str) -> str:
        """Copy ``local_path`` into ``<root>/incoming/`` under a temporary name, then rename it."""
        if not remote_name or os.sep in remote_name or remote_name.startswith("."):
            raise DeviceError(f"upload name {remote_name!r} must be a plain file name")
        incoming = self.root / "incoming"
        final = incoming / remote_name
        try:
            with atomic_path(final) as tmp:
                shutil.copyfile(local_path, tmp)
        except OSError as err:
            raise DeviceError(f"cannot copy {local_path} to {final}: {err.strerror or err}") from None
        return str(final)

    def run(self, argv, timeout_s: float = 600.0) -> tuple[int, str]:
        """Run ``argv`` here; ``(exit status, stdout and stderr together)``."""
        try:
            done = subprocess.run([str(a) for a in argv], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, timeout=timeout_s, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise DeviceError(f"cannot run {argv[0]}: {err}") from None
        return done.returncode, done.stdout.decode("utf-8", "replace")

    def close(self) -> None:
        """Close the agent's stdin, wait for it to exit, and kill it if it does not."""
        proc = self.proc
        if proc is None:
            return
        _close_quietly(proc.stdin)
        try:
            proc.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("local agent (pid %d) did not stop; killing it", proc.pid)
            proc.kill()
            proc.wait()
        self._drain.join(timeout=2.0)     # collect the last stderr lines before closing
        _close_quietly(proc.stdout)
        _close_quietly(proc.stderr)

    def stderr_tail(self, lines: int = 20) -> list[str]:
        """The agent's last stderr lines."""
        return list(self._stderr)[-lines:]

    def exit_status(self) -> int | None:
        """The agent's exit status once it has exited."""
        return None if self.proc is None else self.proc.poll()


def from_target(target) -> LocalTransport:
    """The local transport of a target spec: root and interpreter from its ``[connection]``
    (with the setup record laid over it, ``spec.resolve_connection``).

    A ``root`` of ``"@home"`` means a folder named after the target under ``$EDGEBUILD_HOME``."""
    from edgebuild.targets.spec import resolve_connection

    connection = resolve_connection(target)
    root = connection.root
    if root == "@home":
        from edgebuild.core.paths import edgebuild_home
        root = str(edgebuild_home() / f"agent-{target.name}")
    return LocalTransport(root, python=connection.agent_python)
