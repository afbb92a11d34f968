"""The host steps, on the host's torch model of a stage (the weights its runtime directory makes the
device execute: ``StageModels.for_stage``): ``quality`` (KL divergence, top-1 agreement
and perplexity ratio against the baseline: seconds, so it runs first and a broken stage stops
there) and ``host`` (the benchmark suite and the eudaimonia scenarios, task by task, the generation tasks
together as one unit, stopping as soon as the build's judge says the stage has failed whatever
the remaining tasks give)."""
from __future__ import annotations

from pathlib import Path

from edgebuild.core.cache import code_version, digest
from edgebuild.core.data import data_fingerprint
from edgebuild.core.errors import DataError
from edgebuild.core.files import sha256_file
from edgebuild.core.steps import BuildContext, StageRun, Step


class QualityStep(Step):
    """Record: ``{"kl", "top1_agreement", "ppl_ratio"}`` of the stage as deployed against the
    baseline on the fixed texts, and, for a stage with a runtime directory, ``deployment``: the same
    three of the stage as deployed against the stage as compressed (what deploying costs)."""

    name = "quality"
    needs = ("pack", "runtime")

    def key(self, ctx: BuildContext, run: StageRun) -> str:
        return digest("quality", run.keys["pack"], run.keys.get("runtime"), ctx.texts.fixed(), code_version("bench"))

    def run(self, ctx: BuildContext, run: StageRun, work: Path) -> dict:
        model, tok = ctx.models.for_stage(run)
        with ctx.progress.step(f"KL and top-1 {run.stage}"):
            record = _quality(ctx, model, tok)
        if run.pack.get("runtime"):
            from edgebuild.bench.quality import deployment_kl
            with ctx.progress.step(f"deployment KL {run.stage}"):
                record["deployment"] = deployment_kl(ctx.models.compressed(run)[0], model, tok, ctx.texts.fixed())
        return record

    def apply(self, ctx: BuildContext, run: StageRun, record: dict, entry: Path | None) -> None:
        run.quality = record


class HostStep(Step):
    """Record: ``{"results": {task: result}, "stopped": None | {"after": task, "reason": str}}``.

    Tasks run one at a time in ``config.tasks`` order; after each, ``ctx.judge`` (when the build
    sets one) may stop the stage: the tasks left are not run, and the record says why. With an
    executor that runs elsewhere (Ray), every task is a shard run at once, and the same judge then
    reads their results in the same order: the record is the one the local run makes."""

    name = "host"
    needs = ("pack", "runtime")

    def key(self, ctx: BuildContext, run: StageRun) -> str:
        cfg = ctx.config
        judge = ctx.judge.fingerprint(run) if ctx.judge else None
        return digest("host", run.keys["pack"], run.keys.get("runtime"), cfg.tasks, cfg.profile, data_fingerprint(ctx.data_dir),
                      cfg.seed, scenarios_fingerprint(cfg), judge, code_version("bench"))

    def run(self, ctx: BuildContext, run: StageRun, work: Path) -> dict:
        model, tok = ctx.models.for_stage(run)
        executor = ctx.executor
        tasks = _local_tasks(ctx, run, model, tok) if executor is None or executor.local \
            else _shards(ctx, run, model, tok)
        results, stopped = {}, None
        for done, (task, result) in enumerate(tasks, start=1):
            results[task] = result
            reason = ctx.judge.failed(run, results) if ctx.judge else None
            if reason and done < len(ctx.config.tasks):
                stopped = {"after": task, "reason": reason}
                break
        if ctx.config.eudaimonia and stopped is None:
            results.update(_eudaimonia(ctx, run, model, tok))
        return {"results": results, "stopped": stopped}

    def apply(self, ctx: BuildContext, run: StageRun, record: dict, entry: Path | None) -> None:
        run.host = record["results"]
        if record.get("stopped"):
            run.stopped = record["stopped"]


def units(tasks: list[str]) -> list[list[str]]:
    """``tasks`` as units of work, in order, each at the place of its first task: the generation
    tasks together (their answers decode in one running batch, so one task's long answers do not
    decode alone), log-likelihood tasks that draw the same items together (``Benchmark.sample_key``:
    their shared answers are scored once), every other task alone."""
    from edgebuild.bench import benchmarks

    def unit_key(task: str):
        if task not in benchmarks.names():
            return ("task", task)
        bench = benchmarks.get(task)
        return ("generation",) if bench.generation is not None else ("sample", bench.sample_name)

    grouped: dict[tuple, list[str]] = {}
    for task in tasks:
        grouped.setdefault(unit_key(task), []).append(task)
    return list(grouped.values())


def _local_tasks(ctx: BuildContext, run: StageRun, model, tok):
    """``(task, result)`` in the build's order, each unit (``units``) computed when its first task
    is asked for."""
    tasks, ready = ctx.config.tasks, {}
    unit_of = {task: unit for unit in units(tasks) for task in unit}
    for done, task in enumerate(tasks, start=1):
        if task not in ready:
            unit = unit_of[task]
            label = task if len(unit) == 1 else f"{', '.join(unit)} ({len(unit)} tasks together)"
            with ctx.progress.step(f"{run.stage}: {label} ({done}/{len(tasks)} benchmarks)", unit="requests") as update:
                ready.update(score_tasks(model, tok, unit, *_shard_settings(ctx), progress=update))
        yield task, ready.pop(task)


def _shards(ctx: BuildContext, run: StageRun, model, tok) -> list:
    """``(task, result)`` of every task, each unit (``units``) a shard on the build's executor."""
    tasks, shared = ctx.config.tasks, ctx.executor.share(model)
    parts = units(tasks)
    calls = [(shared, tok, unit, *_shard_settings(ctx)) for unit in parts]
    with ctx.progress.step(f"{run.stage}: {len(tasks)} benchmarks as shards", total=len(parts),
                           unit="shards") as update:
        merged = {}
        for result in ctx.executor.map(score_tasks, calls, progress=update):
            merged.update(result)
    return [(task, merged[task]) for task in tasks]


def _shard_settings(ctx: BuildContext) -> tuple:
    cfg = ctx.config
    return cfg.profile, ctx.data_dir, ctx.data_cache, cfg.seed


def score_tasks(model, tok, tasks: list[str], profile: str, data_dir, data_cache, seed: int,
                progress=None) -> dict:
    """Benchmarks on ``model`` in one evaluation: ``{task: result record}`` (a shard of a stage's
    host step)."""
    from edgebuild.bench.runner import run_host
    results = run_host(model, tok, tasks, profile, data_dir, data_cache, seed=seed, progress=progress)
    return {task: results[task].to_dict() for task in tasks}


def score_task(model, tok, task: str, profile: str, data_dir, data_cache, seed: int, progress=None) -> dict:
    """One benchmark on ``model``: the task's result record."""
    return score_tasks(model, tok, [task], profile, data_dir, data_cache, seed, progress)[task]


def _eudaimonia(ctx: BuildContext, run: StageRun, model, tok) -> dict:
    from edgebuild.bench import eudaimonia
    with ctx.progress.step(f"eudaimonia {run.stage}", unit="requests") as update:
        res = eudaimonia.run(model, tok, ctx.config.eudaimonia_scenarios or None, progress=update)
    return {eudaimonia.TASK_NAME: res.to_dict()}


def scenarios_fingerprint(cfg):
    """sha256 of the eudaimonia scenario file a build scores (None when it scores none)."""
    if not cfg.eudaimonia:
        return None
    from edgebuild.bench import eudaimonia
    path = Path(cfg.eudaimonia_scenarios) if cfg.eudaimonia_scenarios else eudaimonia.DEFAULT_PATH
    if not path.is_file():
        raise DataError(f"eudaimonia scenarios file {path} does not exist",
                        hint="set build.eudaimonia_scenarios to a JSONL file, or leave it empty")
    return sha256_file(path)


def _quality(ctx: BuildContext, model, tok) -> dict:
    """KL, top-1 agreement and perplexity ratio against the baseline's cached log-probabilities."""
    import numpy as np

    from edgebuild.bench import quality
    texts = ctx.texts.fixed()
    key = digest("reference-logprobs", ctx.ref.fingerprint, texts, code_version("bench"))
    entry = ctx.cache.get("reflogits", key)
    if entry is None:
        base, btok = ctx.models.base()
        with ctx.cache.build("reflogits", key) as work:
            np.save(work / "ref.npy", quality.reference_logprobs(base, btok, texts))
        entry = ctx.cache.path("reflogits", key)
    return quality.compare(model, tok, texts, np.load(entry / "ref.npy"))
