"""Benchmarks (registry ``benchmarks``) through lm-eval from a local data dir; quality metrics.

Each entry is a ``Benchmark`` (``edgebuild.bench.base``): an lm-eval built-in task, the converter
that feeds it from the data dir, its kind (``core`` or ``expert``), metric, chance level and
few-shot count. Entries load lazily, so importing this package imports neither torch nor lm-eval.

Metric choice: ``acc_norm`` for ARC, HellaSwag and PIQA (length-normalised log-likelihood, the
figure usually reported for them), ``acc`` for the others (WinoGrande's partial scoring, BoolQ,
LAMBADA, MMLU, TruthfulQA MC1/MC2 report ``acc`` only).

Generation benchmarks: ``gsm8k`` (8-shot chain of thought, ``exact_match`` of the stated
number), ``humaneval`` (greedy ``pass@1``), ``humaneval_pass10`` (``pass@10``, unbiased
estimator over 10 seeded samples per item), ``mbpp`` (3-shot ``pass@1``) and ``math`` (MATH,
0-shot ``exact_match``). Generated code runs only in ``edgebuild.bench.sandbox``.
"""
from __future__ import annotations

from edgebuild.core.errors import ConfigError
from edgebuild.core.registry import Registry

benchmarks = Registry("benchmark", error=ConfigError)
benchmarks.register_lazy("arc_easy", "edgebuild.bench.tasks.arc:ARC_EASY")
benchmarks.register_lazy("piqa", "edgebuild.bench.tasks.piqa:PIQA")
benchmarks.register_lazy("arc_challenge", "edgebuild.bench.tasks.arc:ARC_CHALLENGE")
benchmarks.register_lazy("hellaswag", "edgebuild.bench.tasks.hellaswag:HELLASWAG")
benchmarks.register_lazy("winogrande", "edgebuild.bench.tasks.winogrande:WINOGRANDE")
benchmarks.register_lazy("boolq", "edgebuild.bench.tasks.boolq:BOOLQ")
benchmarks.register_lazy("lambada_openai", "edgebuild.bench.tasks.lambada:LAMBADA_OPENAI")
benchmarks.register_lazy("mmlu", "edgebuild.bench.tasks.mmlu:MMLU")
benchmarks.register_lazy("truthfulqa_mc1", "edgebuild.bench.tasks.truthfulqa:TRUTHFULQA_MC1")
benchmarks.register_lazy("truthfulqa_mc2", "edgebuild.bench.tasks.truthfulqa:TRUTHFULQA_MC2")
benchmarks.register_lazy("gsm8k", "edgebuild.bench.tasks.gsm8k:GSM8K")
benchmarks.register_lazy("humaneval", "edgebuild.bench.tasks.humaneval:HUMANEVAL")
benchmarks.register_lazy("humaneval_pass10", "edgebuild.bench.tasks.humaneval:HUMANEVAL_PASS10")
benchmarks.register_lazy("mbpp", "edgebuild.bench.tasks.mbpp:MBPP")
benchmarks.register_lazy("math", "edgebuild.bench.tasks.hendrycks_math:MATH")

__all__ = ["benchmarks"]
