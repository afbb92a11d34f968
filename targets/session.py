"""A build's connection to its target's agent: opened on first use, once; closed at the end.

When the device cannot be reached, ``on_unreachable = "fail"`` stops the build with the
``DeviceError``; ``"warn"`` records why and lets every device step report that it did not run.
"""
from __future__ import annotations

import logging

from edgebuild.core.errors import DeviceError, EdgebuildError

log = logging.getLogger(__name__)


class DeviceSession:
    def __init__(self, target):
        self.target = target
        self.client = None
        self.transport = None
        self.info: dict | None = None
        self.state: str | None = None       # None until first contact; then "ok" or the failure text

    def connect(self):
        """The agent client, or None when the device is unreachable (and the spec says warn)."""
        if self.state is not None:
            return self.client
        from edgebuild.targets import transports
        from edgebuild.targets.client import connect
        try:
            self.transport = transports.get(self.target.connection.transport)(self.target)
            self.client = connect(self.target, self.transport)
            self.info = self.client.info()
            self.state = "ok"
        except DeviceError as e:
            self.state, self.client = e.one_line(), None
            if self.target.on_unreachable == "fail":
                raise
            log.warning("device unreachable, its gates are not run: %s", e.one_line())
        return self.client

    def operators(self) -> dict | None:
        """The device's onnxruntime version and CPU kernels (the agent's ``ops``), or None when the
        device is unreachable or its agent predates the command."""
        client = self.connect()
        if client is None or not client.supports("ops"):
            return None
        return client.call("ops")

    def close(self) -> None:
        if self.client is not None:
            try:
                self.client.close()
            except EdgebuildError:
                pass
