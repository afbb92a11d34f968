"""Benchmarks: converters on the real data dir, sample indices, lm-eval runs on a tiny model."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edgebuild.bench import benchmarks
from edgebuild.bench.base import Benchmark
from edgebuild.bench.profiles import PROFILES, allocate, get_profile, sample_indices, task_rng
from edgebuild.core.errors import ConfigError, DataError

from conftest import DATA_DIR, lm_eval_tasks, tiny_llama  # noqa: E402
needs_data = pytest.mark.skipif(
    not DATA_DIR.is_dir(),
    reason=f"benchmark data dir {DATA_DIR} not found (set EDGEBUILD_DATA_DIR)")


def _tokenizer_dir() -> Path | None:
    import edgebuild.core

    candidates = [Path(edgebuild.core.__file__).parent / "assets" / "smollm2-tokenizer"]
    return next((p for p in candidates if (p / "tokenizer.json").is_file()), None)


@pytest.fixture(scope="module")
def tiny_model():
    """A seeded 2-layer random LLaMA with the real SmolLM2 tokenizer."""
    return tiny_llama(_tokenizer_dir())


@pytest.fixture(scope="module")
def converted():
    """Every benchmark's converted documents (read once per module)."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"benchmark data dir {DATA_DIR} not found (set EDGEBUILD_DATA_DIR)")
    return {name: benchmarks.get(name).convert(DATA_DIR) for name in benchmarks.names()}


# ----------------------------------------------------------------------------- registry


def test_registry_lists_the_benchmarks():
    assert {"arc_easy", "piqa", "arc_challenge", "hellaswag", "winogrande", "boolq",
            "lambada_openai", "mmlu", "truthfulqa_mc1", "truthfulqa_mc2"} <= set(benchmarks)
    for name in benchmarks:
        bench = benchmarks.get(name)
        assert isinstance(bench, Benchmark) and bench.name == name
    assert benchmarks.get("arc_easy").metric == "acc_norm"
    assert benchmarks.get("mmlu").num_fewshot == 5 and benchmarks.get("mmlu").kind == "core"


def test_unknown_benchmark_suggests_a_name():
    with pytest.raises(ConfigError, match="did you mean 'arc_easy'"):
        benchmarks.get("arc_eazy")


def test_builtin_yaml_exists_for_every_benchmark(converted):
    from edgebuild.bench.data import lm_eval_tasks_dir

    for name, conv in converted.items():
        bench = benchmarks.get(name)
        strata = bench.strata(conv.eval_docs) or [None]
        for stratum in sorted(set(strata)):
            assert (lm_eval_tasks_dir() / bench.lm_eval_yaml.format(stratum=stratum)).is_file()


# ----------------------------------------------------------------------------- converters

SIZES = {"arc_easy": 2376, "arc_challenge": 1172, "piqa": 1838, "hellaswag": 10032,
         "winogrande": 1262, "boolq": 3270, "lambada_openai": 5153, "mmlu": 14042,
         "truthfulqa_mc1": 817, "truthfulqa_mc2": 817}
FIELDS = {
    "arc_easy": {"id", "question", "choices", "answerKey"},
    "piqa": {"goal", "sol1", "sol2", "label"},
    "hellaswag": {"activity_label", "ctx_a", "ctx_b", "ctx", "endings", "label"},
    "winogrande": {"sentence", "option1", "option2", "answer"},
    "boolq": {"question", "passage", "label"},
    "lambada_openai": {"text"},
    "mmlu": {"question", "subject", "choices", "answer"},
    "truthfulqa_mc1": {"question", "mc1_targets", "mc2_targets"},
}


@needs_data
@pytest.mark.parametrize("name", sorted(SIZES))
def test_converter_sizes_and_fields(converted, name):
    docs = converted[name].eval_docs
    assert len(docs) == SIZES[name]
    fields = FIELDS.get(name, FIELDS.get(name.replace("challenge", "easy").replace("mc2", "mc1")))
    assert all(fields <= set(doc) for doc in docs)
    chance = [benchmarks.get(name).chance_of(doc) for doc in docs]
    assert all(0.0 <= c < 1.0 for c in chance)


@needs_data
def test_arc_layout(converted):
    doc = converted["arc_easy"].eval_docs[0]
    assert doc["question"].startswith("Which statement best explains why photosynthesis")
    assert doc["choices"]["label"] == ["A", "B", "C", "D"] and doc["answerKey"] == "A"
    chance = [benchmarks.get("arc_easy").chance_of(d) for d in converted["arc_easy"].eval_docs]
    assert 0.24 < sum(chance) / len(chance) < 0.26 and len(set(chance)) > 1   # 3-5 choices


@needs_data
def test_piqa_labels_joined(converted):
    docs = converted["piqa"].eval_docs
    assert [d["label"] for d in docs[:3]] == [0, 1, 1]
    assert docs[0]["goal"] == "How do I ready a guinea pig cage for it's new occupants?"


@needs_data
def test_boolq_labels_are_ints(converted):
    labels = [d["label"] for d in converted["boolq"].eval_docs]
    assert set(labels) == {0, 1} and labels.count(1) == 2033


@needs_data
def test_hellaswag_query_matches_lm_eval_preprocessing(converted):
    from lm_eval.tasks.hellaswag.utils import preprocess

    docs = converted["hellaswag"].eval_docs
    first = docs[0]
    assert (first["ctx_a"], first["ctx_b"], first["label"]) == \
        ("A man is sitting on a roof.", "he", "3")
    query = preprocess(first["activity_label"] + ": " + first["ctx_a"] + " "
                       + first["ctx_b"].capitalize())
    assert query == "Roof shingle removal: A man is sitting on a roof. He"
    wikihow = next(d for d in docs if d["activity_label"] == "Personal Care and Style")
    assert wikihow["ctx_b"] == "" and wikihow["ctx_a"] == wikihow["ctx"]


def test_hellaswag_split_context():
    from edgebuild.bench.tasks.hellaswag import split_context

    assert split_context("A lady walks. She bends down. the lady") == \
        ("A lady walks. She bends down.", "the lady")
    assert split_context("How to cook. Boil water.") == ("How to cook. Boil water.", "")
    assert split_context("a man is standing") == ("", "a man is standing")


@needs_data
def test_mmlu_subjects_and_fewshot(converted):
    conv = converted["mmlu"]
    subjects = {d["subject"] for d in conv.eval_docs}
    assert len(subjects) == 57 and len(conv.fewshot_docs) == 285
    assert all(d["answer"] in (0, 1, 2, 3) and len(d["choices"]) == 4 for d in conv.eval_docs)
    assert conv.eval_docs[0]["subject"] == "abstract_algebra"


@needs_data
def test_truthfulqa_targets(converted):
    doc = converted["truthfulqa_mc1"].eval_docs[0]
    assert doc["question"].startswith("What is the smallest country in the world")
    assert doc["mc1_targets"]["labels"][0] == 1 and sum(doc["mc1_targets"]["labels"]) == 1
    mc2 = benchmarks.get("truthfulqa_mc2")
    assert mc2.chance_of(doc) == pytest.approx(sum(doc["mc2_targets"]["labels"])
                                               / len(doc["mc2_targets"]["labels"]))


# ----------------------------------------------------------------------------- data errors


def test_missing_data_dir_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist") as info:
        benchmarks.get("arc_easy").convert(tmp_path / "nowhere")
    assert "--data-dir" in info.value.one_line()


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(DataError) as info:
        benchmarks.get("piqa").convert(tmp_path)
    assert "piqa/dev.jsonl" in str(info.value) and "--data-dir" in info.value.one_line()


def test_malformed_json_raises_data_error(tmp_path):
    folder = tmp_path / "arc" / "ARC-Easy"
    folder.mkdir(parents=True)
    (folder / "ARC-Easy-Test.jsonl").write_text('{"id": "x"}\n{not json\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        benchmarks.get("arc_easy").convert(tmp_path)


def test_missing_field_raises_data_error(tmp_path):
    folder = tmp_path / "arc" / "ARC-Easy"
    folder.mkdir(parents=True)
    (folder / "ARC-Easy-Test.jsonl").write_text('{"id": "x", "answerKey": "A"}\n')
    with pytest.raises(DataError, match="record 1 is malformed"):
        benchmarks.get("arc_easy").convert(tmp_path)


def test_piqa_label_count_mismatch(tmp_path):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "dev.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    (tmp_path / "piqa" / "dev-labels.txt").write_text("0\n1\n")
    with pytest.raises(DataError, match="2 labels"):
        benchmarks.get("piqa").convert(tmp_path)


# ----------------------------------------------------------------------------- profiles


def test_unknown_profile():
    with pytest.raises(ConfigError, match="smoke"):
        get_profile("tiny")


def test_sample_indices_are_fixed_seeded_and_not_first_n():
    first = sample_indices("arc_easy", 2376, 200, seed=0)
    assert first == sample_indices("arc_easy", 2376, 200, seed=0)
    assert first == sorted(first) and len(set(first)) == 200
    assert first != list(range(200)) and max(first) > 1000
    assert first != sample_indices("arc_easy", 2376, 200, seed=1)
    assert first != sample_indices("piqa", 2376, 200, seed=0)
    assert sample_indices("arc_easy", 50, None) == list(range(50))
    assert sample_indices("arc_easy", 50, 80) == list(range(50))


def test_stratified_sample_spreads_over_strata():
    strata = ["a"] * 100 + ["b"] * 10 + ["c"] * 3
    picked = sample_indices("mmlu", len(strata), 15, seed=0, strata=strata)
    counts = {s: sum(strata[i] == s for i in picked) for s in "abc"}
    assert counts == {"a": 6, "b": 6, "c": 3}            # "c" is capped, the rest spread evenly
    assert picked == sample_indices("mmlu", len(strata), 15, seed=0, strata=strata)


def test_allocate_is_even_and_capped():
    counts = allocate([5, 5, 5, 1], 10, task_rng("x", 0))
    assert sum(counts) == 10 and counts[3] == 1 and sorted(counts[:3]) == [3, 3, 3]


@needs_data
def test_mmlu_profiles_are_stratified(converted):
    docs = converted["mmlu"].eval_docs
    strata = benchmarks.get("mmlu").strata(docs)
    size = PROFILES["reduced"].size_for("mmlu")
    picked = sample_indices("mmlu", len(docs), size, seed=0, strata=strata)
    per_subject = {}
    for i in picked:
        per_subject[strata[i]] = per_subject.get(strata[i], 0) + 1
    assert len(per_subject) == 57 and set(per_subject.values()) == {10}
    smoke = sample_indices("mmlu", len(docs), PROFILES["smoke"].size_for("mmlu"), 0, strata)
    assert len({strata[i] for i in smoke}) == 8


# ----------------------------------------------------------------------------- lm-eval tasks


@needs_data
def test_generated_tasks_load_in_lm_eval(tmp_path):
    tasks = lm_eval_tasks(("arc_easy", "piqa", "mmlu"), tmp_path)
    assert not list(Path(DATA_DIR).rglob("*.yaml"))
    arc = tasks["edgebuild_arc_easy"]
    doc = arc.eval_docs[0]
    assert arc.doc_to_text(doc).startswith("Question: Which statement best explains")
    assert arc.doc_to_target(doc) == 0 and len(arc.eval_docs) == 2376
    piqa = tasks["edgebuild_piqa"]
    assert piqa.doc_to_target(piqa.eval_docs[1]) == 1
    mmlu = next(task for name, task in tasks.items() if name.startswith("edgebuild_mmlu_"))
    assert mmlu.get_config("num_fewshot") == 5 and len(list(mmlu.fewshot_docs())) == 5


@needs_data
def test_run_host_smoke(tiny_model, tmp_path):
    from edgebuild.bench.runner import TaskResult, run_host

    import torch

    model, tokenizer = tiny_model
    calls = []
    before = os.environ.get("HF_HUB_OFFLINE")
    rng_state = torch.get_rng_state()
    results = run_host(model, tokenizer, ["arc_easy", "piqa"], "smoke", DATA_DIR, tmp_path,
                       batch_size=8, progress=lambda done, total: calls.append((done, total)))
    assert os.environ.get("HF_HUB_OFFLINE") == before
    assert torch.equal(torch.get_rng_state(), rng_state), "the caller's RNG is left alone"
    assert list(results) == ["arc_easy", "piqa"]
    for name, result in results.items():
        docs = benchmarks.get(name).convert(DATA_DIR).eval_docs
        expected = sample_indices(name, len(docs), 8, seed=0)
        assert result.n == 8 and [doc_id for doc_id, _ in result.items] == expected
        assert all(correct in (0.0, 1.0) for _, correct in result.items)
        assert result.score == pytest.approx(sum(c for _, c in result.items) / 8)
        assert result.metric == "acc_norm" and result.kind == "expert"
        again = TaskResult.from_dict(json.loads(json.dumps(result.to_dict())))
        assert again == result
    assert results["piqa"].chance == 0.5
    assert calls and calls[-1][0] == calls[-1][1] == 8 * 2 + sum(
        len(benchmarks.get("arc_easy").convert(DATA_DIR).eval_docs[i]["choices"]["text"])
        for i in sample_indices("arc_easy", 2376, 8))
    assert not list(tmp_path.glob("tasks-*")), "the generated task folder is removed"


def test_run_host_needs_tasks(tiny_model, tmp_path):
    from edgebuild.bench.runner import run_host

    model, tokenizer = tiny_model
    with pytest.raises(ConfigError, match="no benchmark tasks"):
        run_host(model, tokenizer, [], "smoke", DATA_DIR, tmp_path)
    with pytest.raises(ConfigError, match="unknown benchmark profile"):
        run_host(model, tokenizer, ["piqa"], "huge", DATA_DIR, tmp_path)


def test_batches_are_bounded_by_tokens(tiny_model):
    from lm_eval.models.utils import Collator

    from edgebuild.bench.hflm import HostLM

    model, tokenizer = tiny_model
    lm = HostLM(model, tokenizer, batch_size=4, max_batch_tokens=1000)
    requests = [("long", [1] * 400, [2] * 100)] * 3 + [("short", [1] * 90, [2] * 10)] * 6
    chunks = list(Collator.get_chunks(requests, fn=lm._batch_scheduler))
    assert [len(chunk) for chunk in chunks] == [2, 2, 4, 1]


# ----------------------------------------------------------------------------- task YAMLs


def test_read_task_yaml_merges_includes_without_importing():
    from edgebuild.bench.base import FunctionRef
    from edgebuild.bench.data import lm_eval_tasks_dir, read_task_yaml

    folder = lm_eval_tasks_dir() / "hendrycks_math"
    config = read_task_yaml(folder / "hendrycks_math500.yaml")
    assert config["task"] == "hendrycks_math500" and "include" not in config
    assert config["dataset_path"] == "HuggingFaceH4/MATH-500"         # the including file wins
    assert config["doc_to_text"].startswith("Problem:")                 # from the included one
    assert config["process_results"] == FunctionRef("utils.process_results", str(folder))


def test_dumped_yaml_keeps_function_tags(tmp_path):
    import yaml

    from edgebuild.bench.base import FunctionRef
    from edgebuild.bench.data import dump_task_yaml

    text = dump_task_yaml({"metric_list": [{"metric": FunctionRef("pkg.mod.fn")}], "k": [1]})
    assert "!function 'pkg.mod.fn'" in text or "!function pkg.mod.fn" in text

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: ("fn", loader.construct_scalar(node)))
    assert yaml.load(text, Loader=Loader) == {"metric_list": [{"metric": ("fn", "pkg.mod.fn")}],
                                               "k": [1]}


def test_inline_task_must_replace_the_builtin_helpers(tmp_path):
    from edgebuild.bench.base import FunctionRef
    from edgebuild.bench.data import lm_eval_tasks_dir, task_config

    builtin = lm_eval_tasks_dir() / "humaneval" / "humaneval.yaml"
    files = {"test": tmp_path / "x.jsonl"}
    with pytest.raises(ConfigError, match="utils.pass_at_k"):
        task_config("t", builtin, files, 0, tmp_path, inline=True)
    replaced = {"metric_list": [{"metric": FunctionRef("m.f")}], "filter_list": []}
    config = task_config("t", builtin, files, 0, tmp_path, replaced, inline=True)
    assert config["doc_to_text"] == "{{prompt}}" and config["task"] == "t"
    assert config["metric_list"] == replaced["metric_list"] and "include" not in config
    assert task_config("t", builtin, files, 0, tmp_path)["include"] == str(builtin)


@needs_data
def test_measure_host_writes_both_sides(tmp_path, capsys):
    from edgebuild.build.cli import main

    out = tmp_path / "rows.json"
    assert main(["measure", "host", "--model", "tiny-random", "--data-dir", str(DATA_DIR), "--profile",
                 "smoke", "--tasks", "piqa", "--num-fewshot", "0", "--json", str(out)]) == 0
    [row] = json.loads(out.read_text())
    assert row["edgebuild"]["n"] == row["lm_eval_hf"]["n"] == 8
    assert row["edgebuild"]["score"] == row["lm_eval_hf"]["score"] and row["same_items"] == 8
    assert "0-shot" in capsys.readouterr().out


@pytest.mark.parametrize("args, code", [
    (["measure", "host", "--model", "{missing}", "--data-dir", "{tmp}"], 4),
    (["measure", "host", "--model", "tiny-random", "--data-dir", "{missing}"], 6),
    (["measure", "host", "--model", "tiny-random", "--data-dir", "{tmp}", "--tasks", "piqq"], 3),
    (["measure", "host", "--num-fewshot", "-1"], 2),
    (["measure", "compress", "--model", "{missing}", "--data-dir", "{tmp}"], 4),
    (["measure", "device", "--out", "{missing}"], 2),
])
def test_measure_tools_give_one_line_errors(tmp_path, capsys, args, code):
    from edgebuild.build.cli import main

    missing = str(tmp_path / "nothing-here")
    argv = [a.format(missing=missing, tmp=tmp_path) for a in args]
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err


def test_generation_tasks_are_one_unit_of_a_host_step():
    """The generation tasks decode in one running batch, at the place of the first of them;
    log-likelihood tasks stay one unit each, in the build's order."""
    from edgebuild.bench.step import units

    tasks = ["mmlu", "gsm8k", "humaneval", "hellaswag", "math", "mbpp", "piqa"]
    assert units(tasks) == [["mmlu"], ["gsm8k", "humaneval", "math", "mbpp"], ["hellaswag"], ["piqa"]]
    assert units(["piqa", "arc_easy"]) == [["piqa"], ["arc_easy"]]
    assert units(["mbpp"]) == [["mbpp"]]
    tasks = ["truthfulqa_mc1", "piqa", "truthfulqa_mc2", "gsm8k"]
    assert units(tasks) == [["truthfulqa_mc1", "truthfulqa_mc2"], ["piqa"], ["gsm8k"]]


def test_benchmarks_over_the_same_questions_share_items_and_answers(tiny_model, tmp_path, monkeypatch):
    """TruthfulQA MC1 and MC2 draw the same questions; run together, every MC1 answer is one of
    MC2's and is scored once, and MC1's results are those it gets alone."""
    from edgebuild.bench.prefix_scoring import PackedScorer
    from edgebuild.bench.runner import run_host

    model, tokenizer = tiny_model
    scored = []
    original = PackedScorer._batch
    monkeypatch.setattr(PackedScorer, "_batch", lambda self, batch, *args: scored.extend(
        r for row in batch for r in row.requests) or original(self, batch, *args))
    both = run_host(model, tokenizer, ["truthfulqa_mc1", "truthfulqa_mc2"], "smoke", DATA_DIR, tmp_path)
    mc1, mc2 = both["truthfulqa_mc1"], both["truthfulqa_mc2"]
    assert [d for d, _ in mc1.items] == [d for d, _ in mc2.items]
    assert len(scored) == sum(len(answers) for answers in mc2.responses.values())
    alone = run_host(model, tokenizer, ["truthfulqa_mc1"], "smoke", DATA_DIR, tmp_path)["truthfulqa_mc1"]
    assert alone.items == mc1.items
    for doc_id, answers in alone.responses.items():
        for (want, want_greedy, _), (got, got_greedy, _) in zip(answers, mc1.responses[doc_id]):
            assert got == pytest.approx(want, abs=1e-4) and got_greedy == want_greedy
