"""Knob spaces: the settings an accuracy-aware search tries for a compression method.

A method declares ``knob_space`` (knob -> values, from most compressed to least) and ``knob_order``
(which knob is moved first). A build config may replace either for a stage. ``knob_walk`` turns
them into the sequence of settings tried after the configured one: each knob in turn moves value
by value towards quality, keeping what earlier knobs reached, so every setting is at least as
large as the one before it and the first that passes is the smallest that passes in the space.
A composite knob ``"a,b"`` moves knobs that only make sense together (SeedLM's block size and
latent dimension).
"""
from __future__ import annotations

from edgebuild.core.errors import ConfigError


def knob_walk(start: dict, space: dict, order) -> list[dict]:
    """The settings tried after ``start``, in order (``start`` itself not included)."""
    current, out = dict(start), []
    for knob in order:
        names = knob.split(",")
        values = [v if isinstance(v, (list, tuple)) else [v] for v in space[knob]]
        now = [current.get(n) for n in names]
        later = values[values.index(now) + 1:] if now in values else values
        for value in later:
            current = {**current, **dict(zip(names, value))}
            out.append(dict(current))
    return out


def check_space(method, space: dict, order, where: str) -> None:
    """``ConfigError`` (naming ``where``) for an empty space or order, a knob the method does not
    have, a knob in ``order`` without values, or a value the method refuses."""
    if not space or not order:
        raise ConfigError(f"{where}: the knob space of {method.name!r} is empty; list at least one knob "
                          "with at least one value (or leave the method's own space)")
    known = {f for f in method.config_class.__dataclass_fields__}
    for knob, values in space.items():
        unknown = [n for n in knob.split(",") if n not in known]
        if unknown:
            raise ConfigError(f"{where}: {method.name!r} has no knob {unknown[0]!r} (knobs: {', '.join(sorted(known))})")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: knob {knob!r} needs a non-empty list of values, got {values!r}")
    missing = [k for k in order if k not in space]
    if missing:
        raise ConfigError(f"{where}: the order names {missing[0]!r}, which has no values in the space")
    for knobs in knob_walk({}, space, order):
        try:
            method.from_knobs(knobs)
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            raise ConfigError(f"{where}: {method.name!r} refuses the setting {knobs}: {e}") from None
