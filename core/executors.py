"""Executors: where a build's independent pieces of work run (registry ``executors``).

``local`` runs each call in this process, in order. ``ray`` (``pip install edgebuild[ray]``)
runs them as Ray tasks on a Ray cluster (``--ray-address``) or on a Ray instance started on this
machine. Both return the results in the order of the calls, so what a build records does not
depend on the executor.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Sequence

from edgebuild.core.errors import ConfigError
from edgebuild.core.registry import Registry


class Executor(ABC):
    """Runs independent calls ``fn(*args)``."""

    local: bool = False          # runs in this process (a caller may then stop early)

    @abstractmethod
    def share(self, obj):
        """A handle on ``obj`` (a model, say) to pass to many calls without copying it for each."""

    @abstractmethod
    def map(self, fn: Callable, calls: Sequence[tuple],
            progress: Callable[[int, int], None] | None = None) -> list:
        """``[fn(*args) for args in calls]``, in order; ``progress(done, total)`` as calls finish.
        ``fn`` must be a module-level function (it may be sent to another machine)."""

    def close(self) -> None:
        """Release what the executor holds (nothing for ``local``)."""


class LocalExecutor(Executor):
    local = True

    def __init__(self, address: str = "", gpus_per_call: float = 0):
        if address:
            raise ConfigError(f"--ray-address {address} was given, but the executor is local",
                              hint="pass --executor ray with --ray-address, or drop --ray-address")

    def share(self, obj):
        return obj

    def map(self, fn, calls, progress=None) -> list:
        out = []
        for args in calls:
            out.append(fn(*args))
            if progress is not None:
                progress(len(out), len(calls))
        return out


executors: Registry = Registry("executor", error=ConfigError)
executors.register("local", LocalExecutor)
executors.register_lazy("ray", "edgebuild.core.ray_executor:RayExecutor")


def make(name: str, address: str = "", gpus_per_call: float = 0) -> Executor:
    """The executor registered as ``name``, connected to ``address`` (Ray: a cluster)."""
    return executors.get(name)(address, gpus_per_call)
