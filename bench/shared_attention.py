"""Attention for many rows that continue shared prefixes, each prefix stored once.

Given to a Hugging Face model as a cache, a shared prefix (the few-shot block of a task) is
expanded to the batch, concatenated with the rows' own keys in every layer at every decoding
step and, for grouped-query attention, repeated per query head: per layer and step that copies
``rows x heads x prefix`` keys and values, more work than the attention itself on a CPU.

``attention`` (registered with transformers' ``AttentionInterface`` as ``NAME`` by ``use(model)``,
which switches a model to it for a block) attends to

- the row's shared prefix (``RowCache.prefixes``, batch 1 each; rows of several tasks may decode
  together, each task with its own prefix), with one matrix product per prefix and key/value
  head over all its rows and query heads at once (nothing is copied), and
- each row's own keys and values, which ``RowCache`` keeps in preallocated per-layer buffers:
  a decoding step writes its new keys/values there (at each row's own length) and attends to
  the stored ones under the additive mask it is given (``[rows, 1, 1, stored keys]``),

combined in one softmax. A forward pass without ``rows=`` (a ``RowCache``) runs PyTorch's
scaled-dot-product attention, as the model had. Callers pass ``position_ids`` (rows start
after their prefix) and a 4-D mask. Prompts enter the buffers from a prompt pass laid end to end
(``edgebuild.bench.packed_attention``, which hands its keys and values to ``RowCache.keep``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

NAME = "edgebuild_shared_prefix"


@dataclass
class Span:
    """The rows a decoding step computes (``RowCache`` slots ``start:stop``) and where in each
    row's buffer its new token goes (``at``, one position per row)."""

    start: int
    stop: int
    at: torch.Tensor


class RowCache:
    """Keys and values of up to ``capacity`` rows, in slots ``0..capacity-1``, for every layer,
    each row after one of the shared ``prefixes`` (per prefix ``[(keys, values)]`` per layer,
    each ``[1, kv heads, prefix, dim]``, or None: no prefix). ``owner[slot]`` is the prefix of
    the row in that slot. The caller sets ``span`` and ``width`` before each decoding step."""

    def __init__(self, capacity: int, prefixes: list):
        self.capacity = capacity
        self.prefixes = [[(k[0], v[0]) for k, v in layers] if layers else None for layers in prefixes]
        self.owner = [0] * capacity
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.span: Span | None = None
        self.width = 0          # stored positions the current step attends to

    def prefix_length(self, prefix: int) -> int:
        layers = self.prefixes[prefix]
        return 0 if layers is None else layers[0][0].shape[1]

    def lengths(self, count: int) -> torch.Tensor:
        """Prefix length of the rows in slots ``0..count-1``."""
        return torch.tensor([self.prefix_length(self.owner[slot]) for slot in range(count)])

    def groups(self, count: int) -> list[tuple[int, torch.Tensor]]:
        """``[(prefix, slots)]`` of the rows in slots ``0..count-1`` that have a prefix."""
        slots: dict[int, list[int]] = {}
        for slot in range(count):
            if self.prefixes[self.owner[slot]] is not None:
                slots.setdefault(self.owner[slot], []).append(slot)
        return [(prefix, torch.tensor(members)) for prefix, members in slots.items()]

    def _buffers(self, layer: int, like: torch.Tensor, need: int):
        """The layer's key and value buffers, grown to at least ``need`` positions."""
        keys = self.keys.get(layer)
        if keys is None or keys.shape[2] < need:
            size = max(need, 0 if keys is None else keys.shape[2] * 3 // 2)
            shape = (self.capacity, like.shape[1], size, like.shape[3])
            grown = [like.new_zeros(shape), like.new_zeros(shape)]
            if keys is not None:
                grown[0][:, :, :keys.shape[2]] = keys
                grown[1][:, :, :keys.shape[2]] = self.values[layer]
            self.keys[layer], self.values[layer] = grown
        return self.keys[layer], self.values[layer]

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor):
        """Store the span's new ``key``/``value`` (``[rows, kv heads, 1, dim]``); return the
        stored keys and values it attends to, as ``[rows * kv heads, width, dim]`` views."""
        span = self.span
        keys, values = self._buffers(layer, key, self.width)
        rows = slice(span.start, span.stop)
        index = torch.arange(span.start, span.stop, device=key.device)
        keys[index, :, span.at], values[index, :, span.at] = key[:, :, 0], value[:, :, 0]
        count = (span.stop - span.start) * key.shape[1]
        shape = (count, self.width, key.shape[3])
        return (keys[rows, :, :self.width].reshape(shape), values[rows, :, :self.width].reshape(shape))

    def keep(self, layer: int, key: torch.Tensor, value: torch.Tensor, *, start: int,
             spans: list[tuple[int, int]]) -> None:
        """Keep the keys and values of prompts laid end to end (``[1, kv heads, tokens, dim]``,
        prompt i at ``spans[i]``) in slots ``start...``, from position 0."""
        keys, values = self._buffers(layer, key, max(stop - first for first, stop in spans))
        for slot, (first, stop) in enumerate(spans, start=start):
            keys[slot, :, :stop - first] = key[0, :, first:stop]
            values[slot, :, :stop - first] = value[0, :, first:stop]

    def move(self, source: int, target: int) -> None:
        """Copy slot ``source``'s stored keys and values into slot ``target``."""
        self.owner[target] = self.owner[source]
        for layer in self.keys:
            self.keys[layer][target] = self.keys[layer][source]
            self.values[layer][target] = self.values[layer][source]


def attention(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0,
              rows: RowCache | None = None, **kwargs):
    """``(output [rows, 1, heads, dim], None)``: softmax attention of each row's new token over
    its shared prefix and its own keys (masked by ``attention_mask``, which covers the own keys
    only). Without ``rows``: PyTorch's scaled-dot-product attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if rows is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    if query.shape[2] != 1:
        raise ValueError("a RowCache takes one new token per row; prompts enter through RowCache.keep")
    own_keys, own_values = rows.update(module.layer_idx, key, value)
    return _step(module, query, own_keys, own_values, attention_mask, scaling, rows), None


def _step(module, query, own_keys, own_values, attention_mask, scaling: float, rows: RowCache):
    """One new token per row: its attention over its prefix, in place, and its stored keys."""
    count, heads, length, dim = query.shape
    kv_heads = own_keys.shape[0] // count
    groups = heads // kv_heads
    q = query.reshape(count * kv_heads, groups, dim)
    own = torch.bmm(q, own_keys.transpose(1, 2)).mul_(scaling)
    own = own.view(count, kv_heads, groups, -1).add_(attention_mask)     # mask [count, 1, 1, keys]
    top = own.amax(-1, keepdim=True)
    shared = [(slots, _prefix_scores(q.view(count, kv_heads, groups, dim)[slots],
                                     rows.prefixes[prefix][module.layer_idx][0], scaling), prefix)
              for prefix, slots in rows.groups(count)]
    for slots, scores, _ in shared:
        top[slots] = torch.maximum(top[slots], scores.amax(-1, keepdim=True))
    own = own.sub_(top).exp_()
    total = own.sum(-1, keepdim=True)
    out = torch.bmm(own.view(count * kv_heads, groups, -1), own_values).view(count, kv_heads, groups, dim)
    for slots, scores, prefix in shared:
        weights = (scores - top[slots]).exp_()
        total[slots] += weights.sum(-1, keepdim=True)
        out[slots] += _prefix_values(weights, rows.prefixes[prefix][module.layer_idx][1])
    out /= total
    return out.reshape(count, 1, heads, dim)


def _prefix_scores(q: torch.Tensor, prefix_keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Scores ``[rows, kv heads, groups, prefix]`` of queries ``[rows, kv heads, groups, dim]``
    against one prefix's keys ``[kv heads, prefix, dim]``: one product per key/value head."""
    count, kv_heads, groups, dim = q.shape
    flat = q.transpose(0, 1).reshape(kv_heads, -1, dim)
    scores = torch.bmm(flat, prefix_keys.transpose(1, 2)).mul_(scaling)
    return scores.view(kv_heads, count, groups, -1).transpose(0, 1)


def _prefix_values(weights: torch.Tensor, prefix_values: torch.Tensor) -> torch.Tensor:
    """``weights [rows, kv heads, groups, prefix]`` applied to one prefix's values."""
    count, kv_heads, groups, _ = weights.shape
    flat = weights.transpose(0, 1).reshape(kv_heads, -1, weights.shape[-1])
    return torch.bmm(flat, prefix_values).view(kv_heads, count, groups, -1).transpose(0, 1)


def use(model):
    """``model`` attends through ``attention`` inside the block (every config it holds)."""
    return switched(model, NAME, attention)


@contextlib.contextmanager
def switched(model, name: str, function):
    """``model`` attends through ``function``, registered with transformers as ``name``
    (idempotent), inside the block."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, function)
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    saved = {key: config._attn_implementation for key, config in configs.items()}
    try:
        for config in configs.values():
            config._attn_implementation = name
        yield
    finally:
        for key, config in configs.items():
            config._attn_implementation = saved[key]
