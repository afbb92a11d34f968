"""The agent protocol: versioned JSON lines over the agent's stdin and stdout.

One JSON object per line, each way::

    request  {"id": 1, "cmd": "hello", "args": {"protocol": "1.1", "target": "rpi4"}}
    reply    {"id": 1, "ok": true, "result": {...}}
    error    {"id": 1, "ok": false, "error": {"type": "StageError", "message": "..."}}

Commands (``args`` -> ``result``):

    hello     {protocol, target?}          -> {protocol, agent_version, commands, target,
                                               recorded_target, root, active, loaded, pid}
    info      {}                            -> {arch, machine, cores, ram_total_mb, ram_available_mb,
                                               disk_free_mb, cpu_temp_c, throttled, python,
                                               onnxruntime, stages: {name: [versions]}, ...}
    stage     {name, version, files: [{path, sha256, as}], budget_bytes?}
                                            -> {path, files: {as: {sha256, bytes}}, existing,
                                               storage: {pruned, stored_bytes, budget_bytes, over_budget}}
    load      {name?, version?, threads?, packed? = "weights.ebpk"}
                                            -> {loaded, load_s, threads, weights_sha256, format}
                                               (no name: the active stage; a runtime directory
                                               loads in onnxruntime-genai, format "runtime")
    time      {prompt_len?, decode_tokens?, warmup?, repeats?}
                                            -> raw samples {prefill_ms: [..],
                                               decode_ms_per_token: [..], peak_rss_mb, ...}
    measure   {name?, version?, threads?, prompt_len?, decode_tokens?, warmup?, repeats?, timeout_s?}
                                            -> time's samples measured in a fresh process, plus
                                               {load_s, rss_before_load_mb, rss_loaded_mb,
                                               peak_rss_mb, stage_rss_mb, stored_bytes,
                                               weights_sha256, pid, stage}
    generate  {input_ids, max_new_tokens?}  -> {tokens, generate_s}   (greedy, loaded model)
    ops       {ops?: [names]}               -> {onnxruntime, onnxruntime_genai,
                                               kernels: [{domain, op, types}]}   (CPU kernels)
    prune     {budget_bytes?}               -> {pruned, stored_bytes, budget_bytes, over_budget}
    score     {requests: [{context: [ids], continuation: [ids]}], max_batch_tokens?}
                                            -> {results: [[logprob, is_greedy], ...], tokens, score_s}
    activate  {name, version}               -> {active, previous, changed}
    rollback  {}                            -> {active, rolled_back}
    shutdown  {}                            -> {stopping: true}, then the agent exits

``score`` takes token ids computed on the host (the device needs no tokenizer) and returns, per
request, the sum of the continuation's log-probabilities given the context and whether every
continuation token is the model's greedy choice.

Error types: ``ProtocolError``, ``BadRequest``, ``UnknownCommand``, ``VersionMismatch``,
``StageError``, ``NotLoaded``, ``NothingToRollback``, ``RuntimeMissing``, or the class name of an
unexpected exception inside a command. A line that cannot be parsed gets an error reply whose
``id`` is the request's id when it could be read, else ``null``.

The protocol version is ``"MAJOR.MINOR"``. The minor number grows when commands or optional
arguments are added (1.1: ``score`` batches requests that share a context and takes
``max_batch_tokens``; ``hello`` lists ``commands``; ``load`` without a name loads the active
stage; 1.2: runtime directories, ``measure``, ``generate``, ``ops``, ``prune``, ``stage``'s
``budget_bytes``, ``load``'s ``weights_sha256``); the major number changes only when an existing command changes meaning. Each side refuses
a peer of another major version; a host checks ``hello``'s ``commands`` before using a newer one.

This module is shared by the agent and the host's client, and uses the standard library only.
"""
from __future__ import annotations

import json

PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 2
PROTOCOL_VERSION = f"{PROTOCOL_MAJOR}.{PROTOCOL_MINOR}"
AGENT_VERSION = "0.1.0"   # keep equal to the version in device_agent/pyproject.toml


class AgentError(Exception):
    """An error reported to the host as ``{"type": <class name>, "message": str(err)}``."""

    @property
    def type(self) -> str:
        return type(self).__name__


class ProtocolError(AgentError):
    """A line is not a well-formed request or reply."""

    def __init__(self, message: str, req_id=None):
        super().__init__(message)
        self.req_id = req_id


class BadRequest(AgentError):
    """A command's arguments are missing or of the wrong type."""


class UnknownCommand(AgentError):
    """The command name is not one this agent knows."""


class VersionMismatch(AgentError):
    """Host and agent speak different protocol major versions."""


class StageError(AgentError):
    """Staging refused: checksum mismatch, unsafe name, missing upload or conflicting version."""


class NotLoaded(AgentError):
    """``time`` or ``score`` before a successful ``load``."""


class NothingToRollback(AgentError):
    """``rollback`` with no earlier active stage recorded."""


class RuntimeMissing(AgentError):
    """numpy or onnxruntime is not installed on the device."""


def _builtin(obj):
    if hasattr(obj, "tolist"):          # numpy scalars and arrays from the runtime
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _encode(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=_builtin).encode("utf-8") + b"\n"


def encode_line(obj: dict) -> bytes:
    """One JSON line (numpy values as plain numbers), as the agent writes them."""
    return _encode(obj)


def request(req_id: int, cmd: str, args: dict | None = None) -> bytes:
    """One encoded request line."""
    return _encode({"id": req_id, "cmd": cmd, "args": args or {}})


def reply_ok(req_id, result: dict) -> bytes:
    """One encoded success reply line."""
    return _encode({"id": req_id, "ok": True, "result": result})


def reply_error(req_id, err_type: str, message: str) -> bytes:
    """One encoded error reply line; the message is folded onto one line."""
    message = " ".join(str(message).split())
    return _encode({"id": req_id, "ok": False, "error": {"type": err_type, "message": message}})


def _load_object(line) -> dict:
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ProtocolError(f"line is not UTF-8 ({err.reason} at byte {err.start})") from None
    try:
        obj = json.loads(line)
    except ValueError as err:
        raise ProtocolError(f"line is not JSON ({err})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"line must be a JSON object, got {type(obj).__name__}")
    return obj


def parse_request(line) -> tuple:
    """Decode a request line into ``(id, cmd, args)``; raise ``ProtocolError`` when malformed."""
    obj = _load_object(line)
    req_id = obj.get("id")
    if not isinstance(req_id, int) or isinstance(req_id, bool):
        raise ProtocolError(f"request 'id' must be an integer, got {req_id!r}")
    cmd, args = obj.get("cmd"), obj.get("args", {})
    if not isinstance(cmd, str):
        raise ProtocolError(f"request 'cmd' must be a string, got {cmd!r}", req_id)
    if not isinstance(args, dict):
        raise ProtocolError(f"request 'args' must be an object, got {type(args).__name__}", req_id)
    unknown = sorted(set(obj) - {"id", "cmd", "args"})
    if unknown:
        raise ProtocolError(f"request has unknown keys {unknown} (allowed: id, cmd, args)", req_id)
    return req_id, cmd, args


def parse_reply(line) -> dict:
    """Decode a reply line; raise ``ProtocolError`` unless it has ``id``, ``ok`` and a result or error."""
    obj = _load_object(line)
    if "id" not in obj or not isinstance(obj.get("ok"), bool):
        raise ProtocolError(f"reply lacks 'id' or a boolean 'ok': {_clip(obj)}")
    if obj["ok"] and not isinstance(obj.get("result"), dict):
        raise ProtocolError(f"success reply lacks a 'result' object: {_clip(obj)}")
    err = obj.get("error")
    if not obj["ok"] and not (isinstance(err, dict) and "type" in err and "message" in err):
        raise ProtocolError(f"error reply lacks 'error.type' or 'error.message': {_clip(obj)}")
    return obj


def parse_version(version) -> tuple:
    """``(major, minor)`` of a protocol version given as ``1``, ``"1"`` or ``"1.2"``."""
    parts = str(version).split(".")
    try:
        if len(parts) > 2 or isinstance(version, bool):
            raise ValueError
        return int(parts[0]), int(parts[1]) if len(parts) == 2 else 0
    except ValueError:
        raise VersionMismatch(f"protocol version {version!r} is not MAJOR or MAJOR.MINOR") from None


def major(version) -> int:
    """The major number of a protocol version given as ``1``, ``"1"`` or ``"1.2"``."""
    return parse_version(version)[0]


def check_version(theirs, side: str = "host") -> None:
    """Raise ``VersionMismatch`` unless ``theirs`` has this module's major version."""
    if major(theirs) != PROTOCOL_MAJOR:
        raise VersionMismatch(
            f"{side} speaks agent protocol {theirs}, this side speaks {PROTOCOL_VERSION}; "
            f"install matching versions of edgebuild and edgebuild-agent")


def _clip(obj, limit: int = 200) -> str:
    text = json.dumps(obj)
    return text if len(text) <= limit else text[:limit] + "..."
