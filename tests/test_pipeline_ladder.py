"""Retry and fallback down the ladder, driven by hand-made gate outcomes."""
import pytest

from edgebuild.build.config import load_config
from edgebuild.core.errors import ExitCode
from edgebuild.build.pipeline import BuildRequest, Pipeline, StageRun
from edgebuild.bench import resample


def run_with(outcomes, tmp_path, monkeypatch, cfg=None):
    """``outcomes[(stage, attempt)] = "pass" | "fail" | "critical"`` (default pass)."""
    def fake(self, name, sc, attempt, source, setting=None):
        run = StageRun(name, sc.method, dict(sc.knobs), attempt, source.stage if source else None,
                       trial=dict(setting or {}))
        verdict = outcomes.get((name, attempt), "pass")
        run.gate = {"passed": verdict == "pass", "critical": verdict == "critical", "checks": [],
                    "reasons": [] if verdict == "pass" else [verdict]}
        run.status = "passed" if verdict == "pass" else "failed"
        return run
    monkeypatch.setattr(Pipeline, "_run_stage", fake)
    req = BuildRequest(model="tiny-random", target="local", config=cfg or load_config(None, device=False),
                       out=tmp_path / "out", data_dir=tmp_path)
    return Pipeline(req).run()


def path(result):
    return [(r.stage, r.attempt, r.status) for r in result.runs]


def test_all_pass_ships_the_last_stage(tmp_path, monkeypatch):
    res = run_with({}, tmp_path, monkeypatch)
    assert res.shipped == "hyper" and res.exit_code == ExitCode.OK
    assert [r.stage for r in res.runs] == ["baseline", "seedlm", "vptq", "hyper"]


def test_a_failing_stage_searches_its_settings_up_to_max_trials(tmp_path, monkeypatch):
    fails = {("hyper", a): "fail" for a in range(10)}
    res = run_with(fails, tmp_path, monkeypatch)
    hyper = [r for r in res.runs if r.stage == "hyper"]
    assert len(hyper) == 4                                   # build.max_trials
    assert len({tuple(sorted(r.knobs.items())) for r in hyper}) == 4     # each attempt a new setting
    assert res.shipped == "vptq" and res.exit_code == ExitCode.FALLBACK


def test_after_a_setting_fails_its_most_sensitive_layers_fall_back(tmp_path, monkeypatch):
    cfg_file = tmp_path / "f.toml"
    cfg_file.write_text("[stage.vptq]\nfallback_layers = [1, 2]\n")     # tiny-random has 2 layers
    res = run_with({("vptq", 0): "fail", ("vptq", 1): "fail"}, tmp_path, monkeypatch,
                   cfg=load_config(cfg_file, device=False))
    vptq = [r for r in res.runs if r.stage == "vptq"]
    assert [r.trial["fallback_layers"] for r in vptq] == [None, 1, None]   # 2 = every layer: not tried
    assert vptq[0].knobs == vptq[1].knobs != vptq[2].knobs and vptq[2].status == "passed"


def test_a_fallback_trial_reencodes_the_last_trial_of_its_knobs():
    from edgebuild.build.ladder import parent_trial
    trials = [{"knobs": {}, "fallback_layers": None}, {"knobs": {}, "fallback_layers": 1},
              {"knobs": {"bits": 5}, "fallback_layers": None}, {"knobs": {"bits": 5}, "fallback_layers": 1},
              {"knobs": {"bits": 5}, "fallback_layers": 2}]
    assert [parent_trial(trials, i) for i in range(len(trials))] == [None, 0, None, 2, 2]


def test_retry_that_passes_continues_the_ladder(tmp_path, monkeypatch):
    res = run_with({("vptq", 0): "fail"}, tmp_path, monkeypatch)
    assert path(res) == [("baseline", 0, "passed"), ("seedlm", 0, "passed"), ("vptq", 0, "failed"),
                         ("vptq", 1, "passed"), ("hyper", 0, "passed")]
    assert res.exit_code == ExitCode.OK


def test_a_critical_failure_ends_the_search_and_the_next_stage_starts_from_the_baseline(tmp_path, monkeypatch):
    res = run_with({("seedlm", 0): "critical"}, tmp_path, monkeypatch)
    assert path(res) == [("baseline", 0, "passed"), ("seedlm", 0, "failed"), ("vptq", 0, "passed"),
                         ("hyper", 0, "passed")]
    vptq = next(r for r in res.runs if r.stage == "vptq")
    assert vptq.source == "baseline" and "no earlier stage passed" in vptq.note
    assert res.exit_code == ExitCode.FALLBACK          # a stage failed; a compressed one shipped


def test_stage_from_baseline_runs_even_when_previous_failed(tmp_path, monkeypatch):
    cfg_file = tmp_path / "b.toml"
    cfg_file.write_text('[stage.vptq]\nsource = "baseline"\n')
    res = run_with({("seedlm", 0): "critical"}, tmp_path, monkeypatch, cfg=load_config(cfg_file, device=False))
    assert path(res) == [("baseline", 0, "passed"), ("seedlm", 0, "failed"), ("vptq", 0, "passed"),
                         ("hyper", 0, "passed")]
    assert res.shipped == "hyper"


def test_one_trial_when_configured(tmp_path, monkeypatch):
    cfg = load_config(None, device=False)
    cfg.max_trials = 1
    def fake(self, name, sc, attempt, source, setting=None):
        run = StageRun(name, sc.method, dict(sc.knobs), attempt, None)
        run.status = "failed" if name == "hyper" else "passed"
        run.gate = {"critical": False}
        return run
    monkeypatch.setattr(Pipeline, "_run_stage", fake)
    res = Pipeline(BuildRequest("tiny-random", "local", cfg, tmp_path / "o", data_dir=tmp_path)).run()
    assert [r.stage for r in res.runs].count("hyper") == 1
    assert res.exit_code == ExitCode.FALLBACK


# --- adaptive sampling in the gate step ------------------------------------------------------------

def _adaptive_case(tmp_path, monkeypatch, stage_correct):
    """ARC-Easy from the data dir; the reference answers 60 % of items right, the stage
    ``stage_correct(doc_id, reference_correct)``. Returns (report before, report after, calls)."""
    import numpy as np

    from edgebuild.build import gates
    from conftest import DATA_DIR

    if not DATA_DIR.is_dir():
        pytest.skip(f"benchmark data not found at {DATA_DIR}")
    rng = np.random.default_rng(1)
    truth = {d: float(rng.random() < 0.6) for d in range(3000)}
    calls = []

    def fake_items(ctx, run, task, ids):
        calls.append((run.stage, len(ids)))
        ref = run.stage == "baseline"
        return [[int(d), truth[d] if ref else stage_correct(d, truth[d])] for d in sorted(ids)]
    monkeypatch.setattr(resample, "extra_items", fake_items)
    req = BuildRequest(model="tiny-random", target="local", config=load_config(None),
                       out=tmp_path / "out", data_dir=DATA_DIR)
    pipe = Pipeline(req)
    first = list(range(0, 400, 2))
    base = StageRun("baseline", "raw", {}, 0, None, keys={"pack": "b"})
    stage = StageRun("seedlm", "seedlm", {}, 0, "baseline", keys={"pack": "s"})
    base.host = {"arc_easy": {"kind": "core", "score": 0.6, "n": 200, "chance": 0.25,
                              "items": [[d, truth[d]] for d in first]}}
    stage.host = {"arc_easy": {"kind": "core", "score": 0.6, "n": 200, "chance": 0.25,
                               "items": [[d, stage_correct(d, truth[d])] for d in first]}}
    ev = gates.StageEvidence("seedlm", stage.host, base.host, base.host)
    before = gates.evaluate(ev, pipe.cfg.gates)
    changed = gates.resample_inconclusive(pipe.ctx, stage, base, ev, before)
    return before, gates.evaluate(ev, pipe.cfg.gates), changed, calls, stage


def _check(report, name):
    return next(c for c in report.checks if c.name == name)


def test_inconclusive_retention_samples_more_items_until_decisive(tmp_path, monkeypatch):
    # the stage answers 15 % of items the other way (both directions): retention ~0.91 against
    # 0.98, but 200 items leave an interval that reaches 0.98
    import numpy as np
    flip = np.random.default_rng(7).random(3000) < 0.15
    before, after, changed, calls, stage = _adaptive_case(
        tmp_path, monkeypatch, lambda d, c: 1.0 - c if flip[d] else c)
    assert _check(before, "core/arc_easy").verdict == "inconclusive"
    assert changed and calls                                   # both sides were evaluated further
    assert {s for s, _ in calls} == {"seedlm", "baseline"}
    assert 200 < stage.host["arc_easy"]["n"] <= 800             # at most 4x the profile's sample
    assert len(stage.host["arc_easy"]["adaptive"]) >= 2
    assert _check(after, "core/arc_easy").detail.endswith(f"n={stage.host['arc_easy']['n']}")
    assert _check(after, "core/arc_easy").verdict == "fail"               # decided on more items


def test_decisive_retention_samples_nothing_more(tmp_path, monkeypatch):
    before, _, changed, calls, _ = _adaptive_case(tmp_path, monkeypatch, lambda d, c: c)
    assert _check(before, "core/arc_easy").verdict == "pass"
    assert not changed and not calls


def test_listeners_hear_of_every_attempt_as_it_finishes(tmp_path, monkeypatch):
    heard = []

    class Listener:
        def stage_finished(self, run, ctx):
            heard.append((run.stage, run.attempt, run.status, sorted(ctx.passed)))

    def fake(self, name, sc, attempt, source, setting=None):
        run = StageRun(name, sc.method, dict(sc.knobs), attempt, source.stage if source else None)
        run.status = "failed" if (name, attempt) == ("vptq", 0) else "passed"
        run.gate = {"critical": False}
        return run
    monkeypatch.setattr(Pipeline, "_run_stage", fake)
    req = BuildRequest("tiny-random", "local", load_config(None, device=False), tmp_path / "o", data_dir=tmp_path,
                       listeners=[Listener()])
    Pipeline(req).run()
    assert heard[:3] == [("baseline", 0, "passed", ["baseline"]), ("seedlm", 0, "passed", ["baseline", "seedlm"]),
                         ("vptq", 0, "failed", ["baseline", "seedlm"])]
    assert [h[:2] for h in heard] == [("baseline", 0), ("seedlm", 0), ("vptq", 0), ("vptq", 1), ("hyper", 0)]
