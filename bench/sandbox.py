"""Run one untrusted Python program (generated code and its tests) in a contained subprocess.

Generated code is never run in-process. Each program gets:

- a fresh temp dir as cwd, ``HOME`` and ``TMPDIR``, deleted afterwards; a stripped environment;
  stdin closed; stdout/stderr written to files outside that dir and read back truncated;
- ``python -I -S -B`` (isolated mode: no site-packages, no user site, no ``PYTHON*`` variables);
- rlimits set before the program starts (``RLIMIT_CPU``, ``RLIMIT_AS``, ``RLIMIT_FSIZE``,
  ``RLIMIT_NPROC``, ``RLIMIT_NOFILE``, ``RLIMIT_CORE``) by a small bootstrap that runs as the
  first code of the sandboxed interpreter. ``preexec_fn`` is not used: it is unsafe in a parent
  with threads (the evaluator runs torch threads and a worker pool), and limits set in the child
  itself are just as binding: a non-root process cannot raise its hard limits again;
- a new session (``start_new_session=True``); on timeout the whole process group is killed;
- when the OS allows it (probed once per process), ``unshare --user --net --pid --fork``: no
  network (a network namespace with only a down loopback), and a PID namespace whose processes
  all die with it, so nothing outlives the run even if it leaves the process group;
- when the parent runs as root, the program runs as ``nobody`` (uid 65534): root ignores
  ``RLIMIT_NPROC``, and the drop keeps the program from writing files it does not own (every
  path outside its temp dir, except world-writable ones such as ``/tmp``).

The bootstrap forks once: the program runs in the child (as a module named ``__candidate__``,
not ``__main__``), the parent waits and reports how it ended. This keeps the program from being
PID 1 of its namespace (which would ignore ``SIGXCPU`` and self-sent signals). A program
*passes* when it runs to its end: any exception, ``SystemExit`` included, fails it, as in the
HumanEval reference harness.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

STATUSES = ("passed", "failed", "timeout", "killed", "error")
NOBODY = 65534
PROGRAM = "program.py"
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
UNSHARE_FLAGS = (("--user", "--net", "--pid", "--fork", "--kill-child"),
                 ("--user", "--net", "--pid", "--fork"),
                 ("--user", "--net"))
SETUP_EXIT = 125         # the bootstrap could not set the limits or fork (literal in BOOTSTRAP)
SIGNAL_EXIT = 128        # the bootstrap exits SIGNAL_EXIT + n when the program died of signal n

# Runs as ``python -I -S -B -c BOOTSTRAP LIMITS_JSON program.py`` inside the sandbox.
BOOTSTRAP = """\
import json, os, resource, runpy, sys, traceback
try:
    for name, value in json.loads(sys.argv[1]):
        kind = getattr(resource, name)
        hard = resource.getrlimit(kind)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(kind, (value, value))
    path = sys.argv[2]
    sys.argv = [path]
    pid = os.fork()
except BaseException:
    traceback.print_exc()
    os._exit(125)
if pid == 0:
    code = 0
    try:
        runpy.run_path(path, run_name="__candidate__")
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
    os._exit(code)
status = os.waitpid(pid, 0)[1]
code = os.waitstatus_to_exitcode(status)
os._exit(code if code >= 0 else 128 - code)
"""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one run. ``cpu_s`` None: the wall-clock timeout rounded up, plus 1."""

    timeout_s: float = 10.0
    cpu_s: int | None = None
    memory_mb: int = 512
    file_mb: int = 16
    nproc: int = 8
    nofile: int = 64
    output_bytes: int = 4096

    def rlimits(self) -> list[tuple[str, int]]:
        """``[(resource name, soft = hard value)]`` for the bootstrap."""
        cpu = self.cpu_s if self.cpu_s is not None else math.ceil(self.timeout_s) + 1
        mib = 1024 * 1024
        return [("RLIMIT_CPU", cpu), ("RLIMIT_AS", self.memory_mb * mib),
                ("RLIMIT_FSIZE", self.file_mb * mib), ("RLIMIT_NPROC", self.nproc),
                ("RLIMIT_NOFILE", self.nofile), ("RLIMIT_CORE", 0)]


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class SandboxResult:
    """How one program ended.

    ``status``: ``passed`` (ran to its end), ``failed`` (raised or exited non-zero),
    ``timeout`` (killed at the wall-clock limit), ``killed`` (died of a signal, e.g. the CPU
    limit), ``error`` (the sandbox could not run it). ``stderr``/``stdout`` are the last
    ``Limits.output_bytes`` of each. ``note`` says which isolation was unavailable, if any.
    """

    passed: bool
    status: str
    returncode: int | None
    seconds: float
    stderr: str
    network_isolated: bool
    stdout: str = ""
    note: str = ""

    def to_dict(self) -> dict:
        """A JSON-serialisable dict."""
        return asdict(self)


@dataclass(frozen=True)
class Isolation:
    """What this machine allows, probed once: interpreter, user, namespaces."""

    interpreter: str | None
    prefix: tuple[str, ...]
    uid: int | None
    network_isolated: bool
    note: str

    def popen_user(self) -> dict:
        """``subprocess.Popen`` keyword arguments that switch to the sandbox user."""
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.uid, "extra_groups": []}


# ----------------------------------------------------------------------------- probing


def _interpreters() -> list[str]:
    """Candidate interpreters: this one first, then the system's ``python3``."""
    found = [sys.executable, os.path.realpath(sys.executable),
             getattr(sys, "_base_executable", ""), shutil.which("python3", path=SAFE_PATH)]
    return [path for path in dict.fromkeys(found) if path and os.path.isfile(path)]


def _runs(command: list[str], uid: int | None) -> bool:
    """True when ``command`` exits 0 as ``uid`` from ``/`` within 20 s."""
    user = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
    try:
        done = subprocess.run(command, cwd="/", env={"PATH": SAFE_PATH}, timeout=20,
                              stdin=subprocess.DEVNULL, capture_output=True, **user)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


@functools.lru_cache(maxsize=None)
def isolation() -> Isolation:
    """Probe (once per process) the strongest isolation that works on this machine."""
    uid = NOBODY if os.geteuid() == 0 else None
    unshare = shutil.which("unshare", path=SAFE_PATH)
    prefixes = [(unshare, *flags) for flags in UNSHARE_FLAGS] if unshare else []
    for interpreter in _interpreters():
        check = [interpreter, "-I", "-S", "-B", "-c", "import resource, runpy"]
        for prefix in prefixes:
            if _runs([*prefix, *check], uid):
                note = "" if "--pid" in prefix else "no PID namespace (unshare --pid failed)"
                return Isolation(interpreter, prefix, uid, True, note)
        if _runs(check, uid):
            why = "unshare not found" if not unshare else "unshare --user --net failed"
            log.warning("code sandbox without network isolation: %s", why)
            return Isolation(interpreter, (), uid, False, f"network not isolated: {why}")
    who = "uid 65534" if uid is not None else "the current user"
    return Isolation(None, (), uid, False, f"no Python interpreter runs as {who}")


# ----------------------------------------------------------------------------- running


def run_program(source: str, limits: Limits = DEFAULT_LIMITS) -> SandboxResult:
    """Run ``source`` as a Python program in a fresh sandbox and report how it ended."""
    iso = isolation()
    if iso.interpreter is None:
        return SandboxResult(False, "error", None, 0.0, iso.note, False, note=iso.note)
    root = Path(tempfile.mkdtemp(prefix="edgebuild-sandbox-"))
    try:
        work = _prepare(root, source, iso.uid)
        return _execute(root, work, iso, limits)
    except OSError as err:
        return SandboxResult(False, "error", None, 0.0, f"sandbox set-up failed: {err}",
                             iso.network_isolated, note=iso.note)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_programs(sources: list[str], limits: Limits = DEFAULT_LIMITS,
                 workers: int | None = None) -> list[SandboxResult]:
    """``run_program`` for each source, ``workers`` at a time (default: the CPU count, max 4).

    Threads only wait here: each program runs in its own sandboxed subprocess.
    """
    if not sources:
        return []
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=min(workers, len(sources))) as pool:
        return list(pool.map(lambda source: run_program(source, limits), sources))


def _prepare(root: Path, source: str, uid: int | None) -> Path:
    """``root`` (searchable only) holding ``work/`` (the program's own dir) with the program."""
    root.chmod(0o711)
    work = root / "work"
    work.mkdir(mode=0o700)
    (work / PROGRAM).write_text(source, encoding="utf-8")
    if uid is not None:
        os.chown(work, uid, uid)
        os.chown(work / PROGRAM, uid, uid)
    return work


def _execute(root: Path, work: Path, iso: Isolation, limits: Limits) -> SandboxResult:
    """Start the program, wait up to the timeout, kill its process group, read its output."""
    command = [*iso.prefix, iso.interpreter, "-I", "-S", "-B", "-c", BOOTSTRAP,
               json.dumps(limits.rlimits()), PROGRAM]
    env = {"PATH": SAFE_PATH, "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8"}
    with open(root / "stdout", "w+b") as out, open(root / "stderr", "w+b") as err:
        start = time.monotonic()
        proc = subprocess.Popen(command, cwd=work, env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, start_new_session=True, close_fds=True,
                                **iso.popen_user())
        timed_out = False
        try:
            proc.wait(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(proc.pid)
            returncode = proc.wait()
        seconds = time.monotonic() - start
        stdout, stderr = _tail(out, limits.output_bytes), _tail(err, limits.output_bytes)
    status = "timeout" if timed_out else _status(returncode)
    return SandboxResult(status == "passed", status, returncode, seconds, stderr,
                         iso.network_isolated, stdout, iso.note)


def _status(returncode: int) -> str:
    """``passed`` / ``failed`` / ``killed`` / ``error`` from the bootstrap's exit code."""
    if returncode == 0:
        return "passed"
    if returncode == SETUP_EXIT:
        return "error"
    if returncode < 0 or returncode > SIGNAL_EXIT:
        return "killed"
    return "failed"


def _kill_group(pgid: int) -> None:
    """SIGKILL every process left in the group (the program's session)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(stream, limit: int) -> str:
    """The last ``limit`` bytes written to ``stream``, decoded leniently."""
    size = stream.seek(0, os.SEEK_END)
    stream.seek(max(0, size - limit))
    return stream.read().decode("utf-8", errors="replace")
