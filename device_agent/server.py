"""The device agent: answers JSON-lines requests (see ``protocol``) read from a byte stream.

State on the device lives under one root folder::

    <root>/incoming/                 uploads, placed by the host's transport
    <root>/stages/<name>/<version>/  installed stages (files + stage.json manifest), immutable
    <root>/active                    JSON: the active stage and the ones active before it
    <root>/current                   symlink to the active stage's folder (for applications)
    <root>/target.json               the target key the host last introduced itself with

Stages are built in a temporary folder beside their final place and renamed into it, so a
failed ``stage`` leaves nothing behind. A stage is either a runtime directory (``runtime.json``:
a low-bit graph run by onnxruntime-genai) or an exported float graph with packed weights
(``weights.ebpk``, run by onnxruntime). The runtimes (numpy, onnxruntime, onnxruntime-genai) are
imported only by the commands that run a model (``load``, ``measure`` in its own process,
``ops``); every other command needs the standard library only. ``storage`` decides what is kept.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from edgebuild.device_agent import protocol, storage, sysinfo
from edgebuild.device_agent.protocol import (
    AgentError, BadRequest, NothingToRollback, NotLoaded, ProtocolError, RuntimeMissing,
    StageError, UnknownCommand,
)

log = logging.getLogger(__name__)

INCOMING = "incoming"
STAGES = "stages"
ACTIVE = "active"
CURRENT = "current"
TARGET = "target.json"
MANIFEST = "stage.json"
PACKED_FILE = "weights.ebpk"     # default packed-weights file name inside a stage
HISTORY_LIMIT = 16               # earlier active stages remembered for rollback
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TIME_ARGS = {"prompt_len": 1, "decode_tokens": 1, "warmup": 0, "repeats": 1}   # name: minimum
_OPS_DOMAINS = ("com.microsoft", "")
MIN_BATCH_TOKENS = 16
_MISSING = object()


def safe_name(value, what: str) -> str:
    """Return ``value`` if it is a single safe path component, else raise ``StageError``."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise StageError(f"{what} {value!r} is not a safe name: use 1-128 letters, digits, '.', "
                         f"'_', '+' or '-', not starting with '.' and without '/'")
    return value


def _arg(args: dict, key: str, kind, default=_MISSING):
    value = args.get(key)
    if value is None:
        if default is _MISSING:
            raise BadRequest(f"missing argument {key!r}")
        return default
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise BadRequest(f"argument {key!r} must be {names}, got {type(value).__name__} {value!r}")
    return value


def sha256_file(path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def replace_symlink(link: Path, target: Path) -> None:
    """Make ``link`` point at ``target`` atomically: a new link beside it, renamed over it."""
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    try:
        if os.path.lexists(tmp):
            tmp.unlink()
        os.symlink(target, tmp)
        os.replace(tmp, link)
    except OSError as err:       # e.g. a file system without symlinks: the JSON record still holds
        log.warning("cannot update the %s symlink: %s", link.name, err)


def _read_json(path: Path, default):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return default
    except ValueError as err:
        raise StageError(f"{path} is not valid JSON ({err}); remove or repair it") from None


# ----------------------------------------------------------------------------------- staging

def _incoming_path(root: Path, path: str) -> Path:
    incoming = os.path.realpath(root / INCOMING)
    real = os.path.realpath(path if os.path.isabs(path) else os.path.join(incoming, path))
    if os.path.dirname(real) != incoming:
        raise StageError(f"upload path {path!r} is outside {incoming}; upload files there first")
    if not os.path.isfile(real):
        raise StageError(f"upload {path!r} not found in {incoming}; upload it first")
    return Path(real)


def _stage_file(root: Path, entry, index: int) -> tuple:
    if not isinstance(entry, dict):
        raise BadRequest(f"files[{index}] must be an object with 'path', 'sha256' and 'as'")
    as_name = safe_name(_arg(entry, "as", str), f"files[{index}].as")
    if as_name == MANIFEST:
        raise StageError(f"files[{index}].as may not be {MANIFEST!r}: the agent writes that file")
    sha = _arg(entry, "sha256", str).lower()
    if not _SHA256.match(sha):
        raise BadRequest(f"files[{index}].sha256 must be 64 hex digits, got {sha!r}")
    return _incoming_path(root, _arg(entry, "path", str)), as_name, sha


def _place(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (no copy, the upload stays intact); copy where links fail."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _fill(tmp: Path, sources: list) -> dict:
    files = {}
    for src, as_name, sha in sources:
        _place(src, tmp / as_name)
        actual = sha256_file(tmp / as_name)
        if actual != sha:
            raise StageError(f"sha256 of {as_name} (upload {src.name}) is {actual}, expected {sha}; "
                             f"upload it again")
        files[as_name] = {"sha256": sha, "bytes": (tmp / as_name).stat().st_size}
    return files


def _existing_stage(final: Path, sources: list) -> dict:
    manifest = _read_json(final / MANIFEST, {})
    wanted = {as_name: sha for _, as_name, sha in sources}
    have = {k: v.get("sha256") for k, v in manifest.get("files", {}).items()}
    if have != wanted:
        raise StageError(f"stage {final.parent.name}/{final.name} already exists with different "
                         f"files; a staged version is immutable, stage under a new version")
    for src, _, _ in sources:
        src.unlink()
    return {"path": str(final), "files": manifest["files"], "existing": True}


def install_stage(root: Path, name: str, version: str, files) -> dict:
    """Verify the uploads' sha256 and install them atomically as ``stages/<name>/<version>/``."""
    name, version = safe_name(name, "stage name"), safe_name(version, "stage version")
    if not isinstance(files, list) or not files:
        raise BadRequest("argument 'files' must be a non-empty list of {path, sha256, as}")
    sources = [_stage_file(root, entry, i) for i, entry in enumerate(files)]
    names = [as_name for _, as_name, _ in sources]
    if len(set(names)) != len(names):
        raise StageError(f"file names in one stage must be unique, got {names}")
    final = root / STAGES / name / version
    if final.exists():
        return _existing_stage(final, sources)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=final.parent))
    try:
        manifest = {"name": name, "version": version, "files": _fill(tmp, sources),
                    "staged_at": time.time()}
        write_json_atomic(tmp / MANIFEST, manifest)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_if_empty(final.parent)
        raise
    for src, _, _ in sources:
        src.unlink()
    log.info("staged %s/%s (%d files)", name, version, len(sources))
    return {"path": str(final), "files": manifest["files"], "existing": False}


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def list_stages(root: Path) -> dict:
    """``{name: [versions]}`` of the installed stages."""
    stages = {}
    for manifest in sorted((root / STAGES).glob(f"*/*/{MANIFEST}")):
        version_dir = manifest.parent
        if not version_dir.name.startswith("."):
            stages.setdefault(version_dir.parent.name, []).append(version_dir.name)
    return stages


# ------------------------------------------------------------------------------------- agent

def _runtime_module(name: str = "runtime"):
    import importlib

    try:
        return importlib.import_module(f"edgebuild.device_agent.{name}")
    except ImportError as err:
        raise RuntimeMissing(f"cannot import the runtime ({err}); install edgebuild-agent[runtime] "
                             f"(numpy, onnxruntime, onnxruntime-genai) on the device") from None


def _load_runtime(stage_dir: Path, packed: str, threads):
    """The runtime of a stage folder: its runtime directory, or its graph with the packed weights
    file ``packed``."""
    if (stage_dir / "runtime.json").is_file():
        try:
            return _runtime_module("isolated").load_stage(stage_dir, threads)
        except _runtime_module().RuntimeLoadError as err:
            raise StageError(str(err)) from None
    path = stage_dir / safe_name(packed, "packed file")
    if not path.is_file():
        raise StageError(f"stage {stage_dir.parent.name}/{stage_dir.name} has no {path.name}")
    return _runtime_module().Runtime.load(stage_dir, path, threads=threads)


def _timing_args(args: dict) -> dict:
    kwargs = {key: _arg(args, key, int) for key in _TIME_ARGS if key in args}
    for key, value in kwargs.items():
        if value < _TIME_ARGS[key]:
            raise BadRequest(f"argument {key!r} must be >= {_TIME_ARGS[key]}, got {value}")
    return kwargs


def _token_ids(value, what: str) -> list:
    if not isinstance(value, list) or not value:
        raise BadRequest(f"{what} must be a non-empty list of token ids")
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        raise BadRequest(f"{what} must hold non-negative integer token ids")
    return value


def _score_request(req, index: int, vocab: int) -> tuple:
    if not isinstance(req, dict):
        raise BadRequest(f"requests[{index}] must be an object with 'context' and 'continuation'")
    pair = (_token_ids(req.get("context"), f"requests[{index}].context"),
            _token_ids(req.get("continuation"), f"requests[{index}].continuation"))
    if any(t >= vocab for ids in pair for t in ids):
        raise BadRequest(f"requests[{index}] holds token ids >= the vocabulary size {vocab}; "
                         f"tokenize with the model's own tokenizer")
    return pair


class Agent:
    """Command handlers over one root folder; ``serve`` runs the request loop."""

    def __init__(self, root):
        self.root = Path(root)
        for sub in (INCOMING, STAGES):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.runtime = None
        self.loaded = None
        self.stopping = False
        self.commands = {
            "hello": self.hello, "info": self.info, "stage": self.stage, "load": self.load,
            "time": self.time, "score": self.score, "activate": self.activate,
            "rollback": self.rollback, "shutdown": self.shutdown, "measure": self.measure,
            "generate": self.generate, "ops": self.ops, "prune": self.prune,
        }

    def serve(self, stdin, stdout) -> None:
        """Answer one reply line per request line until end of input or ``shutdown``."""
        log.info("agent %s serving %s (protocol %s)", protocol.AGENT_VERSION, self.root,
                 protocol.PROTOCOL_VERSION)
        for line in iter(stdin.readline, b""):
            if not line.strip():
                continue
            stdout.write(self.handle(line))
            stdout.flush()
            if self.stopping:
                break
        log.info("agent stopped")

    def handle(self, line) -> bytes:
        """Decode one request line, run its command, return the encoded reply line."""
        req_id, cmd = None, None
        try:
            req_id, cmd, args = protocol.parse_request(line)
            log.debug("request %s %s", req_id, cmd)
            handler = self.commands.get(cmd)
            if handler is None:
                raise UnknownCommand(f"unknown command {cmd!r} (known: {', '.join(self.commands)})")
            return protocol.reply_ok(req_id, handler(args))
        except ProtocolError as err:
            return protocol.reply_error(err.req_id, err.type, str(err))
        except AgentError as err:
            log.warning("%s refused: %s", cmd, err)
            return protocol.reply_error(req_id, err.type, str(err))
        except Exception as err:   # a failure inside a command must not stop the agent
            log.exception("%s failed", cmd)
            return protocol.reply_error(req_id, type(err).__name__, str(err) or repr(err))

    # --- commands -----------------------------------------------------------------------

    def hello(self, args: dict) -> dict:
        """Check the protocol version and record the target key the host names."""
        protocol.check_version(_arg(args, "protocol", (int, str)))
        target = _arg(args, "target", str, None)
        recorded = _read_json(self.root / TARGET, {}).get("target")
        if target is not None and target != recorded:
            write_json_atomic(self.root / TARGET, {"target": target, "recorded_at": time.time()})
        return {"protocol": protocol.PROTOCOL_VERSION, "agent_version": protocol.AGENT_VERSION,
                "commands": list(self.commands), "target": target, "recorded_target": recorded, "root": str(self.root),
                "active": self._active_state().get("active"), "loaded": self.loaded,
                "pid": os.getpid()}

    def info(self, args: dict) -> dict:
        """Hardware, memory, disk, thermal and software facts, plus the installed stages."""
        facts = sysinfo.collect(self.root)
        facts.update(root=str(self.root), stages=list_stages(self.root), loaded=self.loaded)
        return facts

    def stage(self, args: dict) -> dict:
        """Install uploaded files as ``stages/<name>/<version>/`` after checking their sha256;
        with ``budget_bytes``, prune to it (``storage``) and refuse a version that does not fit."""
        budget = _arg(args, "budget_bytes", int, None)
        result = install_stage(self.root, _arg(args, "name", str), _arg(args, "version", str),
                               _arg(args, "files", list))
        new = Path(result["path"])
        needed = storage.required_bytes(self.root, new)
        if budget is not None and needed > budget and not result["existing"]:
            shutil.rmtree(new, ignore_errors=True)
            raise StageError(f"stage {new.parent.name}/{new.name} does not fit the storage budget of "
                             f"{budget} bytes: with the active and rollback versions it needs {needed}; "
                             f"raise runtime.storage_budget_mb")
        return dict(result, storage=storage.prune(self.root, budget))

    def load(self, args: dict) -> dict:
        """Load a stage (default: the active one) and keep it loaded: a runtime directory, or a
        graph with packed weights (``packed``, default ``weights.ebpk``)."""
        named = "name" in args or "version" in args
        stage_dir = self._stage_dir(args if named else self._active_entry())
        packed = _arg(args, "packed", str, PACKED_FILE)
        threads = _arg(args, "threads", int, None)
        self.runtime, self.loaded = None, None   # free the previous model first
        start = time.perf_counter()
        self.runtime = _load_runtime(stage_dir, packed, threads)
        self.loaded = {"name": stage_dir.parent.name, "version": stage_dir.name}
        return {"loaded": self.loaded, "load_s": round(time.perf_counter() - start, 3),
                "threads": self.runtime.threads,
                "weights_sha256": getattr(self.runtime, "weights_sha256", None),
                "format": "runtime" if (stage_dir / "runtime.json").is_file() else "packed"}

    def measure(self, args: dict) -> dict:
        """Load and time a stage (default: the active one) in a fresh process of its own: memory
        of that stage alone, load time, raw prefill/decode samples, bytes stored, weights sha256."""
        named = "name" in args or "version" in args
        stage_dir = self._stage_dir(args if named else self._active_entry())
        timing = _timing_args({k: v for k, v in args.items() if k in _TIME_ARGS})
        unknown = sorted(set(args) - set(_TIME_ARGS) - {"name", "version", "threads", "timeout_s"})
        if unknown:
            raise BadRequest(f"unknown measure argument(s) {unknown}")
        isolated = _runtime_module("isolated")
        try:
            result = isolated.measure_isolated(stage_dir, _arg(args, "threads", int, None),
                                               float(_arg(args, "timeout_s", (int, float), 1800)), **timing)
        except _runtime_module().RuntimeLoadError as err:
            raise StageError(str(err)) from None
        return dict(result, stage={"name": stage_dir.parent.name, "version": stage_dir.name})

    def generate(self, args: dict) -> dict:
        """Greedy continuation of ``input_ids`` by the loaded model (``max_new_tokens``, default 32)."""
        runtime = self._runtime()
        ids = _token_ids(args.get("input_ids"), "input_ids")
        count = _arg(args, "max_new_tokens", int, 32)
        if count < 1:
            raise BadRequest(f"argument 'max_new_tokens' must be >= 1, got {count}")
        start = time.perf_counter()
        tokens = runtime.generate(ids, count)
        return {"tokens": tokens, "generate_s": round(time.perf_counter() - start, 4)}

    def ops(self, args: dict) -> dict:
        """This device's onnxruntime (and onnxruntime-genai) version and registered CPU kernels
        (``ops``: only these operator names)."""
        names = _arg(args, "ops", list, None)
        operators = _runtime_module("operators")
        kernels = [k for k in operators.registered_kernels(_OPS_DOMAINS)
                   if names is None or k["op"] in names]
        return {"onnxruntime": sysinfo.package_version("onnxruntime", "onnxruntime-gpu"),
                "onnxruntime_genai": sysinfo.package_version("onnxruntime-genai"), "kernels": kernels}

    def prune(self, args: dict) -> dict:
        """Keep two versions per stage (plus the active and rollback ones), within ``budget_bytes``."""
        return storage.prune(self.root, _arg(args, "budget_bytes", int, None))

    def time(self, args: dict) -> dict:
        """Time prefill and decode on the loaded model; raw samples come back."""
        runtime = self._runtime()
        unknown = sorted(set(args) - set(_TIME_ARGS))
        if unknown:
            raise BadRequest(f"unknown time argument(s) {unknown} (known: {sorted(_TIME_ARGS)})")
        result = dict(runtime.time(**_timing_args(args)))
        result["stage"] = self.loaded
        return result

    def score(self, args: dict) -> dict:
        """Log-likelihood of each continuation given its context: ``[[logprob, is_greedy], ...]``.

        Token ids come from the host; requests sharing a context share its prefill.
        """
        runtime = self._runtime()
        requests = _arg(args, "requests", list)
        budget = _arg(args, "max_batch_tokens", int, None)
        if budget is not None and budget < MIN_BATCH_TOKENS:
            raise BadRequest(f"argument 'max_batch_tokens' must be >= {MIN_BATCH_TOKENS}, got {budget}")
        vocab = runtime.graph["vocab_size"]
        pairs = [_score_request(req, i, vocab) for i, req in enumerate(requests)]
        start = time.perf_counter()
        kwargs = {} if budget is None else {"max_batch_tokens": budget}
        results = runtime.score(pairs, **kwargs)
        return {"results": [[float(lp), bool(greedy)] for lp, greedy in results],
                "tokens": sum(len(c) + len(x) for c, x in pairs),
                "score_s": round(time.perf_counter() - start, 4)}

    def activate(self, args: dict) -> dict:
        """Mark a staged version active, remembering the one it replaces."""
        stage_dir = self._stage_dir(args)
        entry = {"name": stage_dir.parent.name, "version": stage_dir.name}
        state = self._active_state()
        current, history = state.get("active"), state.get("history", [])
        if current == entry:
            return {"active": entry, "previous": history[-1] if history else None, "changed": False}
        if current:
            history = (history + [current])[-HISTORY_LIMIT:]
        self._switch(entry, history)
        return {"active": entry, "previous": current, "changed": True}

    def rollback(self, args: dict) -> dict:
        """Make the previously active stage active again."""
        state = self._active_state()
        history = state.get("history", [])
        if not history:
            raise NothingToRollback("no earlier active stage is recorded; activate one by name")
        previous = history[-1]
        self._stage_dir(previous)
        self._switch(previous, history[:-1])
        return {"active": previous, "rolled_back": state.get("active")}

    def shutdown(self, args: dict) -> dict:
        """Unload the model and stop after this reply."""
        self.runtime, self.loaded, self.stopping = None, None, True
        return {"stopping": True}

    # --- helpers ------------------------------------------------------------------------

    def _stage_dir(self, args: dict) -> Path:
        name = safe_name(_arg(args, "name", str), "stage name")
        version = safe_name(_arg(args, "version", str), "stage version")
        stage_dir = self.root / STAGES / name / version
        if not (stage_dir / MANIFEST).is_file():
            raise StageError(f"stage {name}/{version} is not installed on this device; stage it first")
        return stage_dir

    def _active_state(self) -> dict:
        return _read_json(self.root / ACTIVE, {})

    def _active_entry(self) -> dict:
        active = self._active_state().get("active")
        if not active:
            raise BadRequest("no stage is active; name the stage to load, or activate one first")
        return active

    def _switch(self, entry: dict, history: list) -> None:
        """Point ``active`` (the record) and ``current`` (the symlink) at ``entry``, each atomically."""
        write_json_atomic(self.root / ACTIVE, {"active": entry, "history": history,
                                               "activated_at": time.time()})
        replace_symlink(self.root / CURRENT, Path(STAGES) / entry["name"] / entry["version"])

    def _runtime(self):
        if self.runtime is None:
            raise NotLoaded("no model is loaded; send 'load' with a staged name and version first")
        return self.runtime
