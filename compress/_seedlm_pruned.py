"""The exact SeedLM seed search on a CPU: a least-squares bound skips the seeds that cannot win.

Scorer. ``score_seeds`` scores (block, seed) pairs with the arithmetic of ``_seedlm_search.finish``
(elementwise float32: projection ``y' = -2 Q^T w``, back substitution, 4-bit exponent and mantissas,
``s = sum_p z_p (z_p + y'_p)``, the squared error after quantisation minus ``||w||^2``). The search
returns, for every block, the lowest-scoring seed, the first on ties: what ``exhaustive_best``
returns by scoring every seed.

Bound. For every real ``z``, ``sum_p z_p (z_p + y'_p) = sum_p (z_p + y'_p / 2)^2 - ||y'||^2 / 4``,
so no choice of exponent and mantissas scores below ``-||y'||^2 / 4 = -||Q^T w||^2``: the quantised
error is never below the unquantised least-squares error. Rounding: the float32 score of three terms
``a_p^2 - b_p^2`` (``a = z + y'/2``, ``b = y'/2``) is at least ``-(1 + 4u) ||y'||^2 / 4``
(``u = 2**-24``); ``||y'||/2`` is within ``sqrt(P) (C + 1) u ||w||`` of ``||Q^T w||`` (Cauchy-Schwarz,
``Q``'s columns have unit norm); and ``n = ||Q^T w||^2 = w^T Q Q^T w`` computed in float32 as below
is within ``(K + 2) C u ||w||^2`` of its exact value (``K`` terms, ``|(Q Q^T)_ij| <= 1``,
``sum_ij |w_i w_j| <= C ||w||^2``). Hence every seed's computed score is at least

    LB = -(1 + REL_MARGIN) (n + margin ||w||^2) - ABS_MARGIN,
    margin = 2 ((K + 2) C + 2 sqrt(P) (C + 1)) u          (twice the sum of those terms),

and a seed with ``LB > B``, ``B`` the score of any seed already scored, can neither win nor tie.

Search, per chunk of blocks (chunks run on ``threads`` worker threads, one torch thread each):

1. ``n`` for every seed as one matmul of the blocks' ``K = C (C + 1) / 2`` monomials ``w_i w_j``
   against a table of the seeds' projection matrices ``Q Q^T`` (``quad``, ``K x S``), in seed chunks
   that stay in cache; only the maximum of ``n`` over each group of ``GROUP`` seeds is kept.
2. The seeds of a few groups with the largest maxima are scored: ``B``, their lowest score.
3. Every other group whose bound can reach ``B`` is scored: on SmolLM2 about one group per block.

The winner and its score come from the scorer, so rounding in steps 1-3 decides only how many seeds
are scored, never which one wins. All-zero blocks score exactly 0 with every seed: the first wins.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from edgebuild.compress import _seedlm_search as search

UNIT = 2.0 ** -24         # float32 unit roundoff
REL_MARGIN = 1e-5         # covers (1 + 4u) and the rounding of ||w||^2, with room to spare
ABS_MARGIN = 1e-30        # covers underflow of products of tiny weights
GROUP = 8                 # seeds per group: the bound is kept per group
SEED_CHUNK = 2048         # seeds per matmul (smaller tiles, in L2, measured no faster)
BLOCK_CHUNK = 256         # blocks per chunk of work
SUPER = 64                # groups per super-group: the candidate scan looks at these first
TOP_GROUPS = 4            # groups scored first for the initial B
SCORE_CHUNK = 1 << 16     # (block, seed) pairs scored per call: bounds the memory of a call


@dataclass
class PrunedTables:
    """The search terms of a bank, laid out for the pruned search."""

    quad: torch.Tensor      # (K, S_pad) float32: n = phi(w) @ quad; padding columns are 0
    terms: torch.Tensor     # (S, C*P + 2T) float32: per seed -2Q (row-major), R's triangle, solve terms
    pairs: tuple            # (rows, cols) of the K monomials w_i w_j, i <= j
    n_seeds: int
    block_size: int
    latent_dim: int
    chunk: int              # seeds per matmul (a power of two)
    group: int              # seeds per group
    margin: float           # the ``margin`` of the module docstring

    @property
    def groups(self) -> int:
        return self.quad.shape[1] // self.group


def make_tables(bank: search.SeedBank) -> PrunedTables:
    """Lay out ``bank`` (a CPU ``SeedBank``) for the pruned search; ``quad`` from a float64 QR."""
    _, size, latent, _ = bank.proj.shape
    n_seeds = len(bank.seeds)
    tri = bank.tri.shape[1]
    terms = torch.cat([bank.proj.permute(0, 3, 1, 2).reshape(-1, size * latent),
                       bank.tri.permute(0, 2, 1).reshape(-1, tri),
                       bank.solve.permute(0, 2, 1).reshape(-1, tri)], 1)[:n_seeds].contiguous()
    seed_chunk = min(SEED_CHUNK, 1 << max(3, (n_seeds - 1).bit_length()))
    rows, cols = torch.triu_indices(size, size)
    q = torch.linalg.qr(bank.basis.double())[0]
    proj = q @ q.transpose(1, 2)
    coef = proj[:, rows, cols] * torch.where(rows == cols, 1.0, 2.0).double()
    quad = torch.zeros(len(rows), -(-n_seeds // seed_chunk) * seed_chunk)
    quad[:, :n_seeds] = coef.T.float()
    k = len(rows)
    margin = 2 * ((k + 2) * size + 2 * math.sqrt(latent) * (size + 1)) * UNIT
    return PrunedTables(quad, terms, (rows, cols), n_seeds, size, latent, seed_chunk,
                        min(GROUP, seed_chunk), margin)


def score_seeds(rows: torch.Tensor, index: torch.Tensor, tables: PrunedTables, lo_bits, hi_bits):
    """Scores ``(M, k)`` of rows ``(M, C)`` with seeds ``index`` ``(M, k)`` (``finish``'s arithmetic);
    indices past the last seed score ``inf``."""
    size, latent = tables.block_size, tables.latent_dim
    g = tables.terms.index_select(0, index.clamp(max=tables.n_seeds - 1).reshape(-1))
    g = g.view(*index.shape, -1)
    y = search._project([rows[:, c, None] for c in range(size)],
                        [[g[:, :, c * latent + p] for p in range(latent)] for c in range(size)])
    terms, base = search._term_index(latent), size * latent
    tri = len(terms)
    ebits, mant = search._quantise(
        search._coefficients(y, lambda k: g[:, :, base + tri + k], terms), lo_bits, hi_bits)
    score = search._score(y, ebits, mant, lambda k: g[:, :, base + k], terms)
    return score.masked_fill_(index >= tables.n_seeds, math.inf)


def exhaustive_best(rows: torch.Tensor, tables: PrunedTables, lo_bits, hi_bits,
                    seed_chunk: int = 512) -> torch.Tensor:
    """The reference: every seed scored, the lowest score wins, the first seed on ties."""
    best = torch.full((rows.shape[0],), math.inf)
    index = torch.zeros(rows.shape[0], dtype=torch.int64)
    for start in range(0, tables.n_seeds, seed_chunk):
        seeds = torch.arange(start, min(start + seed_chunk, tables.n_seeds)).expand(rows.shape[0], -1)
        low, col = score_seeds(rows, seeds, tables, lo_bits, hi_bits).min(1)
        better = low < best
        best, index = torch.where(better, low, best), torch.where(better, col + start, index)
    return index


def best_seeds(blocks: torch.Tensor, tables: PrunedTables, lo_bits, hi_bits, progress=None,
               threads: int | None = None) -> torch.Tensor:
    """Index of the lowest-scoring seed of each row of ``blocks`` (N, C), exactly as
    ``exhaustive_best``; ``progress(rows_done)`` after each chunk, in order."""
    threads = threads or torch.get_num_threads()
    blocks = blocks.to("cpu", torch.float32).contiguous()
    starts = range(0, blocks.shape[0], BLOCK_CHUNK)
    index = torch.empty(blocks.shape[0], dtype=torch.int64)
    def work(start):
        return _chunk_best(blocks[start:start + BLOCK_CHUNK], tables, lo_bits, hi_bits)

    with _one_torch_thread(), ThreadPoolExecutor(max(1, threads)) as pool:
        for start, found in zip(starts, pool.map(work, starts)):
            index[start:start + found.shape[0]] = found
            if progress is not None:
                progress(start + found.shape[0])
    return index


@contextmanager
def _one_torch_thread():
    """Each worker thread runs its torch ops on one thread (no spinning intra-op pools)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _chunk_best(rows, tables, lo_bits, hi_bits):
    peaks = group_peaks(rows, tables)
    wn = (rows * rows).sum(1)
    first = _top_groups(peaks)
    first_seeds = _group_seeds(first, tables).reshape(rows.shape[0], -1)
    first_scores = score_seeds(rows, first_seeds, tables, lo_bits, hi_bits)
    best = first_scores.min(1).values
    # a group stays iff -(1 + REL_MARGIN) (peak + margin ||w||^2) - ABS_MARGIN <= best
    need = (-best - ABS_MARGIN) / (1 + REL_MARGIN) - tables.margin * wn
    need = torch.where(wn > 0, need, math.inf)             # zero blocks: every seed scores 0
    block, group = _candidates(peaks, need, first)
    more_seeds = _group_seeds(group, tables)
    more_scores = _score_pairs(rows, block, more_seeds, tables, lo_bits, hi_bits)
    found = _first_lowest(rows.shape[0], first_seeds, first_scores, block, more_seeds, more_scores)
    return torch.where(wn > 0, found, 0)


def _score_pairs(rows, block, seeds, tables, lo_bits, hi_bits):
    """``score_seeds(rows[block], seeds)`` a slice at a time (many pairs only on degenerate blocks)."""
    step = max(1, SCORE_CHUNK // max(seeds.shape[1], 1))
    parts = [score_seeds(rows[block[i:i + step]], seeds[i:i + step], tables, lo_bits, hi_bits)
             for i in range(0, len(block), step)]
    return torch.cat(parts) if parts else seeds.float()


def group_peaks(rows: torch.Tensor, tables: PrunedTables) -> torch.Tensor:
    """``(N, groups)``: the largest float32 ``n = ||Q^T w||^2`` over each group's seeds."""
    i, j = tables.pairs
    phi = rows[:, i] * rows[:, j]
    n = rows.shape[0]
    out = torch.empty(n, tables.groups)
    tile = torch.empty(n, tables.chunk)
    per = tables.chunk // tables.group
    for g, start in enumerate(range(0, tables.quad.shape[1], tables.chunk)):
        torch.mm(phi, tables.quad[:, start:start + tables.chunk], out=tile)
        torch.amax(tile.view(n, tables.group, per), 1, out=out[:, g * per:(g + 1) * per])
    return out


def _group_seeds(group, tables):
    """Seed indices ``(..., GROUP)`` of groups: group ``g`` of seed chunk ``j`` holds the seeds
    ``j * chunk + g + m * chunk / GROUP`` (strided, so the maximum runs over contiguous rows)."""
    per = tables.chunk // tables.group
    base = (group // per) * tables.chunk + group % per
    return base[..., None] + torch.arange(tables.group) * per


def _super(peaks):
    size = min(SUPER, peaks.shape[1])
    return peaks.view(peaks.shape[0], -1, size), size


def _top_groups(peaks):
    """A few groups with large peaks: the best group of each of the top super-groups."""
    view, size = _super(peaks)
    top = view.amax(2).topk(min(TOP_GROUPS, view.shape[1]), 1).indices
    inner = view.gather(1, top[:, :, None].expand(-1, -1, size)).argmax(2)
    return top * size + inner


def _candidates(peaks, need, first):
    """``(block, group)`` of every group with ``peak >= need[block]`` not among ``first``."""
    view, size = _super(peaks)
    block, sup = (view.amax(2) >= need[:, None]).nonzero(as_tuple=True)
    row, inner = (view[block, sup] >= need[block, None]).nonzero(as_tuple=True)
    block, group = block[row], sup[row] * size + inner
    fresh = (group[:, None] != first[block]).all(1)
    return block[fresh], group[fresh]


def _first_lowest(n, first_seeds, first_scores, block, more_seeds, more_scores):
    """Per block, the lowest score's seed, the smallest index among equal scores."""
    owner = torch.cat([torch.arange(n).repeat_interleave(first_seeds.shape[1]),
                       block.repeat_interleave(more_seeds.shape[1])])
    seeds = torch.cat([first_seeds.reshape(-1), more_seeds.reshape(-1)])
    scores = torch.cat([first_scores.reshape(-1), more_scores.reshape(-1)])
    low = torch.full((n,), math.inf).scatter_reduce(0, owner, scores, "amin")
    last = torch.iinfo(torch.int64).max
    seeds = torch.where(scores == low[owner], seeds, last)
    return torch.full((n,), last).scatter_reduce(0, owner, seeds, "amin")
