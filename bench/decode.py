"""Batched generation that keeps the batch full and computes shared work once.

``generate`` answers a list of prompts that share generation settings (one lm-eval task's
requests):

- **Shared prefix.** The prompts' common leading tokens (a task's few-shot block) run once; every
  row attends to their keys and values in place (``edgebuild.bench.shared_attention``), never to
  a per-row copy.
- **Continuous batching.** Up to ``max_rows`` rows decode together. A row leaves the batch as soon
  as it has produced a stop string, an end-of-sequence token or ``max_new_tokens`` tokens, and
  waiting prompts take the free places, so a batch does not run on for one long answer while
  the others are done.
- **Identical prompts run once.** Samples of the same prompt (pass@k) share its computation and
  start from copies of its keys and values.

Greedy rows give the tokens ``transformers``' ``generate`` gives (up to float rounding in the
batch). Sampled rows use transformers' temperature / top-k / top-p warpers and draw from their
own ``torch.Generator``, seeded per row (``seeds``): a row's sample does not depend on which rows
share its batch, so results are reproducible whatever the batch size.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from edgebuild.bench.shared_attention import RowCache, Span, use

SUPPORTED = {"do_sample", "temperature", "top_p", "top_k"}
MIN_PREFIX = 32


def warpers(do_sample: bool, temperature=None, top_p=None, top_k=None) -> list:
    """transformers' logits warpers for the given sampling settings (none for greedy)."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    if not do_sample:
        return []
    out = []
    if temperature not in (None, 1.0):
        out.append(TemperatureLogitsWarper(float(temperature)))
    if top_k:
        out.append(TopKLogitsWarper(int(top_k)))
    if top_p not in (None, 1.0):
        out.append(TopPLogitsWarper(float(top_p)))
    return out


def shared_prefix_len(prompts: list[list[int]], min_prefix: int = MIN_PREFIX) -> int:
    """Length of the prompts' common leading part, leaving every prompt at least one token of
    its own; 0 when shorter than ``min_prefix``."""
    first = prompts[0]
    shared = min(len(p) for p in prompts) - 1
    for prompt in prompts[1:]:
        shared = min(shared, next((i for i, (a, b) in enumerate(zip(first, prompt)) if a != b), shared))
    return shared if shared >= min_prefix else 0


@dataclass
class Row:
    """One answer being generated: its request, its own prompt tokens and its new tokens."""

    index: int
    rest: list[int]
    new: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None

    @property
    def length(self) -> int:
        """Tokens stored in the row's cache slot (the last new token is not stored yet)."""
        return len(self.rest) + max(len(self.new) - 1, 0)


@dataclass
class Settings:
    """What every row of one ``generate`` call shares."""

    max_new_tokens: int
    finished: Callable[[list[list[int]]], list[bool]]
    eos: set
    do_sample: bool = False
    chain: list = field(default_factory=list)


class Decoder:
    """The running batch of one ``generate`` call (see the module doc)."""

    def __init__(self, model, prefix: list[int], max_rows: int, settings: Settings,
                 max_tokens: int = 4096):
        from edgebuild.bench.prefix_scoring import prefix_cache

        self.model, self.decoder, self.head = model, model.get_decoder(), model.get_output_embeddings()
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.settings, self.max_tokens = settings, max_tokens
        layers = prefix_cache(self.decoder, prefix, self.device) if prefix else None
        self.cache = RowCache(max_rows, layers)
        self.rows: list[Row] = []            # row i lives in cache slot i

    def admit(self, waiting: list[Row]) -> None:
        """Move waiting rows into the free slots; their prompts run once per distinct prompt, in
        blocks of at most ``max_tokens`` padded tokens."""
        free = self.cache.capacity - len(self.rows)
        taken, waiting[:] = waiting[:free], waiting[free:]
        first: dict[tuple, Row] = {}
        for row in taken:
            first.setdefault(tuple(row.rest), row)
        distinct = list(first.values())                  # slots start, start + 1, ...
        copies = [row for row in taken if first[tuple(row.rest)] is not row]
        start, logits = len(self.rows), []
        for a, b in _chunks([len(row.rest) for row in distinct], self.max_tokens):
            logits.append(self._prefill([row.rest for row in distinct[a:b]], start + a))
        logits = torch.cat(logits)
        place = {id(row): i for i, row in enumerate(distinct)}
        for offset, row in enumerate(copies, start=len(distinct)):
            self.cache.move(start + place[id(first[tuple(row.rest)])], start + offset)
        self.rows += distinct + copies
        sources = [place[id(first[tuple(row.rest)])] for row in distinct + copies]
        self._append(start, logits[torch.tensor(sources, device=logits.device)])

    def _prefill(self, rests: list[list[int]], start: int) -> torch.Tensor:
        """Run distinct prompts into slots ``start...``; the logits after each prompt."""
        width = max(len(rest) for rest in rests)
        ids = torch.zeros(len(rests), width, dtype=torch.long)
        for i, rest in enumerate(rests):
            ids[i, :len(rest)] = torch.tensor(rest)
        lengths = torch.tensor([len(rest) for rest in rests])
        keys = torch.arange(width)
        allowed = (keys[None, :] <= keys[:, None])[None] & (keys[None, None, :] < lengths[:, None, None])
        allowed |= torch.eye(width, dtype=torch.bool)
        positions = self.cache.prefix_len + keys.expand(len(rests), width)
        self.cache.span, self.cache.width = Span(start, start + len(rests)), width
        hidden = self._forward(ids, positions, allowed)
        return self._logits(hidden[torch.arange(len(rests)), lengths - 1])

    def step(self) -> None:
        """One new token for every row in the batch."""
        count = len(self.rows)
        at = torch.tensor([row.length for row in self.rows])
        ids = torch.tensor([[row.new[-1]] for row in self.rows])
        self.cache.span, self.cache.width = Span(0, count, at.to(self.device)), int(at.max()) + 1
        allowed = (torch.arange(self.cache.width)[None, :] <= at[:, None])[:, None]
        hidden = self._forward(ids, self.cache.prefix_len + at[:, None], allowed)
        self._append(0, self._logits(hidden[:, -1]))

    def _forward(self, ids, positions, allowed) -> torch.Tensor:
        mask = torch.zeros(allowed.shape, dtype=self.dtype)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        return self.decoder(input_ids=ids.to(self.device), position_ids=positions.to(self.device),
                            attention_mask=mask[:, None].to(self.device), rows=self.cache,
                            use_cache=False).last_hidden_state

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden).float()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def _append(self, start: int, logits: torch.Tensor) -> None:
        """Choose the next token of rows ``start...`` from their logits."""
        rows = self.rows[start:]
        if not self.settings.do_sample:
            tokens = logits.argmax(dim=-1).tolist()
        else:
            for warp in self.settings.chain:
                logits = warp(None, logits)
            probs = torch.softmax(logits, dim=-1)
            tokens = [int(torch.multinomial(p, 1, generator=row.generator)) for p, row in zip(probs, rows)]
        for row, token in zip(rows, tokens):
            row.new.append(int(token))

    def retire(self) -> list[Row]:
        """Take finished rows out of the batch (the last slot fills each hole)."""
        s = self.settings
        if not self.rows:
            return []
        stopped = s.finished([row.new for row in self.rows])
        done = [i for i, (row, stop) in enumerate(zip(self.rows, stopped))
                if stop or row.new[-1] in s.eos or len(row.new) >= s.max_new_tokens]
        out = []
        for i in reversed(done):
            out.append(self.rows[i])
            last = len(self.rows) - 1
            if i != last:
                self.cache.move(last, i)
                self.rows[i] = self.rows[last]
            self.rows.pop()
        return out


@torch.inference_mode()
def generate(model, prompts: list[list[int]], *, max_new_tokens: int,
             finished: Callable[[list[list[int]]], list[bool]], eos: set, max_rows: int = 32,
             do_sample: bool = False, seeds: list[int] | None = None, **sampling) -> list[list[int]]:
    """The new tokens of every prompt (up to and including the token that ended it).

    ``finished(new tokens of each row)`` says which rows have reached a stop string; a row also
    ends at a token in ``eos`` or after ``max_new_tokens`` tokens. Sampling (``do_sample``,
    ``temperature``, ``top_p``, ``top_k``) draws row ``i`` from a generator seeded ``seeds[i]``."""
    if not prompts:
        return []
    if do_sample and (seeds is None or len(seeds) != len(prompts)):
        raise ValueError("sampled generation needs one seed per prompt")
    prefix = shared_prefix_len(prompts)
    settings = Settings(max_new_tokens, finished, eos, do_sample, warpers(do_sample, **sampling))
    decoder = Decoder(model, prompts[0][:prefix], max_rows, settings)
    waiting = [Row(i, p[prefix:], generator=_generator(seeds[i]) if do_sample else None)
               for i, p in enumerate(prompts)]
    waiting.sort(key=lambda row: -len(row.rest))        # prompt blocks with little padding
    out: dict[int, list[int]] = {}
    refill = max(1, max_rows // 4)        # admit new rows once this many places are free
    with use(model):
        while waiting or decoder.rows:
            done = decoder.retire()
            room = max_rows - len(decoder.rows)
            if waiting and (not decoder.rows or room >= min(refill, len(waiting))):
                decoder.admit(waiting)
                done += decoder.retire()
            out.update((row.index, row.new) for row in done)
            if decoder.rows:
                decoder.step()
    return [out[i] for i in range(len(prompts))]


def _chunks(lengths: list[int], max_tokens: int) -> list[tuple[int, int]]:
    """``[(first, last)]`` runs of prompts (longest first) whose padded block stays within
    ``max_tokens`` tokens (a longer prompt runs alone)."""
    out, first = [], 0
    for i in range(1, len(lengths) + 1):
        if i == len(lengths) or (i - first + 1) * max(lengths[first:i + 1]) > max_tokens:
            out.append((first, i))
            first = i
    return out


def _generator(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator
