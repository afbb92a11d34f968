"""The benchmark suite of a model: core, expert domains, unavailable benchmarks, few-shot pools."""
from __future__ import annotations

import os
import shutil

import pytest

from edgebuild.bench import benchmarks
from edgebuild.bench.base import hold_out
from edgebuild.bench.profiles import get_profile
from edgebuild.bench.runner import prepare
from edgebuild.bench.suite import CORE, EXPERT_DOMAINS, NOT_RUNNABLE, check_domains, expert_benchmarks, plan
from edgebuild.core.errors import ConfigError, DataError

from conftest import DATA_DIR, lm_eval_tasks

needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"benchmark data dir {DATA_DIR} not found")


def test_core_and_expert_kinds_follow_the_suite():
    for name in CORE:
        assert benchmarks.get(name).kind == "core"
    for names in EXPERT_DOMAINS.values():
        for name in names:
            if name not in NOT_RUNNABLE:
                assert benchmarks.get(name).kind == "expert"


def test_seed_shot_counts():
    shots = {name: benchmarks.get(name).num_fewshot for name in
             ("mmlu", "gsm8k", "hellaswag", "arc_challenge", "winogrande", "truthfulqa_mc1")}
    assert shots == {"mmlu": 5, "gsm8k": 8, "hellaswag": 10, "arc_challenge": 25, "winogrande": 5,
                     "truthfulqa_mc1": 0}


def test_expert_domains():
    assert expert_benchmarks(["code", "math"]) == ["mbpp", "math"]
    assert expert_benchmarks(["general"])[:2] == ["math", "mbpp"]
    assert set(expert_benchmarks(["general"])) == {n for v in EXPERT_DOMAINS.values() for n in v}
    assert check_domains(["science", "general"])[0] == "science"
    with pytest.raises(ConfigError, match="unknown expert domain 'medicine'"):
        check_domains(["medicine"])
    with pytest.raises(ConfigError, match="empty"):
        check_domains([])


def test_build_config_checks_expert_domains(tmp_path):
    from edgebuild.build.config import load_config

    path = tmp_path / "c.toml"
    path.write_text('[build]\nexperts = ["code", "poetry"]\n')
    with pytest.raises(ConfigError, match=r"c.toml: key 'build.experts\[1\]' must name an expert "
                                          r"domain \(.*\), got 'poetry'"):
        load_config(path)
    path.write_text('[build]\nexperts = ["code"]\n')
    assert load_config(path).experts == ["code"]


@needs_data
def test_plan_reports_unavailable_benchmarks_with_reasons():
    suite = plan(["general"], DATA_DIR)
    assert suite.tasks[:len(CORE)] == list(CORE)
    assert {"math", "mbpp", "lambada_openai", "arc_easy", "piqa", "boolq"} <= set(suite.tasks)
    assert set(suite.unavailable) == {"storycloze", "alfworld", "babyai", "webshop"}
    assert "request form" in suite.unavailable["storycloze"]
    assert "environment" in suite.unavailable["webshop"]
    narrow = plan(["code"], DATA_DIR)
    assert narrow.tasks == list(CORE) + ["mbpp"] and not narrow.unavailable


@needs_data
def test_missing_data_makes_a_benchmark_unavailable(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(DATA_DIR / "piqa", data / "piqa")
    shutil.copytree(DATA_DIR / "arc", data / "arc")
    suite = plan(["commonsense", "science"], data)
    assert suite.tasks == ["arc_challenge", "piqa", "arc_easy"]
    assert "hellaswag_val_full.txt.gz" in suite.unavailable["hellaswag"]
    assert set(suite.unavailable) == set(CORE) - {"arc_challenge"}


def test_hold_out_is_fixed_and_disjoint():
    docs = [{"i": i} for i in range(50)]
    a, b = hold_out(docs, 5, "x"), hold_out(docs, 5, "x")
    assert a == b and len(a.fewshot_docs) == 5 and len(a.eval_docs) == 45
    assert not {d["i"] for d in a.fewshot_docs} & {d["i"] for d in a.eval_docs}
    assert [d["i"] for d in a.fewshot_docs] != list(range(5))
    assert hold_out(docs, 5, "y").fewshot_docs != a.fewshot_docs
    with pytest.raises(DataError, match="too few to hold out 3"):
        hold_out(docs[:3], 3, "x")


@needs_data
def test_fewshot_tasks_give_every_item_the_same_examples(tmp_path):
    tasks = lm_eval_tasks(("arc_challenge", "hellaswag", "winogrande"), tmp_path)
    names = list(tasks)
    for name, shots in zip(names, (25, 10, 5)):
        task = tasks[name]
        assert task.get_config("num_fewshot") == shots
        assert len(list(task.fewshot_docs())) == shots
        docs = [task.eval_docs[i] for i in range(3)]
        contexts = [task.fewshot_context(doc, num_fewshot=shots) for doc in docs]
        contexts = [c[0] if isinstance(c, list) else c for c in contexts]   # WinoGrande: per option
        assert len(os.path.commonprefix(contexts)) > 40 * shots
    arc = tasks[names[0]]
    train_ids = {d["id"] for d in benchmarks.get("arc_challenge").convert(DATA_DIR).fewshot_docs}
    assert {d["id"] for d in arc.fewshot_docs()} <= train_ids


@needs_data
def test_num_fewshot_replaces_the_benchmarks_own_count(tmp_path):
    tasks = lm_eval_tasks(("hellaswag", "arc_challenge"), tmp_path, num_fewshot=0)
    for task in tasks.values():
        assert task.get_config("num_fewshot") == 0
        doc = task.eval_docs[0]
        assert task.fewshot_context(doc, num_fewshot=0) == task.doc_to_text(doc)


def test_num_fewshot_must_not_be_negative(tmp_path):
    with pytest.raises(ConfigError, match="num_fewshot must be 0 or more"):
        prepare(benchmarks.get("piqa"), DATA_DIR, tmp_path, tmp_path, get_profile("smoke"), 0,
                num_fewshot=-1)
