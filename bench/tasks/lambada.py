"""LAMBADA (OpenAI's detokenized test set, 5153 passages): ``{"text"}`` per line.

The built-in ``lambada_openai`` task predicts the last space-separated word from the rest.
Metric: ``acc`` (the whole word is the greedy continuation). It is open-vocabulary, so the chance
level is 0.
"""
from __future__ import annotations

from pathlib import Path

from edgebuild.bench.base import Benchmark, Converted, fixed_chance
from edgebuild.bench.data import convert_records, data_file, read_jsonl


def lambada_doc(raw: dict) -> dict:
    """One passage; it must have a last word to predict."""
    text = raw["text"]
    if not isinstance(text, str) or " " not in text.strip():
        raise ValueError("text has no last word to predict")
    return {"text": text}


def convert(data_dir: Path) -> Converted:
    """Read ``lambada/lambada_test.jsonl``."""
    path = data_file(data_dir, "lambada/lambada_test.jsonl")
    return Converted(convert_records(path, read_jsonl(path), lambada_doc))


LAMBADA_OPENAI = Benchmark(
    name="lambada_openai", lm_eval_task="lambada_openai",
    lm_eval_yaml="lambada/lambada_openai.yaml",
    kind="expert", metric="acc", num_fewshot=0, convert=convert, chance_of=fixed_chance(0.0),
)
