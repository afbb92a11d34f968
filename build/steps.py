"""The build's steps, in the order they run for each attempt at each stage.

Adding a phase: write a ``edgebuild.core.steps.Step`` in the folder that owns its subject, register
it here and give it its place in ``ORDER``; the pipeline runs, caches and records it.
"""
from __future__ import annotations

from edgebuild.core.errors import ConfigError
from edgebuild.core.registry import Registry

steps = Registry("build step", error=ConfigError)
steps.register_lazy("pack", "edgebuild.compress.step:PackStep")
steps.register_lazy("runtime", "edgebuild.export.step:RuntimeStep")
steps.register_lazy("quality", "edgebuild.bench.step:QualityStep")
steps.register_lazy("graph", "edgebuild.export.step:GraphStep")
steps.register_lazy("verify", "edgebuild.export.step:VerifyStep")
steps.register_lazy("host", "edgebuild.bench.step:HostStep")
steps.register_lazy("device", "edgebuild.targets.step:DeviceStep")
steps.register_lazy("gate", "edgebuild.build.gates:GateStep")

ORDER = ("pack", "runtime", "quality", "graph", "verify", "host", "device", "gate")

# What each build command runs (the steps they need are added by ``plan``).
COMMANDS = {
    "all": ORDER,
    "compress": ("pack",),
    "export": ("pack", "runtime", "graph", "verify"),
    "deploy": ("pack", "runtime", "graph", "verify", "device"),
    "bench": ("pack", "host"),
    "no-device": ("pack", "runtime", "quality", "graph", "verify", "host", "gate"),
}


def plan(names) -> tuple:
    """``names`` and every step they need, in ``ORDER``."""
    wanted = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo.extend(steps.get(name).needs)
    return tuple(n for n in ORDER if n in wanted)
