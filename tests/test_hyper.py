"""Hyper-Compression (``hyper``): the winding codebook, the search, scaling classes, the codec."""

import numpy as np
import pytest
import torch

from edgebuild.core.errors import ConfigError, ModelError
from edgebuild.compress import CompressContext, methods
from edgebuild.compress import hyper
from edgebuild.compress.hyper import HyperCompression, HyperConfig, compress_array, decode_array
from edgebuild.device_agent import packed
from edgebuild.device_agent.codecs import decode, decode_all
from edgebuild.device_agent.codecs import hyper as codec
from edgebuild.device_agent.codecs.rtn import pack_bits


def _gauss(rows=64, cols=96, seed=0, scale=0.02):
    return (np.random.default_rng(seed).standard_normal((rows, cols)) * scale).astype(np.float32)


def _heavy(rows=128, cols=128, seed=1):
    """Student-t (2 degrees of freedom): a few groups lie far out."""
    return (np.random.default_rng(seed).standard_t(2, (rows, cols)) * 0.01).astype(np.float32)


def _rel(original, decoded):
    return hyper.error_stats(original, decoded)["rel_error"]


def _reference_decode(params, arrays, shape):
    """The documented formula, written out independently of the codec: w = c + R * (2u - 1)."""
    m, tbits, classes = params["group_size"], params["theta_bits"], params["classes"]
    rows, cols = codec.as_2d(shape)
    per_row = -(-cols // m)
    codes = codec.unpack_codes(arrays["codes"], tbits + codec.class_bits(classes), rows * per_row)
    theta, cls = codes % (1 << tbits), codes >> tbits
    x = theta.astype(np.float64)[:, None] * arrays["direction"].astype(np.float64)[None, :]
    u = x - np.floor(x)
    block = np.arange(codes.size) // (params["block_rows"] * per_row)
    center = arrays["centers"].astype(np.float64)[block]
    radius = arrays["radii"].astype(np.float64)[block, cls][:, None]
    w = (center + radius * (2.0 * u - 1.0)).astype(np.float32)
    return w.reshape(rows, per_row * m)[:, :cols].reshape(shape)


# --- round trip and error -------------------------------------------------------------------------

def test_error_shrinks_as_the_trajectory_grows():
    w = _gauss()
    errors = []
    for bits in (6, 10, 14):
        params, arrays = compress_array(w, HyperConfig(theta_bits=bits))
        out = decode_array(params, arrays)
        assert out.dtype == np.float32 and out.shape == w.shape
        errors.append(_rel(w, out))
    assert errors[0] > 2 * errors[1] > 4 * errors[2], errors
    assert errors[1] < 0.1 and errors[2] < 0.03, errors


@pytest.mark.parametrize("direction", hyper.DIRECTIONS)
@pytest.mark.parametrize("group_size", [1, 2, 3, 4])
def test_round_trip_error_is_small_for_every_direction_and_group(direction, group_size):
    w = _gauss(32, 48)
    cfg = HyperConfig(group_size=group_size, theta_bits=4 * group_size + 2, direction=direction)
    out = decode_array(*compress_array(w, cfg))
    assert _rel(w, out) < 0.2, (direction, group_size, _rel(w, out))


def test_inner_groups_err_at_most_the_trajectory_covering_radius():
    """Without outlier classes every group lies in the cube, and the winding of the paper (slope
    s = 2**(bits/2)) leaves no point of the cube farther than one grid diagonal from a step."""
    w = _gauss(16, 64)
    params, arrays = compress_array(w, HyperConfig(theta_bits=10, classes=0))
    radius = float(arrays["radii"][0, 0])
    err = np.abs(decode_array(params, arrays) - w)
    assert err.max() <= 2 * radius / 32 * 1.001


def test_weights_of_any_shape_round_trip():
    rng = np.random.default_rng(3)
    for shape in [(), (7,), (5, 9), (3, 4, 5), (0, 6)]:
        w = rng.standard_normal(shape).astype(np.float32)
        out = decode_array(*compress_array(w, HyperConfig(group_size=2, theta_bits=12)))
        assert out.shape == w.shape and out.dtype == np.float32
        if w.size:
            assert _rel(w, out) < 0.1, shape


def test_constant_tensor_is_exact():
    w = np.full((4, 10), 0.375, dtype=np.float32)
    for classes in (0, 1, 3):
        out = decode_array(*compress_array(w, HyperConfig(classes=classes)))
        assert np.array_equal(out, w)


def test_outlier_classes_reduce_error_on_a_heavy_tailed_tensor():
    w = _heavy()
    plain = _rel(w, decode_array(*compress_array(w, HyperConfig(theta_bits=12, classes=0))))
    one = _rel(w, decode_array(*compress_array(w, HyperConfig(theta_bits=12, classes=1))))
    same_bits = _rel(w, decode_array(*compress_array(w, HyperConfig(theta_bits=11, classes=1))))
    assert one < plain / 3, (one, plain)
    assert same_bits < plain / 2, (same_bits, plain)   # 12 bits a group either way


def test_auto_inner_fraction_is_no_worse_than_any_candidate():
    w = _heavy(64, 64)
    params, arrays = compress_array(w, HyperConfig(classes=1))
    assert params["inner_fraction"] in hyper.INNER_CANDIDATES
    auto = _rel(w, decode_array(params, arrays))
    fixed = [_rel(w, decode_array(*compress_array(w, HyperConfig(classes=1, inner_fraction=f))))
             for f in hyper.INNER_CANDIDATES]
    assert auto <= min(fixed) * 1.05
    explicit, _ = compress_array(w, HyperConfig(classes=1, inner_fraction=0.9))
    assert explicit["inner_fraction"] == 0.9


def test_scaling_blocks_adapt_to_rows_of_different_scales():
    w = _gauss(32, 64) * np.geomspace(0.1, 10, 32, dtype=np.float32)[:, None]
    whole = compress_array(w, HyperConfig(theta_bits=10))
    rows = compress_array(w, HyperConfig(theta_bits=10, block_rows=3))   # last block: 2 rows
    assert rows[1]["centers"].shape == (11, 2) and rows[1]["radii"].shape == (11, 2)
    def row_errors(payload):
        out = decode_array(*payload)
        return np.linalg.norm(out - w, axis=1) / np.linalg.norm(w, axis=1)
    assert row_errors(rows).max() < 0.1 and row_errors(whole)[:8].min() > 0.5


# --- the winding and the search -------------------------------------------------------------------

def test_direction_vectors():
    winding = hyper.direction_vector(HyperConfig(group_size=2, theta_bits=12))
    assert winding.tolist() == [1 / 4096, 1 / 64]
    assert hyper.direction_vector(HyperConfig(group_size=3, theta_bits=12)).tolist() == \
        [1 / 4096, 1 / 256, 1 / 16]
    irrational = hyper.direction_vector(HyperConfig(group_size=3, direction="irrational"))
    assert irrational.tolist() == [1 / (np.pi + 1), 1 / (np.pi + 2), 1 / (np.pi + 3)]


def test_winding_of_the_paper_visits_a_uniform_grid():
    points = hyper.trajectory(HyperConfig(group_size=2, theta_bits=8))
    grid = np.sort(np.round(points * 256).astype(int), axis=0)
    assert len({tuple(p) for p in np.round(points * 256).astype(int)}) == 256
    assert np.array_equal(np.unique(grid[:, 1]), np.arange(0, 256, 16))


@pytest.mark.parametrize("direction", hyper.DIRECTIONS)
def test_a_planted_theta_is_recovered(direction):
    cfg = HyperConfig(group_size=2, theta_bits=12, direction=direction)
    points = hyper.trajectory(cfg)
    rng = np.random.default_rng(5)
    planted = rng.choice(len(points), 500, replace=False).astype(np.uint32)
    gaps = np.sqrt(((points[planted][:, None, :] - points[None, :, :]) ** 2).sum(-1))
    gaps[np.arange(500), planted] = np.inf
    noise = rng.standard_normal((500, 2))
    noise *= (0.4 * gaps.min(axis=1) / np.linalg.norm(noise, axis=1))[:, None]
    targets = points[planted] + noise
    assert np.array_equal(hyper.nearest_theta(targets, points), planted)
    assert np.array_equal(hyper.nearest_theta(targets, points, exhaustive=True), planted)


def test_kdtree_and_exhaustive_search_find_equally_near_points():
    points = hyper.trajectory(HyperConfig(group_size=3, theta_bits=10, direction="irrational"))
    targets = np.random.default_rng(6).random((3000, 3))
    d_tree = np.linalg.norm(points[hyper.nearest_theta(targets, points)] - targets, axis=1)
    d_full = np.linalg.norm(points[hyper.nearest_theta(targets, points, exhaustive=True)] - targets,
                            axis=1)
    assert np.allclose(d_tree, d_full, rtol=0, atol=1e-12)


# --- the codec: exact decoding, packing, bits -----------------------------------------------------

@pytest.mark.parametrize("knobs", [{}, {"classes": 3, "group_size": 3},
                                   {"block_rows": 5, "classes": 0},
                                   {"direction": "irrational", "theta_bits": 16}])
def test_decoder_equals_the_documented_reconstruction_bit_for_bit(knobs):
    w = _heavy(23, 37)
    params, arrays = compress_array(w, HyperConfig(**knobs))
    out = decode_array(params, arrays)
    reference = _reference_decode(params, arrays, w.shape)
    assert np.array_equal(out.view(np.uint32), reference.view(np.uint32))


def test_records_survive_the_packed_file_and_decode_identically(tmp_path):
    weights = {"a.weight": torch.from_numpy(_gauss(12, 20)), "b.norm": torch.ones(20) * 0.5}
    ctx = CompressContext()
    records = HyperCompression(HyperConfig(classes=1)).compress(weights, ctx)
    assert [r.name for r in records] == list(weights) and {r.codec for r in records} == {"hyper"}
    assert set(ctx.log["hyper"]) == set(weights)
    assert ctx.log["hyper"]["a.weight"]["rel_error"] < 0.05
    path = tmp_path / "w.ebpack"
    packed.write(path, records)
    _, back = packed.read(path)
    before, after = decode_all(records), decode_all(back)
    for name in weights:
        assert np.array_equal(before[name], after[name])
        assert np.array_equal(decode(back[[r.name for r in back].index(name)]), after[name])
    assert np.array_equal(after["b.norm"], np.full(20, 0.5, np.float32))


@pytest.mark.parametrize("bits", [1, 3, 7, 8, 9, 13, 16, 21, 32])
def test_code_packing_round_trips_across_chunks(bits, monkeypatch):
    monkeypatch.setattr(codec, "CHUNK", 16)
    rng = np.random.default_rng(bits)
    for count in (0, 1, 15, 16, 17, 100):
        codes = rng.integers(0, 1 << bits, count, dtype=np.uint64).astype(np.uint32)
        stream = codec.pack_codes(codes, bits)
        assert stream.dtype == np.uint8 and stream.size == codec.packed_nbytes(count, bits)
        assert np.array_equal(codec.unpack_codes(stream, bits, count), codes)


def test_code_packing_matches_the_rtn_bit_order():
    codes = np.random.default_rng(2).integers(0, 32, 77).astype(np.uint32)
    assert np.array_equal(codec.pack_codes(codes, 5), pack_bits(codes.astype(np.uint8), 5))


def test_bits_accounting():
    w = _gauss(10, 33)                                    # 33 columns: 17 pairs a row, one padded
    cfg = HyperConfig(group_size=2, theta_bits=11, classes=2)
    assert cfg.code_bits == 13
    params, arrays = compress_array(w, cfg)
    groups = 10 * 17
    assert arrays["codes"].nbytes == -(-groups * 13 // 8)
    expected = arrays["codes"].nbytes + 2 * 8 + 2 * 4 + 3 * 4   # direction, center, radii
    assert hyper.bits_per_weight(arrays, w.size) == pytest.approx(8 * expected / w.size)
    record = HyperCompression(cfg).compress_one("w", torch.from_numpy(w))
    assert record.nbytes == expected
    big = compress_array(_gauss(256, 512), HyperConfig(theta_bits=12, classes=1))[1]
    assert hyper.bits_per_weight(big, 256 * 512) == pytest.approx(6.5, abs=0.01)


def test_decoder_refuses_arrays_that_do_not_fit():
    w = _gauss(8, 8)
    params, arrays = compress_array(w, HyperConfig())
    with pytest.raises(codec.HyperFormatError, match="centers"):
        decode_array(params, {**arrays, "centers": arrays["centers"][:, :1]})
    with pytest.raises(codec.HyperFormatError, match="bytes"):
        decode_array(params, {**arrays, "codes": arrays["codes"][:-1]})
    with pytest.raises(codec.HyperFormatError, match="out of range"):
        decode_array({**params, "theta_bits": 31, "classes": 3}, arrays)


# --- the method: knobs, inputs, retries -----------------------------------------------------------

@pytest.mark.parametrize("knobs", [
    {"group_size": 0}, {"group_size": 9}, {"group_size": 2.0}, {"theta_bits": 1},
    {"theta_bits": 21}, {"theta_bits": True}, {"classes": -1}, {"classes": 16},
    {"direction": "spiral"}, {"inner_fraction": 0}, {"inner_fraction": 1.5},
    {"inner_fraction": "auto"}, {"block_rows": -2},
])
def test_bad_knobs_raise_config_error(knobs):
    with pytest.raises(ConfigError, match="hyper knob"):
        HyperConfig(**knobs)
    with pytest.raises(ConfigError):
        HyperCompression.from_knobs(knobs)


def test_registered_and_unknown_knobs_are_named():
    assert methods.get("hyper") is HyperCompression
    with pytest.raises(KeyError, match="theta"):
        HyperCompression.from_knobs({"theta": 3})


def test_bad_inputs_raise_model_error():
    method = HyperCompression()
    with pytest.raises(ModelError, match="'w'.*NaN"):
        method.compress_one("w", torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ModelError, match="float"):
        method.compress_one("ids", torch.arange(6))
    with pytest.raises(ModelError, match="float"):
        compress_array(np.arange(6), HyperConfig())




def test_knob_walk_never_makes_a_stage_smaller():
    from edgebuild.compress.search import knob_walk

    start = HyperConfig(group_size=4, theta_bits=10, classes=1)
    walk = [HyperConfig(**k) for k in knob_walk(vars(start), HyperCompression.knob_space,
                                                  HyperCompression.knob_order)]
    steps = [(c.group_size, c.theta_bits, c.classes) for c in walk]
    assert steps == [(4, 12, 1), (4, 14, 1), (4, 16, 1), (3, 16, 1), (2, 16, 1), (2, 16, 2), (2, 16, 3)]
    seen = [start, *walk]
    for before, after in zip(seen, seen[1:]):
        assert after.code_bits / after.group_size >= before.code_bits / before.group_size
