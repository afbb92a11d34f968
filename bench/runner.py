"""Host benchmarks: an in-memory torch model through lm-eval, on local data, per-item results.

``run_host`` converts each benchmark's data-dir files into a cache, writes lm-eval task YAMLs that
include the built-in tasks, picks the profile's fixed sample indices and runs every task in one
``lm_eval.simple_evaluate`` call. It keeps lm-eval's per-sample log to return, for each task,
which items were answered correctly: gates pair these against the baseline's.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from edgebuild.bench import benchmarks
from edgebuild.bench.base import Benchmark
from edgebuild.bench.data import lm_eval_tasks_dir, write_task
from edgebuild.bench.profiles import Profile, get_profile, sample_indices
from edgebuild.build.errors import ConfigError

log = logging.getLogger(__name__)

TASK_PREFIX = "edgebuild_"
OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


@dataclass
class TaskResult:
    """One benchmark's result on one model.

    ``items`` is ``[[doc_id, correct], ...]`` sorted by ``doc_id`` (the item's position in the
    converted data file); ``correct`` is 0.0/1.0 (TruthfulQA MC2: the probability mass on true
    answers). ``chance`` is the expected score of uniform guessing on the same items.
    """

    name: str
    kind: str
    metric: str
    score: float
    n: int
    chance: float
    items: list = field(default_factory=list)
    stderr: float | None = None

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (``from_dict`` reverses it)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TaskResult":
        """Rebuild a result from ``to_dict`` output (e.g. read back from a JSON cache)."""
        data = dict(data)
        data["items"] = [[int(doc_id), float(correct)] for doc_id, correct in data.get("items", [])]
        return cls(**data)


@dataclass
class TaskPart:
    """One generated lm-eval task: all documents of a benchmark, or of one stratum of it."""

    task_name: str
    doc_ids: list[int]       # benchmark-wide doc id of each document in the task's file
    selected: list[int]      # sorted positions, within the task's file, to evaluate


@dataclass
class PreparedTask:
    """A benchmark ready to run: its converted documents and its generated lm-eval tasks."""

    bench: Benchmark
    docs: list[dict]
    parts: list[TaskPart]


def run_host(model, tokenizer, tasks: list[str], profile: str, data_dir, cache_dir, *,
             seed: int = 0, batch_size: int = 16, max_batch_tokens: int = 4096,
             progress: Callable[[int, int], None] | None = None) -> dict[str, TaskResult]:
    """Evaluate ``model`` (an in-memory Hugging Face causal LM) on ``tasks``.

    ``profile`` ("smoke", "reduced", "full") and ``seed`` fix which items run; ``data_dir`` holds
    the benchmark files, ``cache_dir`` receives the converted JSONL (and the datasets cache).
    A batch holds at most ``batch_size`` requests and ``max_batch_tokens`` tokens (padded), which
    bounds memory on long few-shot prompts. ``progress(done, total)`` is called as loglikelihood
    requests complete. Returns ``{task name: TaskResult}`` in the order of ``tasks``.
    """
    chosen = get_profile(profile)
    if not tasks:
        raise ConfigError("no benchmark tasks given; name at least one of "
                          f"{', '.join(benchmarks.names())}")
    specs = [benchmarks.get(name) for name in dict.fromkeys(tasks)]
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _offline(), tempfile.TemporaryDirectory(dir=cache_dir, prefix="tasks-") as task_dir:
        prepared = [prepare(spec, data_dir, cache_dir, Path(task_dir), chosen, seed)
                    for spec in specs]
        output = _evaluate(model, tokenizer, prepared, Path(task_dir), batch_size,
                           max_batch_tokens, progress)
    return {p.bench.name: _task_result(p, output["samples"]) for p in prepared}


def prepare(bench: Benchmark, data_dir, cache_dir, task_dir: Path, profile: Profile,
            seed: int) -> PreparedTask:
    """Convert ``bench``'s data, pick its sample and write one lm-eval task per part."""
    converted = bench.convert(Path(data_dir))
    docs = converted.eval_docs
    strata = bench.strata(docs)
    indices = sample_indices(bench.name, len(docs), profile.size_for(bench.name), seed, strata)
    builtin = lm_eval_tasks_dir()
    parts = []
    for stratum, doc_ids in _groups(strata, len(docs)):
        selected = _positions(doc_ids, indices)
        if not selected:
            continue
        suffix = f"_{stratum}" if stratum is not None else ""
        part = TaskPart(f"{TASK_PREFIX}{bench.name}{suffix}", doc_ids, selected)
        fewshot = [d for d in converted.fewshot_docs
                   if stratum is None or d[bench.strata_key] == stratum]
        yaml_path = builtin / bench.lm_eval_yaml.format(stratum=stratum)
        write_task(task_dir, part.task_name, yaml_path, [docs[i] for i in doc_ids], fewshot,
                   bench.num_fewshot, cache_dir)
        parts.append(part)
    log.info("%s: %d of %d items in %d lm-eval task(s)", bench.name, len(indices), len(docs),
             len(parts))
    return PreparedTask(bench, docs, parts)


def _groups(strata: list[str] | None, count: int) -> list[tuple[str | None, list[int]]]:
    """``[(stratum, doc ids)]`` in sorted stratum order; one unnamed group when unstratified."""
    if strata is None:
        return [(None, list(range(count)))]
    groups: dict[str, list[int]] = {}
    for doc_id, stratum in enumerate(strata):
        groups.setdefault(stratum, []).append(doc_id)
    return sorted(groups.items())


def _positions(doc_ids: list[int], indices: list[int]) -> list[int]:
    """Sorted positions within ``doc_ids`` of the selected benchmark-wide ``indices``."""
    wanted = set(indices)
    return [position for position, doc_id in enumerate(doc_ids) if doc_id in wanted]


def _evaluate(model, tokenizer, prepared: list[PreparedTask], task_dir: Path, batch_size: int,
              max_batch_tokens: int, progress) -> dict:
    """One ``simple_evaluate`` call over every part of every prepared benchmark."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from edgebuild.bench.hflm import HostLM

    lm = HostLM(model, tokenizer, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                progress=progress)
    parts = [part for p in prepared for part in p.parts]
    # lm-eval maps the k-th evaluated document to samples[k], so the lists must be sorted; a task
    # evaluated in full is left out (lm-eval's membership test is linear in the list length).
    samples = {part.task_name: part.selected for part in parts
               if len(part.selected) < len(part.doc_ids)}
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    # No global seeding (loglikelihood scoring is deterministic; the caller's RNGs stay as they
    # are) and no bootstrap: standard errors are computed from the per-item results.
    return simple_evaluate(model=lm, tasks=[part.task_name for part in parts],
                           samples=samples or None, log_samples=True, task_manager=manager,
                           bootstrap_iters=0, random_seed=None, numpy_random_seed=None,
                           torch_random_seed=None)


def _part_items(part: TaskPart, logged: list[dict], docs: list[dict], metric: str) -> list[list]:
    """``[[doc_id, correct]]`` of one part, checked against the documents asked for."""
    rows = sorted(logged, key=lambda sample: sample["doc_id"])
    positions = [sample["doc_id"] for sample in rows]
    if positions != part.selected:
        raise RuntimeError(f"lm-eval evaluated items {positions[:5]}... of {part.task_name}, "
                           f"not the {len(part.selected)} selected ones")
    items = []
    for sample in rows:
        doc_id = part.doc_ids[sample["doc_id"]]
        expected = docs[doc_id]
        if {key: sample["doc"].get(key) for key in expected} != expected:
            raise RuntimeError(f"lm-eval's document {sample['doc_id']} of {part.task_name} is not "
                               f"item {doc_id} of the converted data")
        items.append([doc_id, float(sample[metric])])
    return items


def _task_result(prepared: PreparedTask, samples: dict) -> TaskResult:
    """Per-item results, score, chance and standard error of one benchmark."""
    bench = prepared.bench
    per_part = [_part_items(part, samples[part.task_name], prepared.docs, bench.metric)
                for part in prepared.parts]
    chance = [[bench.chance_of(prepared.docs[doc_id]) for doc_id, _ in items] for items in per_part]
    items = sorted((item for part_items in per_part for item in part_items),
                   key=lambda item: item[0])
    return TaskResult(
        name=bench.name, kind=bench.kind, metric=bench.metric,
        score=_mean_of_means([[c for _, c in items] for items in per_part]),
        n=len(items), chance=_mean_of_means(chance), items=items,
        stderr=_stderr([[c for _, c in items] for items in per_part]),
    )


def _mean_of_means(groups: list[list[float]]) -> float:
    """Mean over groups of each group's mean (the plain mean when there is one group)."""
    return sum(sum(g) / len(g) for g in groups) / len(groups)


def _stderr(groups: list[list[float]]) -> float | None:
    """Standard error of ``_mean_of_means``; None when a group has fewer than two items."""
    if any(len(g) < 2 for g in groups):
        return None
    variance = 0.0
    for g in groups:
        mean = sum(g) / len(g)
        variance += sum((x - mean) ** 2 for x in g) / (len(g) - 1) / len(g)
    return math.sqrt(variance) / len(groups)


@contextlib.contextmanager
def _offline():
    """Set ``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE`` to 1 for the block, then restore them."""
    saved = {name: os.environ.get(name) for name in OFFLINE_VARS}
    os.environ.update({name: "1" for name in OFFLINE_VARS})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
