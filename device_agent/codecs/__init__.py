"""Numpy-only decoders, one module per codec, looked up lazily by ``Record.codec``.

Each codec module exposes ``decode(params: dict, arrays: dict, shape: tuple) -> np.ndarray`` returning
float32 weights of ``shape``. This package must not import torch: it runs on the device.
"""
from __future__ import annotations

import importlib

import numpy as np

CODECS = {
    "raw": "edgebuild.device_agent.codecs.raw",
    "rtn": "edgebuild.device_agent.codecs.rtn",
    "seedlm": "edgebuild.device_agent.codecs.seedlm",
    "vptq": "edgebuild.device_agent.codecs.vptq",
    "hyper": "edgebuild.device_agent.codecs.hyper",
}


class UnknownCodecError(ValueError):
    pass


def decode(record) -> np.ndarray:
    """Decode one ``Record`` to a float32 array of ``record.shape``."""
    module = CODECS.get(record.codec)
    if module is None:
        raise UnknownCodecError(f"tensor {record.name!r} uses codec {record.codec!r}, unknown to this "
                                f"agent (known: {', '.join(sorted(CODECS))}); upgrade edgebuild-agent")
    out = importlib.import_module(module).decode(record.params, record.arrays, tuple(record.shape))
    return np.asarray(out, dtype=np.float32).reshape(record.shape)


def decode_all(records) -> dict:
    """Decode every record; returns ``{name: float32 array}``."""
    return {r.name: decode(r) for r in records}
