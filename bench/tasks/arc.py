"""ARC-Easy and ARC-Challenge (AI2 Reasoning Challenge), test split, from the AI2 JSONL release.

The release nests the question (``{"question": {"stem", "choices": [{"text", "label"}]}}``);
the built-in ``arc_easy`` task expects the Hugging Face ``allenai/ai2_arc`` layout
``{"id", "question", "choices": {"text": [...], "label": [...]}, "answerKey"}``.
Metric: ``acc_norm`` (length-normalised), as commonly reported for ARC. ARC-Challenge runs
25-shot (examples drawn from the train split), ARC-Easy 0-shot.
"""
from __future__ import annotations

from pathlib import Path

from edgebuild.bench.base import Benchmark, Converted, uniform_chance
from edgebuild.bench.data import convert_records, data_file, read_jsonl


def arc_doc(raw: dict) -> dict:
    """One AI2 release record in the ``allenai/ai2_arc`` layout."""
    question = raw["question"]
    labels = [choice["label"] for choice in question["choices"]]
    doc = {
        "id": raw["id"],
        "question": question["stem"],
        "choices": {"text": [choice["text"] for choice in question["choices"]], "label": labels},
        "answerKey": raw["answerKey"],
    }
    labels.index(doc["answerKey"])          # ValueError (-> DataError) when the key is not a label
    return doc


def _converter(subset: str, fewshot: bool):
    def convert(data_dir: Path) -> Converted:
        docs = _split(data_dir, subset, "Test")
        return Converted(docs, _split(data_dir, subset, "Train") if fewshot else [])
    return convert


def _split(data_dir: Path, subset: str, split: str) -> list[dict]:
    path = data_file(data_dir, f"arc/ARC-{subset}/ARC-{subset}-{split}.jsonl")
    return convert_records(path, read_jsonl(path), arc_doc)


ARC_EASY = Benchmark(
    name="arc_easy", lm_eval_task="arc_easy", lm_eval_yaml="arc/arc_easy.yaml", kind="expert",
    metric="acc_norm", num_fewshot=0, convert=_converter("Easy", fewshot=False),
    chance_of=uniform_chance("choices.text"),
)

ARC_CHALLENGE = Benchmark(
    name="arc_challenge", lm_eval_task="arc_challenge", lm_eval_yaml="arc/arc_challenge.yaml",
    kind="core", metric="acc_norm", num_fewshot=25, convert=_converter("Challenge", fewshot=True),
    chance_of=uniform_chance("choices.text"),
)
