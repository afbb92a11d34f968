"""Where a command's output goes: results (tables, ``--json``) on stdout, everything else on stderr."""
from __future__ import annotations

import contextlib
import os
import sys

import click


def progress():
    """The build's progress display, as the global ``--quiet`` asks (bars on a terminal, lines
    elsewhere)."""
    from edgebuild.core.progress import Progress
    ctx = click.get_current_context(silent=True)
    obj = (ctx.find_root().obj if ctx is not None else None) or {}
    return Progress(obj.get("progress", "auto"))


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def chatter_to_stderr():
    """While the block runs, whatever prints to stdout goes to stderr instead: Python's
    ``print`` (lm-eval's "Passed argument batch_size = auto" lines), and file descriptor 1 itself
    (C libraries, child processes), so that stdout carries only the command's results."""
    out, err = sys.stdout, sys.stderr
    with contextlib.suppress(OSError, ValueError):
        out.flush()
    saved = os.dup(1) if _open(1) and _open(2) else None
    if saved is not None:
        os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(err):
            yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            out.flush()           # what a library wrote to the stdout it kept a reference to
            err.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)
