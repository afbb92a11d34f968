"""Log-likelihoods of (context, continuation) pairs with the shared work done once.

lm-eval's ``HFLM`` runs one padded row per request: for a four-choice question it computes the
question four times, and for a 25-shot prompt it computes the 25 examples again for every choice
of every item. ``PackedScorer`` computes the same log-likelihoods (up to float rounding) with three
kinds of sharing:

- **One row per context.** A context and all of its continuations go into one row; each
  continuation sees the context and itself, never another continuation, and position ids restart
  after the context for each continuation. A one-token continuation adds no token at all (it is
  scored from the context's last position).
- **One prefix per family.** Contexts are sorted by their tokens; neighbours that share at least
  ``min_prefix`` leading tokens form a family (the requests of one few-shot task share their
  examples and instructions). The family's common prefix runs once; its keys and values are
  given to every batch of the family.
- **No padding.** The rows of a batch lie end to end in one sequence of at most ``max_tokens``
  tokens, so the linear layers compute real tokens only, and each row attends to the prefix and
  to itself only (``edgebuild.bench.packed_attention``).

Only the positions that predict a continuation token go through the output layer (each once,
however many one-token continuations it predicts) and a float32 normaliser, in chunks (``HFLM``
takes the log-softmax of every position over the whole vocabulary). Requires a decoder-only Hugging Face
model with full attention that takes transformers' pluggable attention functions; ``supports(model)``
tells.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from edgebuild.bench import packed_attention, softmax
from edgebuild.bench.packed_attention import Packing
from edgebuild.core.models import returned_cache

MIN_PREFIX = 32
HEAD_CHUNK = 128          # states through the output layer at a time (128 x 49,152 logits: 25 MB)


@dataclass
class Row:
    """One context and the continuations scored against it (``[(request index, tokens)]``)."""

    context: tuple
    requests: list = field(default_factory=list)

    def packed_len(self, prefix: int) -> int:
        """Tokens of this row after a shared prefix of ``prefix`` tokens."""
        return len(self.context) - prefix + sum(len(c) - 1 for _, c in self.requests)


def supports(model) -> bool:
    """Whether ``model`` can be scored packed: decoder-only, full attention, a decoder module,
    attention through transformers' pluggable attention functions."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "sliding_window", None) or getattr(config, "attention_chunk_size", None):
        return False
    if not getattr(model, "_supports_attention_backend", False):
        return False
    return hasattr(model, "get_decoder") and model.get_output_embeddings() is not None


def distinct(pairs: list[tuple[list, list]]) -> tuple[list, list[int]]:
    """``(distinct pairs in first-seen order, position of each pair among them)``."""
    positions: dict[tuple, int] = {}
    out, which = [], []
    for context, continuation in pairs:
        key = (tuple(context), tuple(continuation))
        if key not in positions:
            positions[key] = len(out)
            out.append((context, continuation))
        which.append(positions[key])
    return out, which


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


def batches(rows: list[Row], prefix: int, max_tokens: int) -> list[list[Row]]:
    """Rows of one family, in order, in batches of at most ``max_tokens`` packed tokens (a longer
    row is a batch of its own)."""
    out: list[list[Row]] = []
    size = 0
    for row in rows:
        tokens = row.packed_len(prefix)
        if out and size + tokens <= max_tokens:
            out[-1].append(row)
            size += tokens
        else:
            out.append([row])
            size = tokens
    return out


def layout(rows: list[Row], prefix: int) -> tuple[list, list, list, list]:
    """Tokens, positions, segment ids and targets of rows laid end to end in one sequence.

    A segment id is ``(row number in the batch, part)``, part 0 for the row's context and i for
    its continuation i (from 1). Positions restart after the prefix for every row and after its
    context for every continuation. ``targets`` holds, per request, ``(request index,
    [(sequence position, target token), ...])``."""
    tokens, positions, segments, targets = [], [], [], []
    for number, row in enumerate(rows):
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


@torch.inference_mode()
def prefix_cache(decoder, tokens, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values of every layer of ``decoder`` for ``tokens`` (a batch of one)."""
    ids = torch.tensor([list(tokens)], dtype=torch.long, device=device)
    cache = returned_cache(decoder(input_ids=ids, use_cache=True))
    return [(layer.keys, layer.values) for layer in cache.layers]


class PackedScorer:
    """Scores ``[(context tokens, continuation tokens)]`` as ``[(log-likelihood, is_greedy)]``.

    ``max_tokens`` bounds a batch; ``progress(done, total)`` is called as distinct requests finish
    (a request repeated in ``pairs``, as when two tasks ask the same question, runs once)."""

    def __init__(self, model, *, max_tokens: int, max_length: int, min_prefix: int = MIN_PREFIX,
                 progress: Callable[[int, int], None] | None = None):
        self.model, self.decoder = model, model.get_decoder()
        self.head = model.get_output_embeddings()
        self.max_tokens, self.max_length = max_tokens, max_length
        self.min_prefix, self.progress = min_prefix, progress
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    @torch.inference_mode()
    def score(self, pairs: list[tuple[list, list]]) -> list[tuple[float, bool]]:
        """Log-likelihood of each continuation given its context, and whether greedy decoding
        would have produced it, in the order of ``pairs``."""
        unique, which = distinct(pairs)            # a repeated request runs once
        results: dict = {}
        for prefix, rows in families(group_rows(unique, self.max_length), self.min_prefix):
            cache = self._prefix(rows[0].context[:prefix]) if prefix else None
            for batch in batches(rows, prefix, self.max_tokens):
                results.update(self._batch(batch, prefix, cache))
                if self.progress is not None:
                    self.progress(len(results), len(unique))
        return [results[i] for i in which]

    def _prefix(self, tokens: tuple) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return prefix_cache(self.decoder, tokens, self.device)

    def _batch(self, batch: list[Row], prefix: int, cache) -> list[tuple[int, tuple[float, bool]]]:
        """Run one batch of rows, end to end in one sequence, and score every request in it."""
        tokens, positions, segments, targets = layout(batch, prefix)
        packing = Packing.of(segments, cache, self.dtype, self.device)
        with packed_attention.use(self.model):
            hidden = self.decoder(input_ids=torch.tensor([tokens], device=self.device),
                                  position_ids=torch.tensor([positions], device=self.device),
                                  packing=packing, use_cache=False).last_hidden_state
        return self._read(hidden[0], targets)

    def _read(self, hidden: torch.Tensor, targets: list) -> list[tuple[int, tuple[float, bool]]]:
        """Log-likelihoods of the target tokens, from the hidden states at their predictors (each
        predicting position through the output layer once)."""
        cols = torch.tensor([position for _, pairs in targets for position, _ in pairs])
        tokens = torch.tensor([token for _, pairs in targets for _, token in pairs])
        owners = [index for index, pairs in targets for _ in pairs]
        unique, inverse = torch.unique(cols, return_inverse=True)
        picked, best = self._log_probs(hidden[unique.to(hidden.device)], inverse, tokens)
        greedy = (best[inverse] == tokens).tolist()
        totals: dict[int, list] = {}
        for owner, value, hit in zip(owners, picked.tolist(), greedy):
            total = totals.setdefault(owner, [0.0, True])
            total[0] += value
            total[1] = total[1] and hit
        return [(owner, (total[0], bool(total[1]))) for owner, total in totals.items()]

    def _log_probs(self, states: torch.Tensor, inverse: torch.Tensor, tokens: torch.Tensor):
        """``(log-probability of tokens[i] at states[inverse[i]], argmax token of every state)``,
        in float32, the output layer applied ``HEAD_CHUNK`` states at a time (a full-vocabulary
        log-softmax of every state would write, and read back, states x vocabulary floats)."""
        inverse, tokens = inverse.to(states.device), tokens.to(states.device)
        picked = torch.empty(len(tokens), dtype=torch.float32, device=states.device)
        best = torch.empty(len(states), dtype=torch.long, device=states.device)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        for start in range(0, len(states), HEAD_CHUNK):
            logits = self.head(states[start:start + HEAD_CHUNK]).float()
            if cap:
                logits = torch.tanh(logits / cap) * cap
            top, best[start:start + len(logits)] = logits.max(dim=-1)
            norm = softmax.exp_(logits - top[:, None]).sum(dim=-1).log_() + top
            mine = ((inverse >= start) & (inverse < start + len(logits))).nonzero()[:, 0]
            local = inverse[mine] - start
            picked[mine] = logits[local, tokens[mine]] - norm[local]
        return picked.cpu(), best.cpu()
