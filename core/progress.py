"""Progress of a build, on stderr (stdout is kept for results: tables, ``--json``).

Three displays: ``bars`` (rich bars with stage, step, done/total and ETA; the default on a
terminal), ``lines`` (the default elsewhere, for CI logs and pipes: one line when a step starts,
one when it ends with its elapsed time, and a heartbeat line with the latest known progress
every ``heartbeat_s`` seconds while a step runs) and ``quiet`` (nothing).
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from dataclasses import dataclass, field

MODES = ("auto", "bars", "lines", "quiet")
HEARTBEAT_ENV = "EDGEBUILD_HEARTBEAT_S"
DEFAULT_HEARTBEAT_S = 30.0


def heartbeat_interval() -> float:
    """Seconds between heartbeat lines: ``$EDGEBUILD_HEARTBEAT_S`` when set, else 30."""
    try:
        value = float(os.environ.get(HEARTBEAT_ENV, DEFAULT_HEARTBEAT_S))
    except ValueError:
        value = DEFAULT_HEARTBEAT_S
    return value if value > 0 else DEFAULT_HEARTBEAT_S


def duration(seconds: float) -> str:
    """``4.2s``, ``3m05s``, ``1h02m``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def amount(done: float, total: float | None, unit: str) -> str:
    """``12/30 tensors`` or ``1.5/4.0 MB``; ``done`` alone when the total is unknown."""
    if unit == "bytes":
        shown = f"{done / 1e6:.1f}" + (f"/{total / 1e6:.1f}" if total else "")
        return f"{shown} MB"
    return f"{int(done)}" + (f"/{int(total)}" if total else "") + f" {unit}"


@dataclass
class _Step:
    description: str
    total: float | None
    unit: str
    started: float = field(default_factory=time.monotonic)
    done: float = 0.0

    def status(self) -> str:
        """The latest known progress: amount, share, elapsed time and ETA."""
        elapsed = time.monotonic() - self.started
        parts = [f"{elapsed:.0f}s elapsed"]
        if self.done or self.total:
            parts.insert(0, amount(self.done, self.total, self.unit))
        if self.total and 0 < self.done < self.total:
            share = self.done / self.total
            parts.insert(1, f"{100 * share:.0f}%")
            parts.append(f"ETA {duration(elapsed * (1 - share) / share)}")
        return f"{self.description}: " + ", ".join(parts)


class Progress:
    """``with progress.step("compress seedlm", total=n, unit="tensors") as update: update(done, total)``.

    ``mode`` is one of ``MODES`` (``auto``: bars on a terminal, lines otherwise); ``True`` and
    ``False`` mean ``auto`` and ``quiet``. ``stream`` defaults to stderr."""

    def __init__(self, mode: str | bool = "auto", *, stream=None, heartbeat_s: float | None = None):
        mode = {True: "auto", False: "quiet"}.get(mode, mode) if isinstance(mode, bool) else mode
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "bars" if _isatty(self.stream) else "lines"
        self.mode = mode
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else heartbeat_interval()
        self._display = {"bars": _Bars, "lines": _Lines}.get(mode, _Silent)(self)

    def __reduce__(self):
        """Sent to another process (a Ray task), a display shows nothing: it has no terminal there."""
        return Progress, ("quiet",)

    @property
    def enabled(self) -> bool:
        return self.mode != "quiet"

    @contextlib.contextmanager
    def step(self, description: str, total: int | None = None, unit: str = "items"):
        with self._display.step(description, total, unit) as update:
            yield update

    def note(self, message: str) -> None:
        """A line of its own (a stage attempt starting, a retry)."""
        self._display.note(message)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _Silent:
    def __init__(self, owner: Progress):
        self.owner = owner

    @contextlib.contextmanager
    def step(self, description, total, unit):
        yield lambda done, total=None: None

    def note(self, message: str) -> None:
        pass


class _Lines(_Silent):
    """Plain lines: start, heartbeat (the innermost running step), done or failed."""

    def __init__(self, owner: Progress):
        super().__init__(owner)
        self._running: list[_Step] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def _print(self, line: str) -> None:
        with self._lock:
            print(line, file=self.owner.stream, flush=True)

    @contextlib.contextmanager
    def step(self, description, total, unit):
        state = _Step(description, total, unit)
        self._print(f"[start] {description}")
        self._running.append(state)
        self._ensure_heartbeat()

        def update(done, total=None):
            state.done = done
            state.total = total if total is not None else state.total
        try:
            yield update
        except BaseException:
            self._print(f"[failed] {description} after {duration(time.monotonic() - state.started)}")
            raise
        else:
            self._print(f"[done] {description} in {duration(time.monotonic() - state.started)}")
        finally:
            self._running.remove(state)

    def note(self, message: str) -> None:
        self._print(message)

    def _ensure_heartbeat(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._beat, name="edgebuild-heartbeat", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        """Every ``heartbeat_s``: the latest progress of the innermost step; ends when none runs."""
        while not self._wake.wait(self.owner.heartbeat_s):
            running = list(self._running)
            if not running:
                return
            self._print(f"[...] {running[-1].status()}")


class _Bars(_Silent):
    """Rich bars on stderr: one line per running step (stage and step in its description)."""

    def __init__(self, owner: Progress):
        super().__init__(owner)
        self._bar = None
        self._depth = 0

    def _open(self):
        from rich.console import Console
        from rich.progress import (BarColumn, Progress as RichProgress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)
        console = Console(file=self.owner.stream)
        return RichProgress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                            TextColumn("{task.fields[amount]}"), TimeElapsedColumn(),
                            TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True)

    @contextlib.contextmanager
    def step(self, description, total, unit):
        if self._bar is None:
            self._bar = self._open()
            self._bar.start()
        self._depth += 1
        task = self._bar.add_task(description, total=total, amount="")
        known = [total]

        def update(done, total=None):
            known[0] = total if total is not None else known[0]
            self._bar.update(task, completed=done, total=known[0], amount=amount(done, known[0], unit))
        try:
            yield update
        finally:
            self._bar.remove_task(task)
            self._depth -= 1
            if self._depth == 0:
                self._bar.stop()
                self._bar = None

    def note(self, message: str) -> None:
        if self._bar is not None:
            self._bar.console.print(message, markup=False, highlight=False)
        else:
            print(message, file=self.owner.stream, flush=True)
