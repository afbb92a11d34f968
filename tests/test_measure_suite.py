"""``edgebuild measure suite``: edgebuild's host scorer next to the lm_eval command, same items."""
from __future__ import annotations

import json

import pytest

from edgebuild.build.measure import suite_speed
from edgebuild.core.errors import ConfigError, DataError

from conftest import DATA_DIR, tiny_llama


def _row(task, ours, theirs, n=10, seconds=(2.0, 8.0, 4.0)):
    return {"task": task, "n": n, "diff_points": 100 * (ours - theirs), "same_items": n,
            "edgebuild": {"score": ours, "seconds": seconds[0], "items_per_s": n / seconds[0]},
            "lm_eval_cli": {"score": theirs, "n": n, "seconds": seconds[1], "items_per_s": n / seconds[1],
                            "eval_seconds": seconds[2], "eval_items_per_s": n / seconds[2]}}


def test_code_benchmarks_are_refused():
    suite_speed.check_tasks(["arc_easy", "gsm8k"])
    with pytest.raises(ConfigError, match="humaneval: code benchmarks"):
        suite_speed.check_tasks(["arc_easy", "humaneval"])


def test_scores_agree_only_within_one_point():
    assert suite_speed.agree([_row("a", 0.5, 0.505), _row("b", 0.3, 0.3)])
    assert not suite_speed.agree([_row("a", 0.5, 0.48)])


def test_totals_are_items_over_seconds_of_all_tasks():
    out = suite_speed.total([_row("a", 0.5, 0.5, 10, (2.0, 8.0, 4.0)), _row("b", 0.5, 0.5, 30, (2.0, 12.0, 6.0))])
    assert out["edgebuild"]["items_per_s"] == pytest.approx(10.0)
    assert out["lm_eval_cli"]["items_per_s"] == pytest.approx(2.0)
    assert out["lm_eval_cli"]["eval_items_per_s"] == pytest.approx(4.0)


def test_lm_eval_output_is_read_per_task(tmp_path):
    folder = tmp_path / "model__dir"
    folder.mkdir()
    (folder / "samples_edgebuild_piqa_2026-01-01.jsonl").write_text(
        json.dumps({"doc_id": 0, "acc": 1.0, "arguments": {"gen_args_0": {"arg_0": "Q", "arg_1": {"n": 1}}}})
        + "\n" + json.dumps({"doc_id": 3, "acc": 0.0}) + "\n")
    (folder / "results_2026-01-01.json").write_text(json.dumps({"total_evaluation_time_seconds": "12.5"}))
    samples, seconds = suite_speed.read_output(tmp_path, ["edgebuild_piqa"])
    assert [s["doc_id"] for s in samples["edgebuild_piqa"]] == [0, 3] and seconds == 12.5
    assert samples["edgebuild_piqa"][0]["arguments"] == [("Q", {"n": 1})]   # as simple_evaluate returns it
    with pytest.raises(DataError, match="no per-item log for edgebuild_arc_easy"):
        suite_speed.read_output(tmp_path, ["edgebuild_arc_easy"])


@pytest.mark.slow
def test_both_sides_score_the_same_items_alike(tmp_path):
    """The lm_eval command, run as its own process on a saved model folder, gives edgebuild's
    scores on the same items (a tiny random model: fast, and every item's choice is arbitrary)."""
    if not (DATA_DIR / "SOURCES.md").is_file():
        pytest.skip("benchmark data not found")
    model, tokenizer = tiny_llama()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    setup = suite_speed.Setup(str(tmp_path / "model"), DATA_DIR, "smoke", batch_size=8)
    rows = suite_speed.run(setup, ["arc_easy", "gsm8k"])
    assert [r["task"] for r in rows] == ["arc_easy", "gsm8k"]
    for row in rows:
        assert row["same_items"] == row["n"] == row["lm_eval_cli"]["n"] > 0
        assert abs(row["diff_points"]) <= suite_speed.TOLERANCE_POINTS
