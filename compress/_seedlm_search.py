"""The SeedLM seed search: for each block, the candidate seed with the lowest error after quantisation.

For a seed ``s`` with basis ``U = Q R`` (thin QR, float64, stored as float32) and block ``w``:

    y  = Q^T w                      (the bank stores -2 Q, so the projection gives y' = -2 y)
    t  = R^-1 y                     (least-squares coefficients, by back substitution)
    e  = smallest integer with max|t| < 7.5 * 2**e, clamped to [exp_lo, exp_hi]
    m  = clip(round(t / 2**e), -8, 7)
    z  = 2**e R m
    ||w - 2**e U m||^2 = ||w||^2 - ||y||^2 + ||y - z||^2 = ||w||^2 + sum_p z_p (z_p + y'_p)

because ``w - Q y`` is orthogonal to ``Q``. The constant ``||w||^2`` is dropped: the lowest score wins
(the first seed on ties). The rounding error of this form grows like ``2**e``, so it stays accurate for
ill-conditioned bases with large coefficients (the Gram form ``4**e m^T G m`` does not). A diagonal
entry of ``R`` below ``1e-6`` of the largest marks a rank-deficient basis: that coefficient is 0.

``e`` is read from the float32 exponent bits of ``max|t| / 7.5``; ``2**e`` and ``2**-e`` are built from
bits too, so every step is elementwise and the whole tile fuses into one kernel under ``torch.compile``
(C++ on CPU, Triton on CUDA). Without compilation, on CPU, the projection is one matmul per chunk.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import torch

from edgebuild.core.errors import ConfigError
from edgebuild.device_agent.codecs import seedlm as codec

log = logging.getLogger(__name__)

MANT_MIN = -(1 << (codec.COEF_BITS - 1))
MANT_MAX = (1 << (codec.COEF_BITS - 1)) - 1
_INV_RANGE = 1.0 / (MANT_MAX + 0.5)
_F32_BIAS = 126          # float32 exponent bits of x in [2**(k-1), 2**k) equal k + 126
_RANK_TOL = 1e-6
MAX_CALL_GROUPS = 32     # seed groups per kernel call: bounds the memory of any one call


@dataclass
class SeedBank:
    """Per-seed search terms, padded to ``groups * seed_chunk`` seeds with copies of the first."""

    seeds: np.ndarray       # (S,) candidate seeds, int64
    basis: torch.Tensor     # (S, C, P) float32 normalised bases (the decoder's values)
    proj: torch.Tensor      # (G, C, P, Sc) float32: -2 Q
    tri: torch.Tensor       # (G, T, Sc): R's upper triangle, row-major
    solve: torch.Tensor     # (G, T, Sc): back substitution terms (see _solve_terms)

    @property
    def latent_dim(self) -> int:
        return self.proj.shape[2]


@dataclass
class SearchResult:
    """The winning seed (index into the bank), exponent and mantissas of each block."""

    index: torch.Tensor     # (N,) int64
    exponent: torch.Tensor  # (N,) int32, in [exp_lo, exp_hi]
    mantissa: torch.Tensor  # (N, P) int8
    score: torch.Tensor     # (N,) float32: squared error minus ||w||^2


def make_bank(seeds, block_size: int, latent_dim: int, bits: int, seed_chunk: int,
              device: str = "cpu") -> SeedBank:
    """Precompute the search terms of ``seeds`` in chunks of ``seed_chunk``."""
    seeds = np.asarray(seeds, dtype=np.int64)
    basis = torch.from_numpy(codec.bases(seeds, block_size, latent_dim, bits))
    groups = -(-len(seeds) // seed_chunk)
    groups = group_step(groups) * -(-groups // group_step(groups))
    padded = torch.cat([basis, basis[:1].expand(groups * seed_chunk - len(seeds), -1, -1)])
    q, r = torch.linalg.qr(padded.double())
    shape = (groups, seed_chunk)
    proj = (-2.0 * q).permute(1, 2, 0).reshape(block_size, latent_dim, *shape).permute(2, 0, 1, 3)
    rows, cols = _upper(latent_dim)
    tri = r[:, rows, cols].T.reshape(-1, *shape).transpose(0, 1)
    solve = _solve_terms(r)[:, rows, cols].T.reshape(-1, *shape).transpose(0, 1)
    return SeedBank(seeds, basis, *(x.float().contiguous().to(device) for x in (proj, tri, solve)))


def _upper(latent_dim):
    pairs = [(p, q) for p in range(latent_dim) for q in range(p, latent_dim)]
    return [p for p, _ in pairs], [q for _, q in pairs]


def _solve_terms(r):
    """``t_p = y'_p a_p + sum_{q>p} t_q b_pq`` with ``a_p = -1/(2 R_pp)``, ``b_pq = -R_pq/R_pp``."""
    diag = torch.diagonal(r, dim1=1, dim2=2)
    scale = diag.abs().amax(1, keepdim=True)
    inv = torch.where(diag.abs() > _RANK_TOL * scale, 1.0 / diag, torch.zeros_like(diag))
    terms = -r * inv.unsqueeze(2)
    eye = torch.eye(r.shape[1], dtype=torch.bool)
    return torch.where(eye, (-0.5 * inv).unsqueeze(2).expand_as(r), terms)


def _term_index(latent_dim):
    rows, cols = _upper(latent_dim)
    return {(p, q): k for k, (p, q) in enumerate(zip(rows, cols))}


def _project(w_cols, q_cols):
    """``y'_p = sum_c w_c q_cp``, summed in order of ``c``."""
    out = []
    for p in range(len(q_cols[0])):
        acc = w_cols[0] * q_cols[0][p]
        for c in range(1, len(w_cols)):
            acc = acc + w_cols[c] * q_cols[c][p]
        out.append(acc)
    return out


def _coefficients(y, solve, index):
    t = [None] * len(y)
    for p in reversed(range(len(y))):
        acc = y[p] * solve(index[p, p])
        for q in range(p + 1, len(y)):
            acc.addcmul_(t[q], solve(index[p, q]))
        t[p] = acc
    return t


def _quantise(t, lo_bits, hi_bits):
    """Exponent bits (``e + 126``, clamped) and float mantissas."""
    peak = t[0].abs()
    for tp in t[1:]:
        peak = torch.maximum(peak, tp.abs(), out=peak)
    ebits = (peak.mul_(_INV_RANGE).view(torch.int32) >> 23).clamp_(lo_bits, hi_bits)
    scale = ((2 * _F32_BIAS + 1 - ebits) << 23).view(torch.float32)
    return ebits, [(tp * scale).round_().clamp_(MANT_MIN, MANT_MAX) for tp in t]


def _score(y, ebits, mant, tri, index):
    two_e = ((ebits + 1) << 23).view(torch.float32)
    score = None
    for p in range(len(y)):
        z = mant[p] * tri(index[p, p])
        for q in range(p + 1, len(y)):
            z.addcmul_(mant[q], tri(index[p, q]))
        z.mul_(two_e)
        term = (z + y[p]).mul_(z)
        score = term if score is None else score.add_(term)
    return score


def tile_best(rows, proj, tri, solve, lo_bits, hi_bits, matmul: bool = False):
    """Best seed of each row of ``rows`` (N, C) over a tile of ``G x Sc`` seeds: ``(score, column)``."""
    groups, size, latent, chunk = proj.shape
    index = _term_index(latent)
    if matmul:
        y = list((rows @ proj.reshape(size, -1)).view(1, -1, latent, chunk).unbind(2))
    else:
        w_cols = [rows[None, :, c, None] for c in range(size)]
        y = _project(w_cols, [[proj[:, None, c, p, :] for p in range(latent)] for c in range(size)])
    ebits, mant = _quantise(_coefficients(y, lambda k: solve[:, None, k, :], index), lo_bits, hi_bits)
    low, col = _score(y, ebits, mant, lambda k: tri[:, None, k, :], index).min(2)
    best, group = low.min(0)
    return best, col.gather(0, group.unsqueeze(0)).squeeze(0) + group * chunk


def finish(rows, index, bank: SeedBank, lo_bits, hi_bits) -> SearchResult:
    """Exponents, mantissas and scores of the chosen seeds, with the tile kernel's arithmetic."""
    size, latent = rows.shape[1], bank.latent_dim
    pick = lambda a: a.transpose(0, 1).reshape(a.shape[1], -1)[:, index]  # noqa: E731
    proj = bank.proj.permute(1, 2, 0, 3).reshape(size, latent, -1)[:, :, index]
    tri, solve, terms = pick(bank.tri), pick(bank.solve), _term_index(latent)
    y = _project([rows[:, c] for c in range(size)], [[proj[c, p] for p in range(latent)]
                                                      for c in range(size)])
    ebits, mant = _quantise(_coefficients(y, lambda k: solve[k], terms), lo_bits, hi_bits)
    score = _score(y, ebits, mant, lambda k: tri[k], terms)
    mant = torch.stack(mant, 1).to(torch.int8)
    return SearchResult(index, (ebits - _F32_BIAS).to(torch.int32), mant, score)


def group_step(groups: int) -> int:
    """Seed groups per kernel call: at most ``MAX_CALL_GROUPS``, splitting ``groups`` evenly."""
    calls = -(-groups // MAX_CALL_GROUPS)
    return -(-groups // calls)


@functools.lru_cache(maxsize=None)
def compiled_tile():
    """``tile_best`` under ``torch.compile`` (built on first use, cached per shape by torch)."""
    return torch.compile(tile_best, dynamic=False)


def fused_available(device) -> bool:
    """Whether the fused Triton kernel (``_seedlm_triton``) can run on ``device``: CUDA + Triton."""
    if torch.device(device).type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


FUSED_ROWS = 1 << 20      # blocks per fused kernel call: enough programs to fill a large GPU
FUSED_MAX_LATENT = 4


class Searcher:
    """Runs the search over blocks: the fused Triton kernel on CUDA ("fused"); on a CPU the exact
    pruned search ("pruned", ``_seedlm_pruned``); else the tile kernel compiled when possible
    ("compiled"), eager otherwise ("eager")."""

    def __init__(self, bank: SeedBank, kernel: str = "auto", block_chunk: int = 256):
        self.bank, self.kernel, self.block_chunk = bank, kernel, block_chunk
        self.fused = self.pruned = None
        usable = fused_available(bank.proj.device) and bank.latent_dim <= FUSED_MAX_LATENT
        if kernel == "fused" and not usable:
            raise ConfigError("seedlm kernel 'fused' needs CUDA, Triton and latent_dim <= "
                              f"{FUSED_MAX_LATENT}; set kernel = 'auto'")
        on_cpu = bank.proj.device.type == "cpu"
        if kernel == "pruned" and not on_cpu:
            raise ConfigError("seedlm kernel 'pruned' runs on a CPU; set kernel = 'auto'")
        if kernel in ("auto", "fused") and usable:
            from edgebuild.compress import _seedlm_triton

            self.fused, self.kernel = _seedlm_triton.FusedTerms(bank), "fused"
            self.block_chunk = FUSED_ROWS
        elif kernel in ("auto", "pruned") and on_cpu:
            from edgebuild.compress import _seedlm_pruned

            self.pruned, self.kernel = _seedlm_pruned.make_tables(bank), "pruned"

    def search(self, blocks: torch.Tensor, exp_lo: int, exp_hi: int, progress=None) -> SearchResult:
        """Best candidate seed of each row of ``blocks`` (N, C); ``progress(rows_done)`` per chunk."""
        dev = self.bank.proj.device
        lo = torch.tensor(exp_lo + _F32_BIAS, dtype=torch.int32, device=dev)
        hi = torch.tensor(exp_hi + _F32_BIAS, dtype=torch.int32, device=dev)
        blocks = blocks.to(dev, torch.float32)
        if self.pruned is not None:
            from edgebuild.compress._seedlm_pruned import best_seeds

            return finish(blocks, best_seeds(blocks, self.pruned, lo, hi, progress), self.bank, lo, hi)
        index = torch.empty(blocks.shape[0], dtype=torch.int64, device=dev)
        for start in range(0, blocks.shape[0], self.block_chunk):
            rows = blocks[start:start + self.block_chunk]
            index[start:start + rows.shape[0]] = self._rows(rows, lo, hi)
            if progress is not None:
                progress(start + rows.shape[0])
        return finish(blocks, index, self.bank, lo, hi)

    def _rows(self, rows, lo, hi):
        if self.fused is not None:
            from edgebuild.compress._seedlm_triton import best_seeds

            index = best_seeds(rows, self.fused, int(lo), int(hi))
            return torch.where(index < len(self.bank.seeds), index, 0)
        if self.kernel != "eager":
            try:
                return self._sweep(rows, lo, hi, compiled=True)
            except Exception as err:  # noqa: BLE001 - any compiler failure falls back to eager
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                if self.kernel == "compiled":
                    raise ConfigError(f"seedlm kernel 'compiled' failed ({reason}); "
                                      "set kernel = 'auto' or 'eager'") from err
                log.warning("compiled seed search unavailable (%s); using the eager kernel", reason)
                self.kernel = "eager"
        return self._sweep(rows, lo, hi, compiled=False)

    def _sweep(self, rows, lo, hi, compiled):
        """Lowest-scoring seed column of each row over all seed groups, a few groups per call."""
        b, n = self.bank, rows.shape[0]
        if compiled:
            kernel, step, extra = compiled_tile(), group_step(b.proj.shape[0]), {}
            if n < self.block_chunk:       # one static shape per bank: pad the last chunk
                rows = torch.cat([rows, rows.new_zeros(self.block_chunk - n, rows.shape[1])])
        else:                              # matmul only on CPU: CUDA could round it to TF32
            kernel, step, extra = tile_best, 1, {"matmul": rows.device.type == "cpu"}
        best = index = None
        for g in range(0, b.proj.shape[0], step):
            tile = (b.proj[g:g + step], b.tri[g:g + step], b.solve[g:g + step])
            low, col = kernel(rows, *tile, lo, hi, **extra)
            col = col + g * b.proj.shape[3]
            if best is None:
                best, index = low, col
            else:
                better = low < best
                best, index = torch.where(better, low, best), torch.where(better, col, index)
        if compiled and self.kernel == "auto":
            self.kernel = "compiled"
        return torch.where(index < len(b.seeds), index, 0)[:n]    # padding copies seed 0


def reconstruct(basis: torch.Tensor, exponent: torch.Tensor, mantissa: torch.Tensor) -> torch.Tensor:
    """Blocks ``(N, C)`` float32 with the decoder's arithmetic (products summed over p in order)."""
    two_e = ((exponent.to(torch.int32) + _F32_BIAS + 1) << 23).view(torch.float32)
    coef = mantissa.float() * two_e.unsqueeze(1)
    out = basis[:, :, 0] * coef[:, None, 0]
    for p in range(1, basis.shape[2]):
        out = out + basis[:, :, p] * coef[:, None, p]
    return out
