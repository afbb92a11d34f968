"""Content-addressed, content-verified step cache.

Each step's output is a directory ``<root>/<step>/<key>/`` where ``key`` hashes the step's inputs,
its config and the version of the code it runs. Entries are built in a temporary directory and
renamed into place, so an interrupted step never leaves a half-written entry; a finished entry
holds ``_done.json``, which records the sha256 and size of every other file of the entry. Committed
files are made read-only, and an entry is only ever replaced whole, never changed in place.

Every ``get`` hashes the entry's files again (once per process for an unchanged file: the memo is
keyed by path, size, inode and timestamps, and lives only in memory) and compares them with the
record. An entry whose bytes differ, or with a file missing or added, is moved to
``<root>/_quarantine/`` with a one-line warning naming the file, and the step is built again: a
hit is never reported for altered bytes. A failed step's work dir is kept under ``<root>/_failed/``.

Several processes may write one cache (a build and its Ray tasks, on a filesystem every node
sees): each builds in a work dir of its own, and when another writer committed the same key while
this one was building, the first entry stands and the second work dir is dropped (the same key
means the same inputs, so the same content).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgebuild.core import __version__
from edgebuild.core.files import sha256_file

log = logging.getLogger(__name__)

DONE = "_done.json"
QUARANTINE = "_quarantine"
FAILED = "_failed"
SIDE_DIRS = (QUARANTINE, FAILED)
READ_ONLY = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH

_CODE_DIRS = {}
_HASHES: dict[tuple, str] = {}        # (device, inode, size, mtime_ns, ctime_ns) -> sha256, this process only
UNRECORDED = "its record holds no content hashes (written by an older edgebuild)"


def digest(*parts) -> str:
    """Stable sha256 of JSON-serialisable parts."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def code_version(*packages: str) -> str:
    """Hash of the source files of the given ``edgebuild.*`` packages (and the release number).
    Hidden folders (a build's output, ``.setuptools-build``) are not sources: every process of a
    build (its Ray tasks too) must compute the same keys whatever was built beside them."""
    import importlib.util
    h = hashlib.sha256(__version__.encode())
    for name in sorted(packages):
        if name not in _CODE_DIRS:
            spec = importlib.util.find_spec(f"edgebuild.{name}")   # no import: keeps torch out
            root = Path(spec.origin).parent
            files = sorted(p for p in root.rglob("*") if p.suffix in (".py", ".toml", ".yaml", ".jsonl")
                           and not _in_hidden_folder(p.relative_to(root)))
            sub = hashlib.sha256()
            for p in files:
                sub.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
            _CODE_DIRS[name] = sub.hexdigest()
        h.update(f"{name}:{_CODE_DIRS[name]}".encode())
    return h.hexdigest()


def _in_hidden_folder(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts[:-1])


# -- the content of an entry ----------------------------------------------------------------------

def _files(folder: Path) -> dict[str, Path]:
    """``{relative posix path: path}`` of every file under ``folder`` but ``_done.json``."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if rel != DONE and not path.is_dir():
            out[rel] = path
    return out


def file_sha256(path: Path) -> str:
    """sha256 of ``path``, hashed at most once per process while the file is unchanged."""
    st = os.lstat(path)
    memo = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if memo not in _HASHES:
        _HASHES[memo] = sha256_file(path)
    return _HASHES[memo]


def content_record(folder: Path) -> dict:
    """``{relative path: {"sha256", "bytes"}}`` of every file of ``folder`` (``_done.json`` aside)."""
    return {rel: {"sha256": file_sha256(p), "bytes": p.stat().st_size} for rel, p in _files(folder).items()}


def entry_problem(entry: Path) -> str | None:
    """What is wrong with a finished entry's content (naming the first file), or None."""
    try:
        done = json.loads((entry / DONE).read_text())
    except (OSError, ValueError):
        return f"{DONE} is unreadable"
    recorded = done.get("files") if isinstance(done, dict) else None
    if not isinstance(recorded, dict):
        return UNRECORDED
    present = _files(entry)
    for rel in sorted(set(recorded) | set(present)):
        if rel not in present:
            return f"{rel} is missing"
        if rel not in recorded:
            return f"{rel} was added after the entry was written"
        path, want = present[rel], recorded[rel]
        if path.is_symlink() or not path.is_file():
            return f"{rel} is not a regular file"
        if path.stat().st_size != want["bytes"] or file_sha256(path) != want["sha256"]:
            return f"{rel} does not match its recorded sha256"
    return None


def _read_only(folder: Path) -> None:
    for path in _files(folder).values():
        if path.is_file() and not path.is_symlink():
            os.chmod(path, READ_ONLY)


def remove_tree(path: Path) -> None:
    """Delete ``path`` (an entry: its files are read-only) whole."""
    def again(func, p, _exc):
        os.chmod(os.path.dirname(p), stat.S_IRWXU)
        func(p)
    shutil.rmtree(path, onerror=again)


@dataclass
class Entry:
    """A finished entry as found on disk (``cache verify``, ``cache prune``)."""

    step: str
    key: str
    path: Path
    bytes: int
    used: float                                   # last use: when it was committed or last hit
    hashes: set = field(default_factory=set)      # sha256 of its files, as recorded


class StepCache:
    def __init__(self, root: Path, force: bool = False):
        self.root = Path(root)
        self.force = force
        self.hits: list[str] = []
        self.misses: list[str] = []
        self.corrupt: list[str] = []          # "step/key: problem" of entries quarantined by this cache
        self._started: dict[Path, float] = {}
        self._replacing: set[Path] = set()    # work dirs begun while their key had an entry
        self._adopted: set[tuple] = set()     # (step, key) built for this build by another process

    def path(self, step: str, key: str) -> Path:
        return self.root / step / key

    def get(self, step: str, key: str) -> Path | None:
        """The finished entry's directory once its content matches its record, or None (always
        None under ``force``). A corrupt entry is quarantined, with a warning, and None returned."""
        p = self.path(step, key)
        if (self.force and not self.adopted(step, key)) or not (p / DONE).exists():
            return None
        problem = entry_problem(p)
        if problem == UNRECORDED:
            log.info("cache entry %s/%s: %s; building it again", step, key[:12], problem)
            return None
        if problem is not None:
            self.quarantine(p, f"{step}/{key[:12]}", problem)
            return None
        self.hits.append(step)
        _touch(p / DONE)
        return p

    def has(self, step: str, key: str) -> bool:
        """Whether a finished entry of ``step``/``key`` is there (``get`` checks its content)."""
        return not self.force and (self.path(step, key) / DONE).exists()

    def adopt(self, step: str, key: str) -> None:
        """Take the entry of ``step``/``key`` as built by this build (another process built it:
        a Ray task): ``get`` returns it even under ``force``."""
        self._adopted.add((step, key))

    def adopted(self, step: str, key: str) -> bool:
        return (step, key) in self._adopted

    def quarantine(self, entry: Path, name: str, problem: str) -> Path:
        """Move a corrupt entry to ``_quarantine/`` and say so in one line; return where it went."""
        dest = self.root / QUARANTINE / f"{name.replace('/', '_')}-{int(time.time())}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest = Path(tempfile.mkdtemp(prefix=dest.name + "-", dir=dest.parent))
        os.replace(entry, dest / "entry")
        self.corrupt.append(f"{name}: {problem}")
        log.warning("cache entry %s is corrupt (%s); moved to %s and built again", name, problem, dest)
        return dest

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
        if final.exists():
            self._replacing.add(work)
        return work

    def commit(self, work: Path, step: str, key: str) -> Path:
        """Make ``work`` the finished entry of ``step``/``key`` (its files hashed into ``_done.json``
        and made read-only; an entry there when ``work`` began is replaced whole, one another writer
        committed since stands) and return the entry's path."""
        final = self.path(step, key)
        seconds = time.time() - self._started.pop(work, time.time())
        _read_only(work)
        done = {"step": step, "key": key, "seconds": seconds, "files": content_record(work)}
        (work / DONE).write_text(json.dumps(done, indent=1, sort_keys=True))
        if work in self._replacing:
            self._replacing.discard(work)
            _replace(work, final)
        else:
            self._install(work, final)
        self.misses.append(step)
        return final

    def _install(self, work: Path, final: Path) -> None:
        """Rename ``work`` to ``final``; when another writer got there first, keep its entry if it
        is sound (replace it whole if not) and drop ``work``."""
        try:
            os.replace(work, final)
        except OSError:
            if not final.exists():
                raise
            if entry_problem(final) is not None:
                _replace(work, final)
                return
            log.debug("cache entry %s was committed by another writer; keeping it", final)
            self.discard(work)

    def fail(self, work: Path, step: str, key: str) -> Path:
        """Keep a failed step's work dir under ``_failed/`` for inspection."""
        t0 = self._started.pop(work, time.time())
        self._replacing.discard(work)
        failed = self.root / FAILED / f"{step.replace('/', '_')}-{key[:12]}-{int(t0)}"
        failed.parent.mkdir(parents=True, exist_ok=True)
        os.replace(work, failed)
        return failed

    def discard(self, work: Path) -> None:
        """Drop a work dir whose result must not be reused."""
        self._started.pop(work, None)
        self._replacing.discard(work)
        remove_tree(work)

    def failed_dir(self) -> Path:
        return self.root / FAILED

    # -- the whole cache: verify, prune -----------------------------------------------------------

    def entries(self) -> list[Entry]:
        """Every finished entry (the side folders ``_failed``, ``_quarantine`` aside)."""
        found = []
        for done in sorted(self.root.rglob(DONE)):
            entry = done.parent
            rel = entry.relative_to(self.root).parts
            if len(rel) < 2 or rel[0] in SIDE_DIRS or any(part.startswith(".") for part in rel):
                continue
            found.append(_describe(entry, "/".join(rel[:-1]), rel[-1]))
        return found

    def verify_all(self) -> tuple[list[Entry], list[str], list[Entry]]:
        """Check every entry; quarantine the corrupt ones. ``(sound entries, ["step/key: problem"],
        entries without content hashes)`` (the last are built again on their next use)."""
        sound, bad, unrecorded = [], [], []
        for entry in self.entries():
            problem = entry_problem(entry.path)
            if problem in (None, UNRECORDED):
                (sound if problem is None else unrecorded).append(entry)
                continue
            name = f"{entry.step}/{entry.key[:12]}"
            self.quarantine(entry.path, name, problem)
            bad.append(f"{name}: {problem}")
        return sound, bad, unrecorded

    def prune(self, max_bytes: int | None = None, older_than_s: float | None = None,
              keep: set = frozenset(), now: float | None = None) -> list[Entry]:
        """Remove entries, least recently used first: those unused for ``older_than_s``, then more
        until the cache holds at most ``max_bytes``. An entry holding a file whose sha256 is in
        ``keep`` stays. Failed and quarantined work dirs go first. Returns what was removed."""
        now = time.time() if now is None else now
        candidates = sorted(self._side_entries() + self.entries(), key=lambda e: e.used)
        total = sum(e.bytes for e in candidates)
        removed = []
        for e in candidates:
            old = older_than_s is not None and now - e.used > older_than_s
            big = max_bytes is not None and total > max_bytes
            if (old or big) and not (e.hashes & keep):
                remove_tree(e.path)
                total -= e.bytes
                removed.append(e)
        return removed

    def _side_entries(self) -> list[Entry]:
        """Failed and quarantined work dirs, as entries nothing is kept for."""
        out = []
        for side in SIDE_DIRS:
            folder = self.root / side
            for path in sorted(folder.iterdir()) if folder.is_dir() else []:
                out.append(Entry(side, path.name, path, _tree_bytes(path), path.stat().st_mtime))
        return out


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _describe(entry: Path, step: str, key: str) -> Entry:
    try:
        recorded = json.loads((entry / DONE).read_text()).get("files") or {}
        hashes = {f["sha256"] for f in recorded.values()}
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        hashes = set()
    return Entry(step, key, entry, _tree_bytes(entry), (entry / DONE).stat().st_mtime, hashes)


def _replace(work: Path, final: Path) -> None:
    """Rename ``work`` to ``final``, replacing an entry there whole."""
    if not final.exists():
        os.replace(work, final)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{final.name[:12]}-old-", dir=final.parent))
    os.replace(final, old / "entry")
    os.replace(work, final)
    remove_tree(old)


def _touch(path: Path) -> None:
    """Record a use (the entry's ``_done.json`` mtime: what ``prune`` orders by)."""
    with contextlib.suppress(OSError):
        os.utime(path)
