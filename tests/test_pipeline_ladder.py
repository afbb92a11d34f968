"""Retry and fallback down the ladder, driven by hand-made gate outcomes."""
import pytest

from edgebuild.build.config import load_config
from edgebuild.build.errors import ExitCode
from edgebuild.build.pipeline import BuildRequest, Pipeline, StageRun


def run_with(outcomes, tmp_path, monkeypatch, cfg=None):
    """``outcomes[(stage, attempt)] = "pass" | "fail" | "critical"`` (default pass)."""
    def fake(self, name, sc, attempt, source, passed):
        run = StageRun(name, sc.method, dict(sc.knobs), attempt, source.stage if source else None)
        verdict = outcomes.get((name, attempt), "pass")
        run.gate = {"passed": verdict == "pass", "critical": verdict == "critical", "checks": [],
                    "reasons": [] if verdict == "pass" else [verdict]}
        run.status = "passed" if verdict == "pass" else "failed"
        return run
    monkeypatch.setattr(Pipeline, "_run_stage", fake)
    req = BuildRequest(model="tiny-random", target="local", config=cfg or load_config(None),
                       out=tmp_path / "out", data_dir=tmp_path)
    return Pipeline(req).run()


def path(result):
    return [(r.stage, r.attempt, r.status) for r in result.runs]


def test_all_pass_ships_the_last_stage(tmp_path, monkeypatch):
    res = run_with({}, tmp_path, monkeypatch)
    assert res.shipped == "hyper" and res.exit_code == ExitCode.OK
    assert [r.stage for r in res.runs] == ["baseline", "seedlm", "vptq", "hyper"]


def test_failed_stage_is_retried_once_with_adjusted_knobs(tmp_path, monkeypatch):
    res = run_with({("hyper", 0): "fail", ("hyper", 1): "fail"}, tmp_path, monkeypatch)
    hyper = [r for r in res.runs if r.stage == "hyper"]
    assert len(hyper) == 2
    assert hyper[0].knobs != hyper[1].knobs                 # the recommendation changed a knob
    assert res.shipped == "vptq" and res.exit_code == ExitCode.FALLBACK


def test_retry_that_passes_continues_the_ladder(tmp_path, monkeypatch):
    res = run_with({("vptq", 0): "fail"}, tmp_path, monkeypatch)
    assert path(res) == [("baseline", 0, "passed"), ("seedlm", 0, "passed"), ("vptq", 0, "failed"),
                         ("vptq", 1, "passed"), ("hyper", 0, "passed")]
    assert res.exit_code == ExitCode.OK


def test_critical_failure_is_not_retried_and_later_stages_are_skipped(tmp_path, monkeypatch):
    res = run_with({("seedlm", 0): "critical"}, tmp_path, monkeypatch)
    assert path(res) == [("baseline", 0, "passed"), ("seedlm", 0, "failed"), ("vptq", 0, "skipped"),
                         ("hyper", 0, "skipped")]
    assert res.shipped == "baseline" and res.exit_code == ExitCode.BASELINE_ONLY


def test_stage_from_baseline_runs_even_when_previous_failed(tmp_path, monkeypatch):
    cfg_file = tmp_path / "b.toml"
    cfg_file.write_text('[stage.vptq]\nsource = "baseline"\n')
    res = run_with({("seedlm", 0): "critical"}, tmp_path, monkeypatch, cfg=load_config(cfg_file))
    assert path(res) == [("baseline", 0, "passed"), ("seedlm", 0, "failed"), ("vptq", 0, "passed"),
                         ("hyper", 0, "passed")]
    assert res.shipped == "hyper"


def test_no_retries_when_configured(tmp_path, monkeypatch):
    cfg = load_config(None)
    cfg.gates.max_retries = 0
    def fake(self, name, sc, attempt, source, passed):
        run = StageRun(name, sc.method, dict(sc.knobs), attempt, None)
        run.status = "failed" if name == "hyper" else "passed"
        run.gate = {"critical": False}
        return run
    monkeypatch.setattr(Pipeline, "_run_stage", fake)
    res = Pipeline(BuildRequest("tiny-random", "local", cfg, tmp_path / "o", data_dir=tmp_path)).run()
    assert [r.stage for r in res.runs].count("hyper") == 1
    assert res.exit_code == ExitCode.FALLBACK
