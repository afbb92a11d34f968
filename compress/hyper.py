"""``hyper``: Hyper-Compression (Fan et al., arXiv 2409.00592): weights as steps of a torus winding.

The idea of the paper: the trajectory ``theta -> frac(theta * a)`` of a winding on the unit torus
[0, 1)^m fills the cube (densely when the entries of ``a`` are rationally independent, by Kronecker
and Weyl), so a group of ``m`` weights, once scaled into the cube, is approximated by the
trajectory point nearest to it and stored as that step number ``theta`` alone. Decoding is one
multiply and one floor per weight (see ``edgebuild.device_agent.codecs.hyper`` for the record
layout and the exact arithmetic).

How this implementation follows the paper and its public code, choice by choice:

* Group size ``m`` (``group_size``): the paper's engineered version works on pairs (m = 2); any
  ``m`` from 1 to 8 is allowed here.
* Direction ``a`` (``direction``): ``"winding"`` (default) is the paper's engineered direction:
  for m = 2 and n = s^2 trajectory points, ``a = (1/s^2, 1/s)``, the line of slope ``s`` wound on
  the square, whose ``n`` steps cover it uniformly. For other ``m`` and ``n = 2**theta_bits`` it
  generalises to ``a = (1/n, 1/s^(m-1), ..., 1/s)`` with ``s = round(n ** (1/m))`` (identical to
  the paper's for m = 2 when n is a square). ``"irrational"`` is the ergodic-theory direction of
  the paper's first version, ``a_i = 1/(pi + i)`` for i = 1..m.
* Trajectory length (``theta_bits``): ``theta`` runs over ``[0, 2**theta_bits)``.
* Scaling (the paper's "inner square" and distance classes for outliers): per scaling block
  (the whole tensor by default, as in the paper; ``block_rows`` rows each otherwise) the groups'
  centroid ``c`` is the center; the groups within Chebyshev distance ``R_0`` of it (class 0, the
  inner cube) map to the cube directly. The paper fixes the cube's side in weight units (0.1 for
  LLaMA); here ``R_0`` is the ``inner_fraction`` quantile of the groups' Chebyshev distances, so
  the knob does not depend on the weights' scale. Left unset, the fraction is chosen per tensor
  among ``INNER_CANDIDATES`` by the error on a strided sample of groups, as the paper chooses its
  per-layer settings by their loss. The other groups are outliers: the paper splits
  the Euclidean distances from ``R_0`` to the farthest group into ``classes`` rings of equal
  width and shrinks the groups of ring ``k`` toward the center by ``R_0 / R_k`` (``R_k`` = the
  ring's outer radius), which puts them inside the cube; decoding divides by the same factor.
  Equivalently, class ``k`` has its own scale ``R_k``, which is how the record stores it. With
  ``classes = 0`` the cube is stretched over every group (``R_0`` = largest Chebyshev distance).
  The paper also searches the number of classes up to a maximum; each count has its own code
  width here, so it is a knob.
* Codes: the paper stores ``class * (n + 1) + index`` (its codebook adds the centroid to the ``n``
  trajectory points) in ``bit_length`` bits. Here the code is ``class << theta_bits | theta``, the
  trajectory alone, bit-packed tightly; a group costs ``theta_bits + bit_length(classes)`` bits.
* Search: the nearest trajectory point by Euclidean distance, exactly, with a KD-tree as in the
  paper (scipy's ``cKDTree``), or by chunked exhaustive search when scipy is missing.

``compress_array`` / ``decode_array`` work on any float array (e.g. the codebooks of a ``table``
record), ``HyperCompression.compress`` on a dict of weight tensors.
"""
from __future__ import annotations

from typing import ClassVar

import logging
import math
from dataclasses import dataclass

import numpy as np

from edgebuild.core.errors import ConfigError, ModelError
from edgebuild.compress.base import CompressContext, CompressionMethod
from edgebuild.device_agent.codecs import hyper as codec
from edgebuild.device_agent.packed import Record

log = logging.getLogger(__name__)

DIRECTIONS = ("winding", "irrational")
MAX_GROUP = 8
MIN_THETA_BITS, MAX_THETA_BITS = 2, 20
MAX_CLASSES = 15
SEARCH_CHUNK = 1 << 20      # groups per KD-tree query
EXHAUSTIVE_CELLS = 1 << 22  # groups x points per step of the exhaustive search
SAMPLE_GROUPS = 1 << 16     # groups per tensor that choose the inner cube (inner_fraction None)
INNER_CANDIDATES = (0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 1.0)

decode_array = codec.decode_array


@dataclass
class HyperConfig:
    """Knobs of ``hyper``: weights per group, trajectory length in bits, outlier classes, winding
    direction, share of groups in the inner cube, rows per scaling block (0: whole tensor)."""

    group_size: int = 2
    theta_bits: int = 12
    classes: int = 1
    direction: str = "winding"
    inner_fraction: float | None = None
    block_rows: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the knob and its allowed values when one is out of range."""
        _check_int("group_size", self.group_size, 1, MAX_GROUP)
        _check_int("theta_bits", self.theta_bits, MIN_THETA_BITS, MAX_THETA_BITS)
        _check_int("classes", self.classes, 0, MAX_CLASSES)
        _check_int("block_rows", self.block_rows, 0, None)
        if self.direction not in DIRECTIONS:
            raise ConfigError(f"hyper knob 'direction' = {self.direction!r} is not allowed "
                              f"(allowed: {', '.join(DIRECTIONS)})")
        frac = self.inner_fraction
        if frac is not None and (isinstance(frac, bool) or not isinstance(frac, (int, float))
                                 or not 0 < frac <= 1):
            raise ConfigError(f"hyper knob 'inner_fraction' = {frac!r} is not allowed "
                              "(allowed: a number in (0, 1], or none to choose it per tensor)")

    @property
    def code_bits(self) -> int:
        """Bits stored per group: theta plus the class id."""
        return self.theta_bits + codec.class_bits(self.classes)


def _check_int(knob: str, value, low: int, high: int | None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if not ok or (high is not None and value > high):
        allowed = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
        raise ConfigError(f"hyper knob {knob!r} = {value!r} is not allowed (allowed: {allowed})")


def direction_vector(config: HyperConfig) -> np.ndarray:
    """The winding direction ``a`` (float64, ``(group_size,)``) chosen by ``config.direction``."""
    m, n = config.group_size, 1 << config.theta_bits
    if config.direction == "irrational":
        return 1.0 / (np.pi + np.arange(1, m + 1, dtype=np.float64))
    s = max(2, round(n ** (1.0 / m)))
    return np.array([1.0 / n] + [1.0 / s ** k for k in range(m - 1, 0, -1)], dtype=np.float64)


def trajectory(config: HyperConfig) -> np.ndarray:
    """All ``2**theta_bits`` trajectory points ``frac(theta * a)``, float64 ``(n, m)``."""
    theta = np.arange(1 << config.theta_bits, dtype=np.uint32)
    return codec.winding_points(theta, direction_vector(config))


class _Searcher:
    """Nearest trajectory point of many targets: a KD-tree (scipy) or, without it, exhaustive."""

    def __init__(self, points: np.ndarray, exhaustive: bool = False):
        self.points, self.tree = points, None
        if not exhaustive:
            try:
                from scipy.spatial import cKDTree
            except ImportError:
                log.info("scipy is missing: hyper falls back to exhaustive search (slow)")
            else:
                self.tree = cKDTree(points)

    def query(self, targets: np.ndarray) -> np.ndarray:
        """Index (uint32) of the point nearest (Euclidean) to each row of ``targets``."""
        if self.tree is None:
            return _nearest_exhaustive(targets, self.points)
        out = np.empty(len(targets), dtype=np.uint32)
        for start in range(0, len(targets), SEARCH_CHUNK):
            _, idx = self.tree.query(targets[start:start + SEARCH_CHUNK], workers=-1)
            out[start:start + SEARCH_CHUNK] = idx
        return out


def nearest_theta(targets: np.ndarray, points: np.ndarray, exhaustive: bool = False) -> np.ndarray:
    """Index (uint32) of the point of ``points`` nearest (Euclidean) to each row of ``targets``,
    by KD-tree (scipy) unless ``exhaustive`` is set or scipy is missing."""
    return _Searcher(points, exhaustive).query(targets)


def _nearest_exhaustive(targets: np.ndarray, points: np.ndarray) -> np.ndarray:
    out = np.empty(len(targets), dtype=np.uint32)
    step = max(1, EXHAUSTIVE_CELLS // max(1, len(points)))
    for start in range(0, len(targets), step):
        chunk = targets[start:start + step]
        dist = np.zeros((len(chunk), len(points)))
        for k in range(points.shape[1]):
            dist += (chunk[:, k:k + 1] - points[None, :, k]) ** 2
        out[start:start + step] = dist.argmin(axis=1)
    return out


def _f32_up(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to float32 toward +inf (a radius that still covers what it must)."""
    y = np.asarray(x, dtype=np.float64).astype(np.float32)
    return np.where(y.astype(np.float64) < x, np.nextafter(y, np.float32(np.inf)), y)


def _groups(arr: np.ndarray, m: int) -> np.ndarray:
    """``arr`` as float64 groups ``(rows * per_row, m)``; rows padded by repeating their last
    value."""
    rows, cols = codec.as_2d(arr.shape)
    x = arr.astype(np.float64).reshape(rows, cols)
    pad = -cols % m
    if pad and rows:
        x = np.pad(x, ((0, 0), (0, pad)), mode="edge")
    return x.reshape(-1, m)


@dataclass
class _Blocks:
    """Scaling blocks of equal size stacked: centers, offsets from them, and distances."""

    centers: np.ndarray     # float32 (B, m)
    offsets: np.ndarray     # float64 (B, K, m): group - center
    cheb: np.ndarray        # float64 (B, K): Chebyshev distance to the center
    dist: np.ndarray        # float64 (B, K): Euclidean distance to the center

    @classmethod
    def of(cls, g: np.ndarray) -> "_Blocks":
        centers = g.mean(axis=1).astype(np.float32)
        offsets = g - centers.astype(np.float64)[:, None, :]
        dist = np.sqrt((offsets ** 2).sum(axis=2))
        return cls(centers, offsets, np.abs(offsets).max(axis=2), dist)

    def classes_for(self, inner_fraction: float, classes: int):
        """Radii (float32 ``(B, classes + 1)``) and class ids (``(B, K)``) for an inner cube
        holding ``inner_fraction`` of each block's groups and ``classes`` equal-width rings."""
        if classes == 0:
            radii = _f32_up(self.cheb.max(axis=1))[:, None]
            return radii, np.zeros(self.cheb.shape, dtype=np.int64)
        inner = _f32_up(np.quantile(self.cheb, inner_fraction, axis=1))
        far = self.dist.max(axis=1)
        steps = np.arange(1, classes + 1, dtype=np.float64) / classes
        outer = inner.astype(np.float64)[:, None] + steps[None, :] * (far - inner)[:, None]
        outer[:, -1] = far
        radii = np.concatenate([inner[:, None], _f32_up(outer)], axis=1)
        wide = radii.astype(np.float64)
        ring = 1 + (self.dist[:, :, None] > wide[:, None, 1:]).sum(axis=2)
        return radii, np.where(self.cheb <= wide[:, :1], 0, np.minimum(ring, classes))


def _split_blocks(g: np.ndarray, lay: dict, block_rows: int) -> list[_Blocks]:
    """The groups cut into scaling blocks: the full blocks stacked, then the shorter last one."""
    per_block = block_rows * lay["per_row"]
    full = (lay["rows"] // block_rows) * per_block
    parts = [g[:full].reshape(-1, per_block, g.shape[1])] if full else []
    if full < len(g):
        parts.append(g[full:][None])
    return [_Blocks.of(p) for p in parts]


def _unit(offsets: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Offsets ``(N, m)`` divided by their class radius ``(N,)``, mapped from [-1, 1] to [0, 1]."""
    scale = scale[:, None]
    safe = np.where(scale > 0, scale, 1.0)
    return np.where(scale > 0, (offsets / safe + 1.0) / 2.0, 0.5)


def _sample_error(blocks: list[_Blocks], fraction: float, config: HyperConfig, searcher) -> float:
    """Squared error of a strided sample of groups with the inner cube at ``fraction``."""
    err = 0.0
    for b in blocks:
        radii, cls = b.classes_for(fraction, config.classes)
        idx = np.arange(0, cls.size, max(1, cls.size // SAMPLE_GROUPS))
        scale = radii.astype(np.float64)[idx // cls.shape[1], cls.reshape(-1)[idx]]
        u = _unit(b.offsets.reshape(-1, config.group_size)[idx], scale)
        near = searcher.points[searcher.query(u)]
        err += float((((near - u) * (2.0 * scale[:, None])) ** 2).sum())
    return err


def _inner_fraction(blocks: list[_Blocks], config: HyperConfig, searcher) -> float:
    """``config.inner_fraction``, or when it is ``None`` the candidate with least sampled error."""
    if config.inner_fraction is not None or config.classes == 0:
        return 1.0 if config.inner_fraction is None else config.inner_fraction
    errors = {f: _sample_error(blocks, f, config, searcher) for f in INNER_CANDIDATES}
    return min(errors, key=errors.get)


def _encode_groups(g: np.ndarray, lay: dict, block_rows: int, config: HyperConfig):
    """Codes (uint32), centers, radii and the inner fraction used, for groups ``g``."""
    blocks = _split_blocks(g, lay, block_rows)
    searcher = _Searcher(trajectory(config))
    fraction = _inner_fraction(blocks, config, searcher)
    codes, centers, radii = [], [], []
    for b in blocks:
        r, cls = b.classes_for(fraction, config.classes)
        scale = np.take_along_axis(r.astype(np.float64), cls, axis=1).reshape(-1)
        theta = searcher.query(_unit(b.offsets.reshape(-1, config.group_size), scale))
        codes.append((cls.reshape(-1).astype(np.uint32) << np.uint32(config.theta_bits)) | theta)
        centers.append(b.centers), radii.append(r)
    return np.concatenate(codes), np.concatenate(centers), np.concatenate(radii), fraction


def compress_array(arr: np.ndarray, config: HyperConfig) -> tuple[dict, dict]:
    """Compress any float array to ``(params, arrays)`` of the ``hyper`` codec.

    ``decode_array(params, arrays)`` returns it (float32, same shape) approximately.
    Raises ``ModelError`` for non-float or non-finite input.
    """
    arr = np.asarray(arr)
    if arr.dtype.kind != "f":
        raise ModelError(f"hyper compresses float arrays only, got dtype {arr.dtype}; store it raw")
    if not np.isfinite(arr).all():
        raise ModelError("array holds NaN or infinite values; check the source model")
    m = config.group_size
    rows = codec.as_2d(arr.shape)[0]
    block_rows = min(config.block_rows, rows) if config.block_rows else max(rows, 1)
    lay = codec.layout(arr.shape, m, block_rows)
    g = _groups(arr, m)
    if len(g):
        codes, centers, radii, fraction = _encode_groups(g, lay, block_rows, config)
    else:
        codes, fraction = np.zeros(0, np.uint32), 1.0
        centers, radii = np.zeros((0, m), np.float32), np.zeros((0, config.classes + 1), np.float32)
    params = {"group_size": m, "theta_bits": config.theta_bits, "classes": config.classes,
              "block_rows": block_rows, "direction": config.direction, "inner_fraction": fraction,
              "shape": list(arr.shape)}
    arrays = {"codes": codec.pack_codes(codes, config.code_bits),
              "direction": direction_vector(config), "centers": centers,
              "radii": radii.astype(np.float32)}
    return params, arrays


def bits_per_weight(arrays: dict, numel: int) -> float:
    """Stored bits per weight of a ``hyper`` payload: every array's bytes, over ``numel``."""
    return 8.0 * sum(int(a.nbytes) for a in arrays.values()) / max(1, numel)


def error_stats(original: np.ndarray, decoded: np.ndarray) -> dict:
    """Relative Frobenius error and SNR (dB) of ``decoded`` against ``original``."""
    x = np.asarray(original, dtype=np.float64)
    err = float(np.sum((np.asarray(decoded, dtype=np.float64) - x) ** 2))
    sig = float(np.sum(x ** 2))
    rel = math.sqrt(err / sig) if sig > 0 else (0.0 if err == 0 else math.inf)
    snr = 10 * math.log10(sig / err) if err > 0 and sig > 0 else math.inf
    return {"rel_error": rel, "snr_db": snr}


class HyperCompression(CompressionMethod):
    """Hyper-Compression: each group of weights stored as the step number of a torus winding."""

    name = "hyper"
    config_class = HyperConfig
    knob_space: ClassVar[dict] = {"theta_bits": [12, 14, 16], "group_size": [3, 2], "classes": [1, 2, 3]}
    knob_order: ClassVar[tuple] = ("theta_bits", "group_size", "classes")

    def __init__(self, config=None):
        super().__init__(config)
        self.config.validate()

    def compress(self, weights: dict, ctx: CompressContext) -> list[Record]:
        """Compress each float tensor of ``weights`` (any shape); one ``hyper`` record each."""
        records, facts = [], {}
        for done, (name, weight) in enumerate(weights.items(), start=1):
            record = self.compress_one(name, weight)
            facts[name] = self._facts(weight, record)
            records.append(record)
            ctx.progress(done, len(weights))
        ctx.log["hyper"] = facts
        if facts:
            worst = max(facts, key=lambda n: facts[n]["rel_error"])
            log.info("hyper: %d tensors, worst relative error %.4f (%s)", len(facts),
                     facts[worst]["rel_error"], worst)
        return records

    def compress_one(self, name: str, weight) -> Record:
        """Compress one tensor (torch or numpy) to a ``hyper`` record."""
        array = _to_numpy(weight)
        try:
            params, arrays = compress_array(array, self.config)
        except ModelError as e:
            raise ModelError(f"weight {name!r}: {e}") from None
        return Record(name, tuple(array.shape), self.name, params, arrays)

    @staticmethod
    def _facts(weight, record: Record) -> dict:
        decoded = codec.decode(record.params, record.arrays, record.shape)
        stats = error_stats(_to_numpy(weight), decoded)
        return {**stats, "bits_per_weight": bits_per_weight(record.arrays, record.numel)}


def _to_numpy(weight) -> np.ndarray:
    if isinstance(weight, np.ndarray):
        return weight
    if not weight.is_floating_point():
        raise ModelError(f"hyper compresses float tensors only, got dtype {weight.dtype}; "
                         "store it raw")
    return weight.detach().float().cpu().numpy()
