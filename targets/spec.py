"""Target specs: one TOML file per device class, loaded into ``Target`` and validated in one place.

A spec names the hardware (for predicted latency and for checking what the agent reports), the
runtime settings, the budgets a stage must meet on the device, and how to reach it::

    target = load_target("rpi5")            # a registered name (targets/specs/rpi5.toml)
    target = load_target("lab/my-board.toml")   # or a path
    target.budgets.decode_ms_per_token_p95, target.timing.prompt_len

Errors raise ``TargetError`` with the file, the key and the allowed values.

A spec's ``[connection]`` is what the board class usually needs; ``resolve_connection(target)``
(used by the transports) lays over it what ``edgebuild device setup`` recorded for this machine
(``$EDGEBUILD_HOME/devices/<target>.json``: e.g. the device venv's interpreter, a loopback port
and key), then, for a spec that sets ``connection.env_prefix``, environment variables
(``<prefix>PORT``, ``<prefix>USER``, ``<prefix>KEY``, ``<prefix>KNOWN_HOSTS``, ...).
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:     # Python 3.10
    import tomli as tomllib

from edgebuild.core.errors import TargetError
from edgebuild.core.files import write_text_atomic
from edgebuild.core.registry import Registry
from edgebuild.targets.transport import transports

log = logging.getLogger(__name__)

SPECS_DIR = Path(__file__).parent / "specs"
BUILTIN = ("local", "local-ssh", "rpi4", "rpi5", "jetson-orin-nano", "generic-aarch64")
ARCHES = ("native", "aarch64", "armv7l", "x86_64", "riscv64")   # native: whatever the host is
ON_UNREACHABLE = ("fail", "warn")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_ZERO_ALLOWED = {"connection.retries", "timing.warmup", "runtime.accuracy_level"}
_VERSION = re.compile(r"^\d+\.\d+$")
# Connection keys a setup record or the environment may set, with their types.
OVERRIDABLE = {"host": str, "user": str, "port": int, "key": str, "known_hosts": str,
               "trust_on_first_use": bool, "agent_python": str, "root": str}
_NOUNS = {int: ("an integer", "integers"), float: ("a number", "numbers"),
          str: ("a string", "strings"), bool: ("true or false", "booleans")}

targets: Registry = Registry("target", error=TargetError)
for _name in BUILTIN:
    targets.register(_name, SPECS_DIR / f"{_name}.toml")


@dataclass
class RuntimeSpec:
    """``[runtime]``: how the agent runs the model."""

    threads: int | None = None                 # intra-op threads; omitted: onnxruntime's default
    providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    python_version: str | None = None          # the device's Python ("3.11"), for its wheels
    glibc: str | None = None                   # the device's glibc ("2.36"): newest manylinux tag
    encoding: str = "int4"                     # runtime encoding of the linear layers (export.encodings)
    embedding_encoding: str | None = None      # of the embedding and tied head; None: as encoding
    block_size: int = 32                       # values per scale of the blockwise encodings
    accuracy_level: int = 4                    # MatMulNBits compute: 4 int8 (needs int8 dot products), 1 fp32
    symmetric: bool = True                     # blockwise without zero points
    fallback_encoding: str | None = None       # used where the device's onnxruntime lacks an operator
    storage_budget_mb: float | None = None     # the agent keeps its stages within this (MB, 10^6 bytes)


@dataclass
class Timing:
    """``[timing]``: how the agent times a stage (warm-up rounds, then timed repeats)."""

    prompt_len: int = 64                       # prompt tokens of each prefill
    decode_tokens: int = 32                    # tokens decoded with the KV cache after it
    warmup: int = 2
    repeats: int = 5


@dataclass
class Budgets:
    """``[budgets]``: what a stage must achieve on the device to pass its gates."""

    decode_ms_per_token_p95: float
    prefill_ms: float                          # median prefill of timing.prompt_len tokens
    peak_rss_mb: float
    artifact_mb: float                         # packed weights, in MB (10^6 bytes)


@dataclass
class Connection:
    """``[connection]``: how to reach the device's agent."""

    transport: str = "local"
    host: str | None = None
    user: str | None = None                    # default: the local user name
    port: int = 22
    key: str | None = None                     # private key file; default: ssh-agent, ~/.ssh keys
    known_hosts: str = "~/.ssh/known_hosts"
    trust_on_first_use: bool = False           # accept and record an unknown host key
    agent_python: str | None = None            # default: this interpreter (local), python3 (ssh)
    root: str = "~/.cache/edgebuild/agent"     # the agent's folder on the device
    connect_timeout_s: float = 10.0
    retries: int = 3                           # connection retries, with exponential backoff
    timeout_s: float = 300.0                   # longest wait for one agent reply (load, time)
    env_prefix: str | None = None              # read <prefix>PORT, <prefix>USER, ... from the env


@dataclass
class Target:
    """One device class, as read from a spec file."""

    name: str
    description: str
    arch: str
    cores: int
    ram_mb: int
    storage_mb: int
    memory_bandwidth_gbps: float               # sustained, for predicted decode latency
    budgets: Budgets
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)
    timing: Timing = field(default_factory=Timing)
    connection: Connection = field(default_factory=Connection)
    on_unreachable: str = "fail"               # warn: device gates not_run (never invented numbers)
    source: Path | None = field(default=None, compare=False)   # the spec file; not a TOML key

    def validate(self) -> "Target":
        """Check every key's type, allowed values and range; raise ``TargetError`` naming the
        file, the key and what is allowed. Returns ``self``."""
        where = str(self.source or "target spec")
        for key, value, hint in _leaves(self):
            if not _type_ok(value, hint):
                raise TargetError(f"{where}: key {key!r} must be {_describe(hint)}, got {value!r}")
            if _is_number(value) and (value < 0 or (value == 0 and key not in _ZERO_ALLOWED)):
                raise TargetError(f"{where}: key {key!r} must be positive, got {value!r}")
        choices = [("arch", self.arch, ARCHES), ("on_unreachable", self.on_unreachable, ON_UNREACHABLE),
                   ("connection.transport", self.connection.transport, transports.names())]
        for key, value, allowed in choices:
            if value not in allowed:
                raise TargetError(f"{where}: key {key!r} must be one of "
                                  f"{', '.join(map(repr, allowed))}, got {value!r}")
        if not _NAME.match(self.name):
            raise TargetError(f"{where}: key 'name' must be lowercase letters, digits, '.', '_' or "
                              f"'-', got {self.name!r}")
        if self.connection.port > 65535:
            raise TargetError(f"{where}: key 'connection.port' must be 1-65535, got {self.connection.port}")
        bad = [p for p in self.runtime.providers if not p.endswith("ExecutionProvider")]
        if not self.runtime.providers or bad:
            raise TargetError(f"{where}: key 'runtime.providers' must list onnxruntime providers "
                              f"such as 'CPUExecutionProvider', got {self.runtime.providers!r}")
        for key, value in (("runtime.python_version", self.runtime.python_version),
                           ("runtime.glibc", self.runtime.glibc)):
            if value is not None and not _VERSION.match(value):
                raise TargetError(f"{where}: key {key!r} must be MAJOR.MINOR such as '3.11', "
                                  f"got {value!r}")
        self._validate_runtime(where)
        if self.connection.transport == "ssh" and not self.connection.host:
            raise TargetError(f"{where}: key 'connection.host' is required when "
                              f"connection.transport is 'ssh'")
        return self

    def _validate_runtime(self, where: str) -> None:
        from edgebuild.export.encodings import ACCURACY_LEVELS, BLOCK_SIZES, encodings

        rt = self.runtime
        for key in ("encoding", "embedding_encoding", "fallback_encoding"):
            value = getattr(rt, key)
            if value is not None and value not in encodings:
                raise TargetError(f"{where}: key 'runtime.{key}' must be one of "
                                  f"{', '.join(map(repr, encodings.names()))}, got {value!r}")
        for key, allowed in (("block_size", BLOCK_SIZES), ("accuracy_level", ACCURACY_LEVELS)):
            if getattr(rt, key) not in allowed:
                raise TargetError(f"{where}: key 'runtime.{key}' must be one of "
                                  f"{', '.join(map(str, allowed))}, got {getattr(rt, key)!r}")

    def to_dict(self) -> dict:
        """The spec as plain JSON-serialisable data (``source`` as a string)."""
        data = dataclasses.asdict(self)
        data["source"] = str(self.source) if self.source else None
        return data

    def budgets_dict(self) -> dict:
        """``{budget name: limit}`` as the device gates read them."""
        return dataclasses.asdict(self.budgets)

    def digest(self) -> str:
        """sha256 of everything that can change a device measurement (all but description/source)."""
        data = self.to_dict()
        data.pop("source")
        data.pop("description")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def path_of(self, value: str) -> Path:
        """A host-side path from the spec (a key or known_hosts file): ``~`` expanded, relative
        paths taken from the spec file's folder."""
        path = Path(value).expanduser()
        if not path.is_absolute() and self.source is not None:
            path = self.source.parent / path
        return path


def _leaves(obj, prefix: str = ""):
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name == "source":
            continue
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value, hints[f.name]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_ok(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint in (int, float):
        return _is_number(value) and (hint is float or isinstance(value, int))
    return isinstance(value, hint)


def _describe(hint) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is list:
        return f"a list of {_NOUNS[args[0]][1]}"
    if args:
        return " or ".join(_describe(a) for a in args)
    return _NOUNS.get(hint, (getattr(hint, "__name__", str(hint)),))[0]


def _from_table(cls, table: dict, prefix: str, where: str):
    """Build dataclass ``cls`` from a TOML table, refusing unknown and missing keys."""
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
    section = f"[{prefix[:-1]}]" if prefix else "the top level"
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
            raise TargetError(f"{where}: unknown key {prefix + key!r}{hint} "
                              f"(allowed in {section}: {', '.join(allowed)})")
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name in allowed and f.name not in table:
            raise TargetError(f"{where}: missing key {prefix + f.name!r} in {section}")
    kwargs = {}
    for key, value in table.items():
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise TargetError(f"{where}: key {prefix + key!r} must be a table "
                                  f"([{prefix + key}]), got {value!r}")
            value = _from_table(hints[key], value, f"{prefix}{key}.", where)
        kwargs[key] = value
    return cls(**kwargs)


def _spec_path(name_or_path) -> Path:
    text = os.fspath(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith(".toml") or os.sep in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise TargetError(f"target spec file {path} not found; pass a registered target name "
                              f"({', '.join(targets.names())}) or a path to a .toml file")
        return path
    return targets.get(text)


def parse_target(text: str, source: Path | None = None) -> Target:
    """Parse and validate a target spec from TOML text."""
    where = str(source or "target spec")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise TargetError(f"{where}: not valid TOML ({err})") from None
    target = _from_table(Target, data, "", where)
    target.source = source
    return target.validate()


def load_target(name_or_path) -> Target:
    """Load a target spec by registered name (see ``targets``) or from a ``.toml`` path."""
    path = _spec_path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise TargetError(f"cannot read target spec {path}: {err.strerror}") from None
    target = parse_target(text, path)
    if name_or_path in targets and target.name != name_or_path:
        raise TargetError(f"{path}: key 'name' is {target.name!r} but the spec is registered as "
                          f"{name_or_path!r}; make them equal")
    return target


# ------------------------------------------------------------------ connection overrides

def setup_path(name: str) -> Path:
    """Where ``edgebuild device setup`` records what it set up for target ``name``."""
    from edgebuild.core.paths import edgebuild_home
    return edgebuild_home() / "devices" / f"{name}.json"


def read_setup(name: str) -> dict:
    """The recorded connection settings of target ``name`` (``{}`` when there are none)."""
    path = setup_path(name)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise TargetError(f"{path}: cannot read the device setup record ({err}); rerun "
                          f"`edgebuild device setup --target {name}` or delete the file") from None
    if not isinstance(data, dict):
        raise TargetError(f"{path}: the device setup record must be a JSON object; rerun "
                          f"`edgebuild device setup --target {name}`")
    return _checked_overrides(data, str(path))


def write_setup(name: str, values: dict) -> Path:
    """Merge ``values`` into target ``name``'s setup record (temp file, then rename)."""
    values = _checked_overrides(values, "device setup values")
    path = setup_path(name)
    merged = {**read_setup(name), **values}
    return write_text_atomic(path, json.dumps(merged, indent=1, sort_keys=True) + "\n")


def _checked_overrides(data: dict, where: str) -> dict:
    for key, value in data.items():
        kind = OVERRIDABLE.get(key)
        if kind is None:
            raise TargetError(f"{where}: unknown connection key {key!r} "
                              f"(allowed: {', '.join(OVERRIDABLE)})")
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise TargetError(f"{where}: key {key!r} must be {_describe(kind)}, got {value!r}")
    return dict(data)


def _env_overrides(prefix: str) -> dict:
    out = {}
    for key, kind in OVERRIDABLE.items():
        var = prefix + key.upper()
        text = os.environ.get(var)
        if text is None or text == "":
            continue
        if kind is bool:
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise TargetError(f"environment variable {var} must be true or false, got {text!r}")
            out[key] = text.lower() in ("1", "true", "yes")
        elif kind is int:
            if not text.isdigit():
                raise TargetError(f"environment variable {var} must be an integer, got {text!r}")
            out[key] = int(text)
        else:
            out[key] = text
    return out


def resolve_connection(target: Target) -> Connection:
    """``target.connection`` with the setup record, then the environment, laid over it.

    Paths from the setup record and the environment are taken as given (``~`` expanded by the
    transport); the spec's own relative paths stay relative to the spec file.
    """
    overrides = read_setup(target.name)
    if target.connection.env_prefix:
        overrides.update(_env_overrides(target.connection.env_prefix))
    for key in ("key", "known_hosts"):
        if key in overrides:
            overrides[key] = str(Path(overrides[key]).expanduser().absolute())
    resolved = dataclasses.replace(target.connection, **overrides)
    dataclasses.replace(target, connection=resolved).validate()
    return resolved


# ------------------------------------------------------------------ predicted latency

def bytes_per_token(graph: dict, context_len: int) -> int:
    """Bytes one decode step reads, from an exported ``graph.json``: every weight the graph
    binds (the embedding lookup reads one row), plus the KV cache of ``context_len`` tokens."""
    total = 0
    for spec in graph["weights"].values():
        rows = spec["shape"][0] if len(spec["shape"]) == 2 else 1
        count = 1
        for dim in spec["shape"]:
            count *= dim
        lookup = len(spec["shape"]) == 2 and not spec.get("transpose") and rows == graph["vocab_size"]
        total += 4 * (count // rows if lookup else count)
    kv = 2 * graph["num_layers"] * graph["num_kv_heads"] * graph["head_dim"] * 4 * context_len
    return total + kv


def predicted_latency(target: Target, graph: dict, context_len: int | None = None) -> dict:
    """Decode latency predicted from memory traffic: bytes per token / the target's bandwidth.

    Labelled ``"predicted"``: it is a bound from the spec, never a device measurement, and no
    gate reads it.
    """
    context_len = context_len or target.timing.prompt_len + target.timing.decode_tokens
    moved = bytes_per_token(graph, context_len)
    ms = moved / (target.memory_bandwidth_gbps * 1e9) * 1e3
    return {"label": "predicted", "decode_ms_per_token": round(ms, 3), "bytes_per_token": moved,
            "memory_bandwidth_gbps": target.memory_bandwidth_gbps, "context_len": context_len}
