"""Log-likelihoods of (context, continuation) pairs with the shared work done once.

lm-eval's ``HFLM`` runs one padded row per request: for a four-choice question it computes the
question four times, and for a 25-shot prompt it computes the 25 examples again for every choice
of every item. ``PackedScorer`` computes the same log-likelihoods (up to float rounding) with two
kinds of sharing:

- **One row per context.** A context and all of its continuations go into one row; a 4-D
  attention mask lets each continuation see the context and itself, never another
  continuation, and position ids restart after the context for each continuation. A
  one-token continuation adds no token at all (it is scored from the context's last position).
- **One prefix per family.** Contexts are sorted by their tokens; neighbours that share at least
  ``min_prefix`` leading tokens form a family (the requests of one few-shot task share their
  examples and instructions). The family's common prefix runs once; its keys and values are
  given to every batch of the family as a cache.

Only the positions that predict a continuation token go through the output layer and a float32
log-softmax (``HFLM`` takes the log-softmax of every position over the whole vocabulary).
Requires a decoder-only Hugging Face model whose attention takes a 4-D mask (LLaMA-style models
with full attention); ``supports(model)`` tells.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from edgebuild.core.models import cache_arg, returned_cache

MIN_PREFIX = 32


@dataclass
class Row:
    """One context and the continuations scored against it (``[(request index, tokens)]``)."""

    context: tuple
    requests: list = field(default_factory=list)

    def packed_len(self, prefix: int) -> int:
        """Tokens of this row after a shared prefix of ``prefix`` tokens."""
        return len(self.context) - prefix + sum(len(c) - 1 for _, c in self.requests)


def supports(model) -> bool:
    """Whether ``model`` can be scored packed: decoder-only, full attention, a decoder module."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "sliding_window", None) or getattr(config, "attention_chunk_size", None):
        return False
    return hasattr(model, "get_decoder") and model.get_output_embeddings() is not None


def group_rows(pairs: list[tuple[list, list]], max_length: int) -> list[Row]:
    """Requests grouped by context, sorted by context tokens (shared prefixes end up adjacent).

    A pair longer than ``max_length + 1`` tokens loses context tokens from the left, as in
    ``HFLM``."""
    rows: dict[tuple, Row] = {}
    for index, (context, continuation) in enumerate(pairs):
        if not context or not continuation:
            raise ValueError(f"request {index}: empty context or continuation")
        excess = len(context) + len(continuation) - (max_length + 1)
        key = tuple(context[excess:] if excess > 0 else context)
        rows.setdefault(key, Row(key)).requests.append((index, list(continuation)))
    return [rows[key] for key in sorted(rows)]


def common_prefix(a: tuple, b: tuple) -> int:
    """Length of the common leading part of two token sequences."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def families(rows: list[Row], min_prefix: int = MIN_PREFIX) -> list[tuple[int, list[Row]]]:
    """``[(shared prefix length, rows)]``: runs of sorted rows whose neighbours share at least
    ``min_prefix`` tokens. The prefix leaves at least one context token in every row (its last
    position predicts the first continuation token). Rows that share no such prefix with any
    neighbour form one family with prefix 0, listed first."""
    shared_runs: list[tuple[int, list[Row]]] = []
    loose: list[Row] = []
    start, shared = 0, None
    for i in range(1, len(rows) + 1):
        lcp = common_prefix(rows[i - 1].context, rows[i].context) if i < len(rows) else -1
        if lcp >= min_prefix:
            shared = lcp if shared is None else min(shared, lcp)
            continue
        group = rows[start:i]
        prefix = 0 if shared is None else min([shared] + [len(r.context) - 1 for r in group])
        if prefix >= min_prefix:
            shared_runs.append((prefix, group))
        else:
            loose += group
        start, shared = i, None
    return ([(0, loose)] if loose else []) + shared_runs


def lines(rows: list[Row], prefix: int) -> list[list[Row]]:
    """Rows of one family packed into lines no wider than the widest row (first fit, longest
    first): the short contexts of a task fill the space a long one leaves, instead of padding."""
    width = max(row.packed_len(prefix) for row in rows)
    packed: list[list] = []                  # [free tokens, rows]
    for row in sorted(rows, key=lambda r: -r.packed_len(prefix)):
        size = row.packed_len(prefix)
        line = next((line for line in packed if line[0] >= size), None)
        if line is None:
            line = [width, []]
            packed.append(line)
        line[0] -= size
        line[1].append(row)
    return [line for _, line in packed]


def line_len(line: list[Row], prefix: int) -> int:
    return sum(row.packed_len(prefix) for row in line)


def batches(lines_: list[list[Row]], prefix: int, max_rows: int, max_tokens: int) -> list[list[list[Row]]]:
    """Lines, longest first, in batches of at most ``max_rows`` lines and ``max_tokens`` padded
    tokens (the shared prefix counts an eighth: it is only attended to, not computed)."""
    ordered = sorted(lines_, key=lambda line: -line_len(line, prefix))
    out: list[list] = []
    for line in ordered:
        if out:
            width = line_len(out[-1][0], prefix) + prefix // 8
            if len(out[-1]) < max_rows and (len(out[-1]) + 1) * width <= max_tokens:
                out[-1].append(line)
                continue
        out.append([line])
    return out


def layout(line: list[Row], prefix: int) -> tuple[list, list, list, list]:
    """Tokens, positions, segment ids and targets of a line of rows.

    A segment id is ``(row number in the line, part)``, part 0 for the row's context and i for
    its continuation i (from 1). Positions restart after the prefix for every row and after its
    context for every continuation. ``targets`` holds, per request, ``(request index,
    [(line position, target token), ...])``."""
    tokens, positions, segments, targets = [], [], [], []
    for number, row in enumerate(line):
        rest = list(row.context[prefix:])
        end = len(tokens) + len(rest)
        tokens += rest
        positions += range(prefix, prefix + len(rest))
        segments += [(number, 0)] * len(rest)
        for part, (index, continuation) in enumerate(row.requests, start=1):
            start = len(tokens)
            inputs = continuation[:-1]
            tokens += inputs
            positions += range(prefix + len(rest), prefix + len(rest) + len(inputs))
            segments += [(number, part)] * len(inputs)
            predictors = [end - 1] + list(range(start, start + len(inputs)))
            targets.append((index, list(zip(predictors, continuation))))
    return tokens, positions, segments, targets


def attention_mask(rows: torch.Tensor, parts: torch.Tensor, prefix: int, dtype) -> torch.Tensor:
    """Additive ``[batch, 1, L, prefix + L]`` mask from ``[batch, L]`` row numbers (-1: padding)
    and parts (0: context, i: continuation i).

    A token sees the prefix, earlier context tokens of its row and earlier tokens of its own
    part; a padding token sees only itself."""
    batch, length = rows.shape
    same_row = rows[:, :, None] == rows[:, None, :]
    q, k = parts[:, :, None], parts[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    real = rows >= 0
    allowed = causal & same_row & ((k == 0) | (k == q)) & real[:, :, None] & real[:, None, :]
    allowed |= torch.eye(length, dtype=torch.bool)
    seen = torch.cat([real[:, :, None].expand(batch, length, prefix), allowed], dim=2)
    mask = torch.zeros(seen.shape, dtype=dtype)
    mask.masked_fill_(~seen, torch.finfo(dtype).min)
    return mask[:, None]


@torch.inference_mode()
def prefix_cache(decoder, tokens, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values of every layer of ``decoder`` for ``tokens`` (a batch of one)."""
    ids = torch.tensor([list(tokens)], dtype=torch.long, device=device)
    cache = returned_cache(decoder(input_ids=ids, use_cache=True))
    return [(layer.keys, layer.values) for layer in cache.layers]


def expanded_cache(layers: list[tuple[torch.Tensor, torch.Tensor]], batch: int):
    """A fresh ``DynamicCache`` holding ``prefix_cache`` output for ``batch`` rows (views, no copy;
    the cache's own updates concatenate new tensors and leave ``layers`` untouched)."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
                                        for k, v in layers])


class PackedScorer:
    """Scores ``[(context tokens, continuation tokens)]`` as ``[(log-likelihood, is_greedy)]``.

    ``max_rows`` and ``max_tokens`` bound a batch; ``progress(done, total)`` is called as
    requests finish."""

    def __init__(self, model, *, max_rows: int, max_tokens: int, max_length: int,
                 min_prefix: int = MIN_PREFIX, progress: Callable[[int, int], None] | None = None):
        self.model, self.decoder = model, model.get_decoder()
        self.head = model.get_output_embeddings()
        self.max_rows, self.max_tokens, self.max_length = max_rows, max_tokens, max_length
        self.min_prefix, self.progress = min_prefix, progress
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    @torch.inference_mode()
    def score(self, pairs: list[tuple[list, list]]) -> list[tuple[float, bool]]:
        """Log-likelihood of each continuation given its context, and whether greedy decoding
        would have produced it, in the order of ``pairs``."""
        results: list = [None] * len(pairs)
        done = 0
        for prefix, rows in families(group_rows(pairs, self.max_length), self.min_prefix):
            cache = self._prefix(rows[0].context[:prefix]) if prefix else None
            for batch in batches(lines(rows, prefix), prefix, self.max_rows, self.max_tokens):
                for index, value in self._batch(batch, prefix, cache):
                    results[index] = value
                    done += 1
                if self.progress is not None:
                    self.progress(done, len(pairs))
        return results

    def _prefix(self, tokens: tuple) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return prefix_cache(self.decoder, tokens, self.device)

    def _batch(self, batch: list[list[Row]], prefix: int, cache) -> list[tuple[int, tuple[float, bool]]]:
        """Run one batch of packed lines and score every request in it."""
        laid = [layout(line, prefix) for line in batch]
        width = max(len(tokens) for tokens, _, _, _ in laid)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        pos = torch.zeros(len(batch), width, dtype=torch.long)
        rows = torch.full((len(batch), width), -1, dtype=torch.long)
        parts = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (tokens, positions, segments, _) in enumerate(laid):
            n = len(tokens)
            ids[i, :n], pos[i, :n] = torch.tensor(tokens), torch.tensor(positions)
            rows[i, :n], parts[i, :n] = torch.tensor(segments).T
        past = expanded_cache(cache, len(batch)) if cache is not None else None
        mask = attention_mask(rows, parts, prefix, self.dtype).to(self.device)
        hidden = self.decoder(input_ids=ids.to(self.device), position_ids=pos.to(self.device),
                              attention_mask=mask, use_cache=past is not None,
                              **{cache_arg(self.decoder): past}).last_hidden_state
        return self._read(hidden, [targets for _, _, _, targets in laid])

    def _read(self, hidden: torch.Tensor, targets: list) -> list[tuple[int, tuple[float, bool]]]:
        """Log-likelihoods of the target tokens, from the hidden states at their predictors."""
        rows, cols, tokens, owners = [], [], [], []
        for r, row_targets in enumerate(targets):
            for index, pairs in row_targets:
                for position, token in pairs:
                    rows.append(r), cols.append(position), tokens.append(token), owners.append(index)
        device = hidden.device
        logits = self.head(hidden[torch.tensor(rows, device=device),
                                  torch.tensor(cols, device=device)]).float()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        logprobs = torch.log_softmax(logits, dim=-1)
        wanted = torch.tensor(tokens, device=logprobs.device)
        picked = logprobs.gather(1, wanted[:, None])[:, 0].tolist()
        greedy = (logprobs.argmax(dim=-1) == wanted).tolist()
        totals: dict[int, list] = {}
        for owner, value, hit in zip(owners, picked, greedy):
            total = totals.setdefault(owner, [0.0, True])
            total[0] += value
            total[1] = total[1] and hit
        return [(owner, (total[0], bool(total[1]))) for owner, total in totals.items()]
