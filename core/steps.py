"""The step interface: what a build phase needs, its fingerprint, and its run into a record.

A build runs, for each attempt at each stage, a sequence of steps (``edgebuild.build.steps``):
pack → graph → verify → host → device → gate. Each step lives in the folder that owns its subject
(``compress/``, ``export/``, ``bench/``, ``targets/``, ``build/gates.py``) and knows nothing of the
orchestrator: it gets a ``BuildContext`` (the shared services of one build) and the ``StageRun`` it
works on, and the pipeline owns caching: it asks the step for its key, reuses a cached record when
there is one, and otherwise runs the step in a fresh work directory that becomes the cache entry.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

NOT_GATED = "partial build: not gated"     # the note of each run of a build without the gate step


@dataclass
class StageRun:
    """One attempt at one stage, with everything measured (the manifest is built from these)."""

    stage: str
    method: str
    knobs: dict
    attempt: int
    source: str | None
    keys: dict = field(default_factory=dict)      # step name -> cache key
    pack: dict = field(default_factory=dict)
    verify: dict = field(default_factory=dict)
    host: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)
    device: dict = field(default_factory=dict)
    gate: dict = field(default_factory=dict)
    status: str = "pending"   # passed, failed, skipped
    note: str = ""
    stopped: dict | None = None   # {"after": step or task, "reason": ...} when it stopped early
    trial: dict = field(default_factory=dict)     # the search's setting: knobs, fallback layers
    spec: Any = field(default=None, repr=False, compare=False)   # the stage's StageConfig


@dataclass
class BuildContext:
    """The services one build shares between its steps.

    ``config`` is the build config (``edgebuild.build.config.BuildConfig``), ``ref`` the resolved
    model (``edgebuild.core.models.ModelRef``), ``target`` the target spec; ``models`` gives torch
    models (the base model, a stage's model), ``texts`` the fixed and calibration text sets,
    ``device`` the connection to the target's agent (opened on first use); ``judge`` says when a
    stage has failed whatever its remaining benchmarks give; ``passed`` maps each stage that passed
    so far to its ``StageRun``; ``torch_device`` is where torch runs, ``executor`` where
    independent pieces of work (benchmark shards) run.
    """

    config: Any
    ref: Any
    target: Any
    data_dir: Path | None
    out: Path
    cache: Any
    progress: Any
    models: Any = None
    texts: Any = None
    device: Any = None
    judge: Any = None           # .failed(run, host results) -> reason | None; .fingerprint(run)
    torch_device: Any = "cpu"   # where torch compresses and scores: edgebuild.core.accel.TorchDevice (str() "cpu"/"cuda")
    executor: Any = None        # where independent work runs (edgebuild.core.executors; None: here)
    passed: dict = field(default_factory=dict)
    runtime_plan: Any = None    # {"plan", "notes"}: the target's runtime plan as its device runs it (None: the spec's)

    @property
    def data_cache(self) -> Path:
        """Where converted benchmark data and generated task files are kept."""
        return self.out / "cache" / "data"


class Step(ABC):
    """One phase of a stage's build.

    ``needs`` names the steps whose records this one reads (the pipeline runs them first).
    A step whose ``key`` is None is never cached (it is cheap, or depends on what ran before it in
    the same build); ``cacheable(record)`` may refuse one result (a device that did not answer).
    """

    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def key(self, ctx: BuildContext, run: StageRun) -> str | None:
        """The fingerprint of everything this step's output depends on (None: never cached)."""

    @abstractmethod
    def run(self, ctx: BuildContext, run: StageRun, work: Path) -> dict:
        """Do the work, writing any files into ``work`` (None for a step that is never cached);
        return the record (JSON-serialisable)."""

    @abstractmethod
    def apply(self, ctx: BuildContext, run: StageRun, record: dict, entry: Path | None) -> None:
        """Put a record (fresh or cached; its files are in ``entry``) into ``run``."""

    def cacheable(self, record: dict) -> bool:
        """Whether this record may be reused by a later build (default: always)."""
        return True


RECORD = "record.json"


def execute(step: Step, ctx: BuildContext, run: StageRun, forced: bool = False) -> tuple[dict, Path | None]:
    """``(record, entry)`` of ``step`` for ``run``: the cached record under the step's key unless
    ``forced`` (its files' content checked against what was recorded at commit: a corrupt entry
    is quarantined and the step runs again; an entry the cache adopted, built for this build in
    another process, is used even when forced), else a fresh run in a work dir that becomes the cache
    entry (kept aside under ``_failed/`` when the step raises; dropped when the step says the
    record must not be reused).
    A step whose key is None runs every time and has no entry."""
    key = step.key(ctx, run)
    if key is None:
        return step.run(ctx, run, None), None
    run.keys[step.name] = key
    entry = None if forced and not ctx.cache.adopted(step.name, key) else ctx.cache.get(step.name, key)
    if entry is not None:
        try:
            return json.loads((entry / RECORD).read_text()), entry
        except (OSError, ValueError) as err:     # content-checked, so written this way: keep it aside
            ctx.cache.quarantine(entry, f"{step.name}/{key[:12]}", f"{RECORD} is unreadable ({err})")
    work = ctx.cache.begin(step.name, key)
    try:
        record = step.run(ctx, run, work)
        if not step.cacheable(record):
            ctx.cache.discard(work)
            return record, None
        (work / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    except BaseException:
        ctx.cache.fail(work, step.name, key)
        raise
    return record, ctx.cache.commit(work, step.name, key)
