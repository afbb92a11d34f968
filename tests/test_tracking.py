"""W&B tracking: a live offline run read back with wandb's own transaction-log reader, the CLI's wiring,
and a wandb that fails never failing a build."""
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import DATA_DIR, tiny_llama
from edgebuild.build import tracking, tracking_metrics, views
from edgebuild.build.manifest import write_manifest
from edgebuild.build.package import build_package
from edgebuild.build.report import write_reports
from edgebuild.build.report_html import write_html_report
from test_report_html import MMLU_SUBJECTS, make_build, make_result

WANDB_DIRS = ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR")
WANDB_SETTINGS = ("WANDB_MODE", "WANDB_PROJECT", "WANDB_API_KEY", "WANDB_DIR")
BENCHMARKS = ("arc_easy", "mmlu", "piqa", "pubmedqa")
ATTEMPTS = [("baseline", 1), ("seedlm", 1), ("vptq", 1), ("vptq", 2), ("hyper", 1)]


def wandb_log(run_dir: Path) -> list:
    """The records of a run's .wandb transaction log, as wandb itself reads them (``wandb leet inspect``)."""
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def read_run(run_dir: Path) -> dict:
    """History steps (in order), summary, config, artifacts and exit code of a run, from its log."""
    steps, summary, config, artifacts, exit_code = [], {}, {}, [], None
    for rec in wandb_log(run_dir):
        kind, body = rec["type"], rec.get(rec["type"], {})
        if kind == "history":
            steps.append({k: v for k, v in body["item"].items() if not k.startswith("_")})
        elif kind == "summary":
            summary.update(body.get("update", {}))
        elif kind in ("run", "config"):
            config.update((body.get("config") if kind == "run" else body).get("update", {}))
        elif kind == "artifact":
            artifacts.append((body["type"], body["name"], [e["path"] for e in body["manifest"]["contents"]]))
        elif kind == "exit":
            exit_code = body.get("exit_code", 0)
    return {"steps": steps, "summary": summary, "config": config, "artifacts": artifacts, "exit_code": exit_code}


def clean_wandb_env(mp, home: Path) -> None:
    """Keep wandb's own folders (settings, artifact staging) in ``home``; no user settings."""
    for var in WANDB_DIRS:
        mp.setenv(var, str(home / var.lower()))
    for var in WANDB_SETTINGS:
        mp.delenv(var, raising=False)


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    clean_wandb_env(monkeypatch, tmp_path / "wandb-home")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A build with MMLU tracked live: each attempt told to the tracker as the pipeline does, the
    stage steps read back while the run is still open, then the records written and the run finished."""
    mp, tmp = pytest.MonkeyPatch(), tmp_path_factory.mktemp("track")
    clean_wandb_env(mp, tmp / "wandb-home")
    result = make_result(tmp, mmlu=True)
    tracker = tracking.WandbTracker(result.out_dir, flush_s=0.2)
    assert tracker.start({"model": result.model_ref.spec})
    for run in result.runs:
        tracker.stage_finished(run, SimpleNamespace(passed={}))
    while_open = _wait_for_steps(tracker.run_dir, len(result.runs))
    path = write_manifest(result)
    write_reports(result, path)
    write_html_report(result.out_dir, plots=False)
    run_dir = tracker.finish(path, package_path=build_package(result.out_dir))
    mp.undo()
    return result, json.loads(path.read_text()), run_dir, read_run(run_dir), while_open


def _wait_for_steps(run_dir: Path, n: int, timeout: float = 30.0) -> list:
    """The history steps of an open run once it holds ``n`` of them (what it holds after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        steps = read_run(run_dir)["steps"]
        if len(steps) >= n or time.monotonic() > deadline:
            return steps
        time.sleep(0.5)


def test_offline_run_lives_under_the_build_dir(live):
    result, _, run_dir, run, _ = live
    assert run_dir.parent == result.out_dir / "wandb" and run_dir.name.startswith("offline-run-")
    assert run["exit_code"] == 0


def test_each_stage_attempt_is_its_own_step_in_build_order_while_the_run_is_open(live):
    _, _, _, run, while_open = live
    stage_steps = run["steps"][:len(ATTEMPTS)]
    assert [({k.split("/")[0] for k in step}, step[f"{s}/attempt"]) for step, (s, _) in zip(stage_steps, ATTEMPTS)] \
        == [({s}, a) for s, a in ATTEMPTS]
    assert len(run["steps"]) == len(ATTEMPTS) + 1                      # then one step for the whole build
    assert [step[f"{s}/attempt"] for step, (s, _) in zip(while_open, ATTEMPTS)] == [a for _, a in ATTEMPTS]


def test_stage_scores_and_per_benchmark_verdicts(live):
    _, manifest, _, run, _ = live
    for step, st in zip(run["steps"], manifest["stages"]):
        s, verdicts = st["stage"], views.benchmark_verdicts(st)
        assert sorted(k.split("/", 1)[1] for k in step if k.count("/") == 1 and k.split("/")[1] in BENCHMARKS) \
            == list(BENCHMARKS)
        for b in BENCHMARKS:
            assert step[f"{s}/{b}"] == pytest.approx(st["scores"][b])
            assert step[f"{s}/passed/{b}"] == int(verdicts[b])
    vptq1, vptq2, hyper = run["steps"][2:5]
    assert vptq1["vptq/passed/piqa"] == 0 and vptq2["vptq/passed/piqa"] == 1       # failed, retried, passed
    assert all(hyper[f"hyper/passed/{b}"] == 0 for b in BENCHMARKS)
    assert run["summary"]["vptq/passed/piqa"] == 1 and run["summary"]["vptq/attempt"] == 2


def test_expert_and_mmlu_subject_scores_of_the_shipped_stage(live):
    result, manifest, _, run, _ = live
    final = run["steps"][-1]
    assert manifest["compression_level"] == "vptq" and set(manifest["expert_benchmarks"]) == {"pubmedqa"}
    assert final["expert/pubmedqa"] == pytest.approx(manifest["expert_benchmarks"]["pubmedqa"]["score"])
    strata = result.runs[3].host["mmlu"]["details"]["strata"]             # vptq#2, the shipped attempt
    assert sorted(k for k in final if k.startswith("mmlu/")) == [f"mmlu/{s}" for s in MMLU_SUBJECTS]
    for s in MMLU_SUBJECTS:
        assert final[f"mmlu/{s}"] == run["summary"][f"mmlu/{s}"] == pytest.approx(strata[s]["score"])
    assert final["num_failed_benchmarks"] == 4 and final["exit_code"] == 10 and final["overall_passed"] is True


def test_benchmark_by_stage_table_is_the_reports_table(live):
    _, manifest, run_dir, run, _ = live
    final = run["steps"][-1]
    assert final["benchmark_by_stage._type"] == "table-file"
    logged = json.loads((run_dir / "files" / final["benchmark_by_stage.path"]).read_text())
    table = views.score_table(manifest)
    assert logged["columns"] == table.header() == ["benchmark", "baseline#1", "seedlm#1", "vptq#2", "hyper#1",
                                                   "final retention (vptq)"]
    assert logged["data"] == table.rows()


def test_a_line_plot_of_score_by_stage_per_benchmark(live):
    _, manifest, run_dir, run, _ = live
    final, table = run["steps"][-1], views.score_table(manifest)
    for b in BENCHMARKS:
        panel = run["config"][f"_wandb.visualize.score_by_stage/{b}"]["panel_config"]
        assert panel["panelDefId"] == "wandb/line/v0"
        assert panel["fieldSettings"] == {"x": "stage_index", "y": "score", "stroke": None}
        assert panel["stringSettings"]["title"] == f"{b}: score by stage"
        points = json.loads((run_dir / "files" / final[f"score_by_stage/{b}_table.path"]).read_text())
        assert points["columns"] == ["stage_index", "score", "stage"]
        assert points["data"] == [[i, score, name] for i, name, score, _ in table.series(b)]
    assert final["plots/score_by_stage._type"] == "image-file"


def test_config_and_artifacts(live):
    _, manifest, _, run, _ = live
    assert run["config"]["target"] == "local" and run["config"]["compression_level"] == "vptq"
    assert run["config"]["stages"]["vptq#2"]["knobs"] == {"vector_len": 2}
    types = {t: paths for t, _, paths in run["artifacts"]}
    assert sorted(types["build-manifest"]) == ["manifest.json", "report.html", "report.md"]
    (pkg_file,) = types["package"]
    assert pkg_file.startswith("edgebuild-") and pkg_file.endswith("-vptq-local.tar.gz")


def test_a_finished_build_logged_from_its_manifest(tmp_path, wandb_env):
    build_dir, manifest = make_build(tmp_path)
    run_dir = tracking.log_build(build_dir / "manifest.json", plots=False)
    run = read_run(run_dir)
    assert [s["stage"] for s in manifest["stages"]] == [next(iter(step)).split("/")[0] for step in run["steps"][:5]]
    assert run["steps"][1]["seedlm/piqa"] == pytest.approx(manifest["stages"][1]["scores"]["piqa"])
    assert "benchmark_by_stage._type" in run["steps"][-1] and not any("mmlu/" in k for k in run["steps"][-1])


def test_the_cli_tracks_each_stage_as_the_pipeline_finishes_it(tmp_path, wandb_env, monkeypatch):
    """``edgebuild all``'s wiring: the run starts before the pipeline runs, the pipeline's listener
    call logs each stage, the records close it; a build that raises still closes its run."""
    from edgebuild.build import pipeline
    from edgebuild.build.cli import build_cmds
    result = make_result(tmp_path, mmlu=True)
    seen = []

    class Pipeline:
        def __init__(self, req):
            self.req, self.out_dir = req, result.out_dir

        def run(self):
            (tracker,) = self.req.listeners
            seen.append(tracker.run_dir)             # started before the first stage
            for run in result.runs:
                for listener in self.req.listeners:
                    listener.stage_finished(run, None)
            return result

    monkeypatch.setattr(pipeline, "Pipeline", Pipeline)
    cfg = SimpleNamespace(profile="reduced", tasks=list(result.runs[0].host), stages=["baseline", "seedlm", "vptq",
                          "hyper"], experts=["general"], seed=0)
    req = SimpleNamespace(model="m", target="local", out=tmp_path / "out", data_dir=tmp_path, config=cfg, listeners=[])
    build_cmds._run(req, True)
    run = read_run(seen[0])
    assert len(run["steps"]) == 6 and "mmlu/anatomy" in run["steps"][-1] and run["exit_code"] == 0
    assert run["config"]["ladder"] == cfg.stages

    def crash(self):
        raise RuntimeError("device on fire")
    monkeypatch.setattr(Pipeline, "run", crash)
    req.listeners = []
    with pytest.raises(RuntimeError, match="device on fire"):
        build_cmds._run(req, True)
    (crashed,) = [p for p in (result.out_dir / "wandb").glob("offline-run-*") if p != seen[0]]
    assert read_run(crashed)["exit_code"] == 1


def test_wandb_disabled_creates_no_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    result = make_result(tmp_path)
    tracker = tracking.WandbTracker(result.out_dir)
    assert tracker.start() is False
    for run in result.runs:
        tracker.stage_finished(run)
    assert tracker.finish(write_manifest(result)) is None
    assert not (result.out_dir / "wandb").exists()


def test_edge_of_chaos_and_eudaimonia_metrics_when_measured(tmp_path):
    _, manifest = make_build(tmp_path)
    manifest["edge_of_chaos"] = {"measured": True,
                                 "arc_easy": {"accuracy": 0.75, "band": "edge", "n": 80, "ci": [0.66, 0.84]}}
    manifest["stages"][1]["eudaimonia"] = {"rules": {"honesty": 0.9, "care": 0.6}, "passed": True}
    m = tracking_metrics.metrics(manifest)
    assert m["vptq/edge_of_chaos/arc_easy/accuracy"] == 0.75 and m["vptq/edge_of_chaos/arc_easy/n"] == 80
    assert m["vptq/edge_of_chaos/arc_easy/ci/1"] == 0.84
    assert not any(k.endswith("/band") for k in m)
    assert m["seedlm/eudaimonia/rules/honesty"] == 0.9 and m["seedlm/eudaimonia/passed"] == 1
    assert not any("edge_of_chaos" in k for k in tracking_metrics.metrics(make_build(tmp_path / "b")[1]))


def test_a_skipped_stage_logs_only_its_status(tmp_path):
    _, manifest = make_build(tmp_path, nasty=False)
    manifest["stages"].append({"stage": "extra", "attempt": 0, "status": "skipped", "bytes": None, "size_mb": 0.0,
                               "scores": {}, "gate": {}, "latency": {"measured": False, "status": "not run"}})
    m = tracking_metrics.metrics(manifest)
    assert {k: v for k, v in m.items() if k.startswith("extra/")} == {
        "extra/passed": 0, "extra/attempt": 1, "extra/num_failed_checks": 0}
    columns, rows = tracking_metrics.stage_table(manifest)
    assert len(rows) == 6 and all(len(r) == len(columns) for r in rows)


def test_a_failing_wandb_never_fails_the_build(tmp_path, wandb_env, monkeypatch, caplog):
    import wandb
    result = make_result(tmp_path)

    def boom(*a, **k):
        raise RuntimeError("wandb service crashed")
    monkeypatch.setattr(wandb, "init", boom)
    tracker = tracking.WandbTracker(result.out_dir)
    with caplog.at_level(logging.WARNING, logger="edgebuild.build.tracking"):
        assert tracker.start() is False
        for run in result.runs:
            tracker.stage_finished(run)
        assert tracker.finish(write_manifest(result)) is None
    assert "wandb service crashed" in caplog.text


def test_an_error_while_logging_a_stage_closes_the_run(tmp_path, wandb_env, monkeypatch, caplog):
    result = make_result(tmp_path)
    tracker = tracking.WandbTracker(result.out_dir)
    assert tracker.start()
    run_dir = tracker.run_dir
    monkeypatch.setattr(tracker.run, "log", lambda *x, **y: (_ for _ in ()).throw(ValueError("bad payload")))
    with caplog.at_level(logging.WARNING, logger="edgebuild.build.tracking"):
        for run in result.runs:
            tracker.stage_finished(run)
        assert tracker.finish(write_manifest(result)) is None
    assert tracker.run is None and caplog.text.count("bad payload") == 1
    assert read_run(run_dir)["exit_code"] == 1


def test_mode_follows_argument_then_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert tracking.resolve_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert tracking.resolve_mode() == "online" and tracking.resolve_mode("offline") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    build_dir, _ = make_build(tmp_path)
    assert tracking.log_build(build_dir / "manifest.json") is None
    assert not (build_dir / "wandb").exists()


def test_a_missing_manifest_is_a_warning_not_an_error(tmp_path, wandb_env, caplog):
    with caplog.at_level(logging.WARNING, logger="edgebuild.build.tracking"):
        assert tracking.log_build(tmp_path / "nope" / "manifest.json") is None
    assert "manifest.json" in caplog.text


@pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"benchmark data not found at {DATA_DIR}")
def test_host_results_keep_mmlu_scores_per_subject(tmp_path):
    """``mmlu/{subject}`` comes from here: the runner's result keeps each subject's score and n."""
    from edgebuild.bench.runner import run_host
    model, tokenizer = tiny_llama()
    res = run_host(model, tokenizer, ["mmlu"], "smoke", DATA_DIR, tmp_path, batch_size=8)["mmlu"]
    strata = res.details["strata"]
    assert len(strata) == 8 and all(r["n"] == 1 for r in strata.values())          # smoke: 8 subjects, 1 each
    assert res.score == pytest.approx(sum(r["score"] for r in strata.values()) / 8)
    assert tracking_metrics.mmlu_subjects({"mmlu": res.to_dict()}) == {s: r["score"] for s, r in strata.items()}
