"""BoolQ (SuperGLUE distribution), validation split.

This copy of SuperGLUE's ``val.jsonl`` stores ``label`` as the string "true"/"false" (a JSON
boolean is accepted too); the built-in ``boolq`` task (Hugging
Face ``super_glue/boolq``) expects 0 (no) / 1 (yes). Metric: ``acc``; chance 0.5 (two choices;
the majority class "yes" alone would score about 0.62).
"""
from __future__ import annotations

from pathlib import Path

from edgebuild.bench.base import Benchmark, Converted, fixed_chance
from edgebuild.bench.data import convert_records, data_file, read_jsonl

LABELS = {"false": 0, "true": 1}


def boolq_doc(raw: dict) -> dict:
    """One SuperGLUE record in the ``super_glue/boolq`` layout."""
    label = LABELS.get(str(raw["label"]).lower())
    if label is None:
        raise ValueError(f"label {raw['label']!r} is not true/false")
    return {"question": raw["question"], "passage": raw["passage"], "idx": raw["idx"],
            "label": label}


def convert(data_dir: Path) -> Converted:
    """Read ``boolq/val.jsonl``."""
    path = data_file(data_dir, "boolq/val.jsonl")
    return Converted(convert_records(path, read_jsonl(path), boolq_doc))


BOOLQ = Benchmark(
    name="boolq", lm_eval_task="boolq", lm_eval_yaml="super_glue/boolq/default.yaml",
    kind="expert", metric="acc", num_fewshot=0, convert=convert, chance_of=fixed_chance(0.5),
)
