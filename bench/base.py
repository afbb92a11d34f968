"""What a benchmark is: one lm-eval built-in task, fed from local data files.

A ``Benchmark`` names the built-in lm-eval YAML it builds on and a ``convert`` function that
reads the data-dir files and returns documents in the field layout that built-in task expects
(the layout of its Hugging Face dataset). ``edgebuild.bench.data`` writes those documents as
JSONL into a cache folder and generates a YAML that ``include:``s the built-in one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

KINDS = ("core", "expert")
METRICS = ("acc", "acc_norm")


@dataclass(frozen=True)
class Converted:
    """Documents of one benchmark, in the built-in task's field layout.

    ``eval_docs`` keep the data file's order: a document's position is its ``doc_id`` everywhere
    (sample indices, per-item results). ``fewshot_docs`` is the split few-shot examples come from
    (empty for zero-shot tasks).
    """

    eval_docs: list[dict]
    fewshot_docs: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class Benchmark:
    """One edgebuild benchmark.

    ``lm_eval_yaml`` is the built-in YAML's path relative to ``lm_eval/tasks``; for a benchmark
    split by ``strata_key`` (MMLU: one lm-eval task per subject) it holds ``{stratum}``, and the
    score is the mean over strata of each stratum's mean. ``chance_of(doc)`` is the expected
    score of a uniform guess on that document; a result's chance level is its mean over the
    evaluated documents (aggregated like the score).
    """

    name: str
    lm_eval_task: str
    lm_eval_yaml: str
    kind: str
    metric: str
    num_fewshot: int
    convert: Callable[[Path], Converted]
    chance_of: Callable[[dict], float]
    strata_key: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"benchmark {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if self.metric not in METRICS:
            raise ValueError(f"benchmark {self.name!r}: metric {self.metric!r} "
                             f"is not one of {METRICS}")

    def strata(self, docs: list[dict]) -> list[str] | None:
        """The stratum of each document, or None for an unstratified benchmark."""
        if self.strata_key is None:
            return None
        return [doc[self.strata_key] for doc in docs]


def uniform_chance(choices_key: str) -> Callable[[dict], float]:
    """``chance_of`` for a document whose ``choices_key`` (a dotted path) lists its options."""
    keys = choices_key.split(".")

    def chance_of(doc: dict) -> float:
        value = doc
        for key in keys:
            value = value[key]
        return 1.0 / len(value)

    return chance_of


def fixed_chance(value: float) -> Callable[[dict], float]:
    """``chance_of`` for a benchmark whose documents all have the same chance level."""
    return lambda doc: value
