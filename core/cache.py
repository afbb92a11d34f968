"""Content-addressed step cache.

Each step's output is a directory ``<root>/<step>/<key>/`` where ``key`` hashes the step's inputs,
its config and the version of the code it runs. A finished entry holds ``_done.json``; entries are
built in a temporary directory and renamed into place, so an interrupted step never leaves a
half-written entry. A failed step's work dir is kept under ``<root>/_failed/`` for inspection.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from edgebuild.core import __version__

_CODE_DIRS = {}


def digest(*parts) -> str:
    """Stable sha256 of JSON-serialisable parts."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def code_version(*packages: str) -> str:
    """Hash of the source files of the given ``edgebuild.*`` packages (and the release number)."""
    import importlib.util
    h = hashlib.sha256(__version__.encode())
    for name in sorted(packages):
        if name not in _CODE_DIRS:
            spec = importlib.util.find_spec(f"edgebuild.{name}")   # no import: keeps torch out
            root = Path(spec.origin).parent
            files = sorted(p for p in root.rglob("*") if p.suffix in (".py", ".toml", ".yaml", ".jsonl"))
            sub = hashlib.sha256()
            for p in files:
                sub.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
            _CODE_DIRS[name] = sub.hexdigest()
        h.update(f"{name}:{_CODE_DIRS[name]}".encode())
    return h.hexdigest()


class StepCache:
    def __init__(self, root: Path, force: bool = False):
        self.root = Path(root)
        self.force = force
        self.hits: list[str] = []
        self.misses: list[str] = []
        self._started: dict[Path, float] = {}

    def path(self, step: str, key: str) -> Path:
        return self.root / step / key

    def get(self, step: str, key: str) -> Path | None:
        """The finished entry's directory, or None (always None under ``force``)."""
        p = self.path(step, key)
        if not self.force and (p / "_done.json").exists():
            self.hits.append(step)
            return p
        return None

    @contextlib.contextmanager
    def build(self, step: str, key: str):
        """Yield a fresh work dir; on success it becomes the entry, on failure it is kept aside."""
        work = self.begin(step, key)
        try:
            yield work
        except BaseException:
            self.fail(work, step, key)
            raise
        self.commit(work, step, key)

    def begin(self, step: str, key: str) -> Path:
        """A fresh work dir beside where the entry will be (``commit``, ``fail`` or ``discard`` it)."""
        final = self.path(step, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=final.parent))
        self._started[work] = time.time()
        return work

    def commit(self, work: Path, step: str, key: str) -> Path:
        """Make ``work`` the finished entry of ``step``/``key`` and return the entry's path."""
        final = self.path(step, key)
        seconds = time.time() - self._started.pop(work, time.time())
        (work / "_done.json").write_text(json.dumps({"step": step, "key": key, "seconds": seconds}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(work, final)
        self.misses.append(step)
        return final

    def fail(self, work: Path, step: str, key: str) -> Path:
        """Keep a failed step's work dir under ``_failed/`` for inspection."""
        t0 = self._started.pop(work, time.time())
        failed = self.root / "_failed" / f"{step.replace('/', '_')}-{key[:12]}-{int(t0)}"
        failed.parent.mkdir(parents=True, exist_ok=True)
        os.replace(work, failed)
        return failed

    def discard(self, work: Path) -> None:
        """Drop a work dir whose result must not be reused."""
        self._started.pop(work, None)
        shutil.rmtree(work, ignore_errors=True)

    def failed_dir(self) -> Path:
        return self.root / "_failed"
