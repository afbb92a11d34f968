"""``rtn``: round-to-nearest groupwise integer codes (numpy decoder and the shared bit packing).

A weight of shape ``(rows, cols)`` is cut into groups of ``group_size`` consecutive columns (the last
group of a row may be shorter). Each group has an fp16 ``scale``; asymmetric groups also have an fp16
``zero`` (the value of code 0)::

    asymmetric: w = code * scale + zero                 codes in 0 .. 2**bits - 1
    symmetric:  w = (code - 2**(bits - 1)) * scale      codes in 1 .. 2**bits - 1

Arrays: ``codes`` (uint8, the row-major codes bit-packed by :func:`pack_bits`), ``scales`` and, when
asymmetric, ``zeros`` (float16, ``(rows, groups)``). Params: ``bits``, ``group_size``, ``symmetric``.
"""
from __future__ import annotations

import numpy as np


class RTNFormatError(ValueError):
    """An ``rtn`` record whose params or arrays do not fit its shape."""


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes holding ``count`` codes of ``bits`` bits each: ``ceil(count * bits / 8)``."""
    return (count * bits + 7) // 8


_CHUNK = 1 << 20   # codes handled per step, bounding temporary memory to a few MiB


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes (each ``< 2**bits``) into a little-endian bit stream of uint8.

    Code ``i`` occupies stream bits ``[i * bits, (i + 1) * bits)``, least significant bit first;
    the result has exactly ``packed_nbytes(codes.size, bits)`` bytes.
    """
    flat = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    parts = [_pack_chunk(flat[i:i + _CHUNK], bits) for i in range(0, flat.size, _CHUNK)]
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)
    return stream[:packed_nbytes(flat.size, bits)]


def _pack_chunk(codes, bits):
    """Eight codes of ``bits`` bits make exactly ``bits`` bytes (the chunk size is a multiple of 8)."""
    words = np.zeros(-(-codes.size // 8) * 8, dtype=np.uint64)
    words[:codes.size] = codes
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
    packed = np.bitwise_or.reduce(words.reshape(-1, 8) << shifts, axis=1).astype("<u8")
    return packed.view(np.uint8).reshape(-1, 8)[:, :bits].reshape(-1)


def unpack_bits(stream: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``count`` codes of ``stream`` as uint8."""
    stream = np.asarray(stream, dtype=np.uint8).reshape(-1)
    if stream.size != packed_nbytes(count, bits):
        raise RTNFormatError(f"packed codes hold {stream.size} bytes, expected "
                             f"{packed_nbytes(count, bits)} for {count} codes of {bits} bits")
    step = _CHUNK // 8 * bits
    parts = [_unpack_chunk(stream[i:i + step], bits) for i in range(0, stream.size, step)]
    codes = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)
    return codes[:count]


def _unpack_chunk(stream, bits):
    blocks = -(-stream.size // bits)
    flat = np.zeros(blocks * bits, dtype=np.uint8)
    flat[:stream.size] = stream
    chunks = np.zeros((blocks, 8), dtype=np.uint8)
    chunks[:, :bits] = flat.reshape(blocks, bits)
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
    codes = (chunks.view("<u8") >> shifts) & np.uint64((1 << bits) - 1)
    return codes.reshape(-1).astype(np.uint8)


def _check(params, arrays, shape):
    if len(shape) != 2:
        raise RTNFormatError(f"rtn decodes 2-D tensors only, got shape {tuple(shape)}")
    bits, group = int(params["bits"]), int(params["group_size"])
    if not 1 <= bits <= 8 or group < 1:
        raise RTNFormatError(f"rtn params bits={bits}, group_size={group} are out of range")
    rows, cols = shape
    groups = -(-cols // group)
    keys = ("scales",) if params.get("symmetric") else ("scales", "zeros")
    for key in keys:
        if key not in arrays or tuple(arrays[key].shape) != (rows, groups):
            got = tuple(arrays[key].shape) if key in arrays else "missing"
            raise RTNFormatError(f"rtn array {key!r} is {got}, expected {(rows, groups)}")
    return bits, group, groups


def decode(params, arrays, shape, tables=None):
    """Decode an ``rtn`` record to float32 weights of ``shape``."""
    bits, group, groups = _check(params, arrays, shape)
    rows, cols = shape
    codes = unpack_bits(arrays["codes"], bits, rows * cols).reshape(rows, cols)
    padded = np.zeros((rows, groups * group), dtype=np.float32)
    padded[:, :cols] = codes
    padded = padded.reshape(rows, groups, group)
    scales = arrays["scales"].astype(np.float32)[:, :, None]
    if params.get("symmetric"):
        out = (padded - np.float32(1 << (bits - 1))) * scales
    else:
        out = padded * scales + arrays["zeros"].astype(np.float32)[:, :, None]
    return out.reshape(rows, groups * group)[:, :cols]
