"""WinoGrande (v1.1, XL), dev split: ``{"qID", "sentence", "option1", "option2", "answer"}``.

That is already the Hugging Face ``allenai/winogrande`` layout the built-in task expects
(``answer`` is the string "1" or "2"; the sentence holds one ``_`` blank). Metric: ``acc``.
5-shot: the data dir holds only the dev split, so 5 items (a fixed seeded draw) are held out of
it as the examples; 1,262 items are evaluated.
"""
from __future__ import annotations

from pathlib import Path

from edgebuild.bench.base import Benchmark, Converted, fixed_chance, hold_out
from edgebuild.bench.data import convert_records, data_file, read_jsonl

FEWSHOT = 5


def winogrande_doc(raw: dict) -> dict:
    """One record, checked for the fields and values the built-in task relies on."""
    doc = {key: raw[key] for key in ("qID", "sentence", "option1", "option2", "answer")}
    if doc["answer"] not in ("1", "2"):
        raise ValueError(f"answer {doc['answer']!r} is not '1' or '2'")
    doc["sentence"].index("_")
    return doc


def convert(data_dir: Path) -> Converted:
    """Read ``winogrande/dev.jsonl``."""
    path = data_file(data_dir, "winogrande/dev.jsonl")
    return hold_out(convert_records(path, read_jsonl(path), winogrande_doc), FEWSHOT, "winogrande")


WINOGRANDE = Benchmark(
    name="winogrande", lm_eval_task="winogrande", lm_eval_yaml="winogrande/default.yaml",
    kind="core", metric="acc", num_fewshot=FEWSHOT, convert=convert, chance_of=fixed_chance(0.5),
)
