"""Generation benchmarks: converters on the real data, generated lm-eval tasks, code scoring in the
sandbox, and end-to-end runs of GSM8K and HumanEval on a tiny random model."""
from __future__ import annotations

import ast
import json
import sys

import pytest

from edgebuild.bench import benchmarks
from edgebuild.bench.codeexec import humaneval_program, mbpp_program
from edgebuild.bench.data import lm_eval_tasks_dir, read_jsonl
from edgebuild.bench.profiles import PROFILES, get_profile, sample_indices
from edgebuild.bench.sandbox import run_programs

from conftest import DATA_DIR, tiny_llama  # noqa: E402

GENERATION = ("gsm8k", "humaneval", "humaneval_pass10", "mbpp", "math")

pytestmark = pytest.mark.skipif(
    not DATA_DIR.is_dir(), reason=f"benchmark data dir {DATA_DIR} not found (set EDGEBUILD_DATA_DIR)")


@pytest.fixture(scope="module")
def converted():
    return {name: benchmarks.get(name).convert(DATA_DIR) for name in GENERATION}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """The generated lm-eval tasks of every generation benchmark (smoke profile)."""
    from lm_eval.tasks import TaskManager

    from edgebuild.bench.runner import prepare

    folder = tmp_path_factory.mktemp("tasks")
    names = {}
    for name in GENERATION:
        prepared = prepare(benchmarks.get(name), DATA_DIR, folder / "cache", folder,
                           get_profile("smoke"), 0)
        names[name] = prepared.parts[0].task_name
    loaded = TaskManager(include_path=str(folder), include_defaults=False).load(
        list(names.values()))["tasks"]
    return {name: loaded[task_name] for name, task_name in names.items()}


@pytest.fixture(scope="module")
def tiny_model():
    """A seeded 2-layer random LLaMA with the real SmolLM2 tokenizer."""
    return tiny_llama()


# ----------------------------------------------------------------------------- registry, profiles


def test_generation_benchmarks_are_registered():
    expected = {"gsm8k": ("core", "exact_match", 8), "humaneval": ("core", "pass@1", 0),
                "humaneval_pass10": ("core", "pass@10", 0), "mbpp": ("expert", "pass@1", 3),
                "math": ("expert", "exact_match", 0)}
    for name, (kind, metric, shots) in expected.items():
        bench = benchmarks.get(name)
        assert (bench.kind, bench.metric, bench.num_fewshot) == (kind, metric, shots)
        assert bench.generation is not None and bench.chance_of({}) == 0.0
        assert (lm_eval_tasks_dir() / bench.lm_eval_yaml).is_file()
    assert benchmarks.get("humaneval_pass10").generation.repeats >= 10
    assert benchmarks.get("humaneval").generation.repeats == 1


def test_benchmark_checks_samples_against_k():
    from edgebuild.bench.base import Benchmark, Generation, fixed_chance

    with pytest.raises(ValueError, match="at least 10 samples"):
        Benchmark(name="x", lm_eval_task="x", lm_eval_yaml="x.yaml", kind="core",
                  metric="pass@10", num_fewshot=0, convert=None, chance_of=fixed_chance(0.0),
                  generation=Generation(max_gen_toks=8, repeats=5))
    with pytest.raises(ValueError, match="generation block"):
        Benchmark(name="x", lm_eval_task="x", lm_eval_yaml="x.yaml", kind="core",
                  metric="exact_match", num_fewshot=0, convert=None, chance_of=fixed_chance(0.0))


def test_generation_profiles_are_small():
    for name in GENERATION:
        assert PROFILES["smoke"].size_for(name) == 2
        assert PROFILES["reduced"].size_for(name) <= 50
        assert PROFILES["full"].size_for(name) is None


# ----------------------------------------------------------------------------- converters


def test_gsm8k_layout(converted):
    docs = converted["gsm8k"].eval_docs
    assert len(docs) == 1319 and set(docs[0]) == {"question", "answer"}
    assert docs[0]["question"].startswith("Janet’s ducks lay 16 eggs")
    assert docs[0]["answer"].endswith("#### 18")


def test_humaneval_layout(converted):
    docs = converted["humaneval"].eval_docs
    assert len(docs) == 164 and docs[0]["task_id"] == "HumanEval/0"
    assert set(docs[0]) == {"task_id", "prompt", "canonical_solution", "test", "entry_point"}
    assert docs[0]["entry_point"] == "has_close_elements"


def test_mbpp_layout_and_fewshot_match_the_builtin(converted):
    conv = converted["mbpp"]
    assert len(conv.eval_docs) == 500
    assert [d["task_id"] for d in conv.eval_docs[:2]] == [11, 12]
    assert conv.eval_docs[-1]["task_id"] == 510
    assert all(len(d["test_list"]) == 3 and "is_fewshot" not in d for d in conv.eval_docs)
    # lm-eval's mbpp helper lists its three prompt examples literally; ours come from the data
    source = (lm_eval_tasks_dir() / "mbpp" / "utils.py").read_text()
    function = next(node for node in ast.parse(source).body
                    if isinstance(node, ast.FunctionDef) and node.name == "list_fewshot_samples")
    builtin = ast.literal_eval(function.body[-1].value)
    assert conv.fewshot_docs == builtin


def test_math_layout_and_subset_pool(converted):
    conv = converted["math"]
    assert len(conv.eval_docs) == 5000 and len(conv.sample_pool) == 500
    assert set(conv.eval_docs[0]) == {"id", "problem", "level", "type", "solution"}
    subset = read_jsonl(DATA_DIR / "math" / "MATH-500" / "test.jsonl")
    by_problem = {conv.eval_docs[i]["problem"] for i in conv.sample_pool}
    assert {row["problem"] for row in subset} == by_problem


def test_math_sampled_profiles_draw_from_math500(tmp_path, converted):
    from edgebuild.bench.runner import prepare

    pool = set(converted["math"].sample_pool)
    reduced = prepare(benchmarks.get("math"), DATA_DIR, tmp_path / "cache", tmp_path,
                      get_profile("reduced"), 0)
    chosen = [reduced.parts[0].doc_ids[i] for i in reduced.parts[0].selected]
    assert len(chosen) == PROFILES["reduced"].size_for("math") and set(chosen) <= pool
    assert chosen != sorted(pool)[:len(chosen)]


# ----------------------------------------------------------------------------- generated tasks


def test_generated_tasks_keep_the_builtin_prompts(tasks, converted):
    gsm8k = tasks["gsm8k"]
    context = gsm8k.fewshot_context(gsm8k.eval_docs[0], num_fewshot=8)
    assert context.startswith("Q: There are 15 trees in the grove.")
    assert context.count("The answer is") == 8 and context.endswith("Q: " + gsm8k.eval_docs[0]["question"] + "\nA:")
    assert gsm8k.doc_to_target(gsm8k.eval_docs[0]) == "18"
    humaneval = tasks["humaneval"]
    assert humaneval.doc_to_text(humaneval.eval_docs[0]) == converted["humaneval"].eval_docs[0]["prompt"]
    assert "\ndef" in humaneval.config.generation_kwargs["until"]
    mbpp = tasks["mbpp"]
    context = mbpp.fewshot_context(mbpp.eval_docs[0], num_fewshot=3)
    assert context.count("[DONE]") == 3 and context.endswith("[BEGIN]\n")
    assert "Write a function to find the similar elements" in context
    math_task = tasks["math"]
    assert math_task.doc_to_text(math_task.eval_docs[0]).startswith("Problem: ")


def test_generation_lengths_are_bounded_and_sampling_kept(tasks):
    for name, task in tasks.items():
        kwargs = task.config.generation_kwargs
        assert kwargs["max_gen_toks"] == benchmarks.get(name).generation.max_gen_toks <= 256
    sampled = tasks["humaneval_pass10"]
    assert sampled.config.generation_kwargs["do_sample"] is True
    assert sampled.config.repeats == benchmarks.get("humaneval_pass10").generation.repeats
    assert tasks["humaneval"].config.generation_kwargs["do_sample"] is False


def test_code_tasks_never_load_lm_evals_code_eval(tasks):
    assert "lm_eval.tasks.humaneval.utils" not in sys.modules
    assert "lm_eval.tasks.mbpp.utils" not in sys.modules
    for name in ("humaneval", "humaneval_pass10", "mbpp"):
        assert [f.name for f in tasks[name]._filters] == ["sandbox"]


def _score(task, doc, response: str) -> dict[str, float]:
    """Apply every filter of ``task`` to one response; ``{filter: exact_match}``."""
    from lm_eval.api.instance import Instance

    scores = {}
    for ensemble in task._filters:
        instance = Instance("generate_until", doc, ("", {}), 0, resps=[response])
        ensemble.apply([instance])
        result = task.process_results(doc, [instance.filtered_resps[ensemble.name]])
        scores[ensemble.name] = result["exact_match"]
    return scores


@pytest.mark.parametrize("response, strict, flexible", [
    (" Janet has 16 - 3 - 4 = 9 eggs. 9 * 2 = 18. The answer is 18.\n\n", 1.0, 1.0),
    (" 16 - 3 - 4 = 9 eggs, so she makes 9 * 2 = 18 dollars.", 0.0, 1.0),
    (" She makes $18 a day. The answer is $18.", 0.0, 1.0),
    (" She makes 9 * 2 = 18.00 dollars. The answer is 18.00.", 0.0, 0.0),
    (" The answer is 18. Next she buys 20 more.", 1.0, 0.0),
    (" The answer is 17.", 0.0, 0.0),
])
def test_gsm8k_answer_extraction(tasks, response, strict, flexible):
    task = tasks["gsm8k"]
    doc = task.eval_docs[0]
    assert _score(task, doc, response) == {"strict-match": strict, "flexible-extract": flexible}


def test_math_answer_matching(tasks):
    task = tasks["math"]
    doc = task.eval_docs[0]                           # answer: 2 vertical asymptotes
    assert task.process_results(doc, [" $2$"])["exact_match"] == 1
    assert task.process_results(doc, [" 2"])["exact_match"] == 1
    assert task.process_results(doc, [" $3$"])["exact_match"] == 0


# ----------------------------------------------------------------------------- code scoring


def test_reference_solutions_pass_and_wrong_ones_fail(converted):
    humaneval = converted["humaneval"].eval_docs[:6]
    mbpp = converted["mbpp"].eval_docs[:6]
    programs = [humaneval_program(doc, doc["canonical_solution"]) for doc in humaneval]
    programs += [mbpp_program(doc, doc["code"]) for doc in mbpp]
    programs += [humaneval_program(doc, "    return None\n") for doc in humaneval[:3]]
    programs += [mbpp_program(doc, "def nothing():\n    pass\n") for doc in mbpp[:3]]
    results = run_programs(programs)
    assert [r.passed for r in results] == [True] * 12 + [False] * 6, [r.stderr for r in results]


@pytest.mark.slow
def test_every_reference_solution_passes(converted):
    humaneval = converted["humaneval"].eval_docs
    mbpp = converted["mbpp"].eval_docs
    results = run_programs([humaneval_program(d, d["canonical_solution"]) for d in humaneval]
                           + [mbpp_program(d, d["code"]) for d in mbpp])
    failed = [r.stderr[-200:] for r in results if not r.passed]
    assert not failed, failed[:3]


# ----------------------------------------------------------------------------- end to end


def test_run_host_generation_smoke(tiny_model, tmp_path):
    import torch

    from edgebuild.bench.runner import TaskResult, run_host

    model, tokenizer = tiny_model
    rng_state = torch.get_rng_state()
    results = run_host(model, tokenizer, ["gsm8k", "humaneval"], "smoke", DATA_DIR, tmp_path,
                       max_gen_toks=12)
    assert torch.equal(torch.get_rng_state(), rng_state), "the caller's RNG is left alone"
    assert list(results) == ["gsm8k", "humaneval"]
    for name, result in results.items():
        docs = benchmarks.get(name).convert(DATA_DIR).eval_docs
        assert result.n == 2 and result.chance == 0.0
        assert [doc_id for doc_id, _ in result.items] == sample_indices(name, len(docs), 2)
        assert all(0.0 <= score <= 1.0 for _, score in result.items)
        assert result.score == pytest.approx(sum(s for _, s in result.items) / 2)
        assert result.stderr is not None and result.details["max_gen_toks"] == 12
        assert TaskResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    gsm8k, humaneval = results["gsm8k"], results["humaneval"]
    assert gsm8k.metric == "exact_match" and set(gsm8k.details["filters"]) == {
        "strict-match", "flexible-extract"}
    assert humaneval.metric == "pass@1" and humaneval.kind == "core"
    sandbox = humaneval.details["sandbox"]
    assert sandbox["programs"] == 2 and sum(sandbox["statuses"].values()) == 2
    assert "error" not in sandbox["statuses"] and sandbox["seconds"] > 0
    assert not list(tmp_path.glob("tasks-*"))


def test_run_host_rejects_a_bad_length(tiny_model, tmp_path):
    from edgebuild.bench.runner import run_host
    from edgebuild.core.errors import ConfigError

    model, tokenizer = tiny_model
    with pytest.raises(ConfigError, match="max_gen_toks"):
        run_host(model, tokenizer, ["gsm8k"], "smoke", DATA_DIR, tmp_path, max_gen_toks=0)
