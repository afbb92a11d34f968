"""What a benchmark is: one lm-eval built-in task, fed from local data files.

A ``Benchmark`` names the built-in lm-eval YAML it builds on and a ``convert`` function that
reads the data-dir files and returns documents in the field layout that built-in task expects
(the layout of its Hugging Face dataset). ``edgebuild.bench.data`` writes those documents as
JSONL into a cache folder and generates a YAML that ``include:``s the built-in one.

Generation benchmarks (``output_type: generate_until``: GSM8K, HumanEval, MBPP, MATH) also carry
a ``Generation``: how long an answer may get, how many samples per item, which lm-eval filter's
score counts, and the YAML keys that replace the built-in's (e.g. the code-execution metric).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgebuild.core.errors import DataError

KINDS = ("core", "expert")
LOGLIKELIHOOD_METRICS = ("acc", "acc_norm")
GENERATION_METRICS = ("exact_match", "pass@1", "pass@10")
METRICS = LOGLIKELIHOOD_METRICS + GENERATION_METRICS


@dataclass(frozen=True)
class FunctionRef:
    """A ``!function`` value of an lm-eval YAML: ``module.attr``, imported by lm-eval.

    ``base`` is the folder of the YAML it came from (lm-eval resolves a relative module such as
    ``utils`` next to that YAML); None for an importable module path such as
    ``edgebuild.bench.codeexec.pass_at_k``.
    """

    spec: str
    base: str | None = None


@dataclass(frozen=True)
class Generation:
    """How a ``generate_until`` benchmark generates and what it scores.

    ``max_gen_toks`` bounds the new tokens of one answer (``run_host`` can override it);
    ``repeats`` is the number of samples per item (n of the pass@k estimator); ``filter`` names
    the lm-eval filter pipeline whose per-item score is the result (``none`` when the task has
    no filters). ``overrides`` are YAML keys that replace the built-in's. ``inline`` copies the
    built-in YAML into the generated one instead of ``include:``-ing it: needed when the
    built-in names a helper module that must not be imported (lm-eval's HumanEval/MBPP helpers
    load and run Hugging Face's in-process ``code_eval`` at import); every ``!function`` of the
    built-in must then be replaced in ``overrides``.
    """

    max_gen_toks: int
    repeats: int = 1
    filter: str = "none"
    overrides: dict = field(default_factory=dict)
    inline: bool = False

    def __post_init__(self):
        if self.max_gen_toks < 1 or self.repeats < 1:
            raise ValueError(f"max_gen_toks ({self.max_gen_toks}) and repeats ({self.repeats}) "
                             "must be positive")


@dataclass(frozen=True)
class Converted:
    """Documents of one benchmark, in the built-in task's field layout.

    ``eval_docs`` keep the data file's order: a document's position is its ``doc_id`` everywhere
    (sample indices, per-item results). ``fewshot_docs`` is the split few-shot examples come from
    (empty for zero-shot tasks). ``sample_pool`` (None: all) lists the doc ids that sampled
    profiles draw from; the ``full`` profile always evaluates every document (MATH: sampled
    profiles draw from the MATH-500 subset, ``full`` runs the whole test set).
    """

    eval_docs: list[dict]
    fewshot_docs: list[dict] = field(default_factory=list)
    sample_pool: list[int] | None = None


@dataclass(frozen=True)
class Benchmark:
    """One edgebuild benchmark.

    ``lm_eval_yaml`` is the built-in YAML's path relative to ``lm_eval/tasks``; for a benchmark
    split by ``strata_key`` (MMLU: one lm-eval task per subject) it holds ``{stratum}``, and the
    score is the mean over strata of each stratum's mean. ``chance_of(doc)`` is the expected
    score of a uniform guess on that document; a result's chance level is its mean over the
    evaluated documents (aggregated like the score); 0 for generation tasks. ``generation`` is
    set exactly for the metrics in ``GENERATION_METRICS``. ``inline_fewshot`` writes the few-shot
    documents into the YAML's ``fewshot_config.samples`` (as some built-ins list theirs) instead
    of a ``dev`` split: needed when their fields differ from the evaluated documents' (MBPP's
    examples carry ``is_fewshot``), which one JSON dataset cannot hold. Benchmarks with the same
    ``sample_key`` (default: their name) draw the same items: TruthfulQA MC1 and MC2 ask the same
    questions, so their results pair item by item and a host run scores them together
    (``edgebuild.bench.step.units``), each shared answer once.
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
    generation: Generation | None = None
    inline_fewshot: bool = False
    sample_key: str | None = None

    @property
    def sample_name(self) -> str:
        """The name whose seeded draw picks this benchmark's items."""
        return self.sample_key or self.name

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"benchmark {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if self.metric not in METRICS:
            raise ValueError(f"benchmark {self.name!r}: metric {self.metric!r} "
                             f"is not one of {METRICS}")
        if (self.generation is not None) != (self.metric in GENERATION_METRICS):
            raise ValueError(f"benchmark {self.name!r}: a generation block goes with exactly "
                             f"the metrics {GENERATION_METRICS}")
        k = int(self.metric[len("pass@"):]) if self.metric.startswith("pass@") else 1
        if self.generation is not None and self.generation.repeats < k:
            raise ValueError(f"benchmark {self.name!r}: {self.metric} needs at least {k} "
                             f"samples per item, got repeats={self.generation.repeats}")

    def strata(self, docs: list[dict]) -> list[str] | None:
        """The stratum of each document, or None for an unstratified benchmark."""
        if self.strata_key is None:
            return None
        return [doc[self.strata_key] for doc in docs]


def hold_out(docs: list[dict], count: int, name: str) -> Converted:
    """Documents of a benchmark that ships one split only: ``count`` of them, a fixed draw seeded
    by ``name``, become the few-shot pool and leave the evaluated set (which keeps file order)."""
    if count >= len(docs):
        raise DataError(f"{name}: the data file holds {len(docs)} items, too few to hold out "
                        f"{count} few-shot examples and evaluate the rest",
                        hint="point --data-dir at the complete data set described in its SOURCES.md")
    rng = np.random.default_rng(zlib.crc32(f"{name}/fewshot".encode("utf-8")))
    held = sorted(int(i) for i in rng.permutation(len(docs))[:count])
    chosen = set(held)
    return Converted([d for i, d in enumerate(docs) if i not in chosen], [docs[i] for i in held])


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
