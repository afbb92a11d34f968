"""Schemas of the TOML files users write: pydantic dataclasses, one-line errors, reference docs.

A file's schema is a set of ``@schema`` classes (pydantic dataclasses that refuse unknown keys).
Each key is one line: its type (the strict types below: TOML's ``"4"`` is no integer, ``true``
no number), its default and its description::

    @schema
    class Timing:
        warmup: NonNegativeInt = Field(2, description="untimed rounds before the timed ones")

``load(cls, data, where, error)`` validates a parsed file and turns pydantic's
``ValidationError`` into ``error`` (a domain exception) with one line naming the file, the key,
the value and what is allowed, all taken from the same schema that ``reference()`` renders as
the key reference in ``docs/``. Checks beyond one value (a name in a registry, keys that depend
on each other) raise ``KeyProblem`` from a validator.
"""
from __future__ import annotations

import difflib
import functools
import json
from dataclasses import MISSING
from typing import Annotated, Callable

from pydantic import ConfigDict, Field, Strict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as _pydantic_dataclass

from edgebuild.core.errors import EdgebuildError

CONFIG = ConfigDict(extra="forbid")

Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]           # an integer is taken as a float
Str = Annotated[str, Strict()]
Bool = Annotated[bool, Strict()]
PositiveInt = Annotated[int, Strict(), Field(gt=0)]
NonNegativeInt = Annotated[int, Strict(), Field(ge=0)]
PositiveFloat = Annotated[float, Strict(), Field(gt=0)]
NonNegativeFloat = Annotated[float, Strict(), Field(ge=0)]
Fraction = Annotated[float, Strict(), Field(gt=0, le=1)]      # a retention threshold
Probability = Annotated[float, Strict(), Field(ge=0, le=1)]
Port = Annotated[int, Strict(), Field(ge=1, le=65535)]


def schema(cls):
    """Make ``cls`` a schema class: a pydantic dataclass that refuses unknown keys."""
    return _pydantic_dataclass(config=CONFIG)(cls)


class KeyProblem(ValueError):
    """A value a validator refuses: ``key`` (a tuple, relative to the validated class), what
    it ``must`` be, the ``value`` given and a close allowed name, if any."""

    def __init__(self, key: tuple, must: str, value, suggestion: str | None = None):
        super().__init__(f"{'.'.join(map(str, key))} must {must}, got {value!r}")
        self.key, self.must, self.value, self.suggestion = tuple(key), must, value, suggestion


def unknown_name(key: tuple, kind: str, value, known) -> KeyProblem:
    """``KeyProblem`` for a name that is not in ``known``, with a did-you-mean suggestion."""
    known = sorted(known)
    close = difflib.get_close_matches(str(value), known, n=1) if isinstance(value, str) else []
    article = "an" if kind[0] in "aeiou" else "a"
    return KeyProblem(key, f"name {article} {kind} ({', '.join(known)})", value,
                      close[0] if close else None)


NOT_LISTED = {"listed": False}   # json_schema_extra of a field that is no key of its parent's table


def names_from(noun: str, names: Callable[[], list[str]], many: bool = False):
    """``json_schema_extra`` of a field holding a name (``many``: a list of names) that must be
    one of ``names()`` (read when the schema is rendered): what the docs and errors say it allows."""
    def extra(node: dict) -> None:
        text = f"{noun} name{'s' if many else ''}: {', '.join(sorted(names()))}"
        node["allowed"] = f"a list of {text}" if many else f"a {text}"
    return extra


# ----------------------------------------------------------------------------- loading


def load(cls, data: dict, where: str, error: type[EdgebuildError],
         key_of: Callable[[tuple], str] | None = None):
    """``cls`` built from ``data`` (a parsed file); ``error`` with one line on bad input."""
    try:
        return TypeAdapter(cls).validate_python(data)
    except ValidationError as exc:
        raise error(one_line(exc, cls, where, key_of or dotted)) from None


def dotted(loc: tuple) -> str:
    """A file key from a location: ``("budgets", "prefill_ms")`` -> ``budgets.prefill_ms``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f"{'.' if text else ''}{part}"
    return text


def one_line(exc: ValidationError, cls, where: str, key_of: Callable[[tuple], str]) -> str:
    """The first problem of ``exc`` as one line naming the file, key, value and what is allowed."""
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "unexpected_keyword_argument")
    first = errors[0]                 # an unknown key first: it is often a misspelt required one
    message = _describe(first, json_schema(cls), key_of)
    more = f" ({len(errors) - 1} more problem{'s' if len(errors) > 2 else ''} in this file)" \
        if len(errors) > 1 else ""
    return f"{where}: {message}{more}"


def _describe(error: dict, root: dict, key_of) -> str:
    loc, kind, value = tuple(error["loc"]), error["type"], error.get("input")
    problem = (error.get("ctx") or {}).get("error")
    if isinstance(problem, KeyProblem):
        suggestion = f"; did you mean {problem.suggestion!r}?" if problem.suggestion else ""
        return f"key {key_of(loc + problem.key)!r} must {problem.must}, got {problem.value!r}{suggestion}"
    parent = _node(root, loc[:-1])
    if kind == "unexpected_keyword_argument":
        keys = _keys(parent or {})
        close = difflib.get_close_matches(str(loc[-1]), keys, n=1)
        hint = f"; did you mean {key_of(loc[:-1] + (close[0],))!r}?" if close else ""
        return f"unknown key {key_of(loc)!r}{hint} (allowed in {_section(loc[:-1], key_of)}: " \
               f"{', '.join(keys)})"
    if kind in ("missing", "missing_argument"):
        return f"missing key {key_of(loc)!r} in {_section(loc[:-1], key_of)}"
    node = _node(root, loc)
    if node is None:
        return f"key {key_of(loc)!r}: {error['msg']}, got {value!r}"
    return f"key {key_of(loc)!r} must be {allowed(node, root, key_of(loc))}, got {value!r}"


def _section(loc: tuple, key_of) -> str:
    name = key_of(loc)
    return f"[{name}]" if name else "the top level"


def _keys(node: dict) -> list[str]:
    """The keys a table node allows (fields marked ``NOT_LISTED`` left out)."""
    return [k for k, v in node.get("properties", {}).items() if v.get("listed", True)]


# ----------------------------------------------------------------------------- schema walking


@functools.lru_cache(maxsize=None)
def _cached_schema(cls) -> str:
    return json.dumps(TypeAdapter(cls).json_schema())


def json_schema(cls) -> dict:
    """The JSON schema of a schema class (with its ``$defs``)."""
    return json.loads(_cached_schema(cls))


def _deref(node: dict, root: dict) -> dict:
    while "$ref" in node:
        node = {**root["$defs"][node["$ref"].split("/")[-1]],
                **{k: v for k, v in node.items() if k != "$ref"}}
    options = [n for n in node.get("anyOf", []) if n.get("type") != "null"]
    if len(options) == 1:
        node = {**_deref(options[0], root), **{k: v for k, v in node.items() if k != "anyOf"}}
    return node


def _node(root: dict, loc: tuple) -> dict | None:
    """The schema node of the value at ``loc`` (None when the location leaves the schema)."""
    node = _deref(root, root)
    for part in loc:
        if isinstance(part, int) and "items" in node:
            node = node["items"]
        elif part in node.get("properties", {}):
            node = node["properties"][part]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        else:
            return None
        node = _deref(node, root)
    return node


def allowed(node: dict, root: dict, key: str = "", plural: bool = False) -> str:
    """What a schema node allows, in words: ``a number in (0, 1]``, ``one of 'fail', 'warn'``."""
    node = _deref(node, root)
    if "allowed" in node:
        return node["allowed"]
    if "enum" in node:
        return "one of " + ", ".join(repr(v) for v in node["enum"])
    kind = node.get("type")
    if kind in ("integer", "number"):
        noun = {"integer": ("an integer", "integers"), "number": ("a number", "numbers")}[kind]
        return f"{noun[plural]}{_range(node)}"
    if kind == "array":
        return f"{'lists' if plural else 'a list'} of {allowed(node.get('items', {}), root, plural=True)}"
    if kind == "object":
        return _table(node, root, key, plural)
    if "anyOf" in node:
        return " or ".join(allowed(n, root, plural=plural) for n in node["anyOf"]
                           if n.get("type") != "null")
    return {"string": ("a string", "strings"), "boolean": ("true or false", "booleans")}.get(
        kind, ("a value", "values"))[plural]


def _table(node: dict, root: dict, key: str, plural: bool) -> str:
    if "properties" in node:
        return f"a table ([{key}])" if key else "a table"
    values = node.get("additionalProperties")
    if isinstance(values, dict) and values:
        return f"{'tables' if plural else 'a table'} of {allowed(values, root, plural=True)}"
    return "tables" if plural else "a table"


def _range(node: dict) -> str:
    low = ("(", node["exclusiveMinimum"]) if "exclusiveMinimum" in node else \
        ("[", node["minimum"]) if "minimum" in node else None
    high = (")", node["exclusiveMaximum"]) if "exclusiveMaximum" in node else \
        ("]", node["maximum"]) if "maximum" in node else None
    if low and high:
        return f" in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low:
        return f" {'>' if low[0] == '(' else '>='} {low[1]}"
    if high:
        return f" {'<' if high[0] == ')' else '<='} {high[1]}"
    return ""


# ----------------------------------------------------------------------------- reference docs


def fields(cls) -> dict:
    """``{name: pydantic FieldInfo}`` of a schema class, in declaration order."""
    return dict(cls.__pydantic_fields__)


def default_text(info) -> str:
    """A field's default as TOML would spell it (``required`` when it has none)."""
    if info.default_factory is not None:
        value = info.default_factory()
    elif info.default is MISSING or info.is_required():
        return "required"
    else:
        value = info.default
    if value is None:
        return "not set"
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def reference_table(cls, heading: str, key_prefix: str = "") -> str:
    """A Markdown section documenting every key of ``cls``: allowed values, default, meaning
    (a key holding a table of its own is documented in that table's section)."""
    root = json_schema(cls)
    node = _deref(root, root)
    properties = node.get("properties", {})
    lines = [f"### {heading}", "", "| key | allowed | default | meaning |", "|---|---|---|---|"]
    for name, info in fields(cls).items():
        if name not in _keys(node) or "properties" in _deref(properties[name], root):
            continue                  # not a key here, or a table documented in its own section
        what = allowed(properties[name], root, f"{key_prefix}{name}").replace("|", "\\|")
        meaning = (info.description or "").replace("|", "\\|")
        lines.append(f"| `{key_prefix}{name}` | {what} | `{default_text(info)}` | {meaning} |")
    return "\n".join(lines) + "\n"
