"""TruthfulQA multiple choice (MC1, MC2), 817 questions, from ``truthfulqa/v0/mc_task.json``.

The ``v0`` file is the paper version, the one the Hugging Face ``truthful_qa`` multiple-choice
split (used by the built-in tasks) was made from; the top-level ``mc_task.json`` is a later
revision that changes about 200 items. Each item maps answer text to a 0/1 label; the built-in
tasks expect ``{"question", "mc1_targets": {"choices", "labels"}, "mc2_targets": {...}}`` with
the single true MC1 answer first (``doc_to_target: 0``), which the release already does.
Metric: ``acc``; MC2's per-item value is the normalised probability of the true answers, and its
chance level the share of true answers. Both draw the same questions (``SAMPLE``): every MC1 answer
is also an MC2 answer, so scored together they cost about what MC2 costs alone.
"""
from __future__ import annotations

from pathlib import Path

from edgebuild.bench.base import Benchmark, Converted, uniform_chance
from edgebuild.bench.data import convert_records, data_file, read_json

SOURCE = "truthfulqa/v0/mc_task.json"
SAMPLE = "truthfulqa"


def _targets(answers: dict) -> dict:
    if not answers or set(answers.values()) - {0, 1}:
        raise ValueError("answer labels must be 0 or 1")
    return {"choices": list(answers), "labels": list(answers.values())}


def truthfulqa_doc(raw: dict) -> dict:
    """One item in the ``truthful_qa`` multiple-choice layout."""
    mc1 = _targets(raw["mc1_targets"])
    if mc1["labels"][0] != 1 or sum(mc1["labels"]) != 1:
        raise ValueError("MC1 must have exactly one true answer, listed first")
    mc2 = _targets(raw["mc2_targets"])
    if 1 not in mc2["labels"]:
        raise ValueError("MC2 has no true answer")
    return {"question": raw["question"], "mc1_targets": mc1, "mc2_targets": mc2}


def convert(data_dir: Path) -> Converted:
    """Read ``truthfulqa/v0/mc_task.json``."""
    path = data_file(data_dir, SOURCE)
    return Converted(convert_records(path, read_json(path), truthfulqa_doc))


def mc2_chance(doc: dict) -> float:
    """Uniform guessing puts this share of the probability mass on true answers."""
    labels = doc["mc2_targets"]["labels"]
    return sum(labels) / len(labels)


TRUTHFULQA_MC1 = Benchmark(
    name="truthfulqa_mc1", lm_eval_task="truthfulqa_mc1",
    lm_eval_yaml="truthfulqa/truthfulqa_mc1.yaml", kind="core", metric="acc", num_fewshot=0,
    convert=convert, chance_of=uniform_chance("mc1_targets.choices"), sample_key=SAMPLE,
)

TRUTHFULQA_MC2 = Benchmark(
    name="truthfulqa_mc2", lm_eval_task="truthfulqa_mc2",
    lm_eval_yaml="truthfulqa/truthfulqa_mc2.yaml", kind="core", metric="acc", num_fewshot=0,
    convert=convert, chance_of=mc2_chance, sample_key=SAMPLE,
)
