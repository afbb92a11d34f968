"""The packed weights format: round trip and refusal of damaged or foreign files."""
import hashlib
import json
import struct

import numpy as np
import pytest

from edgebuild.device_agent import packed
from edgebuild.device_agent.packed import PackedFormatError, Record


def _records():
    rng = np.random.default_rng(0)
    return [
        Record("a.weight", (3, 5), "raw", {"dtype": "float16"},
               {"data": rng.standard_normal((3, 5)).astype(np.float16)}),
        Record("b.codes", (4, 8), "rtn", {"bits": 3, "group_size": 8, "symmetric": False},
               {"codes": rng.integers(0, 256, 13, dtype=np.uint8),
                "scales": rng.random((4, 1), dtype=np.float32).astype(np.float16)}),
        Record("c.seeds", (7,), "seedlm", {"nested": {"k": [1, 2]}},
               {"seeds": rng.integers(-128, 128, 7, dtype=np.int8)}),
        Record("d.scalar", (), "raw", {"dtype": "float32"}, {"data": np.array([2.5], dtype=np.float32)}),
        Record("e.table", (0,), "table", {}, {"book": rng.standard_normal((2, 3)).astype(np.float32),
                                               "empty": np.zeros(0, dtype=np.float32)}),
    ]


@pytest.fixture
def packed_file(tmp_path):
    path = tmp_path / "w.ebpack"
    packed.write(path, _records(), meta={"model": "tiny", "stage": "rtn"})
    return path


def test_round_trip_keeps_every_record(tmp_path, packed_file):
    meta, records = packed.read(packed_file)
    assert meta == {"model": "tiny", "stage": "rtn"}
    originals = _records()
    assert [r.name for r in records] == [r.name for r in originals]
    for got, want in zip(records, originals):
        assert (got.shape, got.codec, got.params) == (want.shape, want.codec, want.params)
        assert set(got.arrays) == set(want.arrays)
        for key, arr in want.arrays.items():
            assert got.arrays[key].dtype == arr.dtype
            assert got.arrays[key].shape == arr.shape
            np.testing.assert_array_equal(got.arrays[key], arr)


def test_zero_dim_array_keeps_its_shape(tmp_path):
    path = tmp_path / "scalar.ebpack"
    packed.write(path, [Record("s", (), "raw", {"dtype": "float32"},
                               {"data": np.array(2.5, dtype=np.float32)})])
    (record,) = packed.read(path)[1]
    assert record.shape == ()
    assert record.arrays["data"].shape == ()
    assert record.arrays["data"] == np.float32(2.5)


def test_write_returns_file_sha256(tmp_path):
    path = tmp_path / "w.ebpack"
    digest = packed.write(path, _records())
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not list(tmp_path.glob("*.tmp*"))


def test_truncated_file_is_refused(packed_file):
    data = packed_file.read_bytes()
    packed_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(PackedFormatError, match="truncated or corrupt"):
        packed.read(packed_file)
    packed_file.write_bytes(data[:10])
    with pytest.raises(PackedFormatError, match="truncated"):
        packed.read(packed_file)


def test_flipped_byte_is_refused(packed_file):
    data = bytearray(packed_file.read_bytes())
    data[len(data) - 40] ^= 0x01
    packed_file.write_bytes(bytes(data))
    with pytest.raises(PackedFormatError, match="checksum mismatch"):
        packed.read(packed_file)


def test_wrong_magic_is_refused(packed_file):
    data = packed_file.read_bytes()
    packed_file.write_bytes(b"GGUF\x00\x00\x00\x03" + data[8:])
    with pytest.raises(PackedFormatError, match="bad magic"):
        packed.read(packed_file)


def test_unknown_version_is_refused(packed_file):
    body = bytearray(packed_file.read_bytes()[:-32])
    struct.pack_into("<I", body, 8, packed.FORMAT_VERSION + 1)
    packed_file.write_bytes(bytes(body) + hashlib.sha256(body).digest())
    with pytest.raises(PackedFormatError, match=f"version {packed.FORMAT_VERSION + 1} is not supported"):
        packed.read(packed_file)


def test_duplicate_names_are_refused_at_write(tmp_path):
    records = _records()
    records.append(Record("a.weight", (1,), "raw", {"dtype": "float16"},
                          {"data": np.zeros(1, dtype=np.float16)}))
    with pytest.raises(PackedFormatError, match="duplicate tensor name 'a.weight'"):
        packed.write(tmp_path / "dup.ebpack", records)
    assert not (tmp_path / "dup.ebpack").exists()


def test_arrays_are_aligned(packed_file):
    data = packed_file.read_bytes()
    prefix = struct.calcsize("<8sIQ")
    _, _, hlen = struct.unpack_from("<8sIQ", data)
    header = json.loads(data[prefix:prefix + hlen])
    offsets = [a["offset"] for r in header["records"] for a in r["arrays"].values()]
    assert all(off % packed.ALIGN == 0 for off in offsets)
