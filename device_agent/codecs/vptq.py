"""``vptq``: vector post-training quantisation (numpy decoder and the index bit packing).

A weight of shape ``(rows, cols)`` (rows = output channels) is normalised per column,
``x[:, c] = (w[:, c] - bias[c]) / scale[c]``, and every column of ``x`` is cut into
``rows / vector_len`` vectors of ``vector_len`` consecutive rows. Each vector is stored as the
index of a codebook row (a centroid), optionally plus the index of a row of a residual codebook::

    x[j*v:(j+1)*v, c] = codebook[indices[c, j]] + residual_codebook[residual_indices[c, j]]
    w[:, c]           = x[:, c] * scale[c] + bias[c]

Columns listed in ``outlier_columns`` are either stored as they are, in float16
(``outlier_values``, ``(rows, outliers)``; such columns have no indices), or take their
first-stage centroid from the outlier codebook. Codebooks are auxiliary ``table`` records
(shared by several tensors) holding one float16 array ``centroids`` of shape
``(entries, vector_len)``; the decoder casts them to float32 and does the arithmetic above in
float32, in this order.

Arrays: ``indices`` and, with a residual codebook, ``residual_indices`` (uint8 bit streams of
the ``(coded cols, rows / vector_len)`` indices in row-major order, packed by
:func:`pack_indices`; coded columns are all but the float16 ones, in order), ``scales`` and
``biases`` (float16, ``(cols,)``), and, with outliers, ``outlier_columns`` (int32, sorted) and
possibly ``outlier_values``. Params: ``vector_len``, ``index_bits``, ``codebook``,
``residual_bits`` (0: none), ``residual_codebook``, ``outlier_codebook`` (table names, ``None``
when unused).
"""
from __future__ import annotations

import numpy as np

MAX_INDEX_BITS = 24
_CHUNK = 1 << 16   # indices handled per step, bounding temporary memory to a few MiB


class VPTQFormatError(ValueError):
    """A ``vptq`` record whose params, arrays or tables do not fit its shape."""


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes holding ``count`` indices of ``bits`` bits each: ``ceil(count * bits / 8)``."""
    return (count * bits + 7) // 8


def pack_indices(indices: np.ndarray, bits: int) -> np.ndarray:
    """Pack non-negative integers (each ``< 2**bits``, ``bits <= 24``) into a little-endian bit
    stream of uint8: index ``i`` occupies stream bits ``[i * bits, (i + 1) * bits)``, least
    significant bit first. The result has exactly ``packed_nbytes(indices.size, bits)`` bytes."""
    flat = np.ascontiguousarray(indices).reshape(-1).astype("<u4")
    bit_rows = [_index_bits(flat[i:i + _CHUNK], bits) for i in range(0, flat.size, _CHUNK)]
    stream = np.concatenate(bit_rows) if bit_rows else np.zeros(0, dtype=np.uint8)
    return np.packbits(stream, bitorder="little")


def _index_bits(chunk, bits):
    """The ``bits`` low bits of each index as a flat 0/1 uint8 array, least significant first."""
    as_bytes = chunk.view(np.uint8).reshape(-1, 4)
    return np.unpackbits(as_bytes, axis=1, bitorder="little")[:, :bits].reshape(-1)


def unpack_indices(stream: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_indices`: the first ``count`` indices of ``stream`` as int64."""
    stream = np.asarray(stream, dtype=np.uint8).reshape(-1)
    if stream.size != packed_nbytes(count, bits):
        raise VPTQFormatError(f"packed indices hold {stream.size} bytes, expected "
                              f"{packed_nbytes(count, bits)} for {count} indices of {bits} bits")
    weights = np.left_shift(np.int64(1), np.arange(bits, dtype=np.int64))
    out = np.empty(count, dtype=np.int64)
    for start in range(0, count, _CHUNK):
        stop = min(start + _CHUNK, count)
        lo, hi = start * bits, stop * bits
        raw = stream[lo // 8:(hi + 7) // 8]
        flat = np.unpackbits(raw, bitorder="little")[lo % 8:lo % 8 + hi - lo]
        out[start:stop] = flat.reshape(-1, bits).astype(np.int64) @ weights
    return out


def _table(tables, name, vector_len, bits, what):
    """The float32 centroids of table ``name``, checked against the record."""
    if name not in tables or "centroids" not in tables[name]:
        raise VPTQFormatError(f"vptq {what} table {name!r} is missing from the packed weights")
    book = np.asarray(tables[name]["centroids"])
    if book.ndim != 2 or book.shape[1] != vector_len or book.shape[0] > 1 << bits:
        raise VPTQFormatError(f"vptq {what} table {name!r} has shape {book.shape}, expected "
                              f"(at most {1 << bits}, {vector_len})")
    return book.astype(np.float32)


def _check(params, arrays, shape):
    if len(shape) != 2:
        raise VPTQFormatError(f"vptq decodes 2-D tensors only, got shape {tuple(shape)}")
    rows, cols = shape
    v, bits = int(params["vector_len"]), int(params["index_bits"])
    if v < 1 or rows % v or not 1 <= bits <= MAX_INDEX_BITS:
        raise VPTQFormatError(f"vptq params vector_len={v}, index_bits={bits} do not fit "
                              f"shape {tuple(shape)}")
    for key in ("scales", "biases"):
        if key not in arrays or tuple(arrays[key].shape) != (cols,):
            got = tuple(arrays[key].shape) if key in arrays else "missing"
            raise VPTQFormatError(f"vptq array {key!r} is {got}, expected {(cols,)}")
    return rows, cols, v, bits


def _lookup(book, indices, what):
    if indices.size and int(indices.max()) >= book.shape[0]:
        raise VPTQFormatError(f"vptq {what} index {int(indices.max())} is out of its table "
                              f"({book.shape[0]} entries)")
    return book[indices]


def _outliers(arrays, cols):
    """``(outlier columns, fp16 values or None)`` of a record, checked against ``cols``."""
    columns = np.asarray(arrays.get("outlier_columns", []), dtype=np.int64).reshape(-1)
    if columns.size and (columns.min() < 0 or columns.max() >= cols
                         or np.unique(columns).size != columns.size):
        raise VPTQFormatError(f"vptq outlier columns are not distinct columns of {cols}")
    values = arrays.get("outlier_values")
    if values is not None and tuple(values.shape[1:]) != (columns.size,):
        raise VPTQFormatError(f"vptq outlier values have shape {tuple(values.shape)}, expected "
                              f"(rows, {columns.size})")
    return columns, values


def decode(params, arrays, shape, tables=None):
    """Decode a ``vptq`` record to float32 weights of ``shape`` using the codebook ``tables``."""
    rows, cols, v, bits = _check(params, arrays, shape)
    tables = tables or {}
    columns, values = _outliers(arrays, cols)
    coded = np.ones(cols, dtype=bool)
    if values is not None:
        coded[columns] = False
    count = int(coded.sum()) * (rows // v)
    indices = unpack_indices(arrays["indices"], bits, count).reshape(-1, rows // v)
    x = _lookup(_table(tables, params["codebook"], v, bits, "codebook"), indices, "codebook")
    if params.get("outlier_codebook"):
        book = _table(tables, params["outlier_codebook"], v, bits, "outlier codebook")
        at = np.searchsorted(np.flatnonzero(coded), columns)
        x[at] = _lookup(book, indices[at], "outlier codebook")
    res_bits = int(params.get("residual_bits") or 0)
    if res_bits:
        res = unpack_indices(arrays["residual_indices"], res_bits, count).reshape(-1, rows // v)
        res_book = _table(tables, params["residual_codebook"], v, res_bits, "residual codebook")
        x = x + _lookup(res_book, res, "residual codebook")
    out = np.empty((cols, rows), dtype=np.float32)
    scales = arrays["scales"].astype(np.float32)[coded, None]
    out[coded] = x.reshape(-1, rows) * scales + arrays["biases"].astype(np.float32)[coded, None]
    if values is not None:
        out[columns] = values.astype(np.float32).T
    return np.ascontiguousarray(out.T)
