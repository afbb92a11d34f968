"""The ladder: what each stage compresses, the settings its search tries, and which stage ships.

* **Source.** A stage compresses the weights of the best passing stage before it in the ladder (the
  one deployed smallest), or the baseline's when none passed or when its config says
  ``source = "baseline"``; the run's note says which.
* **Search.** A stage's attempts are its configured setting, then the method's knob walk
  (``edgebuild.compress.search``); after each setting fails, the same setting with its most
  sensitive decoder layers kept at 8 bits (``stage.<name>.fallback_layers``, most sensitive by KL
  one layer at a time). Every next setting is at least as large as the last, so the first that
  passes is the smallest that passes; the search stops there, at a critical failure, after
  ``build.max_trials`` attempts, or when ``build.time_budget_s`` of the build has gone by (a
  stage's first attempt always runs).
* **Choice.** The smallest deployed stage that passed every gate ships: walking the passed stages in
  ladder order, a stage is preferred over the one chosen so far only when it shrinks the deployed
  bytes by at least ``gates.min_shrink``.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

from edgebuild.core.errors import ExitCode
from edgebuild.core.steps import StageRun


def deployed_bytes(run: StageRun) -> int | None:
    """Bytes of what the device stores and executes for ``run`` (the packed artifact until a
    runtime encoding says otherwise)."""
    runtime = run.pack.get("runtime") or {}
    return runtime.get("bytes") or run.pack.get("bytes")


def source_for(stages: list, passed: dict, name: str, sc) -> tuple[StageRun | None, str]:
    """The passed stage whose weights ``name`` compresses, and a note saying which and why."""
    base = passed.get("baseline")
    if sc.source == "baseline":
        return base, "compressed from the baseline (source = \"baseline\")"
    before = [passed[s] for s in stages[1:stages.index(name)] if s in passed]
    if not before:
        earlier = stages.index(name) > 1
        return base, "compressed from the baseline" + (": no earlier stage passed" if earlier else "")
    best = min(before, key=lambda r: (deployed_bytes(r) or 0, stages.index(r.stage)))
    return best, f"compressed from {best.stage}, the smallest passing stage before it"


def settings(sc, method, layers: int | None = None) -> Iterator[dict]:
    """The trial settings of a stage, in order: ``{"knobs": ..., "fallback_layers": n or None}``
    (fallback counts below the model's ``layers`` only: keeping every layer is not compressing)."""
    from edgebuild.compress.search import knob_walk
    space = method.knob_space if sc.space is None else sc.space
    order = (list(space) if sc.space is not None else method.knob_order) if sc.order is None else sc.order
    fallbacks = [n for n in sc.fallback_layers if layers is None or n < layers] if sc.scope == "weights" else []
    defaults = dataclasses.asdict(method.config_class())
    start = {**defaults, **sc.knobs}
    for full in [start] + knob_walk(start, space, order):
        knobs = {k: v for k, v in full.items() if k in sc.knobs or v != defaults[k]}
        yield {"knobs": knobs, "fallback_layers": None}
        for n in fallbacks:
            yield {"knobs": knobs, "fallback_layers": n}


def trial_config(sc, setting: dict):
    """The stage config of one trial."""
    return dataclasses.replace(sc, knobs=dict(setting["knobs"]))


def trial_run(name: str, sc, attempt: int, source: StageRun | None, setting: dict | None = None) -> StageRun:
    """Attempt ``attempt`` at stage ``name`` with its trial's stage config ``sc``, compressing
    ``source``'s weights."""
    return StageRun(name, sc.method, dict(sc.knobs), attempt, source.stage if source else None, spec=sc,
                    trial=dict(setting or {}))


def parent_trial(trials: list, i: int) -> int | None:
    """The trial whose records fallback trial ``i`` re-encodes (its knobs, no fallback); None
    when trial ``i`` keeps no layers back."""
    if not trials[i].get("fallback_layers"):
        return None
    return next((j for j in range(i - 1, -1, -1)
                 if not trials[j].get("fallback_layers") and trials[j]["knobs"] == trials[i]["knobs"]), None)


def choose(stages: list, passed: dict, min_shrink: float) -> str:
    """The stage to ship: the smallest deployed stage that passed (see the module's notes)."""
    chosen = "baseline"
    for name in stages[1:]:
        if name not in passed:
            continue
        size, best = deployed_bytes(passed[name]), deployed_bytes(passed[chosen]) if chosen in passed else None
        if best is None or (size is not None and size <= (1 - min_shrink) * best):
            chosen = name
    return chosen


def exit_code(stages: list, runs: list, shipped: str, device_incomplete: bool) -> ExitCode:
    """0: a compressed stage shipped and every stage passed; 10: a compressed stage shipped after
    another stage failed; 11: the baseline shipped; 13: the shipped stage's device checks did not
    run (the build is not validated on its target), whatever else happened."""
    if device_incomplete:
        return ExitCode.DEVICE_INCOMPLETE
    if shipped == "baseline":
        return ExitCode.BASELINE_ONLY if len(stages) > 1 else ExitCode.OK
    passed = {r.stage for r in runs if r.status == "passed"}
    return ExitCode.OK if all(s in passed for s in stages) else ExitCode.FALLBACK
