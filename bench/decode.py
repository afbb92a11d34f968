"""Batched generation that keeps the batch full and computes shared work once.

``generate`` answers a list of prompts that share generation settings (one lm-eval task's
requests); ``generate_groups`` answers several such groups (several tasks) in one running batch,
so that one task's long answers decode alongside the next task's rows instead of alone:

- **Shared prefix.** A group's common leading tokens (a task's few-shot block) run once; every
  row of the group attends to their keys and values in place
  (``edgebuild.bench.shared_attention``), never to a per-row copy.
- **Continuous batching.** Up to ``max_rows`` rows decode together. A row leaves the batch as soon
  as it has produced a stop string, an end-of-sequence token or ``max_new_tokens`` tokens, and
  waiting prompts take the free places, so a batch does not run on for one long answer while
  the others are done.
- **Identical prompts run once.** Samples of the same prompt (pass@k, or the same prompt in two
  groups) share its computation and start from copies of its keys and values.
- **Settings per row.** Each row stops, and picks its tokens (greedy or sampled), by its own
  group's settings.

Greedy rows give the tokens ``transformers``' ``generate`` gives (up to float rounding in the
batch). Sampled rows follow transformers' temperature / top-k / top-p rules and draw from their
own ``torch.Generator``, seeded per row (``seeds``), without sorting the vocabulary
(``edgebuild.bench.sampling``): a row's sample does not depend on which rows share its batch, so
results are reproducible whatever the batch size.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch

from edgebuild.bench import packed_attention, sampling
from edgebuild.bench.packed_attention import Packing
from edgebuild.bench.shared_attention import RowCache, use

SUPPORTED = {"do_sample", "temperature", "top_p", "top_k"}
MIN_PREFIX = 32


def shared_prefix_len(prompts: list[list[int]], min_prefix: int = MIN_PREFIX) -> int:
    """Length of the prompts' common leading part, leaving every prompt at least one token of
    its own; 0 when shorter than ``min_prefix``."""
    first = prompts[0]
    shared = min(len(p) for p in prompts) - 1
    for prompt in prompts[1:]:
        shared = min(shared, next((i for i, (a, b) in enumerate(zip(first, prompt)) if a != b), shared))
    return shared if shared >= min_prefix else 0


@dataclass
class Settings:
    """What every row of one group shares."""

    max_new_tokens: int
    finished: Callable[[list[list[int]]], list[bool]]
    eos: set
    do_sample: bool = False
    chain: list = field(default_factory=list)
    top_p: float | None = None


def settings(max_new_tokens: int, finished, eos: set, do_sample: bool = False, temperature=None,
             top_k=None, top_p=None) -> Settings:
    """``Settings`` with transformers' temperature and top-k warpers and the nucleus size for
    the sampling settings (none for greedy)."""
    nucleus = float(top_p) if do_sample and top_p not in (None, 1.0) else None
    return Settings(max_new_tokens, finished, eos, do_sample,
                    sampling.warpers(do_sample, temperature, top_k), nucleus)


@dataclass
class Group:
    """Prompts answered with the same ``settings`` (one task's requests); ``seeds``, one per
    prompt, for sampled groups."""

    prompts: list[list[int]]
    settings: Settings
    seeds: list[int] | None = None


@dataclass
class Row:
    """One answer being generated: its request, its prefix, its own prompt tokens and its new
    tokens."""

    index: tuple
    rest: list[int]
    settings: Settings
    prefix: int = 0
    new: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None

    @property
    def length(self) -> int:
        """Tokens stored in the row's cache slot (the last new token is not stored yet)."""
        return len(self.rest) + max(len(self.new) - 1, 0)

    @property
    def done(self) -> bool:
        """Ended by an end-of-sequence token or the token limit (stop strings: ``retire``)."""
        return self.new[-1] in self.settings.eos or len(self.new) >= self.settings.max_new_tokens


class Decoder:
    """The running batch of one ``generate_groups`` call (see the module doc)."""

    def __init__(self, model, prefixes: list[list[int]], max_rows: int, max_tokens: int = 2048):
        from edgebuild.bench.prefix_scoring import prefix_cache

        self.model, self.decoder, self.head = model, model.get_decoder(), model.get_output_embeddings()
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.max_tokens = max_tokens
        layers = [prefix_cache(self.decoder, tokens, self.device) if tokens else None for tokens in prefixes]
        self.cache = RowCache(max_rows, prefixes=layers)
        self.rows: list[Row] = []            # row i lives in cache slot i

    def admit(self, waiting: list[Row]) -> None:
        """Move waiting rows into the free slots; their prompts run once per distinct prompt, in
        blocks of one prefix and at most ``max_tokens`` tokens."""
        free = self.cache.capacity - len(self.rows)
        taken, waiting[:] = waiting[:free], waiting[free:]
        first: dict[tuple, Row] = {}
        for row in taken:
            first.setdefault((row.prefix, tuple(row.rest)), row)
        distinct = sorted(first.values(), key=lambda row: row.prefix)   # slots start, start + 1, ...
        copies = [row for row in taken if first[(row.prefix, tuple(row.rest))] is not row]
        start, logits = len(self.rows), []
        for a, b in _chunks([len(row.rest) for row in distinct], self.max_tokens,
                            [row.prefix for row in distinct]):
            logits.append(self._prefill([row.rest for row in distinct[a:b]], start + a, distinct[a].prefix))
        logits = torch.cat(logits)
        place = {id(row): i for i, row in enumerate(distinct)}
        for offset, row in enumerate(copies, start=len(distinct)):
            self.cache.move(start + place[id(first[(row.prefix, tuple(row.rest))])], start + offset)
        self.rows += distinct + copies
        sources = [place[id(first[(row.prefix, tuple(row.rest))])] for row in distinct + copies]
        self._append(start, logits[torch.tensor(sources, device=logits.device)])

    def _prefill(self, rests: list[list[int]], start: int, prefix: int) -> torch.Tensor:
        """Run distinct prompts of one prefix into slots ``start...``, end to end in one sequence
        (no padding; each attends to the prefix and to itself); the logits after each."""
        layers = self.cache.prefixes[prefix]
        tokens = [token for rest in rests for token in rest]
        segments = [(number, 0) for number, rest in enumerate(rests) for _ in rest]
        positions = [self.cache.prefix_length(prefix) + i for rest in rests for i in range(len(rest))]
        packing = Packing.of(segments, None if layers is None else [(k[None], v[None]) for k, v in layers],
                             self.dtype, self.device)
        packing.store = functools.partial(self.cache.keep, start=start, spans=packing.spans)
        for slot in range(start, start + len(rests)):
            self.cache.owner[slot] = prefix
        with packed_attention.use(self.model):
            hidden = self.decoder(input_ids=torch.tensor([tokens], device=self.device),
                                  position_ids=torch.tensor([positions], device=self.device),
                                  packing=packing, use_cache=False).last_hidden_state
        ends = torch.tensor([stop - 1 for _, stop in packing.spans], device=self.device)
        return self._logits(hidden[0, ends])

    def step(self) -> None:
        """One new token for every row in the batch."""
        at = torch.tensor([row.length for row in self.rows])
        ids = torch.tensor([[row.new[-1]] for row in self.rows])
        mask = self.cache.plan(at, self.dtype, self.device)
        positions = (self.cache.lengths(len(self.rows)) + at)[:, None]
        hidden = self.decoder(input_ids=ids.to(self.device), position_ids=positions.to(self.device),
                              attention_mask=mask, rows=self.cache, use_cache=False).last_hidden_state
        self._append(0, self._logits(hidden[:, -1]))

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden).float()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def _append(self, start: int, logits: torch.Tensor) -> None:
        """Choose the next token of rows ``start...`` from their logits, each by its settings."""
        rows = self.rows[start:]
        tokens = logits.argmax(dim=-1).tolist()
        for settings, members in _by_settings(rows, lambda s: s.do_sample):
            warped = logits[torch.tensor(members, device=logits.device)]
            for warp in settings.chain:
                warped = warp(None, warped)
            drawn = sampling.draw(warped, settings.top_p, [rows[i].generator for i in members])
            for i, token in zip(members, drawn):
                tokens[i] = token
        for row, token in zip(rows, tokens):
            row.new.append(int(token))

    def retire(self) -> list[Row]:
        """Take finished rows out of the batch (the last slot fills each hole)."""
        stopped = [False] * len(self.rows)
        for settings, members in _by_settings(self.rows):
            for i, stop in zip(members, settings.finished([self.rows[i].new for i in members])):
                stopped[i] = stop
        done = [i for i, (row, stop) in enumerate(zip(self.rows, stopped)) if stop or row.done]
        out = []
        for i in reversed(done):
            out.append(self.rows[i])
            last = len(self.rows) - 1
            if i != last:
                self.cache.move(last, i)
                self.rows[i] = self.rows[last]
            self.rows.pop()
        return out


def _by_settings(rows: list[Row], keep=lambda settings: True) -> list[tuple[Settings, list[int]]]:
    """``[(settings, [row number, ...])]`` of ``rows``, for the settings ``keep`` accepts."""
    members: dict[int, tuple[Settings, list[int]]] = {}
    for i, row in enumerate(rows):
        if keep(row.settings):
            members.setdefault(id(row.settings), (row.settings, []))[1].append(i)
    return list(members.values())


@torch.inference_mode()
def generate(model, prompts: list[list[int]], *, max_new_tokens: int,
             finished: Callable[[list[list[int]]], list[bool]], eos: set, max_rows: int = 32,
             do_sample: bool = False, seeds: list[int] | None = None, **options) -> list[list[int]]:
    """The new tokens of every prompt (up to and including the token that ended it).

    ``finished(new tokens of each row)`` says which rows have reached a stop string; a row also
    ends at a token in ``eos`` or after ``max_new_tokens`` tokens. Sampling (``do_sample``,
    ``temperature``, ``top_p``, ``top_k``) draws row ``i`` from a generator seeded ``seeds[i]``."""
    chosen = settings(max_new_tokens, finished, eos, do_sample, **options)
    return generate_groups(model, [Group(prompts, chosen, seeds)], max_rows=max_rows)[0]


@torch.inference_mode()
def generate_groups(model, groups: list[Group], *, max_rows: int = 32) -> list[list[list[int]]]:
    """``generate`` for several groups of prompts in one running batch: per group, the new tokens
    of each of its prompts. Groups are admitted in order, so a group's rows join the batch as
    the previous group's finish."""
    for group in groups:
        if group.settings.do_sample and (group.seeds is None or len(group.seeds) != len(group.prompts)):
            raise ValueError("sampled generation needs one seed per prompt")
    prefixes: dict[tuple, int] = {}
    waiting: list[Row] = []
    for g, group in enumerate(groups):
        if group.prompts:
            waiting += _rows(g, group, prefixes)
    decoder = Decoder(model, [list(tokens) for tokens in prefixes], max_rows)
    out: dict[tuple, list[int]] = {}
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
    return [[out[(g, i)] for i in range(len(group.prompts))] for g, group in enumerate(groups)]


def _rows(number: int, group: Group, prefixes: dict[tuple, int]) -> list[Row]:
    """The group's rows, longest prompt first (prompt blocks with little padding), each after
    the group's shared prefix (numbered in ``prefixes``, identical prefixes once)."""
    length = shared_prefix_len(group.prompts)
    prefix = prefixes.setdefault(tuple(group.prompts[0][:length]), len(prefixes))
    sampled = group.settings.do_sample
    rows = [Row((number, i), p[length:], group.settings, prefix,
                generator=_generator(group.seeds[i]) if sampled else None)
            for i, p in enumerate(group.prompts)]
    return sorted(rows, key=lambda row: -len(row.rest))


def _chunks(lengths: list[int], max_tokens: int, keys: list | None = None) -> list[tuple[int, int]]:
    """``[(first, last)]`` runs of prompts of at most ``max_tokens`` tokens in all (a longer
    prompt runs alone) whose ``keys`` (prefixes) are equal."""
    keys = keys or [None] * len(lengths)
    out, first, size = [], 0, 0
    for i, length in enumerate(lengths):
        if i > first and (keys[i] != keys[first] or size + length > max_tokens):
            out.append((first, i))
            first, size = i, 0
        size += length
    if lengths:
        out.append((first, len(lengths)))
    return out


def _generator(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator
