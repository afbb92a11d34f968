"""Scoring generated code for lm-eval's HumanEval and MBPP tasks, in the sandbox.

lm-eval's built-in helpers score with Hugging Face ``evaluate``'s ``code_eval``, which runs the
code inside the evaluating process's own workers (and is loaded and exercised as soon as the
helper module is imported). edgebuild's generated task YAMLs replace them (``task_overrides``)
with:

- a filter, ``humaneval_outcomes`` / ``mbpp_outcomes``, that builds every sample's complete
  program the way the reference harness does and runs all programs of the task in
  ``edgebuild.bench.sandbox``, a few at a time; each response becomes its ``SandboxResult``
  as a dict;
- a metric, ``pass_at_k``, that turns one item's outcomes into unbiased pass@k estimates.

Programs: HumanEval ``prompt + completion``, the item's ``test`` and ``check(entry_point)``;
MBPP the completion, the item's ``test_setup_code`` (empty for all but one test item; lm-eval
leaves it out, the MBPP release includes it) and its three ``test_list`` asserts.
"""
from __future__ import annotations

import logging
import math
from collections import Counter

from edgebuild.bench.base import FunctionRef
from edgebuild.bench.sandbox import Limits, run_programs, unavailable_reason
from edgebuild.core.errors import ConfigError

log = logging.getLogger(__name__)

FILTER_NAME = "sandbox"
# The reference harness allows 3 s per program on a dedicated machine; edgebuild's host is
# often a small shared CPU, so a correct but slow program gets more.
LIMITS = Limits(timeout_s=10.0)


def pass_at_k_estimate(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` pass: ``1 - C(n-c, k) / C(n, k)``.

    This is the estimator of Chen et al. (2021); it needs ``n >= k``.
    """
    if not 0 <= c <= n:
        raise ValueError(f"{c} passing samples out of {n} is impossible")
    if k < 1 or n < k:
        raise ValueError(f"pass@{k} needs at least {k} samples per item, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def humaneval_program(doc: dict, completion: str) -> str:
    """The program run for one HumanEval completion."""
    return f"{doc['prompt']}{completion}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"


def mbpp_program(doc: dict, completion: str) -> str:
    """The program run for one MBPP completion."""
    tests = "\n".join(doc["test_list"])
    setup = doc.get("test_setup_code") or ""
    return f"{completion}\n\n{setup}\n{tests}\n"


def run_outcomes(programs: list[list[str]]) -> list[list[dict]]:
    """Run every program (grouped per item) in the sandbox; the same grouping of result dicts.

    No usable sandbox (no isolating backend and no ``--allow-unsandboxed-code``), or a program
    the sandbox could not start at all, raises ``ConfigError``: scoring it as a failure would
    silently report 0 for every model.
    """
    reason = unavailable_reason()
    if reason:
        raise ConfigError(reason)
    flat = [program for item in programs for program in item]
    results = run_programs(flat, LIMITS)
    broken = [result for result in results if result.status == "error"]
    if broken:
        raise ConfigError(f"the code sandbox could not run {len(broken)} of {len(results)} "
                          f"programs: {broken[0].stderr.strip()[-300:]}",
                          hint="see edgebuild.bench.sandbox for what the sandbox needs")
    log.info("ran %d programs in the sandbox: %s", len(results),
             dict(Counter(result.status for result in results)))
    outcomes = iter(result.to_dict() for result in results)
    return [[next(outcomes) for _ in item] for item in programs]


def humaneval_outcomes(resps: list[list[str]], docs: list[dict]) -> list[list[dict]]:
    """lm-eval filter: each item's completions -> their sandbox outcomes."""
    return run_outcomes([[humaneval_program(doc, r) for r in resp]
                         for resp, doc in zip(resps, docs)])


def mbpp_outcomes(resps: list[list[str]], docs: list[dict]) -> list[list[dict]]:
    """lm-eval filter: each item's completions -> their sandbox outcomes."""
    return run_outcomes([[mbpp_program(doc, r) for r in resp] for resp, doc in zip(resps, docs)])


def pass_at_k(references: list, predictions: list[list[dict]], k=(1,)) -> dict[str, float]:
    """lm-eval metric: ``{"pass@k": estimate}`` for one item from its sandbox outcomes.

    ``predictions[0]`` is the item's list of outcomes (the filter's output); the references
    (the tests) are already part of each program.
    """
    outcomes = predictions[0]
    passed = sum(bool(outcome["passed"]) for outcome in outcomes)
    ks = [k] if isinstance(k, int) else list(k)
    return {f"pass@{kk}": pass_at_k_estimate(len(outcomes), passed, kk) for kk in ks}


def runs_code(benchmark) -> bool:
    """Whether ``benchmark`` (a ``Benchmark``) runs generated programs in the sandbox."""
    return benchmark.generation is not None and benchmark.generation.filter == FILTER_NAME


def task_overrides(filter_fn: str, ks: list[int]) -> dict:
    """YAML keys that make a built-in code task score through the sandbox."""
    metric = {"metric": FunctionRef(f"{__name__}.pass_at_k"), "aggregation": "mean",
              "higher_is_better": True, "k": list(ks)}
    pipeline = {"function": "custom", "filter_fn": FunctionRef(f"{__name__}.{filter_fn}")}
    return {"metric_list": [metric], "filter_list": [{"name": FILTER_NAME, "filter": [pipeline]}]}


def summarize(outcomes: list[list[dict]]) -> dict:
    """Counts of sandbox statuses over items' outcomes, whether all ran isolated, and in what."""
    flat = [outcome for item in outcomes for outcome in item]
    return {"programs": len(flat),
            "statuses": dict(sorted(Counter(outcome["status"] for outcome in flat).items())),
            "network_isolated": bool(flat) and all(o["network_isolated"] for o in flat),
            "backends": sorted({outcome.get("note", "") for outcome in flat}),
            "seconds": round(sum(outcome["seconds"] for outcome in flat), 3)}
