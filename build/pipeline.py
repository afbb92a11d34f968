"""The build: the ladder of stages (baseline → compressed stages), each attempt a sequence of steps.

The pipeline sequences the registered steps (``edgebuild.build.steps``), owns their caching (each
step's record is kept under its key in ``<out>/cache``; a finished build reruns without importing
torch and says it did no work) and the ladder: which stage each one compresses from, retries with
the method's recommended knobs, which stage ships, the exit code. The steps themselves live with
their subjects: compression in ``compress/``, export in ``export/``, host benchmarks in ``bench/``,
the device in ``targets/``, the gates in ``build/gates.py``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from edgebuild.build.config import BuildConfig, StageConfig
from edgebuild.build.steps import ORDER, plan, steps
from edgebuild.core import models
from edgebuild.core.cache import StepCache
from edgebuild.core.data import check_data_dir
from edgebuild.core.errors import ConfigError, ExitCode
from edgebuild.core.files import write_json_atomic
from edgebuild.core.progress import Progress
from edgebuild.core.steps import BuildContext, StageRun, Step

RECORD = "record.json"
STEPS = ORDER

__all__ = ["BuildRequest", "BuildResult", "Pipeline", "StageRun", "STEPS"]


@dataclass
class BuildRequest:
    model: str
    target: str
    config: BuildConfig
    out: Path
    data_dir: Path | None = None
    force: bool = False
    from_stage: str | None = None
    steps: tuple = STEPS             # which steps to run (partial commands run fewer)
    progress: Progress = field(default_factory=lambda: Progress(False))
    listeners: list = field(default_factory=list)   # each gets .stage_finished(run, ctx) after every attempt


@dataclass
class BuildResult:
    runs: list
    shipped: str
    exit_code: ExitCode
    cache_hits: int
    cache_misses: int
    target: object
    model_ref: object
    config: BuildConfig
    out_dir: Path
    partial: bool = False          # not every step ran (compress, export, deploy, bench)


class Pipeline:
    def __init__(self, req: BuildRequest):
        from edgebuild.bench.quality import TextSets
        from edgebuild.compress.stage_models import StageModels
        from edgebuild.targets import load_target
        from edgebuild.targets.session import DeviceSession
        self.req, self.cfg = req, req.config
        if req.from_stage and req.from_stage not in self.cfg.stages:
            raise ConfigError(f"--from {req.from_stage!r} is not a stage of this build ({', '.join(self.cfg.stages)})")
        ref, target = models.resolve(req.model), load_target(req.target)
        self.ctx = BuildContext(
            config=self.cfg, ref=ref, target=target, data_dir=req.data_dir, out=req.out,
            cache=StepCache(req.out / "cache", force=req.force), progress=req.progress,
            models=StageModels(ref, req.progress), texts=TextSets(req.data_dir, self.cfg.calibration_texts, self.cfg.seed),
            device=DeviceSession(target))
        self.steps: list[Step] = [steps.get(name)() for name in plan(req.steps)]
        self.out_dir = req.out / target.name
        self._forced = req.force

    def run(self) -> BuildResult:
        check_data_dir(self.req.data_dir)
        runs = []
        try:
            for name in self.cfg.stages:
                self._forced = self.req.force or self._redo(name)
                for run in self._stage_attempts(name):
                    runs.append(run)
                    if run.status == "passed":
                        self.ctx.passed[name] = run
                    for listener in self.req.listeners:
                        listener.stage_finished(run, self.ctx)
        finally:
            self.ctx.device.close()
        shipped = choose(self.cfg.stages, self.ctx.passed)
        cache = self.ctx.cache
        return BuildResult(runs, shipped, exit_code(self.cfg.stages, shipped), len(cache.hits), len(cache.misses),
                           self.ctx.target, self.ctx.ref, self.cfg, self.out_dir,
                           partial="gate" not in self.req.steps)

    # -- the ladder --------------------------------------------------------------------------------
    def _redo(self, name: str) -> bool:
        stages = self.cfg.stages
        return bool(self.req.from_stage) and stages.index(name) >= stages.index(self.req.from_stage)

    def _stage_attempts(self, name: str):
        if name == "baseline":
            yield self._run_stage(name, StageConfig(method="raw"), 0, None)
            return
        sc = self.cfg.stage_config(name)
        source = self._source(name, sc)
        if source is None:
            yield StageRun(name, sc.method, dict(sc.knobs), 0, None, status="skipped",
                           note="its source stage did not pass")
            return
        knobs = dict(sc.knobs)
        for attempt in range(self.cfg.gates.max_retries + 1):
            run = self._run_stage(name, dataclasses.replace(sc, knobs=knobs), attempt, source)
            yield run
            if run.status == "passed" or run.gate.get("critical"):
                return
            knobs = recommend(sc.method, knobs, run)
            if knobs is None:
                return

    def _source(self, name: str, sc: StageConfig) -> StageRun | None:
        """The passed stage whose weights ``name`` compresses (None: it did not pass)."""
        if sc.source == "baseline":
            return self.ctx.passed.get("baseline")
        return self.ctx.passed.get(self.cfg.stages[self.cfg.stages.index(name) - 1])

    # -- one attempt: its steps ----------------------------------------------------------------------
    def _run_stage(self, name: str, sc: StageConfig, attempt: int, source: StageRun | None) -> StageRun:
        run = StageRun(name, sc.method, dict(sc.knobs), attempt, source.stage if source else None, spec=sc)
        self.ctx.progress.note(f"[{name}] {sc.method} {sc.knobs or ''} attempt {attempt + 1}")
        for step in self.steps:
            self._execute(step, run)
        if "gate" not in self.req.steps:
            run.status, run.note = "passed", "partial build: not gated"
        return run

    def _execute(self, step: Step, run: StageRun) -> None:
        """Run one step for ``run``, or reuse its cached record."""
        key = step.key(self.ctx, run)
        entry = None
        if key is None:
            record = step.run(self.ctx, run, None)
        else:
            run.keys[step.name] = key
            entry = None if self._forced else self.ctx.cache.get(step.name, key)
            if entry is not None:
                record = json.loads((entry / RECORD).read_text())
            else:
                record, entry = self._build(step, run, key)
        step.apply(self.ctx, run, record, entry)

    def _build(self, step: Step, run: StageRun, key: str) -> tuple[dict, Path | None]:
        cache = self.ctx.cache
        work = cache.begin(step.name, key)
        try:
            record = step.run(self.ctx, run, work)
            if not step.cacheable(record):
                cache.discard(work)
                return record, None
            write_json_atomic(work / RECORD, record)
        except BaseException:
            cache.fail(work, step.name, key)
            raise
        return record, cache.commit(work, step.name, key)


def choose(stages: list, passed: dict) -> str:
    """The last stage of the ladder that passed (the baseline when none did)."""
    for name in reversed(stages):
        if name in passed:
            return name
    return "baseline"


def exit_code(stages: list, shipped: str) -> ExitCode:
    if shipped == stages[-1] and len(stages) > 1:
        return ExitCode.OK
    if shipped == "baseline":
        return ExitCode.BASELINE_ONLY if len(stages) > 1 else ExitCode.OK
    return ExitCode.FALLBACK


def recommend(method: str, knobs: dict, run: StageRun) -> dict | None:
    """Knobs for a retry after ``run`` failed its gates (None: the method has nothing left to try)."""
    from edgebuild.compress import methods
    new = methods.get(method).from_knobs(knobs).recommend(run.gate)
    return None if new is None else dataclasses.asdict(new)
