"""The Jinja2 environment the build reports are rendered with.

Templates live in ``build/templates/`` (package data): ``*.html.j2`` are autoescaped, every value
taken from a manifest shows as text, never as markup; ``*.md.j2`` are not. ``None`` renders as an
em dash (an undefined value, e.g. a missing manifest key, as nothing). Filters: ``num(spec)`` formats a number (an em dash for None), ``dumps`` is sorted JSON,
``b64`` base64 of bytes, ``cell`` a Markdown table cell (pipes escaped, one line), ``status_class``
the CSS class of a stage status.
"""
from __future__ import annotations

import base64
import json
from functools import lru_cache

DASH = "—"


def num(value, spec: str = ".3f") -> str:
    """A formatted number; an em dash for None, other values as text."""
    if value is None or _undefined(value):
        return DASH
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return format(value, spec)


def dumps(value) -> str:
    """Sorted, compact-spaced JSON of any value."""
    return json.dumps(value, sort_keys=True, default=str)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def cell(value) -> str:
    """Text safe inside a Markdown table cell."""
    text = DASH if value is None or _undefined(value) else str(value)
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def status_class(status) -> str:
    return {"passed": "pass", "failed": "fail"}.get(status, "skipped")


def _undefined(value) -> bool:
    from jinja2 import Undefined
    return isinstance(value, Undefined)


def _finalize(value):
    return DASH if value is None else value


@lru_cache(maxsize=None)
def environment():
    """The shared environment: templates from ``edgebuild.build/templates``, HTML autoescaped."""
    from jinja2 import Environment, PackageLoader, select_autoescape
    env = Environment(loader=PackageLoader("edgebuild.build", "templates"),
                      autoescape=select_autoescape(enabled_extensions=("html.j2",), default_for_string=True),
                      finalize=_finalize, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(num=num, dumps=dumps, b64=b64, cell=cell, status_class=status_class)
    return env


def has_template(name: str) -> bool:
    return name in environment().list_templates()


def render(name: str, **context) -> str:
    """Render the template ``name`` with ``context``."""
    return environment().get_template(name).render(**context)
