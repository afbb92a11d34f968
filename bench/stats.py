"""Statistics on paired per-item benchmark results (numpy only).

A stage and its reference answer the same items; ``paired`` aligns their ``[[doc_id, correct],
...]`` lists on doc id. Retention is reported two ways:

- raw: ``score / reference`` (the seed's definition);
- chance-normalised: ``(score - chance) / (reference - chance)``, which a model answering at
  random cannot game on a benchmark whose reference is itself close to chance.

Intervals come from a paired bootstrap: each replicate resamples item indices once and takes
both models' means on the same items, so the correlation between the two models is kept. The
resampling is seeded and vectorised (a replicates x items index matrix, built in chunks that
bound memory). Interval ends are percentiles of the replicate ratios; replicates whose
denominator is not positive are left out.

Verdicts against a threshold, for a value and its interval ``(lo, hi)``:

=========  =====================================  ======================================
rule       pass                                   fail
=========  =====================================  ======================================
point      value >= threshold                     hi < threshold
interval   lo >= threshold                        hi < threshold
=========  =====================================  ======================================

Anything else is ``inconclusive``; a missing value is ``uninformative``. The gates use the
``point`` rule (a stage is not failed on noise); adaptive sampling stops on the ``interval`` rule,
which decides only when the interval lies on one side of the threshold.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgebuild.core.errors import ConfigError

PASS, FAIL, INCONCLUSIVE, UNINFORMATIVE, NOT_RUN = "pass", "fail", "inconclusive", "uninformative", "not_run"
SKIPPED = "skipped"          # a check the user chose not to run (e.g. --no-device)
RULES = ("point", "interval")
KINDS = ("raw", "chance_normalised")
MAX_DRAWS = 1 << 22          # indices drawn per chunk of bootstrap replicates (32 MB of int64)


@dataclass
class Retention:
    """Raw and chance-normalised retention of a stage, with their intervals.

    ``informative`` is False when the reference is not significantly above chance on these
    items: the normalised figures are then None (a ratio of noise).
    """

    raw: float | None
    normalised: float | None
    raw_ci: tuple | None
    normalised_ci: tuple | None
    n: int
    informative: bool

    def get(self, kind: str):
        """``(value, ci)`` of ``kind``: ``"raw"`` or ``"chance_normalised"``."""
        return (self.raw, self.raw_ci) if kind == "raw" else (self.normalised, self.normalised_ci)


def paired(stage_items, ref_items) -> tuple[np.ndarray, np.ndarray]:
    """Align two per-item lists ``[[doc_id, correct], ...]`` on doc id; returns two arrays.

    Items of the stage without a reference item are left out; the stage's order is kept.
    """
    ref = {str(d): float(c) for d, c in ref_items}
    common = [(float(c), ref[str(d)]) for d, c in stage_items if str(d) in ref]
    if not common:
        return np.zeros(0), np.zeros(0)
    a = np.array(common)
    return a[:, 0], a[:, 1]


def ratio(num: float, den: float) -> float | None:
    """``num / den`` as a float, or None when the denominator is not positive."""
    return float(num / den) if den > 0 else None


def raw_retention(s: np.ndarray, b: np.ndarray) -> float | None:
    """Mean stage score over mean reference score."""
    return ratio(np.mean(s), np.mean(b))


def normalised_retention(s: np.ndarray, b: np.ndarray, chance: float) -> float | None:
    """``(mean stage - chance) / (mean reference - chance)``; None at or below chance."""
    return ratio(np.mean(s) - chance, np.mean(b) - chance)


def bootstrap_means(*columns: np.ndarray, n_boot: int = 1000, seed: int = 0) -> list[np.ndarray]:
    """Means of each column over ``n_boot`` paired resamples of the items (one array each).

    All columns are resampled with the same indices, so pairs stay together. Deterministic for a
    given ``seed``, ``n_boot`` and number of items.
    """
    columns = [np.asarray(c, dtype=float) for c in columns]
    n = len(columns[0])
    if n == 0 or any(len(c) != n for c in columns):
        raise ValueError(f"bootstrap needs columns of one positive length, got {[len(c) for c in columns]}")
    _check_n_boot(n_boot)
    rng = np.random.default_rng(seed)
    rows = max(1, MAX_DRAWS // n)
    out = [[] for _ in columns]
    for start in range(0, n_boot, rows):
        idx = rng.integers(0, n, size=(min(rows, n_boot - start), n))
        for acc, col in zip(out, columns):
            acc.append(col[idx].mean(axis=1))
    return [np.concatenate(acc) for acc in out]


def percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """The central ``confidence`` interval of ``values`` (percentiles)."""
    _check_confidence(confidence)
    lo_q, hi_q = (1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100
    return float(np.percentile(values, lo_q)), float(np.percentile(values, hi_q))


def ratio_interval(num: np.ndarray, den: np.ndarray, confidence: float) -> tuple | None:
    """Percentile interval of ``num / den`` over the replicates with a positive denominator."""
    ok = den > 0
    if not ok.any():
        return None
    return percentile_interval(num[ok] / den[ok], confidence)


def mean_interval(x, confidence: float = 0.95, n_boot: int = 1000, seed: int = 0) -> tuple:
    """Bootstrap percentile interval of the mean of ``x`` (e.g. an accuracy)."""
    (means,) = bootstrap_means(np.asarray(x, dtype=float), n_boot=n_boot, seed=seed)
    return percentile_interval(means, confidence)


def retention(stage_items, ref_items, chance: float, *, confidence: float = 0.95,
              n_boot: int = 1000, seed: int = 0) -> Retention:
    """Raw and chance-normalised retention of paired items, with paired bootstrap intervals."""
    s, b = paired(stage_items, ref_items)
    return retention_of(s, b, chance, confidence=confidence, n_boot=n_boot, seed=seed)


def retention_of(s: np.ndarray, b: np.ndarray, chance: float, *, confidence: float = 0.95,
                 n_boot: int = 1000, seed: int = 0) -> Retention:
    """``retention`` on already paired arrays ``s`` (stage) and ``b`` (reference)."""
    n = len(s)
    if n == 0:
        return Retention(None, None, None, None, 0, False)
    sb, bb = bootstrap_means(s, b, n_boot=n_boot, seed=seed)
    informative = percentile_interval(bb - chance, confidence)[0] > 0
    raw_ci = ratio_interval(sb, bb, confidence)
    if not informative:
        return Retention(raw_retention(s, b), None, raw_ci, None, n, False)
    norm_ci = ratio_interval(sb - chance, bb - chance, confidence)
    return Retention(raw_retention(s, b), normalised_retention(s, b, chance), raw_ci, norm_ci, n, True)


def verdict(value: float | None, ci: tuple | None, threshold: float, rule: str = "point") -> str:
    """``pass``, ``fail``, ``inconclusive`` or ``uninformative`` of ``value`` against ``threshold``.

    See the module docstring for the two rules. Without an interval, ``point`` decides on the
    value alone and ``interval`` cannot decide.
    """
    if rule not in RULES:
        raise ConfigError(f"verdict rule {rule!r} is not allowed (allowed: {', '.join(RULES)})")
    if value is None:
        return UNINFORMATIVE
    if rule == "point" and value >= threshold:
        return PASS
    if ci is None:
        return FAIL if rule == "point" else INCONCLUSIVE
    if ci[1] < threshold:
        return FAIL
    if rule == "interval" and ci[0] >= threshold:
        return PASS
    return INCONCLUSIVE


def _check_confidence(confidence: float) -> None:
    if not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ConfigError(f"confidence level must be a number strictly between 0 and 1, got {confidence!r}")


def _check_n_boot(n_boot: int) -> None:
    if not isinstance(n_boot, int) or n_boot < 1:
        raise ConfigError(f"bootstrap resamples must be a positive integer, got {n_boot!r}")
