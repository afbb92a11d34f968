"""``vptq``: Vector Post-Training Quantisation (Liu et al., 2024, arXiv 2409.17066).

Every column of a weight (one input channel) is cut into vectors of ``vector_len`` output rows;
each vector is replaced by the index of its nearest centroid in a codebook of
``2**codebook_bits`` entries, optionally plus the index of the nearest centroid of a residual
codebook (``2**residual_codebook_bits`` entries) for what is left. Columns are quantised one at a
time with GPTQ-style error feedback through the inverse Hessian ``H = 2 X Xᵀ / n`` of the layer
input, collected in one forward pass over the calibration texts; codebooks come from k-means
weighted by ``diag(H)``. A fraction of the most important columns (``outlier_fraction``, ranked by
``H_cc * |W[:, c]|²``) are quantised first and kept in fp16 (``outlier_storage="fp16"``) or given
a codebook of their own (``"codebook"``). Columns are normalised (fp16 mean and std per column) so
that one codebook fits every layer of a projection type (``share_codebooks``): the ``q_proj`` of
all decoder layers share one codebook, stored once as a ``table`` record. The algorithm is in
``_vptq_core``, the calibration in ``_vptq_calib``, the record layout and numpy decoder in
``edgebuild.device_agent.codecs.vptq``.

Defaults: vectors of 2 rows, a 256-entry codebook (8 bits per vector: 4 bits per weight), no
residual codebook, 1% of the columns in fp16: about 4.2 bits per weight on SmolLM2-135M (4 for
the indices, ~0.16 for the fp16 columns, ~0.05 for column scales and codebooks). They are chosen
for CPU time: the nearest-centroid search costs ``2**codebook_bits / vector_len`` distances per
weight per pass, and a residual codebook adds a pass. A few columns per layer (those fed by the
"massive" activation channels) carry most of the output error; keeping them exact matters more
than codebook size, and a shared outlier codebook cannot be relied on to hold them.
"""
from __future__ import annotations

from typing import ClassVar

import logging
import re
import time
from collections import defaultdict
from dataclasses import dataclass

from edgebuild.core.errors import ConfigError, ModelError
from edgebuild.compress._vptq_core import quantize_group
from edgebuild.compress.base import CompressContext, CompressionMethod
from edgebuild.device_agent.codecs import TABLE
from edgebuild.device_agent.codecs.vptq import pack_indices
from edgebuild.device_agent.packed import Record

log = logging.getLogger(__name__)

MAX_BITS = 16              # index bits of one codebook (2**16 entries)
MAX_VECTOR_LEN = 32
OUTLIER_STORAGE = ("fp16", "codebook")


@dataclass
class VPTQConfig:
    """Knobs of ``vptq``.

    ``vector_len``: rows per vector (must divide every tensor's row count); ``codebook_bits``:
    index bits (codebook of ``2**bits`` entries); ``residual_codebook_bits``: index bits of the
    residual codebook, 0 = none; ``outlier_fraction``: share of columns treated as outliers;
    ``outlier_storage``: ``"fp16"`` (kept as they are) or ``"codebook"`` (a codebook of their
    own, as large as the first); ``kmeans_iters``: Lloyd iterations; ``calibration_samples`` x ``calibration_seq_len``: tokens
    of calibration; ``damp``: Hessian damping, a fraction of its mean diagonal;
    ``share_codebooks``: one codebook per projection type instead of one per tensor.
    """

    vector_len: int = 2
    codebook_bits: int = 8
    residual_codebook_bits: int = 0
    outlier_fraction: float = 0.01
    outlier_storage: str = "fp16"
    kmeans_iters: int = 20
    calibration_samples: int = 64
    calibration_seq_len: int = 256
    damp: float = 0.01
    share_codebooks: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the knob and its allowed values when one is out of range."""
        _int_in("vector_len", self.vector_len, 1, MAX_VECTOR_LEN)
        _int_in("codebook_bits", self.codebook_bits, 1, MAX_BITS)
        _int_in("residual_codebook_bits", self.residual_codebook_bits, 0, MAX_BITS)
        _int_in("kmeans_iters", self.kmeans_iters, 1, 10_000)
        _int_in("calibration_samples", self.calibration_samples, 1, 1 << 20)
        _int_in("calibration_seq_len", self.calibration_seq_len, 1, 1 << 20)
        _real_in("outlier_fraction", self.outlier_fraction, 0.0, 0.5, "from 0 to 0.5")
        _real_in("damp", self.damp, 1e-6, 10.0, "from 1e-6 to 10")
        if self.outlier_storage not in OUTLIER_STORAGE:
            raise ConfigError(f"vptq knob 'outlier_storage' = {self.outlier_storage!r} is not "
                              f"allowed (allowed: {', '.join(OUTLIER_STORAGE)})")
        if not isinstance(self.share_codebooks, bool):
            raise ConfigError(f"vptq knob 'share_codebooks' = {self.share_codebooks!r} is not "
                              "allowed (allowed: true or false)")


def _int_in(knob, value, lo, hi):
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(f"vptq knob {knob!r} = {value!r} is not allowed "
                          f"(allowed: an integer from {lo} to {hi})")


def _real_in(knob, value, lo, hi, allowed):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ConfigError(f"vptq knob {knob!r} = {value!r} is not allowed (allowed: {allowed})")


class VPTQ(CompressionMethod):
    """Vector post-training quantisation: Hessian-aware codebooks shared across layers."""

    name = "vptq"
    config_class = VPTQConfig
    knob_space: ClassVar[dict] = {"outlier_fraction": [0.01, 0.02, 0.03], "calibration_samples": [64, 128],
                                  "codebook_bits": [8, 10, 12], "residual_codebook_bits": [0, 4, 8]}
    knob_order: ClassVar[tuple] = ("outlier_fraction", "calibration_samples", "codebook_bits",
                                   "residual_codebook_bits")

    def compress(self, weights: dict, ctx: CompressContext) -> list[Record]:
        """Quantise every 2-D tensor of ``weights`` (calibrating on ``ctx.model``); returns the
        codebook ``table`` records followed by one ``vptq`` record per tensor."""
        import torch

        _check_weights(weights, self.config.vector_len)
        if not ctx.calibration_texts:
            raise ConfigError("vptq needs calibration data, but no calibration texts were given",
                              hint="provide calibration texts (the build's calibration set)")
        start = time.monotonic()
        hessians, tokens = _hessians(weights, ctx, self.config)
        calibrated = time.monotonic()
        gen = torch.Generator().manual_seed(ctx.seed)
        tables, records, proxies = [], {}, {}
        done = [0]

        def progress(n):
            done[0] += n
            ctx.progress(done[0], len(weights))

        for key, names in _groups(weights, self.config.share_codebooks).items():
            group_tables, group_records, group_proxy = self._compress_group(
                key, names, weights, hessians, gen, progress)
            tables += group_tables
            records.update(group_records)
            proxies.update(group_proxy)
            for name in names:
                hessians.pop(name, None)
        out = tables + [records[name] for name in weights]
        ctx.log["vptq"] = _facts(out, proxies, tokens, calibrated - start,
                                 time.monotonic() - calibrated, self.knobs())
        return out

    def _compress_group(self, key, names, weights, hessians, gen, progress):
        cfg = self.config
        results, books, layers = quantize_group([weights[n] for n in names],
                                                [hessians[n] for n in names], cfg, gen, progress)
        tables = {"codebook": table_record(f"{key}.vptq.codebook", books.main)}
        if books.outlier is not None:
            tables["outlier_codebook"] = table_record(f"{key}.vptq.outliers", books.outlier)
        if books.residual is not None:
            tables["residual_codebook"] = table_record(f"{key}.vptq.residual", books.residual)
        records = {n: tensor_record(n, tuple(weights[n].shape), r, l, cfg, tables)
                   for n, r, l in zip(names, results, layers)}
        proxies = {n: r.proxy_error for n, r in zip(names, results)}
        return list(tables.values()), records, proxies


def _check_weights(weights: dict, v: int) -> None:
    import torch

    for name, w in weights.items():
        if w.dim() != 2:
            raise ModelError(f"vptq quantises 2-D weights only; {name!r} has shape {tuple(w.shape)}")
        if w.shape[0] % v:
            raise ConfigError(f"vptq knob 'vector_len' = {v} does not divide the {w.shape[0]} rows "
                              f"of {name!r}", hint="pick a vector_len that divides every row count")
        if not bool(torch.isfinite(w).all()):
            raise ModelError(f"weight {name!r} holds NaN or infinite values; check the source model")


def _module_of(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _hessians(weights: dict, ctx, cfg):
    """``({tensor name: H}, calibration tokens)``; tensors of non-linear modules (embeddings)
    get an identity Hessian: plain vector quantisation."""
    import torch

    from edgebuild.compress._vptq_calib import calibration_batches, collect_hessians

    if ctx.model is None:
        raise ConfigError("vptq needs the model to calibrate on, but none was given")
    linear = [n for n in weights
              if isinstance(ctx.model.get_submodule(_module_of(n)), torch.nn.Linear)]
    batches = calibration_batches(ctx.calibration_texts, ctx.tokenizer,
                                  cfg.calibration_samples, cfg.calibration_seq_len)
    by_module = collect_hessians(ctx.model, sorted({_module_of(n) for n in linear}), batches,
                                 ctx.device) if linear else {}
    out = {}
    for name, w in weights.items():
        if name in linear:
            out[name] = by_module[_module_of(name)]
        else:
            log.info("%s is not a linear layer: quantised without calibration", name)
            out[name] = torch.eye(w.shape[1], dtype=torch.float32, device=w.device)
    return out, sum(int(b.numel()) for b in batches)


def _groups(weights: dict, share: bool) -> dict:
    """``{table prefix: [tensor names]}``: with ``share``, tensors whose names differ only in
    their layer numbers and that have the same shape form one group."""
    by_pattern = defaultdict(list)
    for name, w in weights.items():
        pattern = re.sub(r"\.\d+\.", ".*.", name) if share else name
        by_pattern[(pattern, tuple(w.shape))].append(name)
    patterns = defaultdict(int)
    for pattern, _ in by_pattern:
        patterns[pattern] += 1
    return {(p if patterns[p] == 1 else f"{p}.{s[0]}x{s[1]}"): names
            for (p, s), names in by_pattern.items()}


def table_record(name: str, book) -> Record:
    centroids = book.half().cpu().numpy()
    return Record(name, tuple(centroids.shape), TABLE, {"of": "vptq"}, {"centroids": centroids})


def tensor_record(name, shape, result, layer, cfg, tables) -> Record:
    """The ``vptq`` record of one tensor (layout in ``edgebuild.device_agent.codecs.vptq``)."""
    import torch

    params = {"vector_len": cfg.vector_len, "index_bits": cfg.codebook_bits,
              "codebook": tables["codebook"].name,
              "outlier_codebook": _name(tables.get("outlier_codebook")),
              "residual_bits": cfg.residual_codebook_bits,
              "residual_codebook": _name(tables.get("residual_codebook"))}
    arrays = {"scales": layer.scales.cpu().numpy(), "biases": layer.biases.cpu().numpy()}
    coded = torch.ones(shape[1], dtype=torch.bool, device=result.indices.device)
    if layer.n_outliers:
        columns = layer.perm[:layer.n_outliers].sort().values
        arrays["outlier_columns"] = columns.cpu().numpy().astype("int32")
        if cfg.outlier_storage == "fp16":
            arrays["outlier_values"] = result.reconstruction[:, columns].half().cpu().numpy()
            coded[columns] = False
    arrays["indices"] = pack_indices(result.indices[coded].cpu().numpy(), cfg.codebook_bits)
    if result.residual_indices is not None:
        arrays["residual_indices"] = pack_indices(result.residual_indices[coded].cpu().numpy(),
                                                  cfg.residual_codebook_bits)
    return Record(name, shape, VPTQ.name, params, arrays)


def _name(record):
    return record.name if record is not None else None


def _facts(records, proxies, tokens, calib_s, quant_s, knobs) -> dict:
    """What ``ctx.log["vptq"]`` records: bits per weight by part, errors, tokens, times."""
    weights = sum(r.numel for r in records if r.codec != TABLE)
    parts = defaultdict(int)
    for rec in records:
        if rec.codec == TABLE:
            parts["outliers" if rec.name.endswith(".outliers") else "codebooks"] += rec.nbytes
            continue
        for key, arr in rec.arrays.items():
            part = {"indices": "indices", "residual_indices": "residual_indices",
                    "outlier_columns": "outliers", "outlier_values": "outliers"}.get(key, "column_scales")
            parts[part] += arr.nbytes
    bpw = {part: 8 * n / weights for part, n in sorted(parts.items())}
    bpw["total"] = sum(bpw.values())
    errors = list(proxies.values())
    return {"tensors": len(proxies), "weights": weights, "bits_per_weight": bpw,
            "tables": sum(r.codec == TABLE for r in records), "calibration_tokens": tokens,
            "proxy_error_mean": sum(errors) / len(errors), "proxy_error_max": max(errors),
            "seconds": {"calibration": round(calib_s, 2), "quantization": round(quant_s, 2)},
            "knobs": knobs}
