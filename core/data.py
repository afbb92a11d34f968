"""The benchmark data directory: its check and its fingerprint."""
from __future__ import annotations

import os
from pathlib import Path

from edgebuild.core.cache import digest
from edgebuild.core.errors import DataError


def check_data_dir(d) -> None:
    """``DataError`` when no benchmark data directory is given or it does not exist."""
    if d is None:
        raise DataError("no benchmark data directory given", hint="pass --data-dir DIR (see docs)")
    if not Path(d).is_dir():
        raise DataError(f"benchmark data directory {d} does not exist", hint="check --data-dir")


def data_fingerprint(root) -> str:
    """Hash of every file's relative path, size and modification time under ``root``."""
    root = Path(root)
    entries = []
    for dirpath, _, files in os.walk(root):
        for f in sorted(files):
            st = os.stat(os.path.join(dirpath, f))
            entries.append((os.path.relpath(os.path.join(dirpath, f), root), st.st_size, st.st_mtime_ns))
    return digest(sorted(entries))
