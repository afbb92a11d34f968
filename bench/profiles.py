"""Benchmark profiles: how many items of each task to evaluate, and which ones.

Items are never the first N of a file (files are often sorted by source or difficulty): they are a
seeded random sample, the same for every stage of a build so that results pair item by item.
For a stratified benchmark (MMLU subjects) the sample is spread evenly over the strata.

=========  ================================================================================
profile    items per task
=========  ================================================================================
smoke      8 (MMLU: 8 subjects, one item each); generation tasks 2
quick      50 (MMLU: 114, i.e. 2 in each of the 57 subjects); generation tasks: GSM8K 10,
           HumanEval 5, HumanEval pass@10 2 (x 10 samples), MBPP 5, MATH 5
reduced    200 (MMLU: 570, i.e. 10 in each of the 57 subjects); generation tasks: GSM8K 50,
           HumanEval 20, HumanEval pass@10 10 (x 10 samples), MBPP 30, MATH 30 (from MATH-500)
full       all
=========  ================================================================================

Generation is costly on a CPU: the 135M default model decodes about 15 tokens/s one sequence
at a time on 2 cores, every step reading all of its weights, so generation samples stay small and
the generation tasks of a run decode together in one batch of up to 64 rows
(``edgebuild.bench.decode.generate_groups``); the ``full`` profile runs everything. Few-shot
prompts cost little beyond their first item: their shared examples are computed once per task
(``edgebuild.bench.prefix_scoring``).

The whole ``reduced`` suite (every core and expert benchmark, eudaimonia included) takes 7.5 to 10
minutes on 2 CPU cores for the default model, depending on the machine: about 7 min 20 s where a
2048-row float32 matrix product runs at 227 GFLOP/s, 9 to 10 minutes where it runs at 180-190.
About 1.5 minutes of it are generation. Its log-likelihood half computes about 220,000 tokens
without padding (about 46 TFLOP in float32 linear layers: 3.4 minutes at 227 GFLOP/s), plus the
attention of every token to its few-shot prefix. Each generation step multiplies at most 64 rows
by all the weights, where the matrix products run at about half that rate, and reads every row's
keys and values. On 2 cores it cannot take much less than that in float32.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from edgebuild.core.errors import ConfigError


@dataclass(frozen=True)
class Profile:
    """``size`` items per task (None: all), with per-task exceptions in ``sizes``."""

    name: str
    size: int | None
    sizes: dict = field(default_factory=dict)

    def size_for(self, task: str) -> int | None:
        return self.sizes.get(task, self.size)


GENERATION_SMOKE = {"gsm8k": 2, "humaneval": 2, "humaneval_pass10": 2, "mbpp": 2, "math": 2}
GENERATION_QUICK = {"gsm8k": 10, "humaneval": 5, "humaneval_pass10": 2, "mbpp": 5, "math": 5}
GENERATION_REDUCED = {"gsm8k": 50, "humaneval": 20, "humaneval_pass10": 10, "mbpp": 30,
                      "math": 30}

PROFILES = {
    "smoke": Profile("smoke", 8, GENERATION_SMOKE),
    "quick": Profile("quick", 50, {"mmlu": 114, **GENERATION_QUICK}),
    "reduced": Profile("reduced", 200, {"mmlu": 570, **GENERATION_REDUCED}),
    "full": Profile("full", None),
}


def get_profile(name: str) -> Profile:
    """The profile called ``name``; ``ConfigError`` listing the known ones otherwise."""
    if name not in PROFILES:
        raise ConfigError(f"unknown benchmark profile {name!r} (known: {', '.join(PROFILES)})")
    return PROFILES[name]


def task_rng(task: str, seed: int) -> np.random.Generator:
    """A generator seeded by ``seed`` and the task name, so tasks draw independent samples."""
    return np.random.default_rng([seed, zlib.crc32(task.encode("utf-8"))])


def allocate(sizes: list[int], n: int, rng: np.random.Generator) -> list[int]:
    """Spread ``n`` items as evenly as possible over strata of ``sizes`` (capped by each size).

    Strata are filled round-robin in a seeded order, so when ``n`` is not a multiple of the number
    of strata, which strata get one more is random but fixed by the seed.
    """
    counts = [0] * len(sizes)
    order = rng.permutation(len(sizes))
    remaining = min(n, sum(sizes))
    while remaining:
        for s in order:
            if remaining and counts[s] < sizes[s]:
                counts[s] += 1
                remaining -= 1
    return counts


def sample_indices(task: str, num_items: int, size: int | None, seed: int = 0,
                   strata: list[str] | None = None) -> list[int]:
    """Sorted indices of the items of ``task`` to evaluate.

    ``size`` None (or at least ``num_items``) selects all items. Otherwise a seeded permutation
    picks ``size`` of them; with ``strata`` (one label per item) the sample is spread evenly over
    the strata, each drawn by its own permutation.
    """
    if size is None or size >= num_items:
        return list(range(num_items))
    if size <= 0:
        raise ConfigError(f"sample size for {task!r} must be positive, got {size}")
    rng = task_rng(task, seed)
    if strata is None:
        return sorted(int(i) for i in rng.permutation(num_items)[:size])
    if len(strata) != num_items:
        raise ValueError(f"{len(strata)} strata labels for {num_items} items")
    groups: dict[str, list[int]] = {}
    for index, label in enumerate(strata):
        groups.setdefault(label, []).append(index)
    labels = sorted(groups)
    counts = allocate([len(groups[label]) for label in labels], size, rng)
    picked = []
    for label, count in zip(labels, counts):
        members = groups[label]
        picked += [members[int(i)] for i in rng.permutation(len(members))[:count]]
    return sorted(picked)
