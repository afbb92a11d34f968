"""Run one untrusted Python program (generated code and its tests) in a contained subprocess.

Generated code is never run in-process, and by default never without isolation. A *backend*
(registry ``backends``) starts the interpreter; this module prepares the program, applies the
limits, waits, kills and reports. Backends:

- ``bwrap`` (bubblewrap, Debian package ``bubblewrap``), the isolating one. The program sees a
  read-only view of the system (``/usr``, the library dirs, the dynamic linker's files, the
  interpreter's own prefix; nothing of ``/home``, ``/root``, ``/work`` or the host's ``/tmp``),
  ``/tmp`` as its only writable place (a private tmpfs of ``Limits.disk_mb``, gone when it ends,
  also its cwd, ``HOME`` and ``TMPDIR``), no network (a network namespace with only loopback),
  its own PID, IPC and UTS namespaces (it can signal nothing outside), no capabilities and no
  nested user namespaces, and runs as ``nobody`` (65534) inside: on the host it is a fresh uid
  of its own when edgebuild runs as root (bubblewrap is started as that user), else the caller's.
- ``subprocess``: the plain interpreter in a temp dir, without any of the above (only as a
  fresh uid of its own when edgebuild runs as root). Used only when the user opts in with
  ``--allow-unsandboxed-code`` (``build.allow_unsandboxed_code``), as the HumanEval reference
  harness requires an explicit opt-in before running generated code unsandboxed.

Without an isolating backend and without the opt-in, code benchmarks are unavailable and
``unavailable_reason()`` says why.

Every backend runs ``python -I -S -B`` (isolated mode: no site-packages, no user site, no
``PYTHON*`` variables) with a stripped environment and stdin closed; stdout/stderr go to files
outside the program's reach and are read back truncated. A small bootstrap, the first code of the
sandboxed interpreter, sets the rlimits (``RLIMIT_CPU``, ``RLIMIT_AS``, ``RLIMIT_FSIZE``,
``RLIMIT_NPROC``, ``RLIMIT_NOFILE``, ``RLIMIT_CORE``; a non-root process cannot raise its hard
limits again; ``preexec_fn`` is not used: it is unsafe in a parent with threads) and forks once:
the program runs in the child (as a module named ``__candidate__``, not ``__main__``), the parent
waits and reports how it ended. The launcher runs in a new session; at the wall-clock timeout its
whole process group is killed (bubblewrap's PID namespace dies with it). Run as root, each
program gets a host uid no account and no process has (``job_uid``): ``RLIMIT_NPROC`` then counts
only that program's processes, whatever else runs on the machine, and when it ends every process
of that uid is killed, also one that left the process group. A program *passes* when
it runs to its end: any exception, ``SystemExit`` included, fails it, as in the HumanEval
reference harness.
"""
from __future__ import annotations

import functools
import itertools
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
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from edgebuild.core.errors import ConfigError
from edgebuild.core.registry import Registry

log = logging.getLogger(__name__)

STATUSES = ("passed", "failed", "timeout", "killed", "error")
NOBODY = 65534
UID_BASE, UID_SPAN = 0x5EB00000, 1 << 20   # host uids of sandboxed runs (as root): no account's
PROGRAM = "program.py"
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
SETUP_EXIT = 125         # the bootstrap could not set the limits or fork (literal in BOOTSTRAP)
SIGNAL_EXIT = 128        # the bootstrap exits SIGNAL_EXIT + n when the program died of signal n
ISOLATING = ("bwrap",)   # isolating backends, in order of preference
UNSANDBOXED = "subprocess"
OPT_IN = "--allow-unsandboxed-code"
INSTALL_HINT = ("install bubblewrap (Debian package `bubblewrap`, `make setup` installs it) or "
                f"pass {OPT_IN} to run generated code without isolation")

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
    """Resource limits of one run. ``cpu_s`` None: the wall-clock timeout rounded up, plus 1.
    ``disk_mb`` caps the private ``/tmp`` of an isolating backend (``file_mb`` caps each file)."""

    timeout_s: float = 10.0
    cpu_s: int | None = None
    memory_mb: int = 512
    file_mb: int = 16
    nproc: int = 8
    nofile: int = 64
    output_bytes: int = 4096
    disk_mb: int = 64

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
    ``Limits.output_bytes`` of each. ``network_isolated``: the backend isolates (filesystem,
    network, user, processes); ``note`` says which backend ran it and, unsandboxed, why.
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
class Job:
    """One program to start: the interpreter, the host folder holding ``work/program.py`` (the
    folder is searchable by the sandbox user, ``work`` is theirs), the limits and the host uid
    it runs as (None: the caller's)."""

    interpreter: str
    root: Path
    limits: Limits
    uid: int | None = None

    @property
    def work(self) -> Path:
        return self.root / "work"

    def python(self, program: str) -> list[str]:
        """The interpreter's command line running the bootstrap on ``program``."""
        return [self.interpreter, "-I", "-S", "-B", "-c", BOOTSTRAP,
                json.dumps(self.limits.rlimits()), program]


@dataclass(frozen=True)
class Launch:
    """How to start a job: ``argv`` run from ``cwd`` with exactly ``env``, as ``uid`` (None: as
    the caller); ``pass_fds`` stay open in the child; ``started_fd`` (a read end) tells, once the
    launcher exits, whether the program was started at all (None: it always is)."""

    argv: list[str]
    cwd: str
    env: dict
    uid: int | None = None
    pass_fds: tuple = ()
    started_fd: int | None = None


class Backend(ABC):
    """A way of starting the sandboxed interpreter (see the module docstring)."""

    name: str = ""
    isolated: bool = False       # read-only system, private /tmp, no network, own namespaces, nobody

    @abstractmethod
    def missing(self) -> str:
        """What this machine lacks for this backend, as one line ('' when nothing); checked
        before a trial run."""

    @abstractmethod
    def launch(self, job: Job) -> Launch:
        """The command that runs ``job.python(...)`` in this backend."""

    def started(self, launch: Launch) -> bool:
        """Whether the launcher got as far as starting the program (read after it exited)."""
        if launch.started_fd is None:
            return True
        with os.fdopen(launch.started_fd, "rb") as info:
            return b"child-pid" in info.read()


backends: Registry = Registry("code sandbox backend", error=ConfigError)
backends.register_lazy("bwrap", "edgebuild.bench.sandbox_backends:Bubblewrap")
backends.register_lazy("subprocess", "edgebuild.bench.sandbox_backends:PlainSubprocess")


_serial = itertools.count()


def job_uid() -> int | None:
    """The host uid of one run: when we are root, one that no account and no process has, so
    that the run's processes are the only ones it counts and owns; else the caller's (None)."""
    if os.geteuid() != 0:
        return None
    busy = {uid for _, uid in _processes()}
    while True:
        uid = UID_BASE + (os.getpid() * 256 + next(_serial)) % UID_SPAN
        if uid not in busy:
            return uid


def _processes() -> list[tuple[int, int]]:
    """``(pid, uid)`` of every process on the machine."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                found.append((int(entry.name), entry.stat().st_uid))
            except FileNotFoundError:
                pass
    return found


def _running(pid: int) -> bool:
    """Whether ``pid`` still exists and is not a zombie (a zombie has exited: it runs no code and
    holds nothing but its process-table entry until its parent, often init, reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:][:1] not in ("Z", "X")


# ----------------------------------------------------------------------------- choosing


@dataclass(frozen=True)
class Choice:
    """The backend programs run in (None: none can), its interpreter, and a one-line reason
    (why generated code cannot run, or why it runs unsandboxed)."""

    backend: str | None
    interpreter: str | None = None
    reason: str = ""
    isolated: bool = False


_policy = {"allow_unsandboxed": False}


def allow_unsandboxed(allow: bool) -> None:
    """Set, for this process, whether generated code may run without isolation when no
    isolating backend works (the ``--allow-unsandboxed-code`` opt-in)."""
    _policy["allow_unsandboxed"] = bool(allow)


def choose(allow: bool | None = None) -> Choice:
    """The backend generated code runs in: the first isolating backend that works here; else,
    with the opt-in (``allow``, default: the process's setting), the plain subprocess."""
    allow = _policy["allow_unsandboxed"] if allow is None else allow
    reasons = []
    for name in ISOLATING:
        interpreter, reason = probe(name)
        if interpreter:
            return Choice(name, interpreter, isolated=True)
        reasons.append(f"{name}: {reason}")
    why = "; ".join(reasons)
    if not allow:
        return Choice(None, reason=f"generated code cannot run isolated here ({why}); {INSTALL_HINT}")
    interpreter, reason = probe(UNSANDBOXED)
    if not interpreter:
        return Choice(None, reason=f"generated code cannot run here ({why}; {UNSANDBOXED}: {reason})")
    return Choice(UNSANDBOXED, interpreter, f"unsandboxed ({OPT_IN}): {why}")


def unavailable_reason(allow: bool | None = None) -> str | None:
    """Why generated code cannot run here (None: it can), in one line."""
    choice = choose(allow)
    return None if choice.backend else choice.reason


@functools.lru_cache(maxsize=None)
def probe(name: str) -> tuple[str | None, str]:
    """``(interpreter, '')`` when backend ``name`` runs a trial program here, else
    ``(None, why not)``; probed once per process."""
    backend = backends.get(name)()
    missing = backend.missing()
    if missing:
        return None, missing
    why = "no Python interpreter ran"
    for interpreter in _interpreters():
        result = _run(backend, interpreter, "import resource, runpy\n", Limits(timeout_s=20.0))
        if result.passed:
            return interpreter, ""
        why = _last_line(result.stderr) or f"trial run {result.status} ({result.returncode})"
    log.warning("code sandbox backend %s does not work here: %s", name, why)
    return None, why


def _interpreters() -> list[str]:
    """Candidate interpreters: this one (resolved), then the system's ``python3``.
    Programs need only the standard library."""
    found = [os.path.realpath(sys.executable), os.path.realpath(getattr(sys, "_base_executable", "")),
             shutil.which("python3", path=SAFE_PATH)]
    return [path for path in dict.fromkeys(found) if path and os.path.isfile(path)]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


# ----------------------------------------------------------------------------- running


def run_program(source: str, limits: Limits = DEFAULT_LIMITS, choice: Choice | None = None) -> SandboxResult:
    """Run ``source`` as a Python program in a fresh sandbox and report how it ended."""
    choice = choice or choose()
    if choice.backend is None:
        return SandboxResult(False, "error", None, 0.0, choice.reason, False, note=choice.reason)
    result = _run(backends.get(choice.backend)(), choice.interpreter, source, limits)
    note = choice.reason or choice.backend
    return SandboxResult(**{**result.to_dict(), "note": note, "network_isolated": choice.isolated})


def run_programs(sources: list[str], limits: Limits = DEFAULT_LIMITS,
                 workers: int | None = None) -> list[SandboxResult]:
    """``run_program`` for each source, ``workers`` at a time (default: the CPU count, max 4).

    Threads only wait here: each program runs in its own sandboxed subprocess.
    """
    if not sources:
        return []
    choice = choose()
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=min(workers, len(sources))) as pool:
        return list(pool.map(lambda source: run_program(source, limits, choice), sources))


def _run(backend: Backend, interpreter: str, source: str, limits: Limits) -> SandboxResult:
    root = Path(tempfile.mkdtemp(prefix="edgebuild-sandbox-"))
    try:
        job = Job(interpreter, root, limits, job_uid())
        _prepare(job, source)
        return _execute(backend, job)
    except OSError as err:
        return SandboxResult(False, "error", None, 0.0, f"sandbox set-up failed: {err}",
                             backend.isolated)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _prepare(job: Job, source: str) -> None:
    """``root`` (searchable only) holding ``work/`` (the sandbox user's) with the program."""
    job.root.chmod(0o711)
    job.work.mkdir(mode=0o700)
    program = job.work / PROGRAM
    program.write_text(source, encoding="utf-8")
    program.chmod(0o644)
    if job.uid is not None:
        os.chown(job.work, job.uid, job.uid)
        os.chown(program, job.uid, job.uid)


def _execute(backend: Backend, job: Job) -> SandboxResult:
    """Start the program, wait up to the timeout, kill its process group, read its output."""
    launch = backend.launch(job)
    user = {} if launch.uid is None else {"user": launch.uid, "group": launch.uid, "extra_groups": []}
    with open(job.root / "stdout", "w+b") as out, open(job.root / "stderr", "w+b") as err:
        start = time.monotonic()
        try:
            proc = subprocess.Popen(launch.argv, cwd=launch.cwd, env=launch.env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, close_fds=True,
                                    pass_fds=launch.pass_fds, **user)
        except OSError:
            if launch.started_fd is not None:
                os.close(launch.started_fd)
            raise
        finally:
            for fd in launch.pass_fds:
                os.close(fd)
        timed_out = _wait(proc, job.limits.timeout_s, job.uid)
        seconds = time.monotonic() - start
        started = backend.started(launch)
        stdout, stderr = _tail(out, job.limits.output_bytes), _tail(err, job.limits.output_bytes)
    status = "timeout" if timed_out else _status(proc.returncode) if started else "error"
    return SandboxResult(status == "passed", status, proc.returncode, seconds, stderr,
                         backend.isolated, stdout, backend.name)


def _wait(proc: subprocess.Popen, timeout_s: float, uid: int | None) -> bool:
    """Wait for ``proc`` up to ``timeout_s``, then kill its process group and, with a uid of
    its own, every process of that uid; True on timeout."""
    try:
        proc.wait(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
    _kill_group(proc.pid)
    proc.wait()
    if uid is not None:
        _kill_uid(uid)
    return timed_out


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
    """SIGKILL every process left in the group (the launcher's session)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_uid(uid: int, seconds: float = 10.0) -> None:
    """SIGKILL every process of ``uid`` until none is left running (zombies have exited already;
    the container's init may take seconds to reap them)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pids = [pid for pid, owner in _processes() if owner == uid and _running(pid)]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    log.warning("processes of sandbox uid %d outlived the run after %.0f s", uid, seconds)


def _tail(stream, limit: int) -> str:
    """The last ``limit`` bytes written to ``stream``, decoded leniently."""
    size = stream.seek(0, os.SEEK_END)
    stream.seek(max(0, size - limit))
    return stream.read().decode("utf-8", errors="replace")


__all__ = ["Backend", "Choice", "DEFAULT_LIMITS", "Job", "Launch", "Limits", "SandboxResult",
           "allow_unsandboxed", "backends", "choose", "probe", "run_program", "run_programs",
           "unavailable_reason"]
