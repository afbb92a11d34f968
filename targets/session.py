"""A build's connection to its target's agent: opened on first use, kept alive through faults,
closed at the end.

First contact: when the device cannot be reached, ``on_unreachable = "fail"`` stops the build with
the ``DeviceError``; ``"warn"`` records why and lets every device step report that it did not run.

After first contact, a fault at any point (the agent dies, the link drops or stops answering during
an upload, a load, the timing or the scoring) is survived the same way everywhere, by the one
``RetryPolicy`` here (the spec's ``[connection]`` ``retries``, ``backoff_s``, ``backoff_max_s``):
reconnect after a backoff, load again what was loaded, and send the lost request again (a score
request's answered batches are kept; an upload resumes from the verified prefix on the device).
When the retries are spent the session is *lost*: the device step records what it had measured
with ``status = "lost"`` and the phase it was lost in, and every later device step reports the
device as unreachable after one quick reconnect attempt (no backoff, no retries), so the build
completes its other steps, writes its records and exits 13 (the shipped stage is not validated).

``device_session(target)`` is the session a build opens: this one for a device, a
``pool_session.PoolSession`` (the same interface, over every board) for a labgrid group.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from edgebuild.core.errors import DeviceError, EdgebuildError
from edgebuild.targets.client import ConnectionLost

log = logging.getLogger(__name__)

PHASES = {"stage": "upload", "info": "load", "load": "load", "measure": "measure", "time": "time",
          "score": "score"}


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a lost device is reconnected: ``retries`` attempts, the n-th
    after ``backoff_s * 2**n`` seconds (at most ``backoff_max_s``)."""

    retries: int = 3
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0

    @classmethod
    def of(cls, connection) -> "RetryPolicy":
        """The policy of a target spec's ``[connection]`` table."""
        return cls(connection.retries, connection.backoff_s, connection.backoff_max_s)

    def delay(self, attempt: int) -> float:
        """Seconds to wait before reconnect attempt ``attempt`` (0-based)."""
        return min(self.backoff_s * 2 ** attempt, self.backoff_max_s)


def _one_attempt(transport) -> None:
    """Let a transport's own connection and transfer retries go (those of first contact and of
    ``edgebuild device`` commands): once connected, the session's policy alone retries, so a lost
    device is given up after its ``retries``, not after retries of retries."""
    if hasattr(transport, "retries"):
        transport.retries = 0


class DeviceSession:
    def __init__(self, target, policy: RetryPolicy | None = None):
        self.target = target
        self.policy = policy or RetryPolicy.of(target.connection)
        self.client = None
        self.transport = None
        self.info: dict | None = None
        self.state: str | None = None       # None until first contact; then "ok" or the failure text
        self.lost: dict | None = None       # {"after": phase, "error": ...} once the retries are spent
        self.reconnects = 0                 # successful reconnects so far
        self._streak = 0                    # reconnect attempts since the last answered request
        self._answered = 0                  # the client's reply count when the streak was last reset

    # -- connecting ---------------------------------------------------------------------------------

    def connect(self):
        """The agent client, or None when the device is unreachable (and the spec says warn) or
        was lost earlier in the build and one quick reconnect attempt did not bring it back."""
        if self.state is None:
            self._first_contact()
        elif self.lost is not None and self.client is None:
            self._probe()
        return self.client

    def _first_contact(self) -> None:
        try:
            self._open()
            self.info = self.client.info()
            self.state = "ok"
        except DeviceError as e:
            self._drop()
            self.state = e.one_line()
            if self.target.on_unreachable == "fail":
                raise
            log.warning("device unreachable, its gates are not run: %s", e.one_line())

    def _open(self, quick: bool = False) -> None:
        """A new transport and a client greeted through it (``quick``: one connection attempt)."""
        from edgebuild.targets.client import connect
        self.transport = self._transport(quick)
        self.client = connect(self.target, self.transport)
        self.client.on_lost = self._on_lost
        _one_attempt(self.transport)       # from now on this session's policy does the retrying

    def _transport(self, quick: bool):
        from edgebuild.targets import transports
        transport = transports.get(self.target.connection.transport)(self.target)
        if quick:
            _one_attempt(transport)
        return transport

    def _probe(self) -> None:
        """One quick attempt to reach a device lost earlier in the build."""
        try:
            self._open(quick=True)
        except DeviceError as e:
            self._drop()
            self.state = f"{self._lost_text()}; not reachable again: {e.one_line()}"
            log.info("device %s still unreachable: %s", self.target.name, e.one_line())
            return
        log.warning("device %s is reachable again", self.target.name)
        self.lost, self.state, self._streak = None, "ok", 0

    # -- surviving faults ---------------------------------------------------------------------------

    def attempt(self, phase: str, fn):
        """``fn(client)`` for one phase of a device step (upload, load, time, score); when the
        connection is lost, reconnect by the policy and call it again. Raises ``ConnectionLost``
        once the device is lost (``self.lost`` says in which phase)."""
        while True:
            try:
                return fn(self.client)
            except ConnectionLost as err:
                if self.lost is not None or not self.recover(phase, err):
                    raise

    def _on_lost(self, cmd: str, err: ConnectionLost) -> bool:
        """The client's hook: reconnect before it sends a lost request again."""
        return self.recover(PHASES.get(cmd, cmd), err)

    def recover(self, phase: str, err: DeviceError) -> bool:
        """Reconnect after ``err`` lost the connection during ``phase``: True once reconnected;
        False (the session is then lost) when the retries since the last answer are spent."""
        if self.client is not None and self.client.replies != self._answered:
            self._streak = 0
        fault = err
        while self._streak < self.policy.retries:
            delay = self.policy.delay(self._streak)
            self._streak += 1
            log.warning("device %s lost during %s (%s); reconnecting in %.1f s (attempt %d of %d)",
                        self.target.name, phase, err.one_line(), delay, self._streak, self.policy.retries)
            time.sleep(delay)
            try:
                self._reopen()
            except DeviceError as e:
                err = e
                continue
            self.reconnects += 1
            self._answered = self.client.replies
            return True
        self._give_up(phase, fault, None if err is fault else err)
        return False

    def _reopen(self) -> None:
        """The same client over a new transport (a new agent; what was loaded, loaded again)."""
        self.transport = self._transport(quick=True)
        self.client.reopen(self.transport)

    def _give_up(self, phase: str, fault: DeviceError, last: DeviceError | None) -> None:
        error = fault.one_line() + (f"; reconnecting failed: {last.one_line()}" if last else "")
        self.lost = {"after": phase, "error": error, "retries": self.policy.retries}
        self.state = self._lost_text()
        log.warning("device %s is lost (%s, after %d reconnect attempts); its remaining checks are "
                    "reported as not run", self.target.name, self.state, self.policy.retries)
        self._drop()

    def _lost_text(self) -> str:
        return f"lost during {self.lost['after']}: {self.lost['error']}" if self.lost else "lost"

    # -- what a device step does through the session -------------------------------------------------

    def deploy(self, client, name: str, version: str, files: dict, budget_bytes: int | None = None,
               progress=None) -> dict:
        """Upload ``files`` and install them as stage ``name/version`` (``client.deploy_stage``
        through the current transport, within ``budget_bytes``); ``progress(done, total)`` follows
        the upload."""
        from edgebuild.targets.client import deploy_stage
        return deploy_stage(client, self.transport, name, version, files, budget_bytes, progress)

    def boards(self, since: dict | None = None) -> dict | None:
        """What each board of a group did (``PoolSession``); None: one device, no boards."""
        return None

    # -- closing ------------------------------------------------------------------------------------

    def _drop(self) -> None:
        """Forget the connection, closing what is left of it."""
        client, transport, self.client = self.client, self.transport, None
        try:
            if client is not None:
                client._abort()
            elif transport is not None:
                transport.close()
        except EdgebuildError as e:
            log.debug("closing a lost connection: %s", e.one_line())

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


def device_session(target, policy: RetryPolicy | None = None) -> DeviceSession:
    """The session a build opens for ``target``: a ``PoolSession`` over every board of a labgrid
    group (a ``[labgrid]`` table with tags), else a ``DeviceSession`` for its one device."""
    from edgebuild.targets.labgrid import board_group
    if board_group(target):
        from edgebuild.targets.pool_session import PoolSession
        return PoolSession(target, policy)
    return DeviceSession(target, policy)
