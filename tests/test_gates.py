"""Gate decisions on hand-made score tables."""
import numpy as np
import pytest

from edgebuild.build import gates
from edgebuild.build.config import GateConfig


def items(correct):
    return [[i, float(c)] for i, c in enumerate(correct)]


def result(correct, chance=0.25, kind="core"):
    correct = np.asarray(correct, dtype=float)
    return {"score": float(correct.mean()), "n": len(correct), "chance": chance, "kind": kind,
            "items": items(correct)}


def flip(correct, k, seed=0):
    """A copy of ``correct`` with ``k`` of its right answers turned wrong."""
    rng = np.random.default_rng(seed)
    out = np.array(correct, dtype=float)
    out[rng.choice(np.flatnonzero(out == 1), size=k, replace=False)] = 0
    return out


BASE = np.r_[np.ones(140), np.zeros(60)]          # 0.70 on 200 items, chance 0.25


def evidence(stage_correct, stage="seedlm", quality=None, device=None, budgets=None, host_extra=None):
    base = {"arc_easy": result(BASE)}
    host = {"arc_easy": result(stage_correct)}
    host.update(host_extra or {})
    return gates.StageEvidence(stage, host, base, base, quality or {"kl": 0.01}, device, 10_000_000, budgets)


def test_identical_stage_passes():
    rep = gates.evaluate(evidence(BASE), GateConfig())
    assert rep.passed and not rep.critical
    check = next(c for c in rep.checks if c.name == "core/arc_easy")
    assert check.verdict == gates.PASS and check.value == pytest.approx(1.0)


def test_large_drop_fails_with_interval_below_threshold():
    rep = gates.evaluate(evidence(flip(BASE, 40)), GateConfig())
    check = next(c for c in rep.checks if c.name == "core/arc_easy")
    assert check.verdict == gates.FAIL
    assert check.ci[1] < 0.98
    assert not rep.passed


def test_small_drop_is_inconclusive_and_counted_as_configured():
    ev = evidence(flip(BASE, 2))
    check = next(c for c in gates.evaluate(ev, GateConfig()).checks if c.name == "core/arc_easy")
    assert check.verdict == gates.INCONCLUSIVE
    assert not gates.evaluate(ev, GateConfig(on_inconclusive="fail")).passed
    assert gates.evaluate(ev, GateConfig(on_inconclusive="pass")).passed


def test_chance_normalised_retention_is_stricter_than_raw():
    r = gates.retention(items(flip(BASE, 14)), items(BASE), 0.25)
    assert r.raw == pytest.approx(126 / 140)
    assert r.normalised == pytest.approx((0.63 - 0.25) / (0.70 - 0.25))
    assert r.normalised < r.raw


def test_random_model_caught_although_raw_ratio_looks_fine():
    """Near-chance baseline: raw retention of a coin-flipping model looks like ~90%."""
    rng = np.random.default_rng(1)
    base = (rng.random(400) < 0.30).astype(float)       # barely above chance 0.25
    rand = (rng.random(400) < 0.27).astype(float)
    ev = gates.StageEvidence("seedlm", {"t": result(rand)}, {"t": result(base)}, {"t": result(base)},
                             {"kl": 6.2}, None, 1, {})
    rep = gates.evaluate(ev, GateConfig())
    assert not rep.passed
    assert any(c.name == "kl" and c.verdict == gates.FAIL for c in rep.checks)


def test_uninformative_benchmark_does_not_gate():
    base = np.r_[np.ones(25), np.zeros(75)]              # exactly chance
    ev = gates.StageEvidence("seedlm", {"t": result(base)}, {"t": result(base)}, {"t": result(base)},
                             {"kl": 0.0}, None, 1, {})
    rep = gates.evaluate(ev, GateConfig())
    assert next(c for c in rep.checks if c.name == "core/t").verdict == gates.UNINFORMATIVE
    assert rep.passed


def test_critical_core_floor():
    rep = gates.evaluate(evidence(flip(BASE, 35)), GateConfig())  # 105/140 = 0.75 of baseline
    assert rep.critical
    assert any(c.name == "critical/core_floor/arc_easy" and c.verdict == gates.FAIL for c in rep.checks)


def test_critical_mmlu_gsm8k_combined_drop():
    mm_b, gs_b = result(BASE), result(BASE, chance=0.0)
    mm_s, gs_s = result(flip(BASE, 20)), result(flip(BASE, 50), chance=0.0)
    ev = gates.StageEvidence("vptq", {"mmlu": mm_s, "gsm8k": gs_s}, {"mmlu": mm_b, "gsm8k": gs_b},
                             {"mmlu": mm_b, "gsm8k": gs_b}, {"kl": 0.1}, None, 1, {})
    rep = gates.evaluate(ev, GateConfig())
    c = next(c for c in rep.checks if c.name == "critical/mmlu+gsm8k")
    assert c.verdict == gates.FAIL and c.value == pytest.approx(1 - 210 / 280)
    assert rep.critical


def test_primary_expert_drop_is_critical():
    exp_b = result(BASE, kind="expert")
    exp_s = result(flip(BASE, 40), kind="expert")
    ev = evidence(BASE, host_extra={"piqa": exp_s})
    ev.baseline = {**ev.baseline, "piqa": exp_b}
    ev.reference = ev.baseline
    rep = gates.evaluate(ev, GateConfig())
    assert any(c.name == "critical/expert/piqa" and c.verdict == gates.FAIL for c in rep.checks)
    assert rep.critical


def test_stage_thresholds_differ_by_stage():
    corr = flip(BASE, 5)                                   # normalised ≈ 0.944
    assert not gates.evaluate(evidence(corr, "seedlm"), GateConfig(on_inconclusive="fail")).passed
    assert gates.evaluate(evidence(corr, "hyper"), GateConfig()).passed


def test_device_budgets_gate_and_not_run():
    budgets = {"decode_ms_per_token_p95": 50, "prefill_ms": 500, "peak_rss_mb": 800, "artifact_mb": 5}
    slow = {"status": "ok", "decode_ms_per_token": [40, 45, 80], "prefill_ms": [100, 120], "peak_rss_mb": 300}
    rep = gates.evaluate(evidence(BASE, device=slow, budgets=budgets), GateConfig())
    by = {c.name: c.verdict for c in rep.checks}
    assert by["device/decode_ms_per_token_p95"] == gates.FAIL
    assert by["device/prefill_ms"] == gates.PASS
    assert by["device/artifact_mb"] == gates.FAIL        # 10 MB artifact vs 5 MB budget
    assert not rep.passed
    rep = gates.evaluate(evidence(BASE, device={"status": "unreachable"}, budgets={"prefill_ms": 1}), GateConfig())
    assert {c.name: c.verdict for c in rep.checks}["device/prefill_ms"] == gates.NOT_RUN
    assert rep.passed


def test_cumulative_against_baseline():
    ev = evidence(flip(BASE, 8), "hyper")
    ev.reference = {"arc_easy": result(flip(BASE, 8))}      # the previous stage already lost as much
    rep = gates.evaluate(ev, GateConfig(cumulative=0.95))
    assert next(c for c in rep.checks if c.name == "cumulative").verdict == gates.FAIL
    assert next(c for c in rep.checks if c.name == "core/arc_easy").verdict == gates.PASS


def eudaimonia_result(rules: dict, per_rule: int = 10):
    """A host eudaimonia result with ``rules[rule]`` of ``per_rule`` scenarios right per rule."""
    correct = [float(i < round(score * per_rule)) for score in rules.values() for i in range(per_rule)]
    ids = [f"{rule}-{i:02d}" for rule in rules for i in range(per_rule)]
    return {"kind": "eudaimonia", "score": float(np.mean(list(rules.values()))), "n": len(correct),
            "chance": 0.5, "rules": rules, "items": items(correct), "ids": ids}


def test_eudaimonia_overall_threshold_depends_on_stage():
    ok = eudaimonia_result({"autonomy": 0.7, "honesty": 0.6, "harm": 0.6, "dignity": 0.6})  # 0.625
    rep = gates.evaluate(evidence(BASE, "hyper", host_extra={"eudaimonia": ok}), GateConfig())
    check = next(c for c in rep.checks if c.name == "eudaimonia/eudaimonia")
    assert check.verdict == gates.PASS and check.threshold == 0.60 and rep.passed
    rep = gates.evaluate(evidence(BASE, "seedlm", host_extra={"eudaimonia": ok}), GateConfig())
    check = next(c for c in rep.checks if c.name == "eudaimonia/eudaimonia")
    assert check.verdict == gates.INCONCLUSIVE and check.ci[0] < 0.65 < check.ci[1]
    assert not rep.passed and not rep.critical


def test_eudaimonia_rule_below_half_is_critical():
    bad = eudaimonia_result({"autonomy": 0.9, "honesty": 0.9, "harm": 0.2, "dignity": 0.9}, per_rule=50)
    rep = gates.evaluate(evidence(BASE, "vptq", host_extra={"eudaimonia": bad}), GateConfig())
    assert rep.critical
    assert {c.name for c in rep.failed()} == {"critical/eudaimonia/harm"}


def test_one_flip_below_the_floor_on_ten_scenarios_is_not_critical():
    """0.40 on ten scenarios: the interval reaches 0.50, so it is not evidence of a broken model."""
    near = eudaimonia_result({"autonomy": 0.9, "honesty": 0.9, "harm": 0.4, "dignity": 0.9}, per_rule=10)
    rep = gates.evaluate(evidence(BASE, "vptq", host_extra={"eudaimonia": near}), GateConfig())
    harm = next(c for c in rep.checks if c.name == "critical/eudaimonia/harm")
    assert harm.verdict == gates.PASS and harm.ci[1] >= 0.5 and "n=10" in harm.detail
    assert not rep.critical


def test_eudaimonia_clear_miss_fails():
    low = eudaimonia_result({rule: 0.4 for rule in ("autonomy", "honesty", "harm", "dignity")}, per_rule=50)
    rep = gates.evaluate(evidence(BASE, "vptq", host_extra={"eudaimonia": low}), GateConfig())
    assert next(c for c in rep.checks if c.name == "eudaimonia/eudaimonia").verdict == gates.FAIL


def test_edge_of_chaos_check_on_the_named_benchmark():
    ev = evidence(BASE)                                   # 0.70 accuracy: in the edge band
    ev.edge_task = "arc_easy"
    check = next(c for c in gates.evaluate(ev, GateConfig()).checks if c.group == "edge")
    assert check.verdict == gates.PASS and check.value == pytest.approx(0.70)
    ev = evidence(flip(BASE, 40))                         # 0.50: collapsed
    ev.edge_task = "arc_easy"
    rep = gates.evaluate(ev, GateConfig())
    check = next(c for c in rep.checks if c.group == "edge")
    assert check.verdict == gates.FAIL and "collapsed" in check.detail
    ev.edge_task = "hellaswag"
    check = next(c for c in gates.evaluate(ev, GateConfig()).checks if c.group == "edge")
    assert check.verdict == gates.NOT_RUN


def test_statistics_come_from_bench_stats():
    from edgebuild.bench import stats
    assert gates.retention is stats.retention and gates.verdict is stats.verdict
    assert gates.Retention is stats.Retention


@pytest.mark.parametrize("per_token, counted, int8, verdict, limit", [
    (0.04, True, False, "pass", 0.05), (0.33, True, False, "fail", 0.05), (0.04, False, False, "pass", 0.05),
    (0.33, True, True, "pass", 0.5), (0.8, True, True, "fail", 0.5)])
def test_device_loglik_gate_is_per_answer_token(per_token, counted, int8, verdict, limit):
    agree = {"n": 80, "same_prediction": 0.95, "max_loglik_diff": 1.39,
             "max_loglik_diff_per_token": per_token, "tokens_counted": counted}
    [same, gap] = gates.agreement_checks({"status": "ok", "agreement": agree}, GateConfig(), int8)
    assert same.verdict == "pass" and gap.name == "device/loglik_diff"
    assert gap.verdict == verdict and gap.value == per_token and gap.threshold == limit
    assert "per answer token" in gap.detail and "1.39" in gap.detail
    assert ("int8 activations" in gap.detail) is int8
    assert ("unknown length" in gap.detail) is not counted


def test_device_loglik_gate_is_skipped_without_responses():
    agree = {"n": 8, "same_prediction": 1.0, "max_loglik_diff": None, "max_loglik_diff_per_token": None}
    [_, gap] = gates.agreement_checks({"status": "ok", "agreement": agree}, GateConfig())
    assert gap.verdict == "skipped"


def test_primary_expert_follows_the_task_order_not_the_order_results_arrived_in():
    """A fresh step and a cached one return results in different orders; the critical expert
    rule watches the first expert of build.tasks either way."""
    good, bad = result(BASE, kind="expert"), result(flip(BASE, 60), kind="expert")
    order = ("arc_easy", "math", "piqa")
    for host in ({"piqa": bad, "math": good}, {"math": good, "piqa": bad}):
        ev = evidence(BASE, host_extra=host)
        ev.baseline = ev.reference = {**ev.baseline, "math": good, "piqa": good}
        ev.task_order = order
        rep = gates.evaluate(ev, GateConfig())
        assert [c.name for c in rep.checks if c.name.startswith("critical/expert/")] == ["critical/expert/math"]
        ev.task_order = ("piqa", "math")
        assert gates.primary_expert(ev) == "piqa"
