"""Executors: where a build's independent pieces of work run (registry ``executors``).

``local`` runs each call in this process, in order. ``ray`` (``pip install edgebuild[ray]``)
runs them as Ray tasks on a Ray cluster (``--ray-address``) or on a Ray instance started on this
machine. Both return the results in the order of the calls, so what a build records does not
depend on the executor. ``submit`` starts one call and hands back a ``Call`` to wait on later
(the build compresses its next search trials that way while it gates the current one).
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

    @abstractmethod
    def submit(self, fn: Callable, args: tuple, after: Sequence["Call"] = ()) -> "Call":
        """Start ``fn(*args)`` once the calls ``after`` have finished; return its ``Call``
        (``fn`` module-level, as for ``map``)."""

    def capacity(self) -> int:
        """How many calls can run at once."""
        return 1

    def close(self) -> None:
        """Release what the executor holds (nothing for ``local``)."""


class Call(ABC):
    """A call started by ``Executor.submit``."""

    @abstractmethod
    def result(self):
        """Wait for the call; its value, or the error it raised (a call it waited on: that error)."""


class Deferred(Call):
    """The local executor's call: run here, in order, when its result is first asked for."""

    def __init__(self, fn: Callable, args: tuple, after: Sequence[Call] = ()):
        self._fn, self._args, self._after = fn, args, list(after)
        self._outcome: tuple | None = None

    def result(self):
        if self._outcome is None:
            try:
                for call in self._after:
                    call.result()
                self._outcome = (True, self._fn(*self._args))
            except Exception as err:
                self._outcome = (False, err)
        ok, value = self._outcome
        if not ok:
            raise value
        return value


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

    def submit(self, fn, args, after=()) -> Call:
        return Deferred(fn, args, after)


executors: Registry = Registry("executor", error=ConfigError)
executors.register("local", LocalExecutor)
executors.register_lazy("ray", "edgebuild.core.ray_executor:RayExecutor")


def make(name: str, address: str = "", gpus_per_call: float = 0) -> Executor:
    """The executor registered as ``name``, connected to ``address`` (Ray: a cluster)."""
    return executors.get(name)(address, gpus_per_call)
