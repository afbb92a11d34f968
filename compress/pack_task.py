"""The pack step of one search trial as a task on the build's executor (a Ray task, maybe on
another machine).

What the step needs travels as a ``PackJob``: the model, the build config, the calibration text
set, the trial and the stage it compresses from. The task rebuilds a build context from it and
runs the step through ``edgebuild.core.steps.execute``, so the record lands in the step cache
(``<out>/cache``, on a filesystem every node sees) under the key the build computes for that
trial: the build then finds it there. Compression is seeded (``build.seed``) and does not
depend on the process or its torch threads, so the record is the one the build would make.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgebuild.compress.step import PackStep
from edgebuild.core.steps import BuildContext, StageRun, execute


@dataclass
class PackJob:
    ref: Any                 # the resolved model (edgebuild.core.models.ModelRef)
    config: Any              # the build config: seed, calibration size
    texts: Any               # the text sets (calibration texts) of the build
    cache_root: Path         # the step cache: <out>/cache
    torch_device: str        # "cpu" or "cuda"
    source: StageRun | None  # the stage compressed from: its pack key and packed weights
    run: StageRun            # the trial: stage, method, knobs, its stage config and setting
    key: str                 # the trial's pack key as the build computes it
    forced: bool = False     # build it even when cached (--force, --from)


def pack_job(ctx: BuildContext, run: StageRun, key: str, forced: bool = False) -> PackJob:
    """The job of ``run``'s pack step (cache key ``key``) in ``ctx``'s build."""
    source = ctx.passed.get(run.source) if run.source else None
    return PackJob(ctx.ref, ctx.config, ctx.texts, ctx.cache.root, ctx.torch_device.name,
                   _packed_only(source) if source else None, _packed_only(run), key, forced)


def _packed_only(run: StageRun) -> StageRun:
    """``run`` without its measurements: what the pack step reads of it."""
    pack = {"path": run.pack["path"]} if run.pack.get("path") else {}
    return StageRun(run.stage, run.method, dict(run.knobs), run.attempt, run.source,
                    keys={k: v for k, v in run.keys.items() if k == "pack"}, pack=pack,
                    trial=dict(run.trial), spec=run.spec)


def run_pack(job: PackJob) -> str:
    """Run the pack step of ``job.run`` into the step cache (a cached entry is reused unless
    forced); its cache key. ``HostError`` when this process computes another key than the build
    (another edgebuild, model or config here): the build then compresses the trial itself."""
    from edgebuild.core.errors import HostError
    run, ctx, step = _packed_only(job.run), _context(job), PackStep()
    if step.key(ctx, run) != job.key:
        raise HostError("a compression task computes another cache key for its trial than the build does",
                        hint="install the same edgebuild on every node of the Ray cluster (docs/scale.md)")
    execute(step, ctx, run, forced=job.forced)
    return job.key


def _context(job: PackJob) -> BuildContext:
    from edgebuild.compress.stage_models import StageModels
    from edgebuild.core.accel import TorchDevice
    from edgebuild.core.cache import StepCache
    from edgebuild.core.progress import Progress
    device, progress = TorchDevice(job.torch_device), Progress("quiet")
    passed = {job.source.stage: job.source} if job.source else {}
    return BuildContext(config=job.config, ref=job.ref, target=None, data_dir=None,
                        out=job.cache_root.parent, cache=StepCache(job.cache_root), progress=progress,
                        models=StageModels(job.ref, progress, device), texts=job.texts,
                        torch_device=device, passed=passed)
