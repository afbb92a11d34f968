"""One generic registry for every plug-in point.

Entries are registered lazily as ``"module:attr"`` strings so that heavy
imports (torch, lm-eval, onnxruntime) only happen when an entry is used::

    methods = Registry("compression method", error=ConfigError)
    methods.register_lazy("rtn", "edgebuild.compress.rtn:RTN")
    cls = methods.get("rtn")
"""
from __future__ import annotations

import difflib
import importlib
from typing import Generic, Iterator, TypeVar

from edgebuild.core.errors import EdgebuildError, UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, error: type[EdgebuildError] = UnknownNameError):
        self.kind = kind
        self.error = error
        self._entries: dict[str, T | str] = {}

    def register(self, name: str, obj: T | None = None):
        """Register ``obj`` under ``name``; usable as a decorator when obj is omitted."""
        if obj is None:
            def deco(o: T) -> T:
                self._add(name, o)
                return o
            return deco
        self._add(name, obj)
        return obj

    def register_lazy(self, name: str, ref: str) -> None:
        """Register ``"package.module:attr"``, imported on first ``get``."""
        if ":" not in ref:
            raise ValueError(f"lazy reference must be 'module:attr', got {ref!r}")
        self._add(name, ref)

    def _add(self, name: str, obj) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = obj

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise self.error(self._unknown_message(name))
        entry = self._entries[name]
        if isinstance(entry, str):
            module, attr = entry.split(":", 1)
            entry = getattr(importlib.import_module(module), attr)
            self._entries[name] = entry
        return entry

    def _unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, list(self._entries), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}{hint} (known: {', '.join(sorted(self._entries))})"

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
