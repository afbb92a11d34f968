"""``seedlm``: weight blocks rebuilt from LFSR seeds and 4-bit coefficients (arXiv 2410.10714).

A tensor is flattened row-major and cut into blocks of ``C`` weights (zero padded at the end). Each
block is ``w ≈ U(seed) @ (m * 2**e)``: ``U`` is a ``C x P`` matrix filled row-major with the ``C*P``
successive states of a ``K``-bit LFSR after ``seed``, normalised as ``(V - 2**(K-1)) / (2**(K-1) - 1)``;
``m`` holds ``P`` 4-bit two's-complement mantissas and ``e`` one exponent per block.

LFSR convention (Fibonacci form): the feedback polynomial ``x**K + sum(x**j for j in taps)`` gives the
bit recurrence ``a[n+K] = XOR(a[n+j] for j in taps)``; the state holds ``a[n]`` in bit 0 up to
``a[n+K-1]`` in bit ``K-1``, so a step is ``state = (state >> 1) | (parity(state & taps) << (K-1))``.
With ``K = 3``, ``x**3 + x + 1`` and seed 4 the states are 2, 5, 6, 7, 3, 1, 4, ...

Payload: ``arrays["packed"]``, one bit stream (MSB first, zero padded to a byte) of ``num_blocks``
records of ``K + 4 + 4*P`` bits each (at most 57): seed, exponent code, then the mantissas. The
exponent code is ``e - exp_min``. Params: ``block_size`` (C), ``latent_dim`` (P), ``lfsr_bits`` (K),
``taps``, ``exp_min``, ``exp_bits`` and ``coef_bits`` (both 4), ``num_blocks``.

This module is numpy only: it runs on the device, and the host builds its reconstruction with the same
arithmetic (float32, products summed over ``p`` in order).
"""
from __future__ import annotations

import numpy as np

COEF_BITS = 4
EXP_BITS = 4

# Exponents j < K of the feedback polynomial x**K + sum(x**j); every one is primitive (period 2**K - 1).
PRIMITIVE_TAPS = {
    2: (1, 0), 3: (1, 0), 4: (1, 0), 5: (2, 0), 6: (1, 0), 7: (1, 0), 8: (4, 3, 2, 0),
    9: (4, 0), 10: (3, 0), 11: (2, 0), 12: (6, 4, 1, 0), 13: (4, 3, 1, 0), 14: (10, 6, 1, 0),
    15: (1, 0), 16: (12, 3, 1, 0),
}


class SeedLMFormatError(ValueError):
    """A ``seedlm`` record's parameters or payload are inconsistent."""


def taps_for(bits: int) -> tuple:
    """The feedback taps of the ``bits``-bit LFSR used by SeedLM."""
    if bits not in PRIMITIVE_TAPS:
        raise SeedLMFormatError(f"no LFSR polynomial for K={bits} bits (known: {sorted(PRIMITIVE_TAPS)})")
    return PRIMITIVE_TAPS[bits]


def lfsr_step(state, bits: int, taps=None) -> np.ndarray:
    """The next state of each LFSR state in ``state`` (int64 array)."""
    taps = taps_for(bits) if taps is None else tuple(taps)
    state = np.asarray(state, dtype=np.int64)
    feedback = np.zeros_like(state)
    for j in taps:
        feedback ^= state >> j
    return (state >> 1) | ((feedback & 1) << (bits - 1))


def lfsr_states(seeds, count: int, bits: int, taps=None) -> np.ndarray:
    """The ``count`` states following each seed: int64 array ``(len(seeds), count)``."""
    taps = taps_for(bits) if taps is None else tuple(taps)
    state = np.asarray(seeds, dtype=np.int64).reshape(-1)
    out = np.empty((state.size, count), dtype=np.int64)
    for i in range(count):
        state = lfsr_step(state, bits, taps)
        out[:, i] = state
    return out


def bases(seeds, block_size: int, latent_dim: int, bits: int, taps=None) -> np.ndarray:
    """Normalised float32 bases ``(len(seeds), C, P)`` of the given seeds."""
    states = lfsr_states(seeds, block_size * latent_dim, bits, taps)
    half = 1 << (bits - 1)
    centred = (states - half).astype(np.float32)
    return (centred / np.float32(half - 1)).reshape(-1, block_size, latent_dim)


def block_bits(bits: int, latent_dim: int) -> int:
    """Bits per block record: seed, exponent code, mantissas."""
    return bits + EXP_BITS + COEF_BITS * latent_dim


MAX_BLOCK_BITS = 57      # a record plus its bit offset fits one 64-bit word


def _field_widths(bits: int, latent_dim: int) -> list:
    return [bits, EXP_BITS] + [COEF_BITS] * latent_dim


def pack_fields(seeds, exp_codes, mantissas, bits: int, chunk: int = 1 << 16) -> np.ndarray:
    """Pack per-block fields into one MSB-first bit stream (uint8); mantissas are ``(n, P)`` ints."""
    mantissas = np.asarray(mantissas, dtype=np.int64)
    n, latent = mantissas.shape
    width = block_bits(bits, latent)
    if width > MAX_BLOCK_BITS:
        raise SeedLMFormatError(f"a block record of {width} bits exceeds {MAX_BLOCK_BITS}")
    word = np.zeros(n, dtype=np.int64)
    fields = [np.asarray(seeds, np.int64), np.asarray(exp_codes, np.int64)] + list(mantissas.T)
    for values, w in zip(fields, _field_widths(bits, latent)):
        word = (word << w) | (values & ((1 << w) - 1))
    shifts = np.arange(width - 1, -1, -1, dtype=np.int64)
    parts = [np.packbits(((word[lo:lo + chunk, None] >> shifts) & 1).astype(np.uint8))
             for lo in range(0, n, chunk)]          # chunk is a multiple of 8: parts end on a byte
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)


def unpack_fields(packed, num_blocks: int, bits: int, latent_dim: int):
    """Inverse of :func:`pack_fields`: ``(seeds, exp_codes, mantissas)`` as int64 arrays."""
    width = block_bits(bits, latent_dim)
    stream = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if width > MAX_BLOCK_BITS or stream.size * 8 < num_blocks * width:
        raise SeedLMFormatError(f"packed payload holds {stream.size * 8} bits, needs "
                                f"{num_blocks} blocks of {width} bits (at most {MAX_BLOCK_BITS})")
    start = np.arange(num_blocks, dtype=np.int64) * width
    padded = np.concatenate([stream, np.zeros(8, dtype=np.uint8)])
    octets = padded[(start >> 3)[:, None] + np.arange(8)]
    word = octets.view(">u8").reshape(-1).astype(np.uint64)
    word = (word << (start & 7).astype(np.uint64)) >> np.uint64(64 - width)
    word = word.astype(np.int64)
    values, used = [], 0
    for w in _field_widths(bits, latent_dim):
        used += w
        values.append((word >> (width - used)) & ((1 << w) - 1))
    mantissas = np.stack(values[2:], axis=1) if latent_dim else np.zeros((num_blocks, 0), np.int64)
    mantissas -= (mantissas >= (1 << (COEF_BITS - 1))) << COEF_BITS
    return values[0], values[1], mantissas


def reconstruct(basis, exponents, mantissas) -> np.ndarray:
    """Blocks ``(n, C)`` float32 from bases ``(n, C, P)``, exponents ``(n,)`` and mantissas ``(n, P)``."""
    coef = np.ldexp(np.asarray(mantissas, np.float32),
                    np.asarray(exponents, np.int64)[:, None].astype(np.int32)).astype(np.float32)
    out = basis[:, :, 0] * coef[:, None, 0]
    for p in range(1, basis.shape[2]):
        out = out + basis[:, :, p] * coef[:, None, p]
    return out


def _unique_seeds(seeds, bits):
    """``np.unique(seeds, return_inverse=True)`` in linear time (seeds are below ``2**bits``)."""
    present = np.zeros(1 << bits, dtype=bool)
    present[seeds] = True
    position = np.cumsum(present) - 1
    return np.flatnonzero(present), position[seeds]


def _check(params, arrays):
    for key in ("block_size", "latent_dim", "lfsr_bits", "exp_min", "num_blocks"):
        if key not in params:
            raise SeedLMFormatError(f"seedlm record lacks parameter {key!r}")
    if "packed" not in arrays:
        raise SeedLMFormatError("seedlm record lacks the 'packed' array")
    if params.get("exp_bits", EXP_BITS) != EXP_BITS or params.get("coef_bits", COEF_BITS) != COEF_BITS:
        raise SeedLMFormatError(f"seedlm record uses {params.get('exp_bits')}-bit exponents and "
                                f"{params.get('coef_bits')}-bit coefficients; this decoder knows 4 and 4")
    bits = int(params["lfsr_bits"])
    if not all(0 <= int(j) < bits for j in params.get("taps", [0])) or not 2 <= bits <= 32:
        raise SeedLMFormatError(f"seedlm record has LFSR taps {params.get('taps')} outside 0..{bits - 1}")


def decode(params, arrays, shape, tables=None, chunk: int = 1 << 18):
    """Rebuild the float32 tensor of ``shape`` from a ``seedlm`` record."""
    _check(params, arrays)
    c, p, k = int(params["block_size"]), int(params["latent_dim"]), int(params["lfsr_bits"])
    n = int(params["num_blocks"])
    numel = int(np.prod(shape)) if len(shape) else 1
    if n * c < numel:
        raise SeedLMFormatError(f"{n} blocks of {c} cannot hold a tensor of shape {tuple(shape)}")
    seeds, codes, mants = unpack_fields(arrays["packed"], n, k, p)
    if seeds.size and (seeds.min() < 1 or seeds.max() >= (1 << k)):
        raise SeedLMFormatError(f"seedlm record holds a seed outside 1..{(1 << k) - 1}")
    unique, inverse = _unique_seeds(seeds, k)
    table = bases(unique, c, p, k, params.get("taps"))
    exps = codes + int(params["exp_min"])
    out = np.empty((n, c), dtype=np.float32)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        out[lo:hi] = reconstruct(table[inverse[lo:hi].reshape(-1)], exps[lo:hi], mants[lo:hi])
    return out.reshape(-1)[:numel].reshape(shape)
