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
  the stored ones under the additive mask it is given (``[rows, 1, 1, block]``). Rows admitted
  at different times have very different lengths; a step reads every row's buffer up to a
  common ``block`` of positions in place, and only the rows that run past it have their
  remaining positions gathered (``RowCache.plan`` picks the block: reading every row up to the
  longest one read twice the keys that exist in the suite's generation),

combined in one softmax. A forward pass without ``rows=`` (a ``RowCache``) runs PyTorch's
scaled-dot-product attention, as the model had. Callers pass ``position_ids`` (rows start
after their prefix) and a 4-D mask. Prompts enter the buffers from a prompt pass laid end to end
(``edgebuild.bench.packed_attention``, which hands its keys and values to ``RowCache.keep``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from edgebuild.bench import softmax

NAME = "edgebuild_shared_prefix"


@dataclass
class Span:
    """The rows a decoding step computes (``RowCache`` slots ``start:stop``) and where in each
    row's buffer its new token goes (``at``, one position per row)."""

    start: int
    stop: int
    at: torch.Tensor


@dataclass
class Tail:
    """The rows of a step (``slots``, in span order) whose stored keys run past the common block,
    and their additive mask ``[rows, 1, 1, width - block]`` over positions ``block...width-1``."""

    slots: torch.Tensor
    mask: torch.Tensor


GATHER_COST = 3     # a gathered key position costs about this many read in place (copy, then read)


def split(lengths: list[int]) -> int:
    """The common block for rows of ``lengths`` stored positions: the width that minimises the
    positions read in place by every row plus, at ``GATHER_COST`` each, the gathered positions
    of the rows that are longer (the longest row's width when no block reads less)."""
    longest, count = max(lengths), len(lengths)
    best, block = count * longest, longest
    ordered = sorted(lengths, reverse=True)
    for longer, width in enumerate(ordered[1:], start=1):
        if width == ordered[longer - 1]:
            continue
        cost = count * width + GATHER_COST * longer * (longest - width)
        if cost < best:
            best, block = cost, width
    return block


class RowCache:
    """Keys and values of up to ``capacity`` rows, in slots ``0..capacity-1``, for every layer,
    each row after one of the shared ``prefixes`` (per prefix ``[(keys, values)]`` per layer,
    each ``[1, kv heads, prefix, dim]``, or None: no prefix). ``owner[slot]`` is the prefix of
    the row in that slot. ``plan`` sets ``span``, ``width``, ``block`` and ``tail`` before each
    decoding step."""

    def __init__(self, capacity: int, prefixes: list):
        self.capacity = capacity
        self.prefixes = [[(k[0], v[0]) for k, v in layers] if layers else None for layers in prefixes]
        self.owner = [0] * capacity
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.span: Span | None = None
        self.width = 0          # stored positions the current step attends to
        self.block = 0          # of which every row reads this many in place
        self.tail: Tail | None = None

    def plan(self, at: torch.Tensor, dtype=torch.float32, device="cpu") -> torch.Tensor:
        """Set up a decoding step of the rows in slots ``0..len(at)-1``, whose new tokens go to
        positions ``at``; return their additive mask ``[rows, 1, 1, block]`` over the block."""
        lengths = (at + 1).tolist()
        self.span = Span(0, len(lengths), at.to(device))
        self.width, self.block = max(lengths), split(lengths)
        longer = torch.tensor([i for i, length in enumerate(lengths) if length > self.block], dtype=torch.long)
        self.tail = None if not len(longer) else Tail(
            longer.to(device), _mask(torch.arange(self.block, self.width), at[longer], dtype).to(device))
        return _mask(torch.arange(self.block), at, dtype).to(device)

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
        stored keys and values it attends to: the block, as ``[rows * kv heads, block, dim]``
        views, and the tail rows' positions past it (gathered) or None."""
        span = self.span
        keys, values = self._buffers(layer, key, self.width)
        rows = slice(span.start, span.stop)
        index = torch.arange(span.start, span.stop, device=key.device)
        keys[index, :, span.at], values[index, :, span.at] = key[:, :, 0], value[:, :, 0]
        block = tuple(_flat(stored[rows, :, :self.block]) for stored in (keys, values))
        if self.tail is None:
            return block, None
        slots = self.tail.slots + span.start
        return block, tuple(_flat(stored[:, :, self.block:self.width].index_select(0, slots))
                            for stored in (keys, values))

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
    block, tail = rows.update(module.layer_idx, key, value)
    return _step(module, query, block, tail, attention_mask, scaling, rows), None


def _step(module, query, block, tail, attention_mask, scaling: float, rows: RowCache):
    """One new token per row: one softmax over its prefix (in place), its stored keys in the
    block (in place) and, for a tail row, its stored keys past the block."""
    count, heads, _, dim = query.shape
    kv_heads = block[0].shape[0] // count
    q = query.reshape(count, kv_heads, heads // kv_heads, dim)
    everyone = slice(None)
    parts = [(everyone, _row_scores(q, block[0], attention_mask, scaling), block[1], _row_values)]
    if tail is not None:
        slots = rows.tail.slots
        parts.append((slots, _row_scores(q[slots], tail[0], rows.tail.mask, scaling), tail[1], _row_values))
    for prefix, slots in rows.groups(count):
        keys, values = rows.prefixes[prefix][module.layer_idx]
        parts.append((slots, _prefix_scores(q[slots], keys, scaling), values, _prefix_values))
    return _softmax(parts, q).reshape(count, 1, heads, dim)


def _softmax(parts: list, q: torch.Tensor) -> torch.Tensor:
    """``[rows, kv heads, groups, dim]``: softmax attention over the union of ``parts``, each
    ``(rows, scores, values, apply)`` (``apply(weights, values)`` gives their weighted sum)."""
    top = parts[0][1].amax(-1, keepdim=True)
    for slots, scores, _, _ in parts[1:]:
        top[slots] = torch.maximum(top[slots], scores.amax(-1, keepdim=True))
    total, out = torch.zeros_like(top), torch.zeros_like(q)
    for slots, scores, values, apply in parts:
        weights = softmax.exp_(scores.sub_(top[slots]))
        total[slots] += weights.sum(-1, keepdim=True)
        out[slots] += apply(weights, values)
    return out.div_(total)


def _row_scores(q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, scaling: float) -> torch.Tensor:
    """Scores ``[rows, kv heads, groups, keys]`` of queries ``[rows, kv heads, groups, dim]``
    against each row's own keys ``[rows * kv heads, keys, dim]``, masked (``[rows, 1, 1, keys]``)."""
    count, kv_heads, groups, dim = q.shape
    scores = torch.bmm(q.reshape(count * kv_heads, groups, dim), keys.transpose(1, 2)).mul_(scaling)
    return scores.view(count, kv_heads, groups, -1).add_(mask)


def _row_values(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``weights [rows, kv heads, groups, keys]`` applied to each row's own values."""
    count, kv_heads, groups, width = weights.shape
    return torch.bmm(weights.reshape(count * kv_heads, groups, width), values).view(count, kv_heads, groups, -1)


def _flat(stored: torch.Tensor) -> torch.Tensor:
    """``[rows, kv heads, positions, dim]`` as ``[rows * kv heads, positions, dim]`` (a view
    where the layout allows)."""
    return stored.reshape(-1, stored.shape[2], stored.shape[3])


def _mask(positions: torch.Tensor, at: torch.Tensor, dtype) -> torch.Tensor:
    """Additive mask ``[rows, 1, 1, positions]``: a row sees the stored positions up to its ``at``."""
    allowed = positions[None, :] <= at[:, None]
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None, None]


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
