"""The summary a build prints: readable at a CI log's width with the whole suite gated."""
from types import SimpleNamespace

from edgebuild.build import summary
from edgebuild.core.errors import ExitCode
from edgebuild.core.steps import StageRun

TASKS = [f"task_{i:02d}" for i in range(16)]


def attempt(stage, n, score, status, note=""):
    run = StageRun(stage, stage if stage != "baseline" else "raw", {}, n, None, status=status, note=note)
    run.pack = {"bytes": 110_000_000, "stats": {"bits_per_weight": 4.25, "compressed_weights": 1}}
    run.host = {t: {"score": score, "n": 50} for t in TASKS} if score is not None else {}
    run.quality = {"kl": 0.1234}
    run.gate = {"reasons": [] if status == "passed" else [f"core/{TASKS[0]}: retention 0.5 vs 0.9"]}
    return run


def result():
    runs = [attempt("baseline", 0, 0.4, "passed"), attempt("seedlm", 0, None, "failed", "stopped early"),
            attempt("seedlm", 1, None, "failed"), attempt("vptq", 0, 0.3, "failed", "no earlier stage passed"),
            attempt("hyper", 0, 0.2, "failed"), attempt("hyper", 1, 0.36, "passed")]
    return SimpleNamespace(runs=runs, shipped="hyper", exit_code=ExitCode.OK, cache_hits=1, cache_misses=40,
                           partial=False, compressed_ahead={}, model_ref=SimpleNamespace(spec="tiny"),
                           target=SimpleNamespace(name="local"))


def test_printed_summary_fits_a_ci_log_without_cutting_cells(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdout.isatty", lambda: False, raising=False)
    summary.print_table(result())
    out = capsys.readouterr().out
    assert "…" not in out, out
    rows = [line for line in out.splitlines() if line.startswith("│ task_")]
    assert [r.split("│")[1].strip() for r in rows] == TASKS           # one row per benchmark
    assert rows[0].count("│") == 1 + 6 + 1                              # one column per attempt
    assert "0.360 (90%)" in rows[0] and rows[0].count("—") == 2        # seedlm stopped before benchmarks
    assert "seedlm#1: stopped early" in out and "vptq#1: no earlier stage passed" in out
    assert f"hyper#1: core/{TASKS[0]}: retention 0.5 vs 0.9" in out and "shipped: hyper (exit code 0)" in out
