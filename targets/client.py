"""The host side of the agent protocol: one request at a time, each with a timeout.

    target = load_target("rpi5")
    transport = transport_for(target)
    with AgentClient(transport, timeout_s=target.connection.timeout_s) as agent:
        agent.hello(target.name)
        deploy_stage(agent, transport, "rtn", "3f2a9c", {"model.onnx": ..., "graph.json": ...,
                                                         "weights.ebpk": ...})
        agent.load("rtn", "3f2a9c", threads=target.runtime.threads)
        samples = agent.time(prompt_len=64, decode_tokens=32, warmup=2, repeats=5)

Every failure raises ``DeviceError`` with a one-line message: the agent died (with its last
stderr lines), no reply in time (the agent is then stopped), a protocol error, or an error the
agent reported (its type and message). The first two are ``ConnectionLost``: the agent or the link
to it went away, and a reconnect may bring it back. With ``on_lost`` set (the build's
``DeviceSession`` does), a request that lost its connection is sent again once the hook has
reconnected the client (``reopen``: a new agent through a new transport, greeted, with the stage
that was loaded loaded again); a score request's answered batches are kept.

``connect(target)`` starts a target's agent and checks the protocol; when the device cannot be
reached, ``unreachable_result(target, err)`` either re-raises (``on_unreachable = "fail"``) or
returns the record of a device step that did not run (``"warn"``): no measured numbers, so the
device gates read ``not_run``.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path

from edgebuild.core.errors import DeviceError
from edgebuild.core.files import sha256_file
from edgebuild.device_agent import protocol

log = logging.getLogger(__name__)

SCORE_BATCH = 64          # score requests sent per protocol request (a context group stays whole)
RESENDABLE = frozenset({"info", "load", "time", "score"})   # requests that may be sent again after a reconnect


class ConnectionLost(DeviceError):
    """The agent or the link to it went away (it died, the link dropped, or no reply came in
    time); unlike an error the agent reports, a reconnect may bring it back."""


def _read_lines(stream, sink: queue.Queue) -> None:
    """Put each line of ``stream`` into ``sink``, then ``None`` at end of stream."""
    try:
        for line in iter(stream.readline, b""):
            if not line:        # text-mode streams end with ""
                break
            sink.put(line)
    except (OSError, ValueError) as err:    # stream closed under us
        log.debug("agent stdout closed: %s", err)
    finally:
        sink.put(None)



def context_batches(pairs: list, size: int) -> list[list[int]]:
    """Indices of ``pairs`` in batches of about ``size``, requests with equal contexts together.

    Groups keep their first appearance's order; a group larger than ``size`` gets its own batch.
    """
    groups: dict = {}
    for index, (context, _) in enumerate(pairs):
        groups.setdefault(tuple(context), []).append(index)
    batches, batch = [], []
    for indices in groups.values():
        if batch and len(batch) + len(indices) > size:
            batches.append(batch)
            batch = []
        batch = batch + indices
    if batch:
        batches.append(batch)
    return batches


class AgentClient:
    """Starts the agent through ``transport`` and sends it requests."""

    on_lost = None      # callable(cmd, ConnectionLost) -> bool: reconnected (``reopen``), send it again

    def __init__(self, transport, timeout_s: float = 60.0):
        self.transport = transport
        self.timeout_s = timeout_s
        self._next_id = 0
        self.replies = 0                  # requests answered, over every connection of this client
        self.agent_hello: dict | None = None
        self._target: str | None = None
        self._loaded: tuple | None = None  # (args, timeout_s) of the last successful load
        self._start()

    def _start(self) -> None:
        """Open the transport (starting the agent) and read its replies on a thread."""
        self._closed = False
        self._stdin, stdout = self.transport.open()
        self._lines: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=_read_lines, args=(stdout, self._lines),
                                        name="agent-stdout", daemon=True)
        self._reader.start()

    def reopen(self, transport) -> None:
        """Start over through ``transport`` after the connection was lost: a new agent, greeted
        as before, with the stage that was loaded loaded again. Raises ``DeviceError``."""
        self._abort()
        self.transport = transport
        self._start()
        self.hello(self._target)
        if self._loaded is not None:
            self._exchange("load", *self._loaded)

    def __enter__(self) -> "AgentClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- commands -----------------------------------------------------------------------

    def hello(self, target: str | None = None) -> dict:
        """Introduce the host (protocol version, target key); return the agent's versions."""
        self._target = target
        result = self.call("hello", {"protocol": protocol.PROTOCOL_VERSION, "target": target})
        try:
            protocol.check_version(result.get("protocol"), side="agent")
        except protocol.VersionMismatch as err:
            raise DeviceError(str(err)) from None
        self.agent_hello = result
        return result

    def supports(self, cmd: str) -> bool:
        """Whether the agent announced ``cmd`` in its ``hello`` (agents before protocol 1.1 did not)."""
        return cmd in (self.agent_hello or {}).get("commands", [])

    def info(self) -> dict:
        """Device facts: arch, cores, RAM, free disk, temperature, throttling, versions, stages."""
        return self.call("info")

    def stage(self, name: str, version: str, files: list[dict], budget_bytes: int | None = None) -> dict:
        """Install uploaded files (``[{path, sha256, as}]``) as stage ``name/version``; with
        ``budget_bytes``, the agent prunes older versions to it and refuses a version that cannot fit."""
        args = {"name": name, "version": version, "files": files}
        if budget_bytes is not None:
            args["budget_bytes"] = int(budget_bytes)
        return self.call("stage", args)

    def load(self, name: str | None = None, version: str | None = None, threads: int | None = None,
             packed: str | None = None, timeout_s: float | None = None) -> dict:
        """Load a staged model (default: the active stage) into the agent's runtime."""
        args = {"name": name, "version": version, "threads": threads, "packed": packed}
        args = {k: v for k, v in args.items() if v is not None}
        result = self.call("load", args, timeout_s)
        self._loaded = (args, timeout_s)
        return result

    def time(self, timeout_s: float | None = None, **kwargs) -> dict:
        """Time the loaded model (prompt_len, decode_tokens, warmup, repeats); raw samples."""
        return self.call("time", kwargs, timeout_s)

    def measure(self, name: str, version: str, threads: int | None = None, timeout_s: float | None = None,
                **timing) -> dict:
        """Load and time stage ``name/version`` in a fresh process on the device: that stage's own
        memory (``peak_rss_mb``, ``stage_rss_mb``), ``load_s``, raw prefill/decode samples,
        ``stored_bytes`` and the ``weights_sha256`` computed there."""
        args = {"name": name, "version": version, "threads": threads, **timing}
        return self.call("measure", {k: v for k, v in args.items() if v is not None}, timeout_s)

    def score(self, requests, timeout_s: float | None = None, max_batch_tokens: int | None = None,
              progress=None) -> list[tuple[float, bool]]:
        """Log-likelihoods of ``[(context_ids, continuation_ids), ...]``: ``[(logprob, greedy)]``.

        Sent in batches of about ``SCORE_BATCH`` requests, keeping requests that share a context
        in one batch (the agent prefills each context once); ``timeout_s`` applies to each batch.
        ``progress(done, total)`` is called after each batch.
        """
        pairs = [(list(ctx), list(cont)) for ctx, cont in requests]
        out: list = [None] * len(pairs)
        for batch in context_batches(pairs, SCORE_BATCH):
            args = {"requests": [{"context": pairs[i][0], "continuation": pairs[i][1]} for i in batch]}
            if max_batch_tokens is not None:
                args["max_batch_tokens"] = max_batch_tokens
            result = self.call("score", args, timeout_s)
            if len(result["results"]) != len(batch):
                raise DeviceError(f"agent returned {len(result['results'])} scores for {len(batch)} "
                                  f"requests; update edgebuild-agent on the device")
            for index, (logprob, greedy) in zip(batch, result["results"]):
                out[index] = (float(logprob), bool(greedy))
            if progress is not None:
                progress(sum(r is not None for r in out), len(out))
        return out

    def activate(self, name: str, version: str) -> dict:
        """Make a staged version the active one on the device."""
        return self.call("activate", {"name": name, "version": version})

    def rollback(self) -> dict:
        """Make the previously active version active again."""
        return self.call("rollback")

    def close(self) -> None:
        """Ask the agent to shut down, then close the transport. Safe to call twice."""
        if self._closed:
            return
        try:
            if self._reader.is_alive():
                self.call("shutdown", timeout_s=min(self.timeout_s, 10.0))
        except DeviceError as err:
            log.debug("shutdown: %s", err)
        finally:
            self._closed = True
            self.transport.close()

    # --- the exchange -------------------------------------------------------------------

    def call(self, cmd: str, args: dict | None = None, timeout_s: float | None = None) -> dict:
        """Send one request and return its result; raise ``DeviceError`` on any failure. A request
        in ``RESENDABLE`` whose connection was lost is sent again when ``on_lost`` reconnects."""
        while True:
            try:
                return self._exchange(cmd, args, timeout_s)
            except ConnectionLost as err:
                if self.on_lost is None or cmd not in RESENDABLE or not self.on_lost(cmd, err):
                    raise

    def _exchange(self, cmd: str, args: dict | None, timeout_s: float | None) -> dict:
        """One request and its reply, on the current connection."""
        if self._closed:
            raise ConnectionLost(f"cannot send {cmd!r}: the connection to the agent is closed")
        self._next_id += 1
        self._send(protocol.request(self._next_id, cmd, args), cmd)
        reply = self._receive(self._next_id, cmd, timeout_s or self.timeout_s)
        self.replies += 1
        if not reply["ok"]:
            err = reply["error"]
            exc = DeviceError(f"agent refused {cmd!r}: {err['type']}: {err['message']}")
            exc.remote_type = err["type"]
            raise exc
        return reply["result"]

    def _send(self, line: bytes, cmd: str) -> None:
        try:
            self._stdin.write(line)
            self._stdin.flush()
        except (OSError, ValueError):        # broken pipe, or stdin already closed
            raise self._died(cmd) from None

    def _receive(self, req_id: int, cmd: str, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                self._abort()
                raise ConnectionLost(f"no reply to {cmd!r} within {timeout_s:g} s; the agent was "
                                     f"stopped (raise the timeout for a slow device)") from None
            if line is None:
                raise self._died(cmd)
            reply = self._parse(line, cmd)
            if reply is not None and reply["id"] == req_id:
                return reply
            if reply is not None:
                self._unexpected(reply, req_id, cmd)

    def _parse(self, line, cmd: str) -> dict | None:
        text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
        if not text.lstrip().startswith("{"):       # e.g. a login banner from a shell rc file
            log.warning("ignoring non-protocol output from the agent: %s", text.strip()[:200])
            return None
        try:
            return protocol.parse_reply(text)
        except protocol.ProtocolError as err:
            self._abort()
            raise DeviceError(f"protocol error in the reply to {cmd!r}: {err}") from None

    def _unexpected(self, reply: dict, req_id: int, cmd: str) -> None:
        self._abort()
        if reply["id"] is None and not reply["ok"]:
            raise DeviceError(f"agent could not read the {cmd!r} request: "
                              f"{reply['error']['type']}: {reply['error']['message']}")
        raise DeviceError(f"protocol error: reply id {reply['id']!r} to request {req_id} ({cmd!r})")

    def _abort(self) -> None:
        self._closed = True
        try:      # closed now, while its buffers exist: a file left to the garbage collector after a
            self._stdin.close()    # dropped link prints a library traceback (paramiko) when collected
        except Exception as err:  # noqa: BLE001 - whatever a dead stream raises, it is gone
            log.debug("closing the agent's input: %s", err)
        try:
            self.transport.close()
        except DeviceError as err:           # closing what is already gone
            log.debug("closing the transport: %s", err.one_line())

    def _died(self, cmd: str) -> ConnectionLost:
        self._abort()
        status = self.transport.exit_status()
        tail = " | ".join(line.strip() for line in self.transport.stderr_tail(5) if line.strip())
        where = f" (exit status {status})" if status is not None else ""
        return ConnectionLost(f"the agent stopped before replying to {cmd!r}{where}; "
                              f"last stderr: {tail or '(empty)'}")


def deploy_stage(client: AgentClient, transport, name: str, version: str,
                 files: dict[str, Path], budget_bytes: int | None = None, progress=None) -> dict:
    """Upload ``{name in stage: local path}``, then have the agent verify and install them
    (within ``budget_bytes`` of stored stages, when given); ``progress(done, total)`` follows the
    upload's bytes.

    Returns the agent's ``stage`` result (``path``, ``files`` with sha256 and bytes, ``existing``).
    """
    entries = []
    transport.progress = progress
    try:
        for as_name, path in files.items():
            sha = sha256_file(path)
            log.info("uploading %s (%.1f MB) for stage %s/%s", as_name, Path(path).stat().st_size / 2**20,
                     name, version)
            remote = transport.upload(path, f"{name}.{version}.{as_name}")
            entries.append({"path": remote, "sha256": sha, "as": as_name})
    finally:
        transport.progress = None
    return client.stage(name, version, entries, budget_bytes)


def connect(target, transport=None) -> AgentClient:
    """Start ``target``'s agent (through ``transport``, default: the target's own) and say hello.

    Raises ``DeviceError`` when the device cannot be reached or speaks another protocol.
    """
    from edgebuild.targets.transport import transport_for

    transport = transport or transport_for(target)
    client = AgentClient(transport, timeout_s=target.connection.timeout_s)
    try:
        client.hello(target=target.name)
    except BaseException:
        client.close()
        raise
    return client


def unreachable_result(target, error: DeviceError, predicted: dict | None = None) -> dict:
    """The device step's record when ``target`` could not be reached.

    ``on_unreachable = "fail"`` re-raises ``error``. ``"warn"`` logs it and returns
    ``{"status": "unreachable", "error": ..., "target": ...}`` without measured numbers, so the
    device gates report ``not_run``; ``predicted`` (e.g. ``spec.predicted_latency``), kept under
    its own key and labelled so, may be added for information.
    """
    if target.on_unreachable == "fail":
        raise error
    log.warning("device of target %s unreachable, its gates are not run: %s", target.name,
                error.one_line())
    result = {"status": "unreachable", "error": error.one_line(), "target": target.name}
    if predicted is not None:
        result["predicted"] = dict(predicted, label="predicted")
    return result
