"""Adaptive sampling on simulated models with known answers."""
import numpy as np
import pytest

from edgebuild.bench import adaptive, stats
from edgebuild.core.errors import ConfigError, DataError

N = 2048
CHANCE = 0.25


def simulated_model(signal: float, gold: np.ndarray, seed: int) -> np.ndarray:
    """Per-item correctness of a 4-choice model: argmax of noisy logits, ``signal`` on the gold."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(gold), 4))
    logits[np.arange(len(gold)), gold] += signal
    return (logits.argmax(axis=1) == gold).astype(float)


GOLD = np.random.default_rng(0).integers(0, 4, size=N)
BASE = simulated_model(0.55, GOLD, seed=1)               # ~0.41: a near-chance task
ORDER = adaptive.extension_order("sim", N, seed=0)


def evaluator(correct, calls=None):
    def evaluate(doc_ids):
        if calls is not None:
            calls.append(len(doc_ids))
        return [[int(d), float(correct[d])] for d in doc_ids]
    return evaluate


def base_items():
    return [[i, float(c)] for i, c in enumerate(BASE)]


def test_base_is_near_chance():
    assert 0.35 < BASE.mean() < 0.47


def test_random_logits_fail_early():
    broken = simulated_model(0.0, GOLD, seed=2)
    calls = []
    res = adaptive.sample_until_decisive(evaluator(broken, calls), base_items(), ORDER,
                                         threshold=0.98, chance=CHANCE)
    assert res.verdict == stats.FAIL and not res.exhausted
    assert res.history[-1].n <= 256 and sum(calls) == res.history[-1].n
    assert res.history[-1].ci[1] < 0.98


def test_identical_copy_passes_early():
    res = adaptive.sample_until_decisive(evaluator(BASE), base_items(), ORDER,
                                         threshold=0.98, chance=CHANCE)
    assert res.verdict == stats.PASS and res.history[-1].n <= 256
    assert res.retention.normalised == pytest.approx(1.0)


def test_identical_copy_passes_early_under_the_interval_rule_too():
    res = adaptive.sample_until_decisive(evaluator(BASE), evaluator(BASE), ORDER,
                                         threshold=0.98, chance=CHANCE, rule="interval")
    assert res.verdict == stats.PASS and res.history[-1].n <= 256


def borderline_stage():
    """The baseline with every 20th right answer (in sampling order) turned wrong: ~0.87 retention."""
    stage = BASE.copy()
    right = [d for d in ORDER if BASE[d] == 1]
    stage[right[::20]] = 0
    return stage


@pytest.mark.parametrize("rule", ["point", "interval"])
def test_borderline_keeps_sampling_until_exhausted(rule):
    stage = borderline_stage()
    truth = stats.normalised_retention(stage, BASE, CHANCE)
    assert 0.85 < truth < 0.89
    res = adaptive.sample_until_decisive(evaluator(stage), evaluator(BASE), ORDER[:1024],
                                         threshold=0.90, chance=CHANCE, rule=rule)
    assert res.exhausted and res.verdict in (stats.INCONCLUSIVE, stats.UNINFORMATIVE)
    assert [h.n for h in res.history] == [32, 64, 128, 256, 512, 1024]
    assert len(res.items) == len(res.baseline_items) == 1024
    assert res.confidence == pytest.approx(1 - 0.05 / 6)


def test_initial_items_are_used_and_not_reevaluated():
    initial = [[int(d), float(BASE[d])] for d in ORDER[:200]]
    calls = []
    res = adaptive.sample_until_decisive(evaluator(BASE, calls), base_items(), ORDER,
                                         threshold=0.98, chance=CHANCE, initial=initial)
    assert res.history[0].n == 200 and res.verdict == stats.PASS
    assert calls == []                                   # decided on the initial items


def test_schedule_doubles_to_the_total():
    assert adaptive.schedule(0, 100, 32) == [32, 64, 100]
    assert adaptive.schedule(200, 1000, 32) == [200, 400, 800, 1200]
    assert adaptive.schedule(0, 10, 32) == [10]


def test_extension_order_is_seeded_and_skips_selected():
    a = adaptive.extension_order("arc_easy", 50, selected=[1, 2, 3], seed=0)
    assert a == adaptive.extension_order("arc_easy", 50, selected=[1, 2, 3], seed=0)
    assert a != adaptive.extension_order("arc_easy", 50, selected=[1, 2, 3], seed=1)
    assert sorted(a) == [i for i in range(50) if i not in (1, 2, 3)]


def test_missing_baseline_items_and_bad_settings():
    with pytest.raises(DataError, match="baseline has no result"):
        adaptive.sample_until_decisive(evaluator(BASE), base_items()[:10], ORDER,
                                       threshold=0.98, chance=CHANCE)
    with pytest.raises(DataError, match="one item per doc id"):
        adaptive.sample_until_decisive(lambda ids: [[0, 1.0]], base_items(), ORDER,
                                       threshold=0.98, chance=CHANCE)
    with pytest.raises(ConfigError, match="kind"):
        adaptive.sample_until_decisive(evaluator(BASE), base_items(), ORDER, threshold=0.98,
                                       chance=CHANCE, kind="log")
    with pytest.raises(DataError, match="no items"):
        adaptive.sample_until_decisive(evaluator(BASE), base_items(), [], threshold=0.98,
                                       chance=CHANCE)
