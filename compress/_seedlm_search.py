"""The SeedLM seed search as batched torch matrix work (CPU or CUDA).

For every candidate seed ``s`` the bank holds ``pinv(U_s)`` (projection ``t = pinv(U_s) w``), ``-2 U_s``
(giving ``-2 U_s^T w``) and the Gram matrix ``G_s = U_s^T U_s``. For a chunk of blocks one matmul gives
both projections for a chunk of seeds; the coefficients are quantised (shared exponent ``e``, 4-bit
mantissas ``m``) and the error after quantisation follows without building the blocks:

    ||w - 2^e U m||^2 = ||w||^2 + 2^e (2^e m^T G m - 2 m . U^T w)

The constant ``||w||^2`` is dropped; the lowest value over all candidate seeds wins (first on ties).

Exponent rule: ``e`` is the smallest integer with ``max|t| < 7.5 * 2**e`` (read from the float32 bits
of ``max|t| / 7.5``), clamped to ``[exp_lo, exp_hi]``; ``m = clip(round(t / 2**e), -8, 7)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from edgebuild.device_agent.codecs import seedlm as codec

MANT_MIN = -(1 << (codec.COEF_BITS - 1))
MANT_MAX = (1 << (codec.COEF_BITS - 1)) - 1
_INV_RANGE = 1.0 / (MANT_MAX + 0.5)
_F32_BIAS = 126          # float32 exponent bits of x in [2**(k-1), 2**k) equal k + 126


@dataclass
class SeedBank:
    """Precomputed per-seed matrices, in chunks of seeds."""

    seeds: np.ndarray              # (S,) candidate seeds, int64
    basis: torch.Tensor            # (S, C, P) float32 normalised bases (same values as the decoder's)
    mats: list                     # per seed chunk: (C, 2*P*Sc) float32 [pinv | -2 U], p-major columns
    grams: list                    # per seed chunk: {(p, q): (Sc,) float32}, off-diagonals doubled
    starts: list                   # first seed index of each chunk


@dataclass
class SearchResult:
    """The winning seed (index into the bank), exponent and mantissas of each block."""

    index: torch.Tensor            # (N,) int64
    exponent: torch.Tensor         # (N,) int32, in [exp_lo, exp_hi]
    mantissa: torch.Tensor         # (N, P) int8
    score: torch.Tensor            # (N,) float32: squared error minus ||w||^2


def make_bank(seeds, block_size: int, latent_dim: int, bits: int, seed_chunk: int,
              device: str = "cpu") -> SeedBank:
    """Precompute the search matrices of ``seeds`` (pseudo-inverses from float64)."""
    seeds = np.asarray(seeds, dtype=np.int64)
    basis = torch.from_numpy(codec.bases(seeds, block_size, latent_dim, bits))
    wide = basis.double()
    pinv = torch.linalg.pinv(wide)                    # (S, P, C)
    gram = wide.transpose(1, 2) @ wide                # (S, P, P)
    mats, grams, starts = [], [], []
    for lo in range(0, len(seeds), seed_chunk):
        hi = min(len(seeds), lo + seed_chunk)
        proj = pinv[lo:hi].permute(2, 1, 0).reshape(block_size, -1)
        back = (-2.0 * wide[lo:hi]).permute(1, 2, 0).reshape(block_size, -1)
        mats.append(torch.cat([proj, back], 1).float().contiguous().to(device))
        grams.append(_gram_terms(gram[lo:hi], latent_dim, device))
        starts.append(lo)
    return SeedBank(seeds, basis, mats, grams, starts)


def _gram_terms(gram, latent_dim, device):
    terms = {}
    for p in range(latent_dim):
        for q in range(p, latent_dim):
            factor = 1.0 if p == q else 2.0
            terms[p, q] = (factor * gram[:, p, q]).float().contiguous().to(device)
    return terms


def _exponent_bits(t_slices, exp_lo, exp_hi):
    """Biased float32 exponent bits of ``max|t| / 7.5``, clamped: ``e = bits - 126``."""
    peak = t_slices[0].abs()
    for t in t_slices[1:]:
        peak = torch.maximum(peak, t.abs())
    peak.mul_(_INV_RANGE)
    ebits = peak.view(torch.int32) >> 23
    return ebits.clamp_(exp_lo + _F32_BIAS, exp_hi + _F32_BIAS)


def _pow2(ebits, sign):
    """``2**e`` (sign=+1) or ``2**-e`` (sign=-1) as float32, built from the exponent bits."""
    raw = (ebits + 1) if sign > 0 else (2 * _F32_BIAS + 1 - ebits)
    return (raw << 23).view(torch.float32)


def _chunk_scores(blocks, mat, grams, exp_lo, exp_hi):
    """Scores ``(N, Sc)``, exponent bits ``(N, Sc)`` and mantissas ``[P x (N, Sc)]`` of one chunk."""
    n = blocks.shape[0]
    latent = len([k for k in grams if k[0] == k[1]])
    cols = mat.shape[1] // (2 * latent)
    x = (blocks @ mat).view(n, 2, latent, cols)
    t, back = x[:, 0].unbind(1), x[:, 1].unbind(1)
    ebits = _exponent_bits(t, exp_lo, exp_hi)
    scale = _pow2(ebits, -1)
    mant = [(tp * scale).round_().clamp_(MANT_MIN, MANT_MAX) for tp in t]
    quad = None
    for p in range(latent):
        row = mant[p] * grams[p, p]
        for q in range(p + 1, latent):
            row.addcmul_(mant[q], grams[p, q])
        quad = row.mul_(mant[p]) if quad is None else quad.addcmul_(row, mant[p])
    two_e = _pow2(ebits, 1)
    quad.mul_(two_e)
    for p in range(latent):
        quad.addcmul_(mant[p], back[p])
    return quad.mul_(two_e), ebits, mant


def search(blocks: torch.Tensor, bank: SeedBank, exp_lo: int, exp_hi: int,
           block_chunk: int = 1024) -> SearchResult:
    """Best candidate seed of each row of ``blocks`` (N, C), error measured after quantisation."""
    parts = [_search_rows(blocks[lo:lo + block_chunk], bank, exp_lo, exp_hi)
             for lo in range(0, blocks.shape[0], block_chunk)]
    return SearchResult(*(torch.cat(list(col)) for col in zip(*(
        (r.index, r.exponent, r.mantissa, r.score) for r in parts))))


def _search_rows(rows, bank, exp_lo, exp_hi):
    n, dev = rows.shape[0], rows.device
    latent = bank.basis.shape[2]
    best = torch.full((n,), float("inf"), device=dev)
    index = torch.zeros(n, dtype=torch.int64, device=dev)
    ebest = torch.zeros(n, dtype=torch.int32, device=dev)
    mbest = torch.zeros(n, latent, dtype=torch.float32, device=dev)
    for start, mat, grams in zip(bank.starts, bank.mats, bank.grams):
        score, ebits, mant = _chunk_scores(rows, mat, grams, exp_lo, exp_hi)
        low, arg = score.min(1)
        better = low < best
        pick = arg.unsqueeze(1)
        best = torch.where(better, low, best)
        index = torch.where(better, arg + start, index)
        ebest = torch.where(better, ebits.gather(1, pick).squeeze(1) - _F32_BIAS, ebest)
        chosen = torch.stack([m.gather(1, pick).squeeze(1) for m in mant], 1)
        mbest = torch.where(better.unsqueeze(1), chosen, mbest)
    return SearchResult(index, ebest, mbest.to(torch.int8), best)


def reconstruct(basis: torch.Tensor, exponent: torch.Tensor, mantissa: torch.Tensor) -> torch.Tensor:
    """Blocks ``(N, C)`` float32, with the decoder's arithmetic (products summed over p in order)."""
    coef = torch.ldexp(mantissa.float(), exponent.to(torch.int32).unsqueeze(1))
    out = basis[:, :, 0] * coef[:, None, 0]
    for p in range(1, basis.shape[2]):
        out = out + basis[:, :, p] * coef[:, None, p]
    return out
