"""PIQA (Physical Interaction QA), validation split: ``dev.jsonl`` plus ``dev-labels.txt``.

The built-in ``piqa`` task expects ``{"goal", "sol1", "sol2", "label"}`` with ``label`` 0 or 1;
the release keeps the labels in a separate file, one per line, aligned with ``dev.jsonl``.
Metric: ``acc_norm``, as commonly reported for PIQA.
"""
from __future__ import annotations

from pathlib import Path

from edgebuild.bench.base import Benchmark, Converted, fixed_chance
from edgebuild.bench.data import DATA_HINT, convert_records, data_file, read_jsonl, read_lines
from edgebuild.core.errors import DataError


def piqa_doc(pair: tuple) -> dict:
    """One ``(record, label line)`` pair in the built-in task's layout."""
    raw, label = pair
    if label.strip() not in ("0", "1"):
        raise ValueError(f"label {label!r} is not 0 or 1")
    return {"goal": raw["goal"], "sol1": raw["sol1"], "sol2": raw["sol2"], "label": int(label)}


def convert(data_dir: Path) -> Converted:
    """Join ``piqa/dev.jsonl`` with ``piqa/dev-labels.txt``."""
    path = data_file(data_dir, "piqa/dev.jsonl")
    labels_path = data_file(data_dir, "piqa/dev-labels.txt")
    records, labels = read_jsonl(path), [line for line in read_lines(labels_path) if line.strip()]
    if len(records) != len(labels):
        raise DataError(f"{labels_path} has {len(labels)} labels but {path} has {len(records)} "
                        f"records", hint=DATA_HINT)
    return Converted(convert_records(path, zip(records, labels), piqa_doc))


PIQA = Benchmark(
    name="piqa", lm_eval_task="piqa", lm_eval_yaml="piqa/piqa.yaml", kind="expert",
    metric="acc_norm", num_fewshot=0, convert=convert, chance_of=fixed_chance(0.5),
)
