"""SeedLM (arXiv 2410.10714): each block of weights becomes an LFSR seed and a few 4-bit coefficients.

A 2-D tensor is flattened row-major (along the input dimension) into blocks of ``block_size`` (C)
weights. For every block the search picks, among the candidate seeds of a ``lfsr_bits`` (K) LFSR, the
one whose ``C x P`` basis, with least-squares coefficients quantised to ``P`` 4-bit mantissas and one
4-bit shared exponent, gives the lowest squared error *after* quantisation. Bits per weight are
``(K + 4 + 4 P) / C``: 4.0 for (C, P, K) = (8, 3, 16), 3.0 for (12, 4, 16).

Exponent window: a 4-bit field codes ``e - exp_min``. Per tensor ``exp_max = e(max block norm) + 1``,
where ``e(x)`` is the smallest integer with ``x < 7.5 * 2**e``, and ``exp_min = exp_max - 15``
(``exp_min`` is stored in the record). On SmolLM2 layers the winning exponent of a block lies within
``e(block norm) - 3 .. e(block norm) + 1`` except for a few near-singular bases with huge coefficients,
so the window holds the winners; an exponent outside it is clamped (the mantissas clip) and the search
scores that clamped code, so it wins only when it really is best. Blocks 2**16 times smaller than the
largest one get a coarser step than they would like.

Seed budget: on CUDA every one of the ``2**K - 1`` seeds is searched (the paper's setting). On a CPU a
fixed subset of ``seed_budget`` seeds (drawn with ``ctx.seed``) is searched, or every seed with
``seed_budget = "all"``. ``ctx.log["seedlm"]`` records the seeds searched, the device, the kernel, the
throughput and the relative error.

Kernel: on CUDA with Triton, "fused" is one hand-written Triton kernel that streams seed tiles past
blocks held in registers and keeps a running minimum (``_seedlm_triton``). On a CPU, "pruned"
(``_seedlm_pruned``) bounds every seed's error from below by its unquantised least-squares error, got
for all seeds by one matmul per seed chunk, and scores only the seeds whose bound beats the best score
found (about 40 of 65,535 per block on SmolLM2): the same choice as scoring every seed. The tile
kernel runs under ``torch.compile`` ("compiled": C++ on CPU, Triton on CUDA; the first call compiles,
10-40 s on 2 cores) or as plain torch ops ("eager"). "auto" picks "fused" where it can run, "pruned"
on a CPU, else tries "compiled" and falls back to "eager" with a warning.
"""
from __future__ import annotations

from typing import ClassVar

import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from edgebuild.core.errors import ConfigError, ModelError
from edgebuild.compress.base import CompressContext, CompressionMethod
from edgebuild.device_agent.codecs import seedlm as codec
from edgebuild.device_agent.packed import Record

log = logging.getLogger(__name__)

DEFAULT_CPU_SEED_BUDGET = 4096
KERNELS = ("auto", "fused", "pruned", "compiled", "eager")
EXP_LIMIT = 100          # |exponent| bound that keeps 2**e a normal float32
# (block_chunk, seed_chunk) of the search tiles.
TILES = {"cpu": (1024, 128), "cuda": (1024, 1024)}


@dataclass
class SeedLMConfig:
    """Knobs of SeedLM; the defaults are the paper's 4-bit setting."""

    block_size: int = 8          # C: weights per block
    latent_dim: int = 3          # P: coefficients per block
    lfsr_bits: int = 16          # K: LFSR length, so seeds are K-bit
    seed_budget: int | str = DEFAULT_CPU_SEED_BUDGET   # seeds searched on CPU, or "all" (2**K - 1)
    full_search_on_gpu: bool = True              # on CUDA, search every seed whatever the budget
    kernel: str = "auto"         # "fused" (Triton, CUDA), "pruned" (CPU), "compiled", "eager", "auto"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the knob and its allowed values when one is out of range."""
        if not _is_int(self.lfsr_bits) or self.lfsr_bits not in codec.PRIMITIVE_TAPS:
            _bad("lfsr_bits", self.lfsr_bits, f"an LFSR length with a known polynomial, "
                                              f"{min(codec.PRIMITIVE_TAPS)} to {max(codec.PRIMITIVE_TAPS)}")
        if not _is_int(self.block_size) or not 2 <= self.block_size <= 64:
            _bad("block_size", self.block_size, "an integer from 2 to 64")
        if not _is_int(self.latent_dim) or not 1 <= self.latent_dim < self.block_size:
            _bad("latent_dim", self.latent_dim,
                 f"an integer from 1 to block_size - 1 = {self.block_size - 1}")
        if codec.block_bits(self.lfsr_bits, self.latent_dim) > codec.MAX_BLOCK_BITS:
            most = (codec.MAX_BLOCK_BITS - self.lfsr_bits - codec.EXP_BITS) // codec.COEF_BITS
            _bad("latent_dim", self.latent_dim, f"at most {most} with lfsr_bits = {self.lfsr_bits}, "
                                                f"so a block record fits {codec.MAX_BLOCK_BITS} bits")
        if self.seed_budget != "all" and (not _is_int(self.seed_budget) or self.seed_budget < 1):
            _bad("seed_budget", self.seed_budget, f"a positive integer or \"all\"; {self.seed_count} "
                                                  f"seeds exist for lfsr_bits = {self.lfsr_bits}")
        if not isinstance(self.full_search_on_gpu, bool):
            _bad("full_search_on_gpu", self.full_search_on_gpu, "true or false")
        if self.kernel not in KERNELS:
            _bad("kernel", self.kernel, ", ".join(repr(k) for k in KERNELS))

    @property
    def seed_count(self) -> int:
        """Number of nonzero LFSR states, i.e. of distinct seeds."""
        return (1 << self.lfsr_bits) - 1

    @property
    def budget(self) -> int:
        """Seeds searched on a CPU: ``seed_budget``, at most every seed."""
        return self.seed_count if self.seed_budget == "all" else min(self.seed_budget, self.seed_count)

    @property
    def bits_per_weight(self) -> float:
        return codec.block_bits(self.lfsr_bits, self.latent_dim) / self.block_size


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bad(knob, value, allowed):
    raise ConfigError(f"seedlm knob '{knob}' = {value!r} is not allowed (allowed: {allowed})")


class SeedLM(CompressionMethod):
    """Data-free compression into LFSR seeds with 4-bit coefficients and a shared exponent."""

    name = "seedlm"
    config_class = SeedLMConfig
    knob_space: ClassVar[dict] = {"block_size,latent_dim": [[12, 4], [8, 3], [8, 4]],
                                  "seed_budget": [DEFAULT_CPU_SEED_BUDGET, 16384, 65535]}
    knob_order: ClassVar[tuple] = ("block_size,latent_dim", "seed_budget")

    def compress(self, weights: dict, ctx: CompressContext) -> list:
        """One ``seedlm`` record per 2-D tensor; facts about the search go to ``ctx.log["seedlm"]``."""
        self.config.validate()
        tensors = {name: _as_matrix(name, w) for name, w in weights.items()}
        if not tensors:
            return []
        device = "cuda" if ctx.device == "cuda" else "cpu"
        seeds = self.candidate_seeds(device, ctx.seed)
        searcher = self.searcher(seeds, device)
        cfg, stats = self.config, _Stats()
        counter = _Progress(ctx, len(tensors),
                            sum(-(-w.numel() // cfg.block_size) for w in tensors.values()))
        records = []
        for name, w in tensors.items():
            record, recon = self.compress_tensor(name, w, searcher, counter)
            stats.add(w, recon, record)
            records.append(record)
        ctx.log["seedlm"] = stats.summary(cfg, len(seeds), device, searcher.kernel, counter)
        return records

    def searcher(self, seeds, device: str = "cpu"):
        """A ``_seedlm_search.Searcher`` over ``seeds`` with this device's tile sizes."""
        from edgebuild.compress import _seedlm_search as search

        cfg = self.config
        block_chunk, seed_chunk = TILES[device]
        bank = search.make_bank(seeds, cfg.block_size, cfg.latent_dim, cfg.lfsr_bits,
                                min(seed_chunk, _pow2_at_least(len(seeds))), device)
        return search.Searcher(bank, cfg.kernel, block_chunk)

    def candidate_seeds(self, device: str = "cpu", rng_seed: int = 0) -> np.ndarray:
        """The seeds searched: all on CUDA (unless disabled), else a fixed subset of ``seed_budget``."""
        cfg = self.config
        every = np.arange(1, cfg.seed_count + 1, dtype=np.int64)
        if (device == "cuda" and cfg.full_search_on_gpu) or cfg.budget == cfg.seed_count:
            return every
        rng = np.random.default_rng(rng_seed)
        return np.sort(rng.choice(every, size=cfg.budget, replace=False))

    def compress_tensor(self, name: str, weight, searcher, progress=None):
        """Search and pack one 2-D tensor with a ``_seedlm_search.Searcher``.

        Returns ``(Record, float32 reconstruction as a torch tensor)``; the reconstruction uses the
        decoder's arithmetic, so it equals ``codecs.decode(record)`` exactly."""
        from edgebuild.compress._seedlm_search import reconstruct

        cfg = self.config
        blocks = _blocks(weight, cfg.block_size)
        exp_min, exp_max = exponent_window(blocks)
        found = searcher.search(blocks, exp_min, exp_max, progress.rows if progress else None)
        if progress is not None:
            progress.done_tensor(blocks.shape[0])
        index, exps, mants = found.index.cpu(), found.exponent.cpu(), found.mantissa.cpu()
        packed = codec.pack_fields(searcher.bank.seeds[index.numpy()], exps.numpy() - exp_min,
                                   mants.numpy(), cfg.lfsr_bits)
        params = {"block_size": cfg.block_size, "latent_dim": cfg.latent_dim,
                  "lfsr_bits": cfg.lfsr_bits, "taps": list(codec.taps_for(cfg.lfsr_bits)),
                  "exp_min": exp_min, "exp_bits": codec.EXP_BITS, "coef_bits": codec.COEF_BITS,
                  "num_blocks": int(blocks.shape[0])}
        record = Record(name, tuple(weight.shape), self.name, params, {"packed": packed})
        flat = reconstruct(searcher.bank.basis[index], exps, mants).reshape(-1)
        return record, flat[: weight.numel()].reshape(weight.shape)


def _as_matrix(name, w):
    import torch

    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        shape = tuple(w.shape) if hasattr(w, "shape") else type(w).__name__
        raise ModelError(f"seedlm compresses 2-D float weights only; {name!r} is {shape}: "
                         f"leave it out of the compressed selection")
    w = w.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise ModelError(f"weight {name!r} holds NaN or infinite values; check the source model")
    return w


def _blocks(weight, block_size):
    """Row-major blocks ``(N, C)``, the last one zero padded."""
    import torch

    flat = weight.reshape(-1)
    pad = (-flat.numel()) % block_size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.reshape(-1, block_size)


def exponent_window(blocks) -> tuple:
    """``(exp_min, exp_max)`` of a tensor's blocks: 16 exponents topped by e(max block norm) + 1."""
    peak = float(blocks.norm(dim=1).max()) if blocks.numel() else 0.0
    exp_max = min(max(_exponent_of(peak) + 1, -EXP_LIMIT + 15), EXP_LIMIT)
    return exp_max - ((1 << codec.EXP_BITS) - 1), exp_max


def _exponent_of(x: float) -> int:
    """Smallest integer ``e`` with ``x < 7.5 * 2**e`` (very negative for 0)."""
    return math.frexp(x / 7.5)[1] if x > 0 else -EXP_LIMIT


def _pow2_at_least(n: int) -> int:
    return 1 << max(4, (n - 1).bit_length())


class _Progress:
    """Reports ``(done, total)`` in tensors, as a fraction of blocks searched, at most twice a second."""

    def __init__(self, ctx, tensors, blocks):
        self.ctx, self.tensors, self.blocks = ctx, tensors, max(blocks, 1)
        self.base = self.finished = 0
        self.last = 0.0
        self.started = time.perf_counter()

    def rows(self, done):
        now = time.perf_counter()
        if now - self.last >= 0.5:
            self.last = now
            self.ctx.progress(self.tensors * (self.base + done) / self.blocks, self.tensors)

    def done_tensor(self, n):
        self.base, self.finished = self.base + n, self.finished + 1
        done = self.finished if self.finished == self.tensors else self.tensors * self.base / self.blocks
        self.ctx.progress(done, self.tensors)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


class _Stats:
    """Error and size totals over the compressed tensors."""

    def __init__(self):
        self.err = self.ref = 0.0
        self.bits = self.numel = self.blocks = 0

    def add(self, w, recon, record):
        self.err += float(((w - recon) ** 2).sum())
        self.ref += float((w ** 2).sum())
        self.bits += 8 * record.nbytes
        self.numel += w.numel()
        self.blocks += record.params["num_blocks"]

    def summary(self, cfg, n_seeds, device, kernel, counter):
        pairs = self.blocks * n_seeds
        return {"seeds_searched": n_seeds, "of": cfg.seed_count, "device": device, "kernel": kernel,
                "config": {"block_size": cfg.block_size, "latent_dim": cfg.latent_dim,
                           "lfsr_bits": cfg.lfsr_bits},
                "blocks": self.blocks, "block_seed_pairs": pairs,
                "seconds": round(counter.seconds, 3),
                "pairs_per_second": round(pairs / max(counter.seconds, 1e-9)),
                "bits_per_weight": self.bits / max(self.numel, 1),
                "relative_error": math.sqrt(self.err / self.ref) if self.ref else 0.0}
