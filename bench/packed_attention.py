"""Attention for many independent rows laid end to end in one sequence (batch 1, no padding).

``PackedScorer`` puts the contexts of a batch, each followed by its continuations, one after the
other in a single sequence. The model's linear layers then compute only real tokens (no padding),
and this attention (registered with transformers' ``AttentionInterface`` as ``NAME`` by
``use(model)``, which switches a model to it for a block) computes, in two parts joined by their
log-sum-exps:

- every query of the batch against the family's shared prefix (keys and values computed once,
  batch 1), in one fused attention call without a mask, and
- each row's queries against the row's own keys only, under the row's mask (``Packing.masks``:
  context tokens causal, each continuation sees the context and itself).

A mask over the whole batch would compute, and throw away, the scores of every row against every
other row; one call per row over [prefix; row] would run the prefix part in many small pieces.
Both parts use PyTorch's fused CPU/GPU attention kernel, the one that also returns the log-sum-exp.

Callers pass ``position_ids`` (each row starts after the prefix) and ``packing=`` to the decoder
and no attention mask. A forward pass without ``packing`` runs PyTorch's scaled-dot-product
attention, as the model had.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from edgebuild.bench.shared_attention import switched

NAME = "edgebuild_packed"


@dataclass
class Packing:
    """Rows of one packed sequence: ``spans[i]`` is row i's ``(start, stop)`` in it and
    ``masks[i]`` its additive ``[tokens, tokens]`` mask over its own keys (None: plain causal);
    ``prefix`` is the shared prefix's ``[(keys, values)]`` per layer, each ``[1, kv heads, prefix,
    dim]``, or None. ``store(layer, keys, values)``, when set, receives every layer's new keys and
    values (``[1, kv heads, tokens, dim]``): a prompt pass keeps them for decoding."""

    spans: list[tuple[int, int]]
    masks: list[torch.Tensor | None]
    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    store: Callable | None = None

    @classmethod
    def of(cls, segments: list[tuple[int, int]], layers=None, dtype=torch.float32,
           device="cpu") -> "Packing":
        """From the ``(row, part)`` segment id of every token (see ``prefix_scoring.layout``),
        the masks made on ``device``."""
        rows = torch.tensor([row for row, _ in segments])
        parts = torch.tensor([part for _, part in segments])
        bounds = torch.searchsorted(rows, torch.arange(int(rows[-1]) + 2)).tolist()
        spans = list(zip(bounds[:-1], bounds[1:]))
        masks = [row_mask(parts[start:stop], dtype) for start, stop in spans]
        masks = [None if mask is None else mask.to(device) for mask in masks]
        return cls(spans, masks, layers)


def row_mask(parts: torch.Tensor, dtype=torch.float32) -> torch.Tensor | None:
    """Additive ``[tokens, tokens]`` mask: a token sees earlier context tokens (part 0) and earlier
    tokens of its own part. None when the row is all context (the mask is plain causal)."""
    if not bool(parts.any()):
        return None
    q, k = parts[:, None], parts[None, :]
    causal = torch.ones(len(parts), len(parts), dtype=torch.bool).tril()
    seen = causal & ((k == 0) | (k == q))
    return torch.zeros(seen.shape, dtype=dtype).masked_fill_(~seen, torch.finfo(dtype).min)


def attention(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0,
              packing: Packing | None = None, **kwargs):
    """``(output [1, tokens, heads, dim], None)``: each row of ``packing`` attends to the prefix
    and its own keys only. Without ``packing``: PyTorch's scaled-dot-product attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packing is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    if packing.store is not None:
        packing.store(module.layer_idx, key, value)
    out, lse = _own(query, key, value, packing, scaling)
    if packing.prefix is not None:
        keys, values = packing.prefix[module.layer_idx]
        shared, shared_lse = _fused(query, keys, values, scaling)
        total = torch.logaddexp(lse, shared_lse)
        out = out * (lse - total).exp_()[..., None] + shared * (shared_lse - total).exp_()[..., None]
    return out.transpose(1, 2).to(query.dtype), None


def _fused(query, key, value, scaling: float, causal: bool = False, mask=None):
    """``(output [1, heads, tokens, dim], log-sum-exp [1, heads, tokens])`` of softmax attention
    (grouped-query keys and values as they are): PyTorch's fused kernel on a CPU, the same
    arithmetic spelled out elsewhere."""
    if query.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, causal, attn_mask=mask, scale=scaling)
    return _spelled_out(query, key, value, scaling, causal, mask)


def _spelled_out(query, key, value, scaling: float, causal: bool = False, mask=None):
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if causal:
        mask = torch.full(scores.shape[-2:], torch.finfo(scores.dtype).min,
                          dtype=scores.dtype, device=scores.device).triu_(1)
    if mask is not None:
        scores = scores + mask
    lse = torch.logsumexp(scores.float(), dim=-1)
    weights = (scores.float() - lse[..., None]).exp_().to(value.dtype)
    return torch.matmul(weights, value), lse


def _own(query, key, value, packing: Packing, scaling: float):
    """Each row's queries against its own keys: output and log-sum-exp for every token."""
    out = query.new_empty(query.shape)
    lse = query.new_empty(query.shape[:3], dtype=torch.float32)
    for (start, stop), mask in zip(packing.spans, packing.masks):
        rows = slice(start, stop)
        out[:, :, rows], lse[:, :, rows] = _fused(
            query[:, :, rows], key[:, :, rows], value[:, :, rows], scaling, causal=mask is None,
            mask=mask)
    return out, lse


def use(model):
    """``model`` attends through ``attention`` inside the block (every config it holds)."""
    return switched(model, NAME, attention)
