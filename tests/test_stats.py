"""Paired statistics on synthetic data with known answers; the edge-of-chaos bands."""
import numpy as np
import pytest

from edgebuild.bench import edge, stats
from edgebuild.bench.runner import TaskResult
from edgebuild.core.errors import ConfigError, DataError


def items(correct):
    return [[i, float(c)] for i, c in enumerate(correct)]


def paired_bernoulli(rng, n, p_both, p_base_only, p_stage_only):
    """``n`` paired 0/1 results drawn from a 2x2 table of cell probabilities."""
    cells = rng.choice(4, size=n, p=[p_both, p_base_only, p_stage_only,
                                     1 - p_both - p_base_only - p_stage_only])
    stage = np.isin(cells, (0, 2)).astype(float)
    base = np.isin(cells, (0, 1)).astype(float)
    return stage, base


# ----------------------------------------------------------------------------- retention


def test_paired_aligns_on_doc_id_and_drops_unpaired():
    s, b = stats.paired([[3, 1], [1, 0], [9, 1]], [[1, 1], [3, 0], [4, 1]])
    assert s.tolist() == [1.0, 0.0] and b.tolist() == [0.0, 1.0]
    assert stats.paired([[5, 1]], [[6, 1]])[0].size == 0


def test_point_retentions():
    s, b = np.r_[np.ones(63), np.zeros(37)], np.r_[np.ones(70), np.zeros(30)]
    assert stats.raw_retention(s, b) == pytest.approx(0.9)
    assert stats.normalised_retention(s, b, 0.25) == pytest.approx(0.38 / 0.45)
    assert stats.normalised_retention(s, np.full(100, 0.2), 0.25) is None


def test_bootstrap_is_seeded_and_keeps_pairs():
    x = np.arange(50.0)
    a1, b1 = stats.bootstrap_means(x, x, n_boot=200, seed=3)
    a2, _ = stats.bootstrap_means(x, x, n_boot=200, seed=3)
    a3, _ = stats.bootstrap_means(x, x, n_boot=200, seed=4)
    assert np.array_equal(a1, a2) and not np.array_equal(a1, a3)
    assert np.array_equal(a1, b1)                       # same resample for both columns


def test_bootstrap_in_chunks_matches_size(monkeypatch):
    monkeypatch.setattr(stats, "MAX_DRAWS", 100)         # 2 replicates per chunk of 50 items
    (means,) = stats.bootstrap_means(np.arange(50.0), n_boot=7, seed=0)
    assert means.shape == (7,)


def test_paired_bootstrap_interval_covers_a_known_difference():
    """95 % intervals of the mean difference and of raw retention cover the truth ~95 % of the time."""
    rng = np.random.default_rng(0)
    p_both, p_base_only, p_stage_only = 0.55, 0.15, 0.05  # base 0.70, stage 0.60
    true_diff, true_ratio = 0.60 - 0.70, 0.60 / 0.70
    hits_diff = hits_ratio = 0
    reps = 300
    for rep in range(reps):
        s, b = paired_bernoulli(rng, 300, p_both, p_base_only, p_stage_only)
        sb, bb = stats.bootstrap_means(s, b, n_boot=500, seed=rep)
        lo, hi = stats.percentile_interval(sb - bb, 0.95)
        hits_diff += lo <= true_diff <= hi
        r = stats.retention(items(s), items(b), 0.25, n_boot=500, seed=rep)
        hits_ratio += r.raw_ci[0] <= true_ratio <= r.raw_ci[1]
    assert 0.91 <= hits_diff / reps <= 0.99
    assert 0.91 <= hits_ratio / reps <= 0.99


def test_interval_of_a_mean_narrows_with_n():
    rng = np.random.default_rng(1)
    small = stats.mean_interval(rng.random(50) < 0.7)
    large = stats.mean_interval(rng.random(2000) < 0.7)
    assert large[1] - large[0] < (small[1] - small[0]) / 3
    assert large[0] < 0.7 < large[1]


def test_retention_uninformative_at_chance():
    base = np.r_[np.ones(25), np.zeros(75)]
    r = stats.retention(items(base), items(base), 0.25)
    assert not r.informative and r.normalised is None and r.raw == pytest.approx(1.0)


# ----------------------------------------------------------------------------- verdicts


@pytest.mark.parametrize("value, ci, rule, expected", [
    (0.99, (0.97, 1.01), "point", stats.PASS),           # point estimate meets the threshold
    (0.99, (0.97, 1.01), "interval", stats.INCONCLUSIVE),  # but the interval reaches below it
    (0.99, (0.985, 1.0), "interval", stats.PASS),
    (0.90, (0.85, 0.95), "point", stats.FAIL),
    (0.90, (0.85, 0.95), "interval", stats.FAIL),
    (0.97, (0.93, 1.00), "point", stats.INCONCLUSIVE),
    (None, None, "point", stats.UNINFORMATIVE),
    (0.97, None, "point", stats.FAIL),
    (0.97, None, "interval", stats.INCONCLUSIVE),
])
def test_verdict_rules(value, ci, rule, expected):
    assert stats.verdict(value, ci, 0.98, rule) == expected


def test_verdicts_on_synthetic_data():
    rng = np.random.default_rng(2)
    base = (rng.random(400) < 0.7).astype(float)
    clear_fail = np.where(rng.random(400) < 0.3, 0.0, base)        # loses ~30 % of right answers
    borderline = base.copy()
    borderline[np.flatnonzero(base == 1)[::40]] = 0                 # loses 2.5 % of right answers
    verdicts = {}
    for name, stage in [("pass", base), ("fail", clear_fail), ("borderline", borderline)]:
        value, ci = stats.retention(items(stage), items(base), 0.25).get("chance_normalised")
        verdicts[name] = stats.verdict(value, ci, 0.98, "interval")
    assert verdicts == {"pass": stats.PASS, "fail": stats.FAIL, "borderline": stats.INCONCLUSIVE}


def test_bad_settings_raise_config_errors():
    with pytest.raises(ConfigError, match="rule"):
        stats.verdict(0.5, None, 0.5, rule="median")
    with pytest.raises(ConfigError, match="confidence"):
        stats.mean_interval([1, 0, 1], confidence=1.5)
    with pytest.raises(ConfigError, match="bootstrap"):
        stats.mean_interval([1, 0, 1], n_boot=0)


# ----------------------------------------------------------------------------- edge of chaos


@pytest.mark.parametrize("accuracy, band", [
    (0.59, edge.COLLAPSED), (0.60, edge.DEGRADED), (0.69, edge.DEGRADED), (0.70, edge.EDGE),
    (0.80, edge.EDGE), (0.81, edge.SATURATED),
])
def test_edge_bands(accuracy, band):
    assert edge.band_of(accuracy) == band


def test_edge_check_verdicts():
    def at(acc, n=400):
        k = round(acc * n)
        return items(np.r_[np.ones(k), np.zeros(n - k)])

    assert edge.check(at(0.75)).verdict == stats.PASS
    assert edge.check(at(0.90)).verdict == stats.UNINFORMATIVE
    collapsed = edge.check(at(0.40))
    assert collapsed.band == edge.COLLAPSED and collapsed.verdict == stats.FAIL
    assert collapsed.ci[0] < 0.40 < collapsed.ci[1]
    assert edge.check(at(0.68)).verdict == stats.INCONCLUSIVE   # interval reaches 70 %
    assert edge.check(at(0.68, n=4000)).verdict == stats.FAIL


def test_edge_check_takes_task_results():
    correct = [1.0] * 3 + [0.0]
    result = TaskResult("piqa", "core", "acc_norm", 0.75, 4, 0.5, items(correct))
    assert edge.check(result).task == "piqa"
    assert edge.check(result.to_dict()).accuracy == pytest.approx(0.75)
    assert "piqa" in edge.check(result).detail
    with pytest.raises(DataError, match="no per-item results"):
        edge.check([], task="piqa")
