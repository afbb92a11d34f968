"""Adaptive sampling: evaluate more items of a benchmark only while the gate cannot decide.

A retention check on a few hundred items is often ``inconclusive`` (the point estimate misses the
threshold but its interval still reaches it) or ``uninformative`` (the reference is not yet
significantly above chance). ``sample_until_decisive`` then evaluates further items, in a fixed
seeded order, doubling the number of items each round, until the verdict is ``pass`` or ``fail``
or the items run out. A clearly broken stage fails and a faithful copy passes on the first
round; only a borderline stage costs the whole item set.

Rounds: the first evaluates ``initial`` items as given (typically the profile's sample, already
run) or else the first ``first`` items of ``order``; each later round adds as many items as have
been evaluated so far. Each round's interval is taken at ``1 - (1 - confidence) / rounds``
(Bonferroni over the planned rounds), so looking several times does not raise the chance of a
wrong ``fail`` above ``1 - confidence``.

Verdicts use ``edgebuild.bench.stats.verdict``: with ``rule="point"`` (the gates' rule) the
sampler stops exactly when the gate would decide; ``rule="interval"`` stops only when the whole
interval lies on one side of the threshold. This module is pure logic: the caller supplies the
function that evaluates a list of doc ids.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from edgebuild.bench.profiles import task_rng
from edgebuild.bench.stats import (FAIL, PASS, UNINFORMATIVE, KINDS, RULES, Retention, paired,
                                   retention_of, verdict)
from edgebuild.core.errors import ConfigError, DataError

log = logging.getLogger(__name__)

Items = list  # [[doc_id, correct], ...]
Evaluate = Callable[[list], Items]


@dataclass
class Round:
    """One round: items evaluated so far, the retention, its interval and the verdict."""

    n: int
    value: float | None
    ci: tuple | None
    verdict: str


@dataclass
class AdaptiveResult:
    """Outcome of adaptive sampling.

    ``items`` / ``baseline_items``: every item evaluated, for the stage and the baseline (pass them
    to the gates as the task's items); ``verdict``: the last round's; ``exhausted``: True when the
    items ran out before a decision; ``confidence``: the per-round interval level used.
    """

    verdict: str
    items: Items
    baseline_items: Items
    retention: Retention
    history: list = field(default_factory=list)
    exhausted: bool = False
    confidence: float = 0.95

    def to_dict(self) -> dict:
        """A JSON-serialisable dict."""
        return asdict(self)


def extension_order(task: str, num_items: int, selected: Sequence[int] = (), seed: int = 0) -> list[int]:
    """Doc ids ``0..num_items-1`` not in ``selected``, in a fixed order seeded by task and seed."""
    chosen = set(int(i) for i in selected)
    rng = task_rng(f"{task}/adaptive", seed)
    return [int(i) for i in rng.permutation(num_items) if int(i) not in chosen]


def schedule(initial: int, remaining: int, first: int) -> list[int]:
    """Cumulative item counts after each round: start, then doubling, ending at the total."""
    total = initial + remaining
    n = initial if initial > 0 else min(first, total)
    sizes = [n]
    while n < total:
        n = min(2 * n, total)
        sizes.append(n)
    return sizes


def sample_until_decisive(evaluate: Evaluate, baseline: Items | Evaluate, order: Sequence,
                          *, threshold: float, chance: float, initial: Items = (), first: int = 32,
                          kind: str = "chance_normalised", rule: str = "point",
                          confidence: float = 0.95, n_boot: int = 1000, seed: int = 0,
                          max_items: int | None = None) -> AdaptiveResult:
    """Evaluate items of ``order`` round by round until the retention verdict is decisive.

    ``evaluate(doc_ids) -> [[doc_id, correct], ...]`` scores the stage on those items;
    ``baseline`` is the reference's items (covering every doc id evaluated) or a function like
    ``evaluate`` for the reference. ``initial`` holds stage items already evaluated (their ids are
    skipped in ``order``). ``max_items`` caps the total. ``kind`` and ``rule`` pick the retention
    (``raw``/``chance_normalised``) and the verdict rule (``point``/``interval``).
    """
    _check_args(kind, rule, first, max_items, confidence)
    done = {str(d) for d, _ in initial}
    todo = [d for d in order if str(d) not in done]
    total = len(initial) + len(todo) if max_items is None else min(max_items, len(initial) + len(todo))
    if total == 0:
        raise DataError("adaptive sampling got no items: give initial items or doc ids to evaluate")
    sizes = schedule(len(initial), max(0, total - len(initial)), first)
    level = 1 - (1 - confidence) / len(sizes)
    reference = _Reference(baseline)
    items, history, taken = list(initial), [], 0
    for size in sizes:
        batch = todo[taken:taken + size - len(items)]
        items += _evaluated(evaluate, batch, "stage")
        taken += len(batch)
        r, v = _judge(items, reference, chance, kind, rule, threshold, level, n_boot, seed)
        history.append(Round(r.n, *r.get(kind), v))
        log.info("adaptive round %d: n=%d %s retention %s -> %s", len(history), r.n, kind,
                 _fmt(r.get(kind)), v)
        if v in (PASS, FAIL):
            break
    return AdaptiveResult(v, items, reference.items_for(items), r, history,
                          exhausted=v not in (PASS, FAIL), confidence=level)


def _judge(items, reference, chance, kind, rule, threshold, level, n_boot, seed):
    """Retention of ``items`` against the reference, and its verdict."""
    s, b = paired(items, reference.items_for(items))
    r = retention_of(s, b, chance, confidence=level, n_boot=n_boot, seed=seed)
    if not r.informative:
        return r, UNINFORMATIVE
    value, ci = r.get(kind)
    return r, verdict(value, ci, threshold, rule)


class _Reference:
    """The reference's items: a fixed list, or filled on demand by an evaluate function."""

    def __init__(self, baseline: Items | Evaluate):
        self._evaluate = baseline if callable(baseline) else None
        self._items = {} if callable(baseline) else {str(d): [d, c] for d, c in baseline}

    def items_for(self, items: Items) -> Items:
        """The reference items of the same doc ids as ``items`` (evaluating missing ones)."""
        missing = [d for d, _ in items if str(d) not in self._items]
        if missing and self._evaluate is not None:
            for d, c in _evaluated(self._evaluate, missing, "baseline"):
                self._items[str(d)] = [d, c]
            missing = [d for d, _ in items if str(d) not in self._items]
        if missing:
            raise DataError(f"the baseline has no result for {len(missing)} item(s) "
                            f"(doc ids {missing[:5]}...); evaluate the baseline on the same items")
        return [self._items[str(d)] for d, _ in items]


def _evaluated(evaluate: Evaluate, doc_ids: list, who: str) -> Items:
    """``evaluate(doc_ids)``, checked to return one item per doc id asked for."""
    if not doc_ids:
        return []
    got = [[d, float(c)] for d, c in evaluate(list(doc_ids))]
    if sorted(str(d) for d, _ in got) != sorted(str(d) for d in doc_ids):
        raise DataError(f"the {who} evaluation returned items {[d for d, _ in got][:5]}... "
                        f"for doc ids {list(doc_ids)[:5]}...; it must return one item per doc id")
    return got


def _check_args(kind: str, rule: str, first: int, max_items: int | None, confidence: float) -> None:
    if kind not in KINDS:
        raise ConfigError(f"retention kind {kind!r} is not allowed (allowed: {', '.join(KINDS)})")
    if rule not in RULES:
        raise ConfigError(f"verdict rule {rule!r} is not allowed (allowed: {', '.join(RULES)})")
    if not isinstance(first, int) or first < 1:
        raise ConfigError(f"first round size must be a positive integer, got {first!r}")
    if max_items is not None and (not isinstance(max_items, int) or max_items < 1):
        raise ConfigError(f"max_items must be a positive integer or None, got {max_items!r}")
    if not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ConfigError(f"confidence level must be strictly between 0 and 1, got {confidence!r}")


def _fmt(value_ci) -> str:
    value, ci = value_ci
    if value is None:
        return "n/a"
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
