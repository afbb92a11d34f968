"""The SeedLM seed search as one fused Triton kernel (CUDA; also runs in Triton's interpreter).

It computes what ``_seedlm_search.tile_best`` computes (same terms, same arithmetic: projection
``y' = -2 Q^T w``, back substitution, exponent from the float32 bits of ``max|t| / 7.5``, mantissas
rounded half to even and clipped, score ``sum_p z_p (z_p + y'_p)``) but never writes a per-pair
value to memory: each program holds ``BLOCK_N`` blocks, streams the seed terms in tiles of
``BLOCK_S`` seeds (read once per program, shared by its blocks through the cache) and keeps a
running minimum per block. The work is ``N x S`` block-seed pairs of about 60 float operations.

Latent dimensions up to ``MAX_LATENT`` (4) are supported: the paper's configurations use 3 and 4.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_LATENT = 4
BLOCK_S, BLOCK_N, NUM_WARPS = 32, 32, 4      # tile (seeds, blocks, warps): fastest of 15 on an H200


@triton.jit
def _coef(y, t1, t2, t3, solve_ptr, k_pp, k1, k2, k3, s_off, P: tl.constexpr, p: tl.constexpr):
    """``t_p = y'_p a_p + sum_{q>p} t_q b_pq`` (terms at ``solve[k, s]``)."""
    acc = y * tl.load(solve_ptr + k_pp + s_off)[None, :]
    if p + 1 < P:
        acc += t1 * tl.load(solve_ptr + k1 + s_off)[None, :]
    if p + 2 < P:
        acc += t2 * tl.load(solve_ptr + k2 + s_off)[None, :]
    if p + 3 < P:
        acc += t3 * tl.load(solve_ptr + k3 + s_off)[None, :]
    return acc

@triton.jit
def _mant(t, scale):
    m = t * scale
    m = (m + 12582912.0) - 12582912.0
    return tl.minimum(tl.maximum(m, -8.0), 7.0)

@triton.jit
def _z(m0, m1, m2, m3, tri_ptr, k0, k1, k2, k3, s_off, two_e, P: tl.constexpr, p: tl.constexpr):
    """``z_p = 2**e sum_{q>=p} m_q R_pq`` (terms at ``tri[k, s]``)."""
    z = m0 * tl.load(tri_ptr + k0 + s_off)[None, :]
    if p + 1 < P:
        z += m1 * tl.load(tri_ptr + k1 + s_off)[None, :]
    if p + 2 < P:
        z += m2 * tl.load(tri_ptr + k2 + s_off)[None, :]
    if p + 3 < P:
        z += m3 * tl.load(tri_ptr + k3 + s_off)[None, :]
    return z * two_e

@triton.jit
def _project(w_ptr, rows, row_ok, proj_ptr, s_off, n_seeds, C: tl.constexpr, P: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """``y'_p = sum_c w_c (-2 Q)_cp`` for p < P (the others stay 0), as ``(BLOCK_N, BLOCK_S)`` tiles."""
    y0 = tl.zeros((BLOCK_N, BLOCK_S), tl.float32)
    y1 = tl.zeros((BLOCK_N, BLOCK_S), tl.float32)
    y2 = tl.zeros((BLOCK_N, BLOCK_S), tl.float32)
    y3 = tl.zeros((BLOCK_N, BLOCK_S), tl.float32)
    for c in tl.static_range(C):
        w = tl.load(w_ptr + rows * C + c, mask=row_ok, other=0.0)[:, None]
        y0 += w * tl.load(proj_ptr + (c * P) * n_seeds + s_off)[None, :]
        if P > 1:
            y1 += w * tl.load(proj_ptr + (c * P + 1) * n_seeds + s_off)[None, :]
        if P > 2:
            y2 += w * tl.load(proj_ptr + (c * P + 2) * n_seeds + s_off)[None, :]
        if P > 3:
            y3 += w * tl.load(proj_ptr + (c * P + 3) * n_seeds + s_off)[None, :]
    return y0, y1, y2, y3


@triton.jit
def search_kernel(w_ptr, proj_ptr, tri_ptr, solve_ptr, best_ptr, index_ptr,
                  n_rows, n_seeds, lo_bits, hi_bits,
                  C: tl.constexpr, P: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    T: tl.constexpr = P * (P + 1) // 2
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    best = tl.full((BLOCK_N,), float("inf"), tl.float32)
    index = tl.zeros((BLOCK_N,), tl.int32)
    cols = tl.arange(0, BLOCK_S)
    # offsets of R's upper-triangle terms, row-major: k(p, q) = p*P - p*(p-1)/2 + q - p
    for start in range(0, n_seeds, BLOCK_S):
        s_off = start + cols
        y0, y1, y2, y3 = _project(w_ptr, rows, row_ok, proj_ptr, s_off, n_seeds, C, P, BLOCK_N, BLOCK_S)
        zero = tl.zeros((BLOCK_N, BLOCK_S), tl.float32)
        # back substitution, p = P-1 .. 0; k(p, q) for P <= 4 written out
        t3 = zero
        t2 = zero
        t1 = zero
        if P > 3:
            t3 = _coef(y3, zero, zero, zero, solve_ptr, (3 * P - 3) * n_seeds, 0, 0, 0, s_off, P, 3)
        if P > 2:
            t2 = _coef(y2, t3, zero, zero, solve_ptr, (2 * P - 1) * n_seeds,
                       (2 * P) * n_seeds, 0, 0, s_off, P, 2)
        if P > 1:
            t1 = _coef(y1, t2, t3, zero, solve_ptr, P * n_seeds, (P + 1) * n_seeds,
                       (P + 2) * n_seeds, 0, s_off, P, 1)
        t0 = _coef(y0, t1, t2, t3, solve_ptr, 0, n_seeds, 2 * n_seeds, 3 * n_seeds, s_off, P, 0)
        peak = tl.maximum(tl.maximum(tl.abs(t0), tl.abs(t1)), tl.maximum(tl.abs(t2), tl.abs(t3)))
        ebits = (peak * (1.0 / 7.5)).to(tl.int32, bitcast=True) >> 23
        ebits = tl.minimum(tl.maximum(ebits, lo_bits), hi_bits)
        scale = ((253 - ebits) << 23).to(tl.float32, bitcast=True)
        two_e = ((ebits + 1) << 23).to(tl.float32, bitcast=True)
        m0 = _mant(t0, scale)
        m1 = _mant(t1, scale)
        m2 = _mant(t2, scale)
        m3 = _mant(t3, scale)
        z = _z(m0, m1, m2, m3, tri_ptr, 0, n_seeds, 2 * n_seeds, 3 * n_seeds, s_off, two_e, P, 0)
        score = (z + y0) * z
        if P > 1:
            z = _z(m1, m2, m3, zero, tri_ptr, P * n_seeds, (P + 1) * n_seeds, (P + 2) * n_seeds,
                   0, s_off, two_e, P, 1)
            score += (z + y1) * z
        if P > 2:
            z = _z(m2, m3, zero, zero, tri_ptr, (2 * P - 1) * n_seeds, (2 * P) * n_seeds, 0, 0,
                   s_off, two_e, P, 2)
            score += (z + y2) * z
        if P > 3:
            z = _z(m3, zero, zero, zero, tri_ptr, (3 * P - 3) * n_seeds, 0, 0, 0, s_off, two_e, P, 3)
            score += (z + y3) * z
        low = tl.min(score, axis=1)
        arg = tl.argmin(score, axis=1).to(tl.int32) + start
        better = low < best
        best = tl.where(better, low, best)
        index = tl.where(better, arg, index)
    tl.store(best_ptr + rows, best, mask=row_ok)
    tl.store(index_ptr + rows, index, mask=row_ok)


class FusedTerms:
    """A bank's search terms laid out seed-minor for the kernel: ``proj`` ``(C*P, S)``, ``tri`` and
    ``solve`` ``(T, S)``, ``S`` a multiple of the seed tile."""

    def __init__(self, bank, block_s: int | None = None):
        groups, size, latent, chunk = bank.proj.shape
        if latent > MAX_LATENT:
            raise ValueError(f"the fused kernel handles latent_dim <= {MAX_LATENT}, not {latent}")
        block_s = block_s or BLOCK_S
        self.size, self.latent, self.block_s = size, latent, block_s
        seeds = groups * chunk
        pad = (-seeds) % block_s
        self.proj = _seed_minor(bank.proj.permute(1, 2, 0, 3).reshape(size * latent, seeds), pad)
        self.tri = _seed_minor(bank.tri.permute(1, 0, 2).reshape(-1, seeds), pad)
        self.solve = _seed_minor(bank.solve.permute(1, 0, 2).reshape(-1, seeds), pad)


def _seed_minor(x, pad):
    """Contiguous, padded with copies of seed column 0 (they tie with it and lose: first wins)."""
    if pad:
        x = torch.cat([x, x[:, :1].expand(-1, pad)], dim=1)
    return x.contiguous()


def best_seeds(rows: torch.Tensor, terms: FusedTerms, lo_bits: int, hi_bits: int,
               block_n: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """Column (into the padded bank) of the lowest-scoring seed for each row of ``rows`` (N, C)."""
    block_n, num_warps = block_n or BLOCK_N, num_warps or NUM_WARPS
    rows = rows.contiguous().float()
    n = rows.shape[0]
    best = torch.empty(n, dtype=torch.float32, device=rows.device)
    index = torch.empty(n, dtype=torch.int32, device=rows.device)
    grid = (triton.cdiv(n, block_n),)
    search_kernel[grid](rows, terms.proj, terms.tri, terms.solve, best, index,
                    n, terms.proj.shape[1], int(lo_bits), int(hi_bits),
                    C=terms.size, P=terms.latent, BLOCK_N=block_n, BLOCK_S=terms.block_s,
                    num_warps=num_warps)
    return index.long()
