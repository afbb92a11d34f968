"""The build: the ladder of stages (baseline → compressed stages), each attempt a sequence of steps.

The pipeline sequences the registered steps (``edgebuild.build.steps``), owns their caching (each
step's record is kept under its key in ``<out>/cache``; a finished build reruns without importing
torch and says it did no work) and the ladder: which stage each one compresses from, retries with
the method's recommended knobs, which stage ships, the exit code. The steps themselves live with
their subjects: compression in ``compress/``, export in ``export/``, host benchmarks in ``bench/``,
the device in ``targets/``, the gates in ``build/gates.py``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from edgebuild.build.config import BuildConfig, StageConfig
from edgebuild.build import gates, ladder, lookahead
from edgebuild.build.steps import ORDER, plan, steps
from edgebuild.core import accel, executors, models
from edgebuild.core.cache import StepCache
from edgebuild.core.data import check_data_dir
from edgebuild.core.errors import ConfigError, ExitCode
from edgebuild.core.progress import Progress
from edgebuild.core.steps import NOT_GATED, BuildContext, StageRun, Step, execute

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
    progress: Progress = field(default_factory=lambda: Progress("quiet"))
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
    not_evaluated: dict = field(default_factory=dict)   # benchmark -> why it gated no stage
    torch_device: str = "cpu"      # where torch compresses and scores in this build ("cpu", "cuda")
    compressed_ahead: dict = field(default_factory=dict)   # stage -> {"compressed", "used"}: trials packed as tasks


class Pipeline:
    def __init__(self, req: BuildRequest):
        from edgebuild.bench.quality import TextSets
        from edgebuild.compress.stage_models import StageModels
        from edgebuild.export.deployed import deployed_model
        from edgebuild.targets import load_target
        from edgebuild.targets.session import device_session
        self.req, self.cfg = req, req.config
        if req.from_stage and req.from_stage not in self.cfg.stages:
            raise ConfigError(f"--from {req.from_stage!r} is not a stage of this build ({', '.join(self.cfg.stages)})")
        ref, target = models.resolve(req.model), load_target(req.target)
        torch_device = accel.TorchDevice(self.cfg.torch_device)
        self.ctx = BuildContext(
            config=self.cfg, ref=ref, target=target, data_dir=req.data_dir, out=req.out,
            cache=StepCache(req.out / "cache", force=req.force), progress=req.progress,
            torch_device=torch_device, models=StageModels(ref, req.progress, torch_device, deploy=deployed_model),
            texts=TextSets(req.data_dir, self.cfg.calibration_texts, self.cfg.seed),
            device=device_session(target))
        wanted = [n for n in req.steps if n != "device" or self.cfg.device]
        self.steps: list[Step] = [steps.get(name)() for name in plan(wanted)]
        self.ctx.judge = gates.EarlyJudge(self.ctx)
        self.out_dir = req.out / target.name
        self._forced = req.force

    def run(self) -> BuildResult:
        check_data_dir(self.req.data_dir)
        self.not_evaluated = resolve_tasks(self.cfg, self.req.data_dir)
        self.started = time.monotonic()
        self.compressed_ahead = {}
        runs = []
        self.ctx.executor = self._executor()
        try:
            self._preflight()
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
            self.ctx.executor.close()
        return self._result(runs)

    def _executor(self):
        """The build's executor; a Ray task asks for a GPU when the build scores on CUDA."""
        name = self.cfg.executor
        remote = not executors.executors.get(name).local
        gpus = 1 if remote and self.ctx.torch_device.name == "cuda" else 0
        return executors.make(name, self.cfg.ray_address, gpus_per_call=gpus)

    def _result(self, runs: list) -> BuildResult:
        shipped = ladder.choose(self.cfg.stages, self.ctx.passed, self.cfg.gates.min_shrink)
        incomplete = self._device_incomplete(shipped)
        cache = self.ctx.cache
        return BuildResult(runs, shipped, ladder.exit_code(self.cfg.stages, runs, shipped, incomplete),
                           len(cache.hits), len(cache.misses), self.ctx.target, self.ctx.ref, self.cfg,
                           self.out_dir, partial="gate" not in self.req.steps, not_evaluated=self.not_evaluated,
                           torch_device=self.ctx.torch_device.name, compressed_ahead=self.compressed_ahead)

    def _device_incomplete(self, shipped: str) -> bool:
        """The device was asked for but did not measure the shipped stage."""
        run = self.ctx.passed.get(shipped)
        wanted = self.cfg.device and "device" in self.req.steps
        return wanted and run is not None and (run.device or {}).get("status") != "ok"

    def _preflight(self) -> None:
        """Reach the device before any stage work when its spec says an unreachable device fails
        the build (``on_unreachable = "fail"``, the default for real boards), and check that its
        onnxruntime runs the target's runtime encodings (``device_runtime_plan``)."""
        if not (self.cfg.device and "device" in self.req.steps):
            return
        if self.ctx.target.on_unreachable == "fail":
            self.ctx.device.connect()
        self.ctx.runtime_plan = device_runtime_plan(self.ctx.target, self.ctx.device.operators())

    # -- the ladder --------------------------------------------------------------------------------
    def _redo(self, name: str) -> bool:
        stages = self.cfg.stages
        return bool(self.req.from_stage) and stages.index(name) >= stages.index(self.req.from_stage)

    def _stage_attempts(self, name: str):
        if name == "baseline":
            yield self._run_stage(name, StageConfig(method="raw"), 0, None)
            return
        sc = self.cfg.stage_config(name)
        source, note = ladder.source_for(self.cfg.stages, self.ctx.passed, name, sc)
        if source is None:
            yield StageRun(name, sc.method, dict(sc.knobs), 0, None, status="skipped",
                           note="the baseline did not pass")
            return
        trials = self._trials(sc)
        ahead = self._lookahead(name, sc, source, trials)
        try:
            yield from self._walk(name, sc, source, note, trials, ahead)
        finally:
            if ahead.window:
                self.compressed_ahead[name] = ahead.finish()

    def _trials(self, sc) -> list:
        """The settings a stage's search tries, in order, within ``build.max_trials``."""
        from edgebuild.compress import methods
        layers = models.num_layers(self.ctx.ref)
        return list(ladder.settings(sc, methods.get(sc.method), layers))[: self.cfg.max_trials]

    def _lookahead(self, name: str, sc: StageConfig, source: StageRun, trials: list) -> lookahead.Lookahead:
        """The stage's trials compressed ahead of the walk (none on the local executor)."""
        packs = any(step.name == "pack" for step in self.steps)
        width = lookahead.window(self.ctx, trials) if packs else 0
        return lookahead.Lookahead(self.ctx, name, sc, source, trials, width, self._forced)

    def _walk(self, name: str, sc: StageConfig, source: StageRun, note: str, trials: list, ahead):
        """The stage's trials in order, until one passes, fails critically or the budget is spent."""
        for attempt, setting in enumerate(trials):
            if attempt and not self._budget_left(attempt):
                return
            ahead.ready(attempt)
            run = self._run_stage(name, ladder.trial_config(sc, setting), attempt, source, setting)
            run.note = run.note or note
            yield run
            if run.status == "passed" or run.gate.get("critical"):
                return

    def _budget_left(self, attempt: int) -> bool:
        """Whether another attempt of a stage may start (``build.max_trials``, ``time_budget_s``)."""
        budget = self.cfg.time_budget_s
        over = budget is not None and time.monotonic() - self.started > budget
        return attempt < self.cfg.max_trials and not over

    # -- one attempt: its steps ----------------------------------------------------------------------
    def _run_stage(self, name: str, sc: StageConfig, attempt: int, source: StageRun | None,
                   setting: dict | None = None) -> StageRun:
        run = ladder.trial_run(name, sc, attempt, source, setting)
        fallback = f", {setting['fallback_layers']} layers at 8 bits" if (setting or {}).get("fallback_layers") else ""
        knobs = f" {sc.knobs}" if sc.knobs else ""
        self.ctx.progress.note(f"[{name}] {sc.method}{knobs}{fallback} attempt {attempt + 1}")
        for step in self.steps:
            if run.stopped and step.name != "gate":
                continue
            self._execute(step, run)
            if step.name != "gate" and not run.stopped:
                run.stopped = gates.stop_reason(self.ctx, run, step.name)
        if "gate" not in self.req.steps:
            run.status, run.note = "passed", NOT_GATED
        return run

    def _execute(self, step: Step, run: StageRun) -> None:
        """Run one step for ``run``, or reuse its cached record."""
        record, entry = execute(step, self.ctx, run, forced=self._forced)
        step.apply(self.ctx, run, record, entry)


def device_runtime_plan(target, ops: dict | None) -> dict | None:
    """``{"plan", "notes"}``: the target's runtime plan on a device whose agent reported ``ops``
    (its onnxruntime version and kernels); a tensor class whose operator it lacks falls back to
    ``runtime.fallback_encoding`` (a note says so), else a one-line ``TargetError`` naming the
    operator and the onnxruntime it needs. None when the device did not say."""
    if ops is None:
        return None
    from edgebuild.export.operators import plan_for_device
    plan, notes = plan_for_device(target.runtime, ops.get("onnxruntime"), ops.get("kernels"))
    return {"plan": plan, "notes": notes}


def resolve_tasks(cfg: BuildConfig, data_dir) -> dict:
    """Fill in ``cfg.tasks`` when the config leaves it to the default (the core suite and the
    expert benchmarks of ``build.experts`` that can run); return ``{benchmark: why it is not
    evaluated}`` for those of that suite that will gate no stage."""
    from edgebuild.bench.suite import plan
    suite = plan(cfg.experts, data_dir)
    not_evaluated = dict(suite.unavailable)
    if cfg.tasks is None:
        cfg.tasks = list(suite.tasks)
    else:
        not_evaluated.update({t: "not in build.tasks: a narrower task list was chosen"
                              for t in suite.tasks if t not in cfg.tasks})
    missing = [t for t in (cfg.device_tasks or []) + ([cfg.edge_task] if cfg.edge_task else []) if t not in cfg.tasks]
    if missing:
        raise ConfigError(f"{cfg.source_file}: {missing[0]!r} (build.device_tasks / build.edge_task) is not "
                          f"one of the tasks this build gates on ({', '.join(cfg.tasks)})")
    return not_evaluated
