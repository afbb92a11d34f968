"""Host benchmarks: an in-memory torch model through lm-eval, on local data, per-item results.

``run_host`` converts each benchmark's data-dir files into a cache, writes lm-eval task YAMLs that
include the built-in tasks, picks the profile's fixed sample indices and runs every task in one
``lm_eval.simple_evaluate`` call. It keeps lm-eval's per-sample log to return, for each task,
which items were answered correctly: gates pair these against the baseline's.

Generation tasks (GSM8K, HumanEval, MBPP, MATH) run through the same call: lm-eval generates
with the model (greedy, or sampled where the task samples: the torch RNG is seeded from
``seed`` for the run and restored afterwards), applies the task's filters (for code, running
the programs in ``edgebuild.bench.sandbox``) and scores each item; the score of the
benchmark's filter is its per-item result.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from edgebuild.bench import benchmarks, harness
from edgebuild.bench.base import Benchmark, Converted
from edgebuild.bench.codeexec import FILTER_NAME, summarize
from edgebuild.bench.data import lm_eval_tasks_dir, read_task_yaml, write_task
from edgebuild.bench.profiles import Profile, get_profile, sample_indices, task_rng
from edgebuild.core.errors import ConfigError, DataError

# Tokens of one log-likelihood batch. A float32 matrix product already runs at full speed with
# 2,048 rows, and a 4,096-token batch's MLP activations (4,096 x 1,536 floats, 25 MB) no longer
# fit a CPU's cache, which slows every elementwise step: the reduced HellaSwag took 82 s at 4,096
# and 73 s at 2,048 on 2 cores.
MAX_BATCH_TOKENS = 2048

log = logging.getLogger(__name__)

TASK_PREFIX = "edgebuild_"
OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


@dataclass
class TaskResult:
    """One benchmark's result on one model.

    ``items`` is ``[[doc_id, correct], ...]`` sorted by ``doc_id`` (the item's position in the
    converted data file); ``correct`` is 0.0/1.0 (TruthfulQA MC2: the probability mass on true
    answers; pass@k with k > 1: the item's unbiased estimate). ``chance`` is the expected score
    of uniform guessing on the same items (0 for generation tasks). ``details`` holds facts of
    generation tasks: samples per item, answer length bound, the score of every lm-eval filter,
    and for code tasks the sandbox's status counts and network isolation; for a stratified
    benchmark (MMLU), ``strata`` holds each stratum's ``{"score", "n"}`` (the score is their mean).
    ``responses`` (log-likelihood tasks) is ``{doc_id: [[logprob, is_greedy, tokens], ...]}``, one
    per request of the item (one per answer choice; ``tokens``, the answer's length in tokens, only
    where the model could count them): what the device's answers are compared with.
    """

    name: str
    kind: str
    metric: str
    score: float
    n: int
    chance: float
    items: list = field(default_factory=list)
    stderr: float | None = None
    details: dict = field(default_factory=dict)
    responses: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (``from_dict`` reverses it)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TaskResult":
        """Rebuild a result from ``to_dict`` output (e.g. read back from a JSON cache)."""
        data = dict(data)
        data["items"] = [[int(doc_id), float(correct)] for doc_id, correct in data.get("items", [])]
        data["responses"] = {int(doc_id): [[float(r[0]), bool(r[1]), *map(int, r[2:3])] for r in pairs]
                             for doc_id, pairs in data.get("responses", {}).items()}
        return cls(**data)


@dataclass
class TaskPart:
    """One generated lm-eval task: all documents of a benchmark, or of one stratum of it."""

    task_name: str
    doc_ids: list[int]       # benchmark-wide doc id of each document in the task's file
    selected: list[int]      # sorted positions, within the task's file, to evaluate
    stratum: str | None = None   # the stratum (MMLU: subject) whose documents the task holds


@dataclass
class PreparedTask:
    """A benchmark ready to run: its converted documents and its generated lm-eval tasks."""

    bench: Benchmark
    docs: list[dict]
    parts: list[TaskPart]


def run_host(model, tokenizer, tasks: list[str], profile: str, data_dir, cache_dir, *,
             seed: int = 0, batch_size: int = 16, max_batch_tokens: int = MAX_BATCH_TOKENS,
             max_gen_toks: int | None = None, doc_ids: dict | None = None,
             num_fewshot: int | None = None,
             progress: Callable[[int, int], None] | None = None) -> dict[str, TaskResult]:
    """Evaluate ``model`` (an in-memory Hugging Face causal LM) on ``tasks``.

    ``profile`` ("smoke", "reduced", "full") and ``seed`` fix which items run; ``data_dir`` holds
    the benchmark files, ``cache_dir`` receives the converted JSONL (and the datasets cache).
    A batch holds at most ``max_batch_tokens`` tokens (and, unpacked, ``batch_size`` padded
    requests), which bounds memory on long few-shot prompts. ``max_gen_toks`` (None: each benchmark's own bound)
    caps the new tokens of every generated answer. ``seed`` also seeds sampled generation.
    ``doc_ids`` (``{task: [doc id, ...]}``) evaluates exactly those items of a task instead of the
    profile's sample (adaptive sampling extends a sample this way). ``num_fewshot`` (None: each
    benchmark's own count) gives every task that many few-shot examples.
    ``progress(done, total)`` is called as loglikelihood requests complete. Returns
    ``{task name: TaskResult}`` in the order of ``tasks``.
    """
    from edgebuild.bench.hflm import HostLM

    lm = HostLM(model, tokenizer, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                progress=progress)
    return run_lm(lm, tasks, profile, data_dir, cache_dir, seed=seed, max_gen_toks=max_gen_toks,
                  doc_ids=doc_ids, num_fewshot=num_fewshot)


def run_lm(lm, tasks: list[str], profile: str, data_dir, cache_dir, *, seed: int = 0,
           max_gen_toks: int | None = None, doc_ids: dict | None = None,
           num_fewshot: int | None = None) -> dict[str, TaskResult]:
    """``run_host`` with any lm-eval ``LM`` (lm-eval's own ``HFLM``, for one)."""
    chosen = get_profile(profile)
    if not tasks:
        raise ConfigError("no benchmark tasks given; name at least one of "
                          f"{', '.join(benchmarks.names())}")
    specs = [benchmarks.get(name) for name in dict.fromkeys(tasks)]
    if max_gen_toks is not None and max_gen_toks < 1:
        raise ConfigError(f"max_gen_toks must be a positive number of tokens, got {max_gen_toks}")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _offline(), tempfile.TemporaryDirectory(dir=cache_dir, prefix="tasks-") as task_dir:
        prepared = [prepare(spec, data_dir, cache_dir, Path(task_dir), chosen, seed, max_gen_toks,
                            (doc_ids or {}).get(spec.name), num_fewshot) for spec in specs]
        output = _evaluate(lm, prepared, Path(task_dir), seed)
    count = token_counter(lm)
    return {p.bench.name: _task_result(p, output["samples"], count) for p in prepared}


def prepare(bench: Benchmark, data_dir, cache_dir, task_dir: Path, profile: Profile,
            seed: int, max_gen_toks: int | None = None, doc_ids: list | None = None,
            num_fewshot: int | None = None) -> PreparedTask:
    """Convert ``bench``'s data, pick its sample (or take ``doc_ids``) and write one lm-eval task
    per part (with ``num_fewshot`` examples when given, else the benchmark's own count)."""
    if num_fewshot is not None:
        if num_fewshot < 0:
            raise ConfigError(f"num_fewshot must be 0 or more, got {num_fewshot}")
        bench = replace(bench, num_fewshot=num_fewshot)
    converted = bench.convert(Path(data_dir))
    docs = converted.eval_docs
    strata = bench.strata(docs)
    if doc_ids is not None:
        indices = sorted({int(i) for i in doc_ids})
        if not indices or indices[0] < 0 or indices[-1] >= len(docs):
            raise ConfigError(f"{bench.name}: item ids must lie in 0..{len(docs) - 1}")
    else:
        indices = _sample(bench, converted, profile.size_for(bench.name), seed, strata)
    builtin = lm_eval_tasks_dir()
    parts = []
    for stratum, doc_ids in _groups(strata, len(docs)):
        selected = _positions(doc_ids, indices)
        if not selected:
            continue
        suffix = f"_{stratum}" if stratum is not None else ""
        part = TaskPart(f"{TASK_PREFIX}{bench.name}{suffix}", doc_ids, selected, stratum)
        fewshot = _fewshot(bench, [d for d in converted.fewshot_docs
                                   if stratum is None or d[bench.strata_key] == stratum],
                           part.task_name, seed)
        yaml_path = builtin / bench.lm_eval_yaml.format(stratum=stratum)
        write_task(task_dir, part.task_name, yaml_path, [docs[i] for i in doc_ids], fewshot,
                   bench.num_fewshot, cache_dir, _overrides(bench, yaml_path, max_gen_toks),
                   bench.generation is not None and bench.generation.inline, bench.inline_fewshot)
        parts.append(part)
    log.info("%s: %d of %d items in %d lm-eval task(s)", bench.name, len(indices), len(docs),
             len(parts))
    return PreparedTask(bench, docs, parts)


def _fewshot(bench: Benchmark, pool: list[dict], task_name: str, seed: int) -> list[dict]:
    """The examples every item of a task gets: the whole pool when it holds no more than the
    task's shot count (MMLU's five dev questions per subject, in order), else a seeded draw of
    ``num_fewshot`` of them (ARC-Challenge: 25 of 1,119 train questions)."""
    if bench.inline_fewshot or len(pool) <= bench.num_fewshot:
        return pool
    order = task_rng(f"{task_name}/fewshot", seed).permutation(len(pool))[:bench.num_fewshot]
    return [pool[int(i)] for i in order]


def _sample(bench: Benchmark, converted: Converted, size: int | None, seed: int,
            strata: list[str] | None) -> list[int]:
    """The profile's doc ids: all for ``size`` None, else a seeded sample of the sample pool."""
    pool = converted.sample_pool
    if size is None or pool is None:
        return sample_indices(bench.sample_name, len(converted.eval_docs), size, seed, strata)
    pool_strata = None if strata is None else [strata[i] for i in pool]
    return [pool[i] for i in sample_indices(bench.sample_name, len(pool), size, seed, pool_strata)]


def _overrides(bench: Benchmark, yaml_path: Path, max_gen_toks: int | None) -> dict:
    """YAML keys a generation benchmark sets over the built-in task: answer length bound,
    samples per item, and its own ``overrides``."""
    generation = bench.generation
    if generation is None:
        return {}
    if not yaml_path.is_file():
        raise DataError(f"lm-eval has no built-in task file {yaml_path}",
                        hint="install the lm-eval version named in pyproject.toml")
    kwargs = dict(read_task_yaml(yaml_path).get("generation_kwargs") or {})
    kwargs["max_gen_toks"] = max_gen_toks or generation.max_gen_toks
    return {"generation_kwargs": kwargs, "repeats": generation.repeats, **generation.overrides}


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


def _evaluate(lm, prepared: list[PreparedTask], task_dir: Path, seed: int) -> dict:
    """One ``simple_evaluate`` call of ``lm`` over every part of every prepared benchmark."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    harness.adjust()
    parts = [part for p in prepared for part in p.parts]
    # lm-eval maps the k-th evaluated document to samples[k], so the lists must be sorted; a task
    # evaluated in full is left out (lm-eval's membership test is linear in the list length).
    samples = {part.task_name: part.selected for part in parts
               if len(part.selected) < len(part.doc_ids)}
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    # lm-eval seeds nothing (the caller's Python and numpy RNGs stay as they are); torch's RNG,
    # which sampled generation draws from, is seeded here and restored on exit. No bootstrap:
    # standard errors are computed from the per-item results. Code tasks are marked unsafe by
    # lm-eval; their programs run only in edgebuild.bench.sandbox (see codeexec).
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return simple_evaluate(model=lm, tasks=[part.task_name for part in parts],
                               samples=samples or None, log_samples=True, task_manager=manager,
                               bootstrap_iters=0, random_seed=None, numpy_random_seed=None,
                               torch_random_seed=None, confirm_run_unsafe_code=True)


def _part_rows(part: TaskPart, logged: list[dict], docs: list[dict], name: str) -> list[dict]:
    """The logged samples of one part and one filter, checked against the documents asked for."""
    rows = sorted((sample for sample in logged if sample["filter"] == name),
                  key=lambda sample: sample["doc_id"])
    positions = [sample["doc_id"] for sample in rows]
    if positions != part.selected:
        raise RuntimeError(f"lm-eval evaluated items {positions[:5]}... of {part.task_name} "
                           f"(filter {name}), not the {len(part.selected)} selected ones")
    for sample in rows:
        doc_id = part.doc_ids[sample["doc_id"]]
        expected, seen = docs[doc_id], sample["doc"]
        shared = expected.keys() & seen.keys()   # a task's process_docs may drop or add fields
        if not shared or any(seen[key] != expected[key] for key in shared):
            raise RuntimeError(f"lm-eval's document {sample['doc_id']} of {part.task_name} is not "
                               f"item {doc_id} of the converted data")
    return rows


def _part_items(part: TaskPart, logged: list[dict], docs: list[dict], bench: Benchmark) -> list[list]:
    """``[[doc_id, correct]]`` of one part: the metric of the benchmark's filter."""
    name = bench.generation.filter if bench.generation is not None else "none"
    rows = _part_rows(part, logged, docs, name)
    return [[part.doc_ids[sample["doc_id"]], float(sample[bench.metric])] for sample in rows]


def result_from_samples(prepared: PreparedTask, samples: dict) -> TaskResult:
    """The ``TaskResult`` of a prepared benchmark from lm-eval's logged samples
    (``{task name: [sample, ...]}``), however lm-eval ran (in this process or its command)."""
    return _task_result(prepared, samples)


def _task_result(prepared: PreparedTask, samples: dict, count=None) -> TaskResult:
    """Per-item results, score, chance and standard error of one benchmark (``count``: see
    ``_responses``)."""
    bench = prepared.bench
    per_part = [_part_items(part, samples[part.task_name], prepared.docs, bench)
                for part in prepared.parts]
    chance = [[bench.chance_of(prepared.docs[doc_id]) for doc_id, _ in items] for items in per_part]
    items = sorted((item for part_items in per_part for item in part_items),
                   key=lambda item: item[0])
    return TaskResult(
        name=bench.name, kind=bench.kind, metric=bench.metric,
        score=_mean_of_means([[c for _, c in items] for items in per_part]),
        n=len(items), chance=_mean_of_means(chance), items=items,
        stderr=_stderr([[c for _, c in items] for items in per_part]),
        details={**_details(prepared, samples), **_strata(prepared.parts, per_part)},
        responses=_responses(prepared, samples, count),
    )


def _responses(prepared: PreparedTask, samples: dict, count=None) -> dict:
    """``{doc_id: [[logprob, is_greedy(, tokens)], ...]}`` of a log-likelihood benchmark (empty for
    generation); ``tokens``, the answer's length as ``count`` (a tokenizer) counts it, when given."""
    if prepared.bench.generation is not None:
        return {}
    return {part.doc_ids[sample["doc_id"]]: [_response(r, args, count) for r, args in
                                             zip(sample["filtered_resps"], sample["arguments"])]
            for part in prepared.parts for sample in samples[part.task_name] if sample["filter"] == "none"}


def _response(resp, arguments, count) -> list:
    pair = [float(resp[0]), bool(resp[1])]
    return pair if count is None else pair + [count(arguments[1])]


def token_counter(lm):
    """A function giving the number of tokens ``lm`` splits a text into (None if it cannot say)."""
    encode = getattr(lm, "tok_encode", None)
    return None if encode is None else (lambda text: max(1, len(encode(text))))


def _strata(parts: list[TaskPart], per_part: list[list]) -> dict:
    """``{"strata": {stratum: {"score", "n"}}}`` of a stratified benchmark; empty otherwise."""
    scores = {part.stratum: {"score": sum(c for _, c in items) / len(items), "n": len(items)}
              for part, items in zip(parts, per_part) if part.stratum is not None}
    return {"strata": scores} if scores else {}


def _details(prepared: PreparedTask, samples: dict) -> dict:
    """Facts of a generation run: samples per item, length bound, every filter's score, and
    the sandbox's status counts for code tasks. Empty for loglikelihood tasks."""
    bench = prepared.bench
    if bench.generation is None:
        return {}
    logged = [sample for part in prepared.parts for sample in samples[part.task_name]]
    filters: dict[str, list[float]] = {}
    for sample in logged:
        filters.setdefault(sample["filter"], []).append(float(sample[bench.metric]))
    arguments = logged[0]["arguments"][0] if logged else ("", {})
    details = {"repeats": bench.generation.repeats, "filter": bench.generation.filter,
               "max_gen_toks": arguments[1].get("max_gen_toks"),
               "filters": {name: sum(v) / len(v) for name, v in sorted(filters.items())}}
    if bench.generation.filter == FILTER_NAME:
        details["sandbox"] = summarize([sample["filtered_resps"][0] for sample in logged
                                        if sample["filter"] == FILTER_NAME])
    return details


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
