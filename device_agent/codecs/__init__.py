"""Numpy-only decoders, one module per codec, looked up lazily by ``Record.codec``.

Each codec module exposes ``decode(params: dict, arrays: dict, shape: tuple, tables: dict) -> np.ndarray``
returning float32 weights of ``shape``. ``tables`` maps the name of every auxiliary record (codec
``"table"``: data shared by several tensors, e.g. a codebook shared across layers) to its arrays; a
record refers to a table by name in its ``params``. Table records are not model tensors and are not
returned by ``decode_all``. This package must not import torch: it runs on the device.
"""
from __future__ import annotations

import importlib

import numpy as np

TABLE = "table"

CODECS = {
    "raw": "edgebuild.device_agent.codecs.raw",
    "rtn": "edgebuild.device_agent.codecs.rtn",
    "seedlm": "edgebuild.device_agent.codecs.seedlm",
    "vptq": "edgebuild.device_agent.codecs.vptq",
    "hyper": "edgebuild.device_agent.codecs.hyper",
}


class UnknownCodecError(ValueError):
    pass


def tables_of(records) -> dict:
    """``{name: arrays}`` of the auxiliary table records."""
    return {r.name: r.arrays for r in records if r.codec == TABLE}


def decode(record, tables=None) -> np.ndarray:
    """Decode one ``Record`` to a float32 array of ``record.shape``."""
    module = CODECS.get(record.codec)
    if module is None:
        raise UnknownCodecError(f"tensor {record.name!r} uses codec {record.codec!r}, unknown to this "
                                f"agent (known: {', '.join(sorted(CODECS))}); upgrade edgebuild-agent")
    out = importlib.import_module(module).decode(record.params, record.arrays, tuple(record.shape),
                                                 tables or {})
    return np.asarray(out, dtype=np.float32).reshape(record.shape)


def decode_all(records) -> dict:
    """Decode every model tensor; returns ``{name: float32 array}`` (tables excluded)."""
    tables = tables_of(records)
    return {r.name: decode(r, tables) for r in records if r.codec != TABLE}
