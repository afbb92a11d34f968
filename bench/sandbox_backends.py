"""The code sandbox's backends: bubblewrap (isolating) and the plain subprocess (opt-in only).

See ``edgebuild.bench.sandbox`` for what each guarantees and how a backend is chosen.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from edgebuild.bench.sandbox import NOBODY, PROGRAM, SAFE_PATH, Backend, Job, Launch

# What the sandbox sees of the system, read-only: the interpreter, its standard library and the
# shared libraries it loads. Nothing else of the host (no /home, /root, /work, /var, host /tmp).
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
SYSTEM_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime")
INSIDE_TMP = "/tmp"
INSIDE_ENV = {"PATH": "/usr/bin:/bin", "HOME": INSIDE_TMP, "TMPDIR": INSIDE_TMP, "LANG": "C.UTF-8"}


class Bubblewrap(Backend):
    """bubblewrap: read-only system view, private tmpfs ``/tmp``, no network, nobody inside."""

    name = "bwrap"
    isolated = True

    def missing(self) -> str:
        if shutil.which("bwrap", path=SAFE_PATH) is None:
            return "bwrap is not installed"
        return ""

    def launch(self, job: Job) -> Launch:
        read_end, write_end = os.pipe()
        program = f"{INSIDE_TMP}/{PROGRAM}"
        argv = [shutil.which("bwrap", path=SAFE_PATH),
                "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
                "--new-session", "--uid", str(NOBODY), "--gid", str(NOBODY), "--hostname", "sandbox",
                "--info-fd", str(write_end),
                *system_view(job.interpreter),
                "--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
                "--size", str(job.limits.disk_mb * 1024 * 1024), "--tmpfs", INSIDE_TMP,
                "--ro-bind", str(job.work / PROGRAM), program,
                "--remount-ro", "/", "--chdir", INSIDE_TMP, "--clearenv",
                *[arg for key, value in INSIDE_ENV.items() for arg in ("--setenv", key, value)],
                "--", *job.python(program)]
        return Launch(argv, "/", {"PATH": SAFE_PATH}, job.uid, (write_end,), read_end)


def system_view(interpreter: str) -> list[str]:
    """bubblewrap arguments that show the system read-only: the system dirs (symlinks kept as
    symlinks), the dynamic linker's files, and the interpreter's prefix when it lies elsewhere."""
    args: list[str] = []
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for path in SYSTEM_FILES:
        args += ["--ro-bind-try", path, path]
    prefix = Path(interpreter).parent.parent
    if not any(prefix == Path(d) or Path(d) in prefix.parents for d in SYSTEM_DIRS):
        args += ["--ro-bind", str(prefix), str(prefix)]
    return args


class PlainSubprocess(Backend):
    """The interpreter in a temp dir: limits, timeout and a stripped environment only."""

    name = "subprocess"
    isolated = False

    def missing(self) -> str:
        return ""

    def launch(self, job: Job) -> Launch:
        env = {"PATH": SAFE_PATH, "HOME": str(job.work), "TMPDIR": str(job.work), "LANG": "C.UTF-8"}
        return Launch(job.python(PROGRAM), str(job.work), env, job.uid)
