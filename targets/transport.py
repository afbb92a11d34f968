"""How the host reaches a device agent: the ``Transport`` interface and its registry.

A transport starts the agent (a local subprocess, or the remote command of an SSH session) and
hands back its stdin and stdout; ``AgentClient`` speaks the protocol over them. It also puts
files into ``<root>/incoming/`` on the device, where the agent's ``stage`` command finds them,
and runs the few commands that provisioning needs (``run``).

``transports`` maps a target's ``connection.transport`` to a factory ``f(target) -> Transport``::

    target = load_target("rpi5")
    transport = transports.get(target.connection.transport)(target)   # or transport_for(target)
    client = AgentClient(transport, timeout_s=target.connection.timeout_s)
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import BinaryIO

from edgebuild.core.errors import ConfigError, DeviceError
from edgebuild.core.registry import Registry

transports: Registry = Registry("transport", error=ConfigError)
transports.register_lazy("local", "edgebuild.targets.local:from_target")
transports.register_lazy("ssh", "edgebuild.targets.ssh:from_target")
transports.register_lazy("labgrid", "edgebuild.targets.labgrid:from_target")


class Transport(ABC):
    """A way to start the agent on a device and to put files there."""

    progress = None    # callable(done_bytes, total_bytes) during an upload, when set

    @abstractmethod
    def open(self) -> tuple[BinaryIO, BinaryIO]:
        """Start the agent; return ``(stdin, stdout)``: a writable and a readable byte stream.

        Raises ``DeviceError`` when the device cannot be reached or the agent cannot start.
        """

    @abstractmethod
    def upload(self, local_path, remote_name: str) -> str:
        """Copy a local file to ``<root>/incoming/<remote_name>`` on the device, atomically
        (temporary name, then rename); return the file's path on the device."""

    @abstractmethod
    def close(self) -> None:
        """Stop the agent if it still runs and release the connection. Safe to call twice."""

    def device_root(self) -> str:
        """The agent's root folder, as an absolute path on the device."""
        return str(self.root)

    def run(self, argv: list[str], timeout_s: float = 600.0) -> tuple[int, str]:
        """Run a command on the device (for provisioning); ``(exit status, stdout and stderr)``.

        Raises ``DeviceError`` when the command cannot be started at all.
        """
        raise DeviceError(f"the {type(self).__name__} cannot run commands on the device")

    def stderr_tail(self, lines: int = 20) -> list[str]:
        """The agent's last stderr lines (for error messages when it dies)."""
        return []

    def exit_status(self) -> int | None:
        """The agent's exit status once it has exited, else ``None``."""
        return None


def transport_for(target) -> Transport:
    """The transport named by ``target.connection.transport``, configured from the target."""
    return transports.get(target.connection.transport)(target)
