"""Target specs: one TOML file per device class, loaded into ``Target`` and validated in one place.

A spec names the hardware (for predicted latency and for checking what the agent reports), the
runtime settings, the budgets a stage must meet on the device, and how to reach it::

    target = load_target("rpi5")            # a registered name (targets/specs/rpi5.toml)
    target = load_target("lab/my-board.toml")   # or a path
    target.budgets.decode_ms_per_token_p95, target.timing.prompt_len

Every key is declared once, with its type, range and description, in
``edgebuild.targets.spec_schema`` (rendered as ``docs/targets.md`` by ``reference()``). Errors
raise ``TargetError`` with one line naming the file, the key, the value and what is allowed.

A spec's ``[connection]`` is what the board class usually needs; ``resolve_connection(target)``
(used by the transports) lays over it what ``edgebuild device setup`` recorded for this machine
(``$EDGEBUILD_HOME/devices/<target>.json``: e.g. the device venv's interpreter, a loopback port
and key), then, for a spec that sets ``connection.env_prefix``, environment variables
(``<prefix>PORT``, ``<prefix>USER``, ``<prefix>KEY``, ``<prefix>KNOWN_HOSTS``, ...).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import re
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:     # Python 3.10
    import tomli as tomllib

from edgebuild.core import schema
from edgebuild.core.errors import TargetError
from edgebuild.core.files import write_text_atomic
from edgebuild.core.registry import Registry
from edgebuild.targets.spec_schema import (
    ARCHES, ON_UNREACHABLE, Budgets, Connection, LabgridSpec, RuntimeSpec, Target, Timing,
)

log = logging.getLogger(__name__)

__all__ = ["ARCHES", "BUILTIN", "Budgets", "Connection", "LabgridSpec", "ON_UNREACHABLE", "RuntimeSpec", "SPECS_DIR",
           "Target", "Timing", "load_target", "parse_target", "reference", "resolve_connection",
           "targets"]

SPECS_DIR = Path(__file__).parent / "specs"
BUILTIN = ("local", "local-ssh", "rpi4", "rpi5", "jetson-orin-nano", "generic-aarch64")
NOT_KEYS = ("source",)       # Target fields no spec file may set
LABGRID_PREFIX = "labgrid:"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
# Connection keys a setup record or the environment may set, with their types.
OVERRIDABLE = {"host": str, "user": str, "port": int, "key": str, "known_hosts": str,
               "trust_on_first_use": bool, "agent_python": str, "root": str}
_NOUNS = {int: "an integer", str: "a string", bool: "true or false"}

targets: Registry = Registry("target", error=TargetError)
for _name in BUILTIN:
    targets.register(_name, SPECS_DIR / f"{_name}.toml")


def valid_name(name: str) -> bool:
    """Whether ``name`` can name a target (lowercase letters, digits, '.', '_', '-')."""
    return bool(_NAME.match(name))


def user_specs_dir() -> Path:
    """``$EDGEBUILD_HOME/targets``: the user's own specs, found by name like the built-in ones."""
    from edgebuild.core.paths import edgebuild_home
    return edgebuild_home() / "targets"


def target_names() -> list[str]:
    """Every target name ``load_target`` accepts: the built-in specs, then the user's."""
    folder = user_specs_dir()
    users = sorted(p.stem for p in folder.glob("*.toml")) if folder.is_dir() else []
    return targets.names() + [n for n in users if n not in targets]


def _spec_path(name_or_path) -> Path:
    text = os.fspath(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith(".toml") or os.sep in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise TargetError(f"target spec file {path} not found; pass a registered target name "
                              f"({', '.join(target_names())}) or a path to a .toml file")
        return path
    if text in targets:
        return targets.get(text)
    path = user_specs_dir() / f"{text}.toml"
    if _NAME.match(text) and path.is_file():
        return path
    known = target_names()
    close = difflib.get_close_matches(text, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise TargetError(f"unknown target {text!r}{hint} (known: {', '.join(known)}; or a path to a "
                      f".toml file, or labgrid:PLACE)")


def parse_target(text: str, source: Path | None = None) -> Target:
    """Parse and validate a target spec from TOML text."""
    where = str(source or "target spec")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise TargetError(f"{where}: not valid TOML ({err})") from None
    for key in NOT_KEYS:
        if key in data:
            keys = [k for k in schema.fields(Target) if k not in NOT_KEYS]
            raise TargetError(f"{where}: unknown key {key!r} (allowed in the top level: {', '.join(keys)})")
    target = schema.load(Target, data, where, TargetError)
    target.source = source
    return target


def load_target(name_or_path) -> Target:
    """Load a target spec by name (built-in, then ``user_specs_dir()``), from a ``.toml`` path,
    or from a labgrid place (``labgrid:PLACE``, ``labgrid:TAG=VALUE``; see ``targets.labgrid``)."""
    if isinstance(name_or_path, str) and name_or_path.startswith(LABGRID_PREFIX):
        from edgebuild.targets.labgrid import target_for
        return target_for(name_or_path[len(LABGRID_PREFIX):])
    path = _spec_path(name_or_path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise TargetError(f"cannot read target spec {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise TargetError(f"{path}: not valid TOML (not UTF-8 text: {err.reason} at byte {err.start})") from None
    target = parse_target(text, path)
    if path.stem == name_or_path and target.name != name_or_path:
        raise TargetError(f"{path}: key 'name' is {target.name!r} but the spec is registered as "
                          f"{name_or_path!r}; make them equal")
    return target


def reference() -> str:
    """``docs/targets.md``: every key of a target spec, from the schema."""
    head = ("# Target spec reference\n\n"
            "Generated from `edgebuild/targets/spec_schema.py` by `edgebuild targets docs`; do not "
            "edit by hand.\nCheck a file with `edgebuild targets check FILE`; the built-in specs are "
            "in `targets/specs/`.\nUnknown keys are errors.\n\n")
    tables = [(Target, "top level"), (RuntimeSpec, "`[runtime]`"), (Timing, "`[timing]`"),
              (Budgets, "`[budgets]` (required)"), (Connection, "`[connection]`"),
              (LabgridSpec, "`[labgrid]`")]
    return head + "\n".join(schema.reference_table(cls, heading) for cls, heading in tables)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)               # a TOML basic string is a JSON string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def dump_target(target: Target, header: str = "") -> str:
    """``target`` as spec-file TOML (``parse_target`` reads it back equal); ``header`` becomes
    leading comment lines. Keys whose value is None are left out (their defaults)."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    tables = []
    for f in dataclasses.fields(target):
        value = getattr(target, f.name)
        if f.name == "source" or value is None:
            continue
        if dataclasses.is_dataclass(value):
            tables.append((f.name, value))
        else:
            lines.append(f"{f.name} = {_toml_value(value)}")
    for name, table in tables:
        lines += ["", f"[{name}]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in dataclasses.asdict(table).items()
                  if v is not None]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ emulated boards

LATENCY_BUDGETS = ("decode_ms_per_token_p95", "prefill_ms")
NOT_MEASURABLE = "not measurable under emulation"


def latency_gate_applies(target: Target) -> bool:
    """Whether the device's latency samples may gate a stage: never on an emulated CPU, whose
    timings say how fast the emulator runs, not the board."""
    return not target.emulated


def gate_applies(target: Target, budget: str) -> bool:
    """Whether budget ``budget`` (a ``[budgets]`` key) can be judged on ``target``'s device."""
    return budget not in LATENCY_BUDGETS or latency_gate_applies(target)


def measurement_label(target: Target) -> str:
    """How the device's numbers were obtained: ``"emulated"`` or ``"measured"``."""
    return "emulated" if target.emulated else "measured"


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
            raise TargetError(f"{where}: key {key!r} must be {_NOUNS[kind]}, got {value!r}")
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
    data = {**dataclasses.asdict(target.connection), **overrides}
    return schema.load(Connection, data, str(target.source or "target spec"), TargetError,
                       lambda loc: schema.dotted(("connection", *loc)))


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
