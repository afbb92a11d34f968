"""GSM8K (grade-school math), test split, 8-shot chain of thought, from the OpenAI release.

``gsm8k/test.jsonl`` holds ``{"question", "answer"}`` records, the answer ending in
``#### <number>``: the Hugging Face ``openai/gsm8k`` (``main``) layout that lm-eval's
``gsm8k_cot`` expects. That task prompts ``Q: ... A:`` after the eight chain-of-thought
exemplars of Wei et al. (2022), written into its YAML (no training data is read), stops at the
next ``Q:`` and scores ``exact_match`` against the number after ``####`` (commas, ``$`` and a
trailing period ignored). The score is that of its ``strict-match`` filter: the number the
model states as "The answer is N." in the exemplars' format; the ``flexible-extract`` figure
(last number in the answer) is kept in the result's details.
"""
from __future__ import annotations

from pathlib import Path

from edgebuild.bench.base import Benchmark, Converted, Generation, fixed_chance
from edgebuild.bench.data import convert_records, data_file, read_jsonl


def gsm8k_doc(raw: dict) -> dict:
    """One release record (``question``, ``answer`` ending in ``#### N``)."""
    doc = {"question": raw["question"], "answer": raw["answer"]}
    if "####" not in doc["answer"]:
        raise ValueError("the answer has no '#### <number>' line")
    return doc


def convert(data_dir: Path) -> Converted:
    """The 1319 test problems, in file order."""
    path = data_file(data_dir, "gsm8k/test.jsonl")
    return Converted(convert_records(path, read_jsonl(path), gsm8k_doc))


GSM8K = Benchmark(
    name="gsm8k", lm_eval_task="gsm8k_cot", lm_eval_yaml="gsm8k/gsm8k-cot.yaml", kind="core",
    metric="exact_match", num_fewshot=8, convert=convert, chance_of=fixed_chance(0.0),
    generation=Generation(max_gen_toks=256, filter="strict-match"),
)
