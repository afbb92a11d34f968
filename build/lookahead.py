"""Compressing a stage's next search trials ahead of its walk, on an executor that runs elsewhere
(Ray).

The walk (``Pipeline._walk``) runs a stage's trials one at a time, in order, every step
of each in this process, as a local build does. Meanwhile the pack steps of the next trials run as
tasks (``compress/pack_task.py``), as many at once as the executor has room for, within
``build.max_trials``: each writes its record into the shared step cache under the key the walk
computes. Before a trial's steps run, the walk waits for its task and then finds its packed
weights in the cache, so no key is compressed twice at once. A task that failed is passed over:
the walk compresses that trial itself, as a local build does, and fails the same way. A fallback
trial's task starts once its setting's own task is done (it re-encodes that trial's records).
Trials the walk never reaches (an earlier one passed) were compressed for nothing: their entries
stay in the cache, and the manifest counts them (``compressed_ahead``).
"""
from __future__ import annotations

import logging

from edgebuild.build import ladder
from edgebuild.core.steps import BuildContext

log = logging.getLogger(__name__)


class Lookahead:
    """The pack tasks of the trials of stage ``name`` (config ``sc``, its settings ``trials`` in
    order, compressing from ``source``), at most ``window`` started from the trial the walk is at."""

    def __init__(self, ctx: BuildContext, name: str, sc, source, trials: list, window: int, forced: bool):
        self.ctx, self.name, self.sc, self.source = ctx, name, sc, source
        self.trials, self.window, self.forced = trials, window, forced
        self.calls: dict[int, object] = {}
        self.used = 0

    def ready(self, attempt: int) -> None:
        """Start the tasks of the trials from ``attempt`` up to the window, then wait for
        ``attempt``'s: its packed weights are in the cache when it succeeded."""
        if not self.window:
            return
        for i in range(attempt, min(attempt + self.window, len(self.trials))):
            self._start(i)
        call = self.calls[attempt]
        if call is None:                              # cached before the stage began
            return
        with self.ctx.progress.step(f"{self.name}: attempt {attempt + 1} compressed as a task"):
            try:
                key = call.result()
            except Exception as err:                  # compressed here instead, as a local build does
                log.warning("%s attempt %d: its compression task failed (%s); compressing it here",
                            self.name, attempt + 1, err)
                return
        self.ctx.cache.adopt("pack", key)
        self.used += 1

    def finish(self) -> dict:
        """Wait for the tasks still running; ``{"compressed", "used"}``: trials compressed as
        tasks, and those of them the walk reached."""
        done = 0
        for call in filter(None, self.calls.values()):
            try:
                call.result()
                done += 1
            except Exception:                         # a trial the walk never reached, or reported
                pass
        return {"compressed": done, "used": self.used}

    def _start(self, i: int) -> None:
        """Start trial ``i``'s task, after its parent's for a fallback trial; none when its packed
        weights are cached already (and the stage is not built again)."""
        from edgebuild.compress.pack_task import pack_job, run_pack
        from edgebuild.compress.step import PackStep
        if i in self.calls:
            return
        setting = self.trials[i]
        run = ladder.trial_run(self.name, ladder.trial_config(self.sc, setting), i, self.source, setting)
        key = PackStep().key(self.ctx, run)
        if not self.forced and self.ctx.cache.has(PackStep.name, key):
            self.calls[i] = None
            return
        parent = self.calls.get(ladder.parent_trial(self.trials, i))
        self.calls[i] = self.ctx.executor.submit(run_pack, (pack_job(self.ctx, run, key, self.forced),),
                                                 [parent] if parent else [])


def window(ctx: BuildContext, trials: list) -> int:
    """How many trials to compress ahead: none on an executor that runs here, else as many as
    the executor runs at once (within the trials)."""
    executor = ctx.executor
    if executor is None or executor.local:
        return 0
    return min(executor.capacity(), len(trials))
