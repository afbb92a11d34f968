"""Edge-of-chaos check: is the model under test working where a benchmark can still see it change?

A benchmark discriminates best between a good and a damaged model when the model answers most,
but not all, of its items. The seed (§1.3) asks that the model under test score 70-80 % on the
configured benchmark and sample; its accuracy (the mean of the per-item results) falls in one of
four bands:

===========  ================  ==============================================================
band         accuracy          verdict
===========  ================  ==============================================================
collapsed    below 60 %        ``fail`` (``inconclusive`` when the interval reaches 70 %)
degraded     60 % to < 70 %    ``fail`` (``inconclusive`` when the interval reaches 70 %)
edge         70 % to 80 %      ``pass``
saturated    above 80 %        ``uninformative``: too easy to show a loss; reported, not a
                               failure of the stage
===========  ================  ==============================================================

The band is that of the point estimate; the bootstrap interval of the accuracy only softens a
failure into ``inconclusive`` when the model may still reach the edge band (the gates' rule: a
stage fails when even the interval's upper end misses the threshold).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from edgebuild.bench.stats import FAIL, INCONCLUSIVE, PASS, UNINFORMATIVE, mean_interval
from edgebuild.core.errors import DataError

COLLAPSED, DEGRADED, EDGE, SATURATED = "collapsed", "degraded", "edge", "saturated"
COLLAPSE_BELOW = 0.60
EDGE_LOW = 0.70
EDGE_HIGH = 0.80


@dataclass
class EdgeResult:
    """The accuracy of the model under test, its interval, band and verdict."""

    task: str
    band: str
    accuracy: float
    ci: tuple
    n: int
    verdict: str
    detail: str

    def to_dict(self) -> dict:
        """A JSON-serialisable dict."""
        return asdict(self)


def band_of(accuracy: float) -> str:
    """The band (``collapsed``, ``degraded``, ``edge``, ``saturated``) of an accuracy in [0, 1]."""
    if accuracy < COLLAPSE_BELOW:
        return COLLAPSED
    if accuracy < EDGE_LOW:
        return DEGRADED
    return EDGE if accuracy <= EDGE_HIGH else SATURATED


def check(result, *, task: str | None = None, confidence: float = 0.95, n_boot: int = 1000,
          seed: int = 0) -> EdgeResult:
    """Classify a benchmark result of the model under test.

    ``result`` is a ``TaskResult``, its ``to_dict()`` form, or a plain ``[[doc_id, correct], ...]``
    list; ``task`` names it in the result (default: the result's own name). Raises ``DataError``
    when there are no items.
    """
    name, items = _name_and_items(result, task)
    correct = np.array([float(c) for _, c in items])
    if correct.size == 0:
        raise DataError(f"edge-of-chaos check: {name} has no per-item results; run the benchmark first")
    accuracy = float(correct.mean())
    ci = mean_interval(correct, confidence, n_boot, seed)
    band = band_of(accuracy)
    verdict = _verdict(band, ci)
    detail = (f"{name}: accuracy {accuracy:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] on n={correct.size}: "
              f"{band} (edge band {EDGE_LOW:.0%}-{EDGE_HIGH:.0%})")
    return EdgeResult(name, band, accuracy, ci, int(correct.size), verdict, detail)


def _verdict(band: str, ci: tuple) -> str:
    if band == EDGE:
        return PASS
    if band == SATURATED:
        return UNINFORMATIVE
    return FAIL if ci[1] < EDGE_LOW else INCONCLUSIVE


def _name_and_items(result, task: str | None) -> tuple[str, list]:
    if isinstance(result, dict):
        return task or result.get("name", "benchmark"), result.get("items", [])
    if hasattr(result, "items") and not callable(result.items):
        return task or getattr(result, "name", "benchmark"), result.items
    return task or "benchmark", list(result)
