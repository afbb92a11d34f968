"""The ``ray`` executor: each call a Ray task, on a cluster or on a Ray instance started here."""
from __future__ import annotations

import os
import socket

from edgebuild.core.errors import HostError
from edgebuild.core.executors import Call, Executor

FIX_ADDRESS = "start the cluster (`ray start --head` on its head node) or fix --ray-address / $RAY_ADDRESS"


def _ray():
    try:
        import ray
    except ImportError:
        raise HostError("--executor ray needs the ray package, which is not installed",
                        hint="pip install 'edgebuild[ray]'") from None
    return ray


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A ``host:port`` (or ``ray://host:port``) address answers a TCP connection; else ``HostError``."""
    if address in ("", "auto", "local"):
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise HostError(f"Ray address {address!r} is not host:port or ray://host:port", hint=FIX_ADDRESS)
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise HostError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}", hint=FIX_ADDRESS) from None


class RayExecutor(Executor):
    """Connects on construction: ``address`` (else ``$RAY_ADDRESS``; empty: a Ray instance started
    on this machine, or the one this process already started). ``gpus_per_call``: GPUs each task
    asks Ray for (1 when the build scores on CUDA)."""

    def __init__(self, address: str = "", gpus_per_call: float = 0):
        self.ray = _ray()
        self.gpus = gpus_per_call
        self._started = False
        self._after = None           # the task that starts a call once the calls it waits for are done
        if not self.ray.is_initialized():
            self._connect(address or os.environ.get("RAY_ADDRESS", ""))

    def _connect(self, address: str) -> None:
        check_reachable(address)
        try:
            self.ray.init(address=address or None, include_dashboard=False, log_to_driver=False,
                          configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = address or "a Ray instance on this machine"
            raise HostError(f"cannot start or reach {where}: {' '.join(str(e).split())[:200]}",
                            hint=FIX_ADDRESS) from None
        self._started = True

    def share(self, obj):
        return self.ray.put(obj)

    def map(self, fn, calls, progress=None) -> list:
        task = self.ray.remote(num_gpus=self.gpus, max_retries=0)(fn)
        refs = [task.remote(*args) for args in calls]
        pending = list(refs)
        while pending:
            _, pending = self.ray.wait(pending, num_returns=1)
            if progress is not None:
                progress(len(refs) - len(pending), len(refs))
        return fetch(self.ray, refs)

    def submit(self, fn, args, after=()) -> Call:
        if self._after is None:
            self._after = self.ray.remote(num_gpus=self.gpus, max_retries=0)(after_calls)
        return RayCall(self.ray, self._after.remote(fn, args, *[call.ref for call in after]))

    def capacity(self) -> int:
        """The cluster's CPUs (its GPUs when each task asks for one)."""
        resources = self.ray.cluster_resources()
        return max(1, int(resources.get("GPU" if self.gpus else "CPU", 1)))

    def close(self) -> None:
        if self._started:
            self.ray.shutdown()
            self._started = False


class RayCall(Call):
    """A Ray task started by ``RayExecutor.submit``."""

    def __init__(self, ray, ref):
        self.ray, self.ref = ray, ref

    def result(self):
        return fetch(self.ray, self.ref)


def after_calls(fn, args: tuple, *_finished):
    """``fn(*args)``: Ray starts it once the tasks whose results are passed as ``_finished`` are done
    (a failed one fails this task with its error)."""
    return fn(*args)


def fetch(ray, refs):
    """``ray.get(refs)``; a task's own error raised as it was raised in the task."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise
