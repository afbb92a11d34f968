"""Which benchmarks a model gets: the core suite plus the expert benchmarks of its domains.

Every model runs the core suite. Expert benchmarks follow the model's expert domains
(``build.experts`` in the build config; ``general``, the default, means every domain):

===========  ==================================  ===========================================
domain       benchmarks                          what they probe
===========  ==================================  ===========================================
math         MATH                                competition mathematics, exact answers
code         MBPP                                short Python programs, run in the sandbox
language     LAMBADA, StoryCloze                 long-range word prediction, story endings
science      ARC-Easy                            grade-school science questions
commonsense  PIQA                                physical commonsense
reading      BoolQ                               yes/no questions on a passage
agents       ALFWorld, BabyAI, WebShop           interactive tasks in an environment
===========  ==================================  ===========================================

A build's *primary* expert benchmark (the one the critical-drop rule watches) is the first expert
benchmark in its ``build.tasks``. A benchmark edgebuild cannot run is reported as unavailable with the
reason: StoryCloze's data is distributed only on request, the agent benchmarks are interactive
environments rather than scored data sets, any benchmark whose files are missing from the
data dir says which file it wanted, and the code benchmarks (HumanEval, MBPP) say why generated
code cannot run isolated here unless the user passed ``--allow-unsandboxed-code``
(``edgebuild.bench.sandbox``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgebuild.core.errors import ConfigError, DataError

CORE = ("mmlu", "gsm8k", "humaneval", "humaneval_pass10", "hellaswag", "arc_challenge",
        "truthfulqa_mc1", "truthfulqa_mc2", "winogrande")

EXPERT_DOMAINS = {
    "math": ("math",),
    "code": ("mbpp",),
    "language": ("lambada_openai", "storycloze"),
    "science": ("arc_easy",),
    "commonsense": ("piqa",),
    "reading": ("boolq",),
    "agents": ("alfworld", "babyai", "webshop"),
}
GENERAL = "general"

_ENVIRONMENT = ("an interactive environment, not a scored data set: edgebuild has no environment "
                "runner for it")
NOT_RUNNABLE = {
    "storycloze": ("the ROCStories/StoryCloze data is distributed only through a request form and "
                   "is not in the data dir; edgebuild has no task for it"),
    "alfworld": _ENVIRONMENT,
    "babyai": _ENVIRONMENT,
    "webshop": _ENVIRONMENT,
}


@dataclass
class Suite:
    """Benchmarks to run, in order, and ``{benchmark: reason}`` for those that cannot run."""

    tasks: list[str]
    unavailable: dict[str, str] = field(default_factory=dict)
    experts: list[str] = field(default_factory=list)


def check_domains(domains: list[str]) -> list[str]:
    """``domains`` with ``general`` expanded; ``ConfigError`` naming an unknown domain."""
    if not domains:
        raise ConfigError("build.experts is empty; name at least one expert domain, or 'general' "
                          f"(domains: {', '.join(EXPERT_DOMAINS)})")
    out: list[str] = []
    for domain in domains:
        if domain == GENERAL:
            out += [d for d in EXPERT_DOMAINS if d not in out]
        elif domain in EXPERT_DOMAINS:
            out += [] if domain in out else [domain]
        else:
            raise ConfigError(f"unknown expert domain {domain!r} in build.experts; known: "
                              f"{GENERAL}, {', '.join(EXPERT_DOMAINS)}")
    return out


def expert_benchmarks(domains: list[str]) -> list[str]:
    """Expert benchmarks of ``domains``, in domain order (runnable or not)."""
    names: list[str] = []
    for domain in check_domains(domains):
        names += [n for n in EXPERT_DOMAINS[domain] if n not in names]
    return names


def plan(domains: list[str], data_dir, every: bool = False,
         allow_unsandboxed: bool | None = None) -> Suite:
    """The core suite and the experts of ``domains`` (``every``: all registered benchmarks and
    every domain's experts), split into runnable tasks and unavailable ones.
    ``allow_unsandboxed``: see ``unavailable_reason``."""
    from edgebuild.bench import benchmarks

    experts = expert_benchmarks([GENERAL] if every else domains)
    names = list(CORE) + [n for n in experts if n not in CORE]
    if every:
        names += [n for n in benchmarks.names() if n not in names]
    suite = Suite([], experts=experts)
    for name in names:
        reason = unavailable_reason(name, data_dir, allow_unsandboxed)
        if reason is None:
            suite.tasks.append(name)
        else:
            suite.unavailable[name] = reason
    return suite


def unavailable_reason(name: str, data_dir, allow_unsandboxed: bool | None = None) -> str | None:
    """Why benchmark ``name`` cannot run with ``data_dir`` (None: it can). A code benchmark
    also needs a code sandbox, or ``allow_unsandboxed`` (None: the process's setting, see
    ``edgebuild.bench.sandbox.allow_unsandboxed``)."""
    from edgebuild.bench import benchmarks
    from edgebuild.bench import sandbox
    from edgebuild.bench.codeexec import runs_code

    if name in NOT_RUNNABLE:
        return NOT_RUNNABLE[name]
    benchmark = benchmarks.get(name)
    if runs_code(benchmark):
        reason = sandbox.unavailable_reason(allow_unsandboxed)
        if reason:
            return reason
    try:
        benchmark.convert(Path(data_dir))
    except DataError as exc:
        return f"no usable data: {exc}"
    return None
