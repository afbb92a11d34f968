"""MATH (Hendrycks et al., competition mathematics), 0-shot, exact match of the final answer.

``math/test/<subject>.jsonl`` hold the 5000 test problems ``{"id", "problem", "level", "type",
"solution"}`` (the Hugging Face ``EleutherAI/hendrycks_math`` layout plus the release path as
``id``), read in sorted subject order. lm-eval's ``hendrycks_math`` tasks (one per subject, all
with the same prompt) ask ``Problem: ... Answer:``, stop at the next ``Problem:`` and compare
the answer (between the first and last ``$`` when there are two) with the solution's
``\\boxed{}`` answer after normalising both. One task holds all subjects (built on
``hendrycks_math500.yaml``, which has that prompt); the score is the item mean, as lm-eval's
size-weighted group average.

Sampled profiles draw from the MATH-500 subset (``math/MATH-500/test.jsonl``, matched by
``unique_id``); the ``full`` profile runs all 5000.
"""
from __future__ import annotations

from pathlib import Path

from edgebuild.bench.base import Benchmark, Converted, Generation, fixed_chance
from edgebuild.bench.data import DATA_HINT, convert_records, data_file, read_jsonl
from edgebuild.core.errors import DataError

SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
            "number_theory", "prealgebra", "precalculus")
SUBSET = "math/MATH-500/test.jsonl"


def math_doc(raw: dict) -> dict:
    """One release record; its solution must hold a ``\\boxed`` (or ``\\fbox``) answer."""
    doc = {"id": raw["id"], "problem": raw["problem"], "level": raw["level"],
           "type": raw["type"], "solution": raw["solution"]}
    if "\\boxed" not in doc["solution"] and "\\fbox" not in doc["solution"]:
        raise ValueError(f"{doc['id']}: the solution has no \\boxed answer")
    return doc


def subset_ids(data_dir: Path) -> list[str]:
    """The ``unique_id`` of each MATH-500 problem."""
    path = data_file(data_dir, SUBSET)
    return convert_records(path, read_jsonl(path), lambda raw: raw["unique_id"])


def convert(data_dir: Path) -> Converted:
    """All test problems, and the doc ids of the MATH-500 subset as the sampling pool."""
    docs = []
    for subject in SUBJECTS:
        path = data_file(data_dir, f"math/test/{subject}.jsonl")
        docs += convert_records(path, read_jsonl(path), math_doc)
    position = {doc["id"]: doc_id for doc_id, doc in enumerate(docs)}
    wanted = subset_ids(data_dir)
    unknown = [unique_id for unique_id in wanted if unique_id not in position]
    if unknown:
        raise DataError(f"{SUBSET}: {len(unknown)} problems (e.g. {unknown[0]}) are not in "
                        "math/test", hint=DATA_HINT)
    return Converted(docs, sample_pool=sorted(position[unique_id] for unique_id in wanted))


MATH = Benchmark(
    name="math", lm_eval_task="hendrycks_math", lm_eval_yaml="hendrycks_math/hendrycks_math500.yaml",
    kind="expert", metric="exact_match", num_fewshot=0, convert=convert,
    chance_of=fixed_chance(0.0), generation=Generation(max_gen_toks=192),
)
