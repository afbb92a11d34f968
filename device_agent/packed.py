"""The packed weights format: one file holding every tensor of a stage.

Layout (little endian)::

    magic   8 bytes  b"EBPACK\\x00\\x01"
    version u32      FORMAT_VERSION
    hlen    u64      length of the JSON header
    header  hlen     UTF-8 JSON: {"meta": {...}, "records": [{name, shape, codec, params,
                     arrays: {key: {dtype, shape, offset, nbytes}}}]}
    payload          each array at a 64-byte aligned offset (relative to payload start)
    sha256  32 bytes digest of everything before it

The reader checks magic, version, header, bounds, duplicates and the digest, and raises
``PackedFormatError`` with a message that says what is wrong.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field

import numpy as np

MAGIC = b"EBPACK\x00\x01"
FORMAT_VERSION = 1
ALIGN = 64
_PREFIX = struct.Struct("<8sIQ")
_DIGEST = 32


class PackedFormatError(ValueError):
    """The file is not a valid packed-weights file of a version this reader knows."""


@dataclass
class Record:
    name: str
    shape: tuple
    codec: str
    params: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays.values())


def _pad(n: int) -> int:
    return (-n) % ALIGN


def _layout(records):
    entries, blobs, offset = [], [], 0
    names = set()
    for rec in records:
        if rec.name in names:
            raise PackedFormatError(f"duplicate tensor name {rec.name!r}")
        names.add(rec.name)
        arrays = {}
        for key, arr in rec.arrays.items():
            arr = np.require(arr, requirements="C")
            offset += _pad(offset)
            arrays[key] = {"dtype": arr.dtype.str, "shape": list(arr.shape), "offset": offset,
                           "nbytes": int(arr.nbytes)}
            blobs.append((offset, arr))
            offset += arr.nbytes
        entries.append({"name": rec.name, "shape": list(rec.shape), "codec": rec.codec,
                        "params": rec.params, "arrays": arrays})
    return entries, blobs


def write(path, records, meta=None) -> str:
    """Write records to ``path`` atomically; return the file's sha256 (hex)."""
    entries, blobs = _layout(records)
    header = json.dumps({"meta": meta or {}, "records": entries}, sort_keys=True).encode()
    tmp = f"{path}.tmp{os.getpid()}"
    h = hashlib.sha256()
    with open(tmp, "wb") as f:
        def put(b):
            h.update(b)
            f.write(b)
        put(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)))
        put(header)
        pos = 0
        for offset, arr in blobs:
            put(b"\0" * (offset - pos))
            put(arr.tobytes())
            pos = offset + arr.nbytes
        f.write(h.digest())
    os.replace(tmp, path)
    return _file_sha256(path)


def _file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read(path):
    """Read and check a packed file; return ``(meta, records)``."""
    with open(path, "rb") as f:
        data = f.read()
    where = os.fspath(path)
    if len(data) < _PREFIX.size + _DIGEST:
        raise PackedFormatError(f"{where}: file is truncated ({len(data)} bytes)")
    magic, version, hlen = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise PackedFormatError(f"{where}: not an edgebuild packed-weights file (bad magic)")
    if version != FORMAT_VERSION:
        raise PackedFormatError(f"{where}: format version {version} is not supported "
                                f"(this reader knows {FORMAT_VERSION}); upgrade edgebuild-agent")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise PackedFormatError(f"{where}: checksum mismatch: the file is truncated or corrupt")
    start = _PREFIX.size + hlen
    if start > len(body):
        raise PackedFormatError(f"{where}: header runs past the end of the file")
    try:
        header = json.loads(body[_PREFIX.size:start])
    except ValueError as e:
        raise PackedFormatError(f"{where}: header is not valid JSON ({e})") from None
    payload = memoryview(body)[start:]
    return header.get("meta", {}), _records(header, payload, where)


def _records(header, payload, where):
    records, seen = [], set()
    for ent in header.get("records", []):
        name = ent["name"]
        if name in seen:
            raise PackedFormatError(f"{where}: duplicate tensor {name!r}")
        seen.add(name)
        arrays = {}
        for key, a in ent["arrays"].items():
            end = a["offset"] + a["nbytes"]
            if a["offset"] < 0 or end > len(payload):
                raise PackedFormatError(f"{where}: array {name}:{key} lies outside the payload")
            arr = np.frombuffer(payload[a["offset"]:end], dtype=np.dtype(a["dtype"]))
            if arr.size != int(np.prod(a["shape"])):
                raise PackedFormatError(f"{where}: array {name}:{key} has a size that does not match its shape")
            arrays[key] = arr.reshape(a["shape"])
        records.append(Record(name, tuple(ent["shape"]), ent["codec"], ent.get("params", {}), arrays))
    return records
