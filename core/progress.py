"""Progress display: rich bars on a terminal, silence otherwise."""
from __future__ import annotations

import contextlib
import sys


class Progress:
    """``with progress.step("compress seedlm", total=n) as update: update(done, total)``."""

    def __init__(self, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._rich = None

    @contextlib.contextmanager
    def step(self, description: str, total: int | None = None):
        if not self.enabled:
            yield lambda done, total=None: None
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress,
                                   SpinnerColumn, TextColumn, TimeElapsedColumn)
        with RichProgress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                          MofNCompleteColumn(), TimeElapsedColumn(), transient=True) as bar:
            task = bar.add_task(description, total=total)

            def update(done, total=None):
                bar.update(task, completed=done, total=total if total is not None else bar.tasks[0].total)
            yield update

    def note(self, message: str) -> None:
        if self.enabled:
            print(message, file=sys.stderr)
