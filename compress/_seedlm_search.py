"""The SeedLM seed search as batched torch matrix work (CPU or CUDA).

For every candidate seed ``s`` with basis ``U_s = Q_s R_s`` (thin QR) the bank holds ``pinv(U_s)``,
``-2 Q_s`` and ``R_s``. For a chunk of blocks one matmul gives, for a chunk of seeds, the least-squares
coefficients ``t = pinv(U_s) w`` and ``-2 y`` with ``y = Q_s^T w``. The coefficients are quantised
(shared exponent ``e``, 4-bit mantissas ``m``) and the error after quantisation follows without building
the blocks, since ``w - Q y`` is orthogonal to ``Q``:

    ||w - 2^e U m||^2 = ||w||^2 - ||y||^2 + ||y - z||^2 = ||w||^2 + sum_p z_p (z_p - 2 y_p),
    z = 2^e R m

The constant ``||w||^2`` is dropped; the lowest score over all candidate seeds wins (first on ties).
Unlike the Gram form ``4^e m^T G m - 2^e ...``, this keeps float32 accurate for ill-conditioned bases
with large coefficients: the rounding error grows like ``2^e``, not ``4^e``.

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
    mats: list                     # per seed chunk: (C, 2*P*Sc) float32 [pinv | -2 Q], p-major columns
    tris: list                     # per seed chunk: {(p, q): (Sc,) float32}, R's upper triangle
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
    """Precompute the search matrices of ``seeds`` (from float64 factorisations)."""
    seeds = np.asarray(seeds, dtype=np.int64)
    basis = torch.from_numpy(codec.bases(seeds, block_size, latent_dim, bits))
    wide = basis.double()
    pinv = torch.linalg.pinv(wide)                    # (S, P, C)
    q, r = torch.linalg.qr(wide)                      # (S, C, P), (S, P, P)
    mats, tris, starts = [], [], []
    for lo in range(0, len(seeds), seed_chunk):
        hi = min(len(seeds), lo + seed_chunk)
        proj = pinv[lo:hi].permute(2, 1, 0).reshape(block_size, -1)
        back = (-2.0 * q[lo:hi]).permute(1, 2, 0).reshape(block_size, -1)
        mats.append(torch.cat([proj, back], 1).float().contiguous().to(device))
        tris.append(_triangle(r[lo:hi], latent_dim, device))
        starts.append(lo)
    return SeedBank(seeds, basis, mats, tris, starts)


def _triangle(r, latent_dim, device):
    """``{(p, q): (Sc,) float32}`` for the upper triangle ``q >= p`` of ``R``."""
    return {(p, q): r[:, p, q].float().contiguous().to(device)
            for p in range(latent_dim) for q in range(p, latent_dim)}


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


def _chunk_scores(blocks, mat, tri, exp_lo, exp_hi):
    """Scores ``(N, Sc)``, exponent bits ``(N, Sc)`` and mantissas ``[P x (N, Sc)]`` of one chunk."""
    n = blocks.shape[0]
    latent = len([k for k in tri if k[0] == k[1]])
    x = (blocks @ mat).view(n, 2, latent, -1)
    t, back = x[:, 0].unbind(1), x[:, 1].unbind(1)
    ebits = _exponent_bits(t, exp_lo, exp_hi)
    scale = _pow2(ebits, -1)
    mant = [(tp * scale).round_().clamp_(MANT_MIN, MANT_MAX) for tp in t]
    two_e = _pow2(ebits, 1)
    score = None
    for p in range(latent):
        z = mant[p] * tri[p, p]
        for q in range(p + 1, latent):
            z.addcmul_(mant[q], tri[p, q])
        z.mul_(two_e)
        term = (z + back[p]).mul_(z)
        score = term if score is None else score.add_(term)
    return score, ebits, mant


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
    for start, mat, tri in zip(bank.starts, bank.mats, bank.tris):
        score, ebits, mant = _chunk_scores(rows, mat, tri, exp_lo, exp_hi)
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
    coef = mantissa.float() * _pow2(exponent.to(torch.int32).unsqueeze(1) + _F32_BIAS, 1)
    out = basis[:, :, 0] * coef[:, None, 0]
    for p in range(1, basis.shape[2]):
        out = out + basis[:, :, p] * coef[:, None, p]
    return out
