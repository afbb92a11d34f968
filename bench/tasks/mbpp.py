"""MBPP (Mostly Basic Python Problems), test split (task ids 11-510), 3-shot, pass@1.

``mbpp/mbpp.jsonl`` holds all 974 problems ``{"task_id", "text", "code", "test_list",
"test_setup_code", "challenge_test_list"}`` (the Hugging Face ``google-research-datasets/mbpp``
``full`` layout), split by task id: 11-510 test, 2-4 the standard few-shot prompts. lm-eval's
``mbpp`` shows the three examples (``[BEGIN]`` code ``[DONE]``), then the problem and its tests,
and greedily generates until ``[DONE]``. Each completion runs with the item's tests in
``edgebuild.bench.sandbox``; ``edgebuild.bench.codeexec`` scores it (pass@1, 0 or 1 per item).

The few-shot examples are read from the data file and written into the task YAML (the built-in
lists the same three records in its helper module). The built-in YAML is copied inline, not included: its helper module
imports and runs Hugging Face's in-process ``code_eval`` as soon as it is loaded.
"""
from __future__ import annotations

from pathlib import Path

from edgebuild.bench.base import Benchmark, Converted, Generation, fixed_chance
from edgebuild.bench.codeexec import FILTER_NAME, task_overrides
from edgebuild.bench.data import DATA_HINT, convert_records, data_file, read_jsonl
from edgebuild.core.errors import DataError

FIELDS = ("task_id", "text", "code", "test_list", "test_setup_code", "challenge_test_list")
TEST_IDS = range(11, 511)
FEWSHOT_IDS = (2, 3, 4)


def mbpp_doc(raw: dict) -> dict:
    """One release record, its fields checked (three test asserts)."""
    doc = {key: raw[key] for key in FIELDS}
    if len(doc["test_list"]) < 3:
        raise ValueError(f"task {doc['task_id']} has {len(doc['test_list'])} tests, not 3")
    return doc


def fewshot_doc(doc: dict) -> dict:
    """A prompt example in the layout of the built-in's examples (``is_fewshot`` set)."""
    return {"task_id": doc["task_id"], "text": doc["text"], "code": doc["code"],
            "test_list": doc["test_list"], "is_fewshot": True}


def convert(data_dir: Path) -> Converted:
    """The 500 test problems in file order, and the three prompt examples."""
    path = data_file(data_dir, "mbpp/mbpp.jsonl")
    docs = {doc["task_id"]: doc for doc in convert_records(path, read_jsonl(path), mbpp_doc)}
    missing = [i for i in (*FEWSHOT_IDS, *TEST_IDS) if i not in docs]
    if missing:
        raise DataError(f"{path} lacks MBPP task ids {missing[:5]}", hint=DATA_HINT)
    eval_docs = [doc for task_id, doc in docs.items() if task_id in TEST_IDS]
    return Converted(eval_docs, [fewshot_doc(docs[i]) for i in FEWSHOT_IDS])


MBPP = Benchmark(
    name="mbpp", lm_eval_task="mbpp", lm_eval_yaml="mbpp/mbpp.yaml", kind="expert",
    metric="pass@1", num_fewshot=3, convert=convert, chance_of=fixed_chance(0.0),
    inline_fewshot=True,
    generation=Generation(max_gen_toks=256, filter=FILTER_NAME, inline=True,
                          overrides=task_overrides("mbpp_outcomes", [1])),
)
