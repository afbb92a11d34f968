"""The VPTQ algorithm on torch tensors: Hessian-weighted k-means and the second-order pass.

All layers of a group (e.g. the ``q_proj`` of every decoder layer) share one codebook, so they
are quantised together: the k-means runs on vectors of every layer, and the column-by-column pass
runs batched over the layers (they have the same shape), a few layers at a time.

Per layer (weight ``W``: ``(rows, cols)``, Hessian ``H = 2 X Xᵀ / n``: ``(cols, cols)``):

1. columns are normalised (``x = (w - bias) / scale``, fp16 scale = std, bias = mean per column);
2. outlier columns (largest ``H_cc * |W[:, c]|²``) are chosen and put first, the rest follow by
   decreasing ``H_cc``; outlier columns are kept in fp16 or get a codebook of their own;
3. each column is cut into vectors of ``vector_len`` rows; the codebooks come from k-means weighted
   by ``H_cc * scale_c²`` (``diag(H)`` in the normalised space);
4. columns are quantised in that order, in blocks, to the nearest centroid (plus, with a residual
   codebook, the nearest residual centroid of what is left); the error of each column is spread
   over the columns not yet quantised through the Cholesky factor of ``H⁻¹`` (GPTQ-style).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from edgebuild.core.errors import ModelError

log = logging.getLogger(__name__)

BLOCK = 128                  # columns per lazy-update block
KMEANS_SAMPLES = 256         # k-means trains on at most this many vectors per centroid
KMEANS_TOL = 1e-5            # stop when the weighted inertia improves by less than this fraction
DIST_ELEMENTS = 1 << 22      # distances computed per step (bounds temporary memory to 16 MiB)
PASS_BYTES = 256 << 20       # working memory of one batched pass (sets how many layers it takes)
DAMP_RETRIES = 4             # damping grows tenfold per retry when a Cholesky factor fails


@dataclass
class Books:
    """float32 codebooks (each already rounded to fp16) used by a pass."""

    main: object
    outlier: object = None
    residual: object = None


@dataclass
class Layer:
    """One weight prepared for quantisation (see the module docstring)."""

    weight: object       # (rows, cols) float32, dead columns zeroed
    hessian: object      # (cols, cols) float32, undamped
    scales: object       # (cols,) float16
    biases: object       # (cols,) float16
    importance: object   # (cols,) float32, k-means weight of each column, summing to 1
    perm: object         # (cols,) quantisation order: outliers first, then by decreasing H_cc
    n_outliers: int


@dataclass
class LayerResult:
    """What one layer comes out as, in its original column order."""

    indices: object            # (cols, rows / vector_len) int64
    residual_indices: object   # same shape, or None
    reconstruction: object     # (rows, cols) float32, equal to what the decoder produces
    proxy_error: float         # tr(E H Eᵀ) / tr(W H Wᵀ), E = W - reconstruction


def fp16_books(book):
    """Round a float32 codebook to fp16 and back: the values stored and used everywhere."""
    return book.half().float()


# --- nearest centroid and k-means ---------------------------------------------------------------

def nearest(x, book):
    """Index of the nearest row of ``book`` (k, v) for every row of ``x`` (n, v), in chunks."""
    import torch

    sq = (book * book).sum(1)
    step = max(1, DIST_ELEMENTS // book.shape[0])
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for s in range(0, x.shape[0], step):
        out[s:s + step] = torch.addmm(sq, x[s:s + step], book.T, alpha=-2).argmin(1)
    return out


def _sq_dist(x, book, idx):
    return ((x - book[idx]) ** 2).sum(1)


def _plus_plus(x, w, k, gen):
    """Weighted k-means++ seeding: next centre drawn with probability ∝ weight · distance²."""
    import torch

    book = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    first = int(torch.multinomial((w + 1e-30).cpu(), 1, generator=gen))
    book[0] = x[first]
    dist = ((x - x[first]) ** 2).sum(1)
    for i in range(1, k):
        mass = torch.cumsum(w * dist, 0)
        if float(mass[-1]) <= 0:      # fewer distinct vectors than centroids: repeat the first
            book[i:] = book[0]
            break
        pick = torch.searchsorted(mass, mass[-1] * torch.rand(1, generator=gen).to(x.device))
        book[i] = x[min(int(pick), x.shape[0] - 1)]
        dist = torch.minimum(dist, ((x - book[i]) ** 2).sum(1))
    return book


def kmeans(x, w, k: int, iters: int, gen):
    """Weighted k-means (Lloyd, k-means++ seeding) of ``x`` (n, v) with weights ``w`` (n,).

    Trains on a seeded sample of at most ``KMEANS_SAMPLES * k`` vectors. Returns the fp16-rounded
    centroids as float32 ``(k, v)``."""
    import torch

    if x.shape[0] > KMEANS_SAMPLES * k:
        pick = torch.randperm(x.shape[0], generator=gen)[:KMEANS_SAMPLES * k].to(x.device)
        x, w = x[pick], w[pick]
    book = _plus_plus(x, w, k, gen)
    last = math.inf
    for _ in range(iters):
        idx = nearest(x, book)
        inertia = float((w * _sq_dist(x, book, idx)).sum())
        if last < math.inf and last - inertia <= KMEANS_TOL * last:
            break
        last = inertia
        sums = torch.zeros_like(book).index_add_(0, idx, x * w[:, None])
        mass = torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, idx, w)
        filled = mass > 0
        book[filled] = sums[filled] / mass[filled, None]
    return fp16_books(book)


# --- per-layer preparation ----------------------------------------------------------------------

def _fp16_scales(std):
    """Column scales as fp16; zero, subnormal-flushed or constant columns get scale 1."""
    import torch

    scales = std.half()
    return torch.where(scales > 0, scales, torch.ones_like(scales))


def prepare(weight, hessian, outlier_fraction: float) -> Layer:
    """Normalisation, k-means importance, outlier columns and quantisation order of one layer."""
    import torch

    diag = hessian.diagonal().clone()
    dead = diag <= 0
    weight = weight.clone()
    weight[:, dead] = 0
    rows, cols = weight.shape
    scales = _fp16_scales(weight.std(0, unbiased=False))
    biases = weight.mean(0).half()
    if not (torch.isfinite(scales).all() and torch.isfinite(biases).all()):
        raise ModelError("a weight column has values too large for fp16 scales; check the model")
    imp = diag.clamp(min=0) * scales.float() ** 2
    imp = imp / imp.sum() if float(imp.sum()) > 0 else torch.full_like(imp, 1 / cols)
    n_out = math.ceil(outlier_fraction * cols) if outlier_fraction > 0 else 0
    is_out = torch.zeros(cols, dtype=torch.bool, device=weight.device)
    if n_out:
        score = diag.clamp(min=0) * (weight ** 2).sum(0)
        is_out[torch.topk(score, n_out).indices] = True
    order = torch.argsort(diag, descending=True, stable=True)
    order = order[torch.argsort((~is_out[order]).to(torch.int8), stable=True)]
    return Layer(weight, hessian, scales, biases, imp, order, n_out)


def normalised_vectors(layer: Layer, v: int):
    """The layer's normalised weights as ``(cols, rows / v, v)`` vectors, original column order."""
    x = (layer.weight - layer.biases.float()) / layer.scales.float()
    return x.T.reshape(x.shape[1], -1, v)


def inverse_factor(hessian, damp: float):
    """Upper Cholesky factor ``U`` of the damped ``H⁻¹ = UᵀU`` for a batch ``(L, n, n)``; dead
    diagonal entries are set to 1 first. The damping grows tenfold per retry when a factor fails.

    With ``J`` the order reversal and ``J H J = L Lᵀ``, ``U = J L⁻¹ J``: one Cholesky factor and
    one triangular solve, no explicit inverse."""
    import torch

    h = hessian.clone()
    diag = h.diagonal(dim1=1, dim2=2)
    diag[diag <= 0] = 1
    n = h.shape[1]
    eye = torch.eye(n, dtype=h.dtype, device=h.device)
    flip = torch.arange(n - 1, -1, -1, device=h.device)
    mean = diag.mean(1)
    for attempt in range(DAMP_RETRIES):
        damped = h + (damp * 10 ** attempt * mean)[:, None, None] * eye
        factor, info = torch.linalg.cholesky_ex(damped[:, flip][:, :, flip])
        if not bool(info.any()):
            inverse = torch.linalg.solve_triangular(factor, eye.expand_as(factor), upper=False)
            return inverse[:, flip][:, :, flip]
        log.info("Hessian not positive definite at damp %g; retrying", damp * 10 ** attempt)
    raise ModelError("a layer's Hessian stays singular after damping; raise the 'damp' knob "
                     "or provide more calibration data")


# --- the second-order pass ----------------------------------------------------------------------

def _quantize_column(col, s, b, book, residual):
    """Quantise one column of every layer of a batch: ``col`` (L, rows), ``s``/``b`` (L,).

    Returns ``(q, indices, residual_indices, left)``: the reconstruction (L, rows), the indices
    (L, rows / v), and the normalised vectors minus their first-stage centroid."""
    rows, v = col.shape[1], book.shape[1]
    x = ((col - b[:, None]) / s[:, None]).reshape(-1, v)
    first = nearest(x, book)
    c = book[first]
    left = x - c
    second = None
    if residual is not None:
        second = nearest(left, residual)
        c = c + residual[second]
    q = c.reshape(-1, rows) * s[:, None] + b[:, None]
    return q, first.reshape(-1, rows // v), second, left


def _quantize_position(col, n, s, b, books: Books, n_outliers: int, out):
    """Quantise column ``n`` (in quantisation order) of every layer of a batch into ``out``
    (``(idx, ridx, left)``, written in place); returns its reconstruction ``(L, rows)``."""
    idx, ridx, left = out
    if n < n_outliers and books.outlier is None:          # an outlier column kept in fp16
        idx[:, n] = 0
        left[:, n] = 0
        if ridx is not None:
            ridx[:, n] = 0
        return col.half().float()
    book = books.outlier if n < n_outliers else books.main
    q, idx[:, n], second, rest = _quantize_column(col, s[:, n], b[:, n], book, books.residual)
    if ridx is not None:
        ridx[:, n] = second.reshape(col.shape[0], -1)
    left[:, n] = rest.reshape(col.shape[0], -1, left.shape[3])
    return q


def vptq_pass(W, Hinv, s, b, books: Books, n_outliers: int, v: int):
    """One pass over a batch of layers in quantisation order: ``W`` (L, rows, cols) permuted,
    ``Hinv`` (L, cols, cols) the upper factor of the permuted ``H⁻¹``, ``s``/``b`` (L, cols).

    Returns ``(Q, indices, residual_indices, left)``: the reconstruction, the indices
    ``(L, cols, rows / v)`` (residual ones or None; zero for fp16 columns) and the first-stage
    normalised residuals ``(L, cols, rows / v, v)``."""
    import torch

    L, rows, cols = W.shape
    W = W.clone()
    Q = torch.empty_like(W)
    idx = torch.empty(L, cols, rows // v, dtype=torch.long, device=W.device)
    ridx = torch.empty_like(idx) if books.residual is not None else None
    left = torch.empty(L, cols, rows // v, v, dtype=W.dtype, device=W.device)
    for i in range(0, cols, BLOCK):
        j = min(i + BLOCK, cols)
        block, err = W[:, :, i:j].clone(), torch.empty(L, rows, j - i, dtype=W.dtype, device=W.device)
        hb = Hinv[:, i:j, i:j]
        for k in range(j - i):
            q = _quantize_position(block[:, :, k], i + k, s, b, books, n_outliers, (idx, ridx, left))
            Q[:, :, i + k] = q
            e = (block[:, :, k] - q) / hb[:, k, k, None]
            block[:, :, k + 1:] -= e[:, :, None] * hb[:, None, k, k + 1:]
            err[:, :, k] = e
        W[:, :, j:] -= torch.bmm(err, Hinv[:, i:j, j:])
    return Q, idx, ridx, left


def layers_per_pass(rows: int, cols: int) -> int:
    """How many layers one batched pass takes within ``PASS_BYTES`` of working memory."""
    per_layer = 4 * (5 * rows * cols + 3 * cols * cols)
    return max(1, PASS_BYTES // per_layer)


def run_pass(layers: list[Layer], books: Books, v: int, damp: float):
    """Quantise a batch of prepared layers (same shape, same ``n_outliers``) with ``books``.

    Returns ``(quantised, left, importance)``: per layer ``(reconstruction, indices,
    residual_indices)`` in original column order, and the first-stage normalised residual
    vectors ``(n, v)`` with their k-means weights (to train a residual codebook)."""
    import torch

    W = torch.stack([l.weight[:, l.perm] for l in layers])
    H = torch.stack([l.hessian[l.perm][:, l.perm] for l in layers])
    s = torch.stack([l.scales.float()[l.perm] for l in layers])
    b = torch.stack([l.biases.float()[l.perm] for l in layers])
    Q, idx, ridx, left = vptq_pass(W, inverse_factor(H, damp), s, b, books, layers[0].n_outliers, v)
    del W, H
    quantised = []
    for i, layer in enumerate(layers):
        inv = torch.argsort(layer.perm)
        quantised.append((Q[i][:, inv].contiguous(), idx[i][inv],
                          None if ridx is None else ridx[i][inv]))
    imp = torch.stack([l.importance[l.perm] for l in layers])
    if books.outlier is None:
        imp[:, :layers[0].n_outliers] = 0                      # fp16 columns leave no residual
    weights = imp[:, :, None].expand(-1, -1, left.shape[2]).reshape(-1)
    return quantised, left.reshape(-1, v), weights


def proxy_error(layer: Layer, reconstruction) -> float:
    """``tr(E H Eᵀ) / tr(W H Wᵀ)`` with ``E = W - reconstruction``: the relative output error on
    the calibration inputs."""
    err = layer.weight - reconstruction
    total = float(((layer.weight @ layer.hessian) * layer.weight).sum())
    return float(((err @ layer.hessian) * err).sum()) / total if total > 0 else 0.0


# --- a whole group ------------------------------------------------------------------------------

def _subsample(x, w, n: int, gen):
    import torch

    if x.shape[0] <= n:
        return x, w
    pick = torch.randperm(x.shape[0], generator=gen)[:n].to(x.device)
    return x[pick], w[pick]


def training_vectors(layers: list[Layer], v: int, outliers: bool):
    """Normalised vectors ``(n, v)`` and k-means weights ``(n,)`` of the outlier columns
    (``outliers``) or of the other columns of every layer. Each layer's columns weigh 1 in all,
    shared out by importance, so that no layer's outlier columns crowd out its other columns."""
    import torch

    xs, ws = [], []
    for layer in layers:
        cols = layer.perm[:layer.n_outliers] if outliers else layer.perm[layer.n_outliers:]
        x = normalised_vectors(layer, v)[cols]
        imp = layer.importance[cols]
        imp = imp / imp.sum() if float(imp.sum()) > 0 else torch.full_like(imp, 1 / len(cols))
        xs.append(x.reshape(-1, v))
        ws.append(imp.repeat_interleave(x.shape[1]))
    return torch.cat(xs), torch.cat(ws)


def quantize_group(weights: list, hessians: list, cfg, gen, progress=lambda n: None):
    """Quantise layers of one shape sharing codebooks (knobs from ``cfg``, a ``VPTQConfig``).

    ``weights``: float32 ``(rows, cols)`` tensors; ``hessians``: matching ``(cols, cols)``;
    ``gen``: a seeded CPU ``torch.Generator``; ``progress(n)`` is called as ``n`` more layers are
    finished. Returns ``(results, books, layers)``: one ``LayerResult`` and one ``Layer`` per
    weight, and the fp16-rounded codebooks."""
    layers = [prepare(w, h, cfg.outlier_fraction) for w, h in zip(weights, hessians)]
    v, k = cfg.vector_len, 1 << cfg.codebook_bits
    books = Books(kmeans(*training_vectors(layers, v, False), k, cfg.kmeans_iters, gen))
    if layers[0].n_outliers and cfg.outlier_storage == "codebook":
        books.outlier = kmeans(*training_vectors(layers, v, True), k, cfg.kmeans_iters, gen)
    step = layers_per_pass(*layers[0].weight.shape)
    chunks = [layers[i:i + step] for i in range(0, len(layers), step)]
    if cfg.residual_codebook_bits:
        k_res = 1 << cfg.residual_codebook_bits
        share = -(-KMEANS_SAMPLES * k_res // len(chunks))
        lefts = [_subsample(*run_pass(c, books, v, cfg.damp)[1:], share, gen) for c in chunks]
        xs, ws = zip(*lefts)
        books.residual = kmeans(_cat(xs), _cat(ws), k_res, cfg.kmeans_iters, gen)
    results = []
    for chunk in chunks:
        for layer, (q, idx, ridx) in zip(chunk, run_pass(chunk, books, v, cfg.damp)[0]):
            results.append(LayerResult(idx, ridx, q, proxy_error(layer, q)))
        progress(len(chunk))
    return results, books, layers


def _cat(parts):
    import torch

    return torch.cat(list(parts))
