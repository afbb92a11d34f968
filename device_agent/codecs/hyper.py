"""``hyper``: Hyper-Compression (Fan et al., "Hyper-Compression: Model Compression via
Hyperfunction", arXiv 2409.00592), numpy decoder and the code packing it shares with the encoder.

A group of ``m`` consecutive weights is a point of R^m. It is stored as one integer ``theta``, the
step of a winding on the unit torus whose point ``frac(theta * a)`` lies nearest to the group once
the group is mapped into the unit cube, plus the id of the *scaling class* that did the mapping.

Layout. A tensor of shape ``S`` is viewed as 2-D ``(rows, cols)``: ``(1, n)`` for 0-D and 1-D
tensors, ``(S[0], prod(S[1:]))`` otherwise. Each row is padded at its end to a multiple of ``m``
by repeating its last value; the padded row is cut into groups of ``m`` consecutive values, in
row-major order. Consecutive rows form *scaling blocks* of ``block_rows`` rows (the last block
may be shorter); a block holds a center ``c`` (m values) and ``classes + 1`` radii
``R_0 <= R_1 <= ...``.
A group's code is ``(cls << theta_bits) | theta`` and it decodes, in float64, to::

    u = frac(theta * a)                 # frac(x) = x - floor(x), for each of the m entries of a
    w = c + R_cls * (2 * u - 1)         # then cast to float32

so class ``cls`` covers the cube of half side ``R_cls`` around the center. Every operation is a
single IEEE-754 float64 multiply, floor, subtract or add, evaluated in this order, so the result is
the same bit for bit on every platform.

Arrays: ``codes`` (uint8, the codes bit-packed by :func:`pack_codes` with ``theta_bits +
class_bits(classes)`` bits each), ``direction`` (float64 ``(m,)``: the vector ``a``), ``centers``
(float32 ``(blocks, m)``) and ``radii`` (float32 ``(blocks, classes + 1)``). Params:
``group_size``, ``theta_bits``, ``classes``, ``block_rows`` and, for arrays decoded outside a
record, ``shape``.
"""
from __future__ import annotations

import numpy as np

CHUNK = 1 << 20    # groups decoded (and codes packed) per step, to bound temporary memory


class HyperFormatError(ValueError):
    """A ``hyper`` record whose params or arrays do not fit its shape."""


def class_bits(classes: int) -> int:
    """Bits of the class id for ``classes`` outer classes (class 0, the inner cube, included)."""
    return int(classes).bit_length()


def as_2d(shape) -> tuple[int, int]:
    """The ``(rows, cols)`` view of a tensor of ``shape`` (see the module docstring)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        return 1, int(np.prod(shape)) if shape else 1
    return shape[0], int(np.prod(shape[1:]))


def layout(shape, group_size: int, block_rows: int) -> dict:
    """Sizes derived from a shape: rows, cols, groups per row, groups, blocks."""
    rows, cols = as_2d(shape)
    per_row = -(-cols // group_size)
    return {"rows": rows, "cols": cols, "per_row": per_row, "groups": rows * per_row,
            "blocks": -(-rows // block_rows) if rows else 0}


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes holding ``count`` codes of ``bits`` bits each: ``ceil(count * bits / 8)``."""
    return (count * bits + 7) // 8


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes (each ``< 2**bits``, ``bits <= 32``) into a little-endian bit stream.

    Code ``i`` occupies stream bits ``[i * bits, (i + 1) * bits)``, least significant bit first
    (the convention of the ``rtn`` codec); the result has ``packed_nbytes(codes.size, bits)`` bytes.
    """
    flat = np.ascontiguousarray(codes, dtype="<u4").reshape(-1)
    parts = []
    for start in range(0, flat.size, CHUNK):      # CHUNK is a multiple of 8: whole bytes per part
        chunk = flat[start:start + CHUNK].view(np.uint8).reshape(-1, 4)
        bitmat = np.unpackbits(chunk, axis=1, bitorder="little")[:, :bits]
        parts.append(np.packbits(bitmat.reshape(-1), bitorder="little"))
    out = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)
    return out[:packed_nbytes(flat.size, bits)]


def unpack_codes(stream: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: the ``count`` codes of ``stream`` as uint32."""
    stream = np.asarray(stream, dtype=np.uint8).reshape(-1)
    if stream.size != packed_nbytes(count, bits):
        raise HyperFormatError(f"packed codes hold {stream.size} bytes, expected "
                               f"{packed_nbytes(count, bits)} for {count} codes of {bits} bits")
    out = np.empty(count, dtype="<u4")
    step = CHUNK * bits // 8                       # bytes of CHUNK codes
    for i, start in enumerate(range(0, count, CHUNK)):
        n = min(CHUNK, count - start)
        part = stream[i * step:i * step + packed_nbytes(n, bits)]
        bitvec = np.unpackbits(part, bitorder="little")
        bitmat = np.zeros((n, 32), dtype=np.uint8)
        bitmat[:, :bits] = bitvec[:n * bits].reshape(n, bits)
        out[start:start + n] = np.packbits(bitmat, axis=1, bitorder="little").view("<u4")[:, 0]
    return out


def winding_points(theta: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """The hyperfunction: ``frac(theta * a)`` in float64, shape ``(len(theta), m)``."""
    theta = np.asarray(theta, dtype=np.float64)
    x = theta[:, None] * np.asarray(direction, dtype=np.float64)[None, :]
    return x - np.floor(x)


def _check(params, arrays, shape):
    m, tbits, classes = int(params["group_size"]), int(params["theta_bits"]), int(params["classes"])
    block_rows = int(params["block_rows"])
    if m < 1 or tbits < 1 or classes < 0 or block_rows < 1 or tbits + class_bits(classes) > 32:
        raise HyperFormatError(f"hyper params group_size={m}, theta_bits={tbits}, "
                               f"classes={classes}, block_rows={block_rows} are out of range")
    lay = layout(shape, m, block_rows)
    blocks = lay["blocks"]
    expected = {"direction": (m,), "centers": (blocks, m), "radii": (blocks, classes + 1)}
    for key, want in expected.items():
        got = tuple(arrays[key].shape) if key in arrays else "missing"
        if got != want:
            raise HyperFormatError(f"hyper array {key!r} is {got}, expected {want}")
    return m, tbits, classes, lay


def decode(params, arrays, shape=None, tables=None):
    """Decode a ``hyper`` record (or a :func:`decode_array` payload) to float32 of ``shape``."""
    shape = tuple(params["shape"]) if shape is None else tuple(shape)
    m, tbits, classes, lay = _check(params, arrays, shape)
    codes = unpack_codes(arrays["codes"], tbits + class_bits(classes), lay["groups"])
    direction = arrays["direction"].astype(np.float64)
    centers, radii = arrays["centers"].astype(np.float64), arrays["radii"].astype(np.float64)
    groups_per_block = int(params["block_rows"]) * lay["per_row"]
    out = np.empty((lay["groups"], m), dtype=np.float32)
    for start in range(0, lay["groups"], CHUNK):
        code = codes[start:start + CHUNK]
        block = np.arange(start, start + code.size) // groups_per_block
        cls = (code >> np.uint32(tbits)).astype(np.int64)
        if cls.size and cls.max() > classes:
            raise HyperFormatError(f"hyper code names class {int(cls.max())}; "
                                   f"the record has {classes}")
        u = winding_points(code & np.uint32((1 << tbits) - 1), direction)
        out[start:start + code.size] = centers[block] + radii[block, cls][:, None] * (2.0 * u - 1.0)
    padded = out.reshape(lay["rows"], lay["per_row"] * m)
    return padded[:, :lay["cols"]].reshape(shape)


decode_array = decode
