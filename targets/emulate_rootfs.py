"""The root filesystem of an emulated board: Debian for arm64, built once, cached, read-only.

``ensure_rootfs(release)`` runs ``debootstrap`` for a foreign architecture (the arm64 programs
it installs run through qemu-user, registered with binfmt_misc) into a temporary folder, adds the
board's login user and a mount point for each board's own files, removes what must differ per
board (SSH host keys) and renames the folder into the cache: a second start reuses it. Boards lay
their own writable layer over it (overlayfs), so the cached tree is never written after the build.

``check_host()`` says what this machine lacks to run arm64 programs, as one ``HostError``
(exit code 15) naming the package to install; ``enable_binfmt()`` mounts binfmt_misc and enables
qemu's entry, which a machine start does not keep.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from edgebuild.core.errors import DeviceError, HostError
from edgebuild.core.files import write_text_atomic

log = logging.getLogger(__name__)

BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
QEMU_PACKAGES = "qemu-user-static binfmt-support"
MARKER = ".edgebuild-rootfs.json"     # written last: a tree without it is not finished
BOARD_ETC = "etc/edgebuild-board"     # each board's sshd config, keys and cpuinfo are bound here
LOGIN_USER = "pi"


@dataclass(frozen=True)
class Release:
    """A Debian release for one architecture, with what a board needs installed."""

    suite: str = "bookworm"
    arch: str = "arm64"                 # Debian's name
    qemu: str = "aarch64"               # qemu-user's name
    mirror: str = "http://deb.debian.org/debian"
    packages: tuple = ("python3", "python3-venv", "openssh-server", "openssh-sftp-server")

    @property
    def key(self) -> str:
        return f"debian-{self.suite}-{self.arch}"


BOOKWORM_ARM64 = Release()


# ------------------------------------------------------------------------ the host

def qemu_binary(release: Release) -> str | None:
    """qemu-user's static interpreter for ``release``, if installed."""
    return shutil.which(f"qemu-{release.qemu}-static")


def check_host(release: Release = BOOKWORM_ARM64) -> None:
    """Raise ``HostError`` naming what to install when this host cannot run ``release``'s
    programs or build its root filesystem (root, qemu-user, binfmt_misc, debootstrap, iproute2)."""
    install = f"apt-get install {QEMU_PACKAGES} debootstrap"
    if os.geteuid() != 0:
        raise HostError("emulated boards need root (network namespaces, mounts, chroot); "
                        "run as root")
    if qemu_binary(release) is None:
        raise HostError(f"no qemu-user support on this host: qemu-{release.qemu}-static not found; "
                        f"install it ({install})")
    if shutil.which("update-binfmts") is None:
        raise HostError(f"no qemu-user support on this host: update-binfmts not found; install "
                        f"it ({install})")
    for tool, package in (("debootstrap", "debootstrap"), ("ip", "iproute2"), ("tc", "iproute2"),
                          ("unshare", "util-linux")):
        if shutil.which(tool) is None:
            raise HostError(f"{tool} not found; install it (apt-get install {package})")


def _run(argv: list[str], what: str, timeout_s: float = 60.0) -> str:
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise HostError(f"{what} failed: {err}") from None
    text = done.stdout.decode("utf-8", "replace")
    if done.returncode != 0:
        tail = " | ".join(text.strip().splitlines()[-3:])
        raise HostError(f"{what} failed (exit status {done.returncode}): {tail}")
    return text


def enable_binfmt(release: Release = BOOKWORM_ARM64) -> None:
    """Mount binfmt_misc and enable qemu's entry for ``release`` (needed after each machine
    start); raise ``HostError`` when the kernel has no binfmt_misc."""
    check_host(release)
    if not (BINFMT_DIR / "register").exists():
        try:
            subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)],
                           check=True, capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as err:
            raise HostError(f"no qemu-user support on this host: binfmt_misc cannot be mounted at "
                            f"{BINFMT_DIR} ({err}); load the kernel module (modprobe binfmt_misc) "
                            f"or use a kernel with CONFIG_BINFMT_MISC") from None
    entry = BINFMT_DIR / f"qemu-{release.qemu}"
    if not entry.exists() or "enabled" not in entry.read_text():
        _run(["update-binfmts", "--enable", f"qemu-{release.qemu}"],
             f"enabling qemu-{release.qemu} in binfmt_misc (install {QEMU_PACKAGES})")
    flags = re.search(r"^flags: *(\S*)", entry.read_text(), re.MULTILINE)
    if flags is None or "F" not in flags.group(1):
        raise HostError(f"binfmt_misc entry {entry} lacks the F (fix-binary) flag, so arm64 "
                        f"programs cannot run inside a chroot; reinstall {QEMU_PACKAGES}")


# ------------------------------------------------------------------------ the cache

def rootfs_dir(home, release: Release = BOOKWORM_ARM64) -> Path:
    """Where ``release``'s root filesystem is cached under ``home`` ($EDGEBUILD_HOME)."""
    return Path(home) / "emulate" / "rootfs" / release.key


def read_marker(folder) -> dict | None:
    """What a finished root filesystem records about itself (None when unfinished or absent)."""
    try:
        return json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def file_lock(path: Path):
    """Hold an exclusive lock on ``path`` (created) while the block runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def ensure_rootfs(home, release: Release = BOOKWORM_ARM64, log_file=None) -> Path:
    """The cached root filesystem of ``release``, built first when absent (minutes; debootstrap's
    output goes to ``log_file``, default ``<cache>/<release>.log``)."""
    final = rootfs_dir(home, release)
    log_file = log_file or final.with_name(final.name + ".log")
    if read_marker(final):
        return final
    with file_lock(final.with_name(final.name + ".lock")):
        if read_marker(final):                 # built meanwhile by another start
            return final
        enable_binfmt(release)
        for stale in [final, *final.parent.glob(final.name + ".partial-*")]:
            remove_tree(stale)
        work = final.with_name(f"{final.name}.partial-{os.getpid()}")
        started = time.monotonic()
        _debootstrap(release, work, log_file)
        _prepare(release, work)
        write_text_atomic(work / MARKER, json.dumps(
            {**versions(work), "suite": release.suite, "arch": release.arch,
             "packages": list(release.packages),
             "build_seconds": round(time.monotonic() - started, 1)}, indent=1) + "\n")
        os.replace(work, final)
        return final


def _debootstrap(release: Release, work: Path, log_file) -> None:
    """debootstrap in a private mount namespace: the mounts it makes vanish with it."""
    argv = ["unshare", "--mount", "--propagation", "private", "debootstrap", "--variant=minbase",
            f"--arch={release.arch}", f"--include={','.join(release.packages)}", release.suite,
            str(work), release.mirror]
    log.info("building the %s root filesystem: %s", release.key, " ".join(argv))
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL
    try:
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              timeout=3600, check=False)
    finally:
        if log_file:
            out.close()
    if done.returncode != 0:
        where = f"; see {log_file}" if log_file else ""
        raise DeviceError(f"debootstrap of Debian {release.suite} {release.arch} failed (exit "
                          f"status {done.returncode}){where}; it needs {release.mirror} (a Debian "
                          f"package mirror) and qemu-user")


def _prepare(release: Release, root: Path) -> None:
    """Add the login user and the per-board mount point; drop host keys and package lists."""
    # password "*": no password login, yet not a locked account (sshd refuses those)
    _run(["chroot", str(root), "/usr/sbin/useradd", "--create-home", "--shell", "/bin/bash",
          "--uid", "1000", "--password", "*", LOGIN_USER],
         f"adding user {LOGIN_USER} to the root filesystem", timeout_s=300)
    (root / BOARD_ETC).mkdir(parents=True, exist_ok=True)
    for key in (root / "etc" / "ssh").glob("ssh_host_*"):
        key.unlink()
    shutil.rmtree(root / "var" / "cache" / "apt" / "archives", ignore_errors=True)
    for lists in (root / "var" / "lib" / "apt" / "lists").glob("*_Packages"):
        lists.unlink()


def versions(root) -> dict:
    """Python and glibc versions of a Debian root filesystem, read from dpkg's status file."""
    status = (Path(root) / "var" / "lib" / "dpkg" / "status").read_text(errors="replace")
    found = {}
    for package, key in (("libc6", "glibc"), ("python3", "python")):
        match = re.search(rf"^Package: {package}\n(?:[^\n]+\n)*?Version: (\d+\.\d+)", status,
                          re.MULTILINE)
        found[key] = match.group(1) if match else None
    return found


# ------------------------------------------------------------------------ removal

def mounts_under(folder) -> list[str]:
    """Mount points at or below ``folder`` in this mount namespace."""
    folder = os.path.realpath(folder)
    points = []
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            point = line.split()[1].replace("\\040", " ")
            if point == folder or point.startswith(folder + os.sep):
                points.append(point)
    return points


def remove_tree(folder) -> None:
    """Delete ``folder`` unless something is mounted inside it (then refuse: rmtree would reach
    through a bind mount into the host)."""
    folder = Path(folder)
    if not folder.exists():
        return
    busy = mounts_under(folder)
    if busy:
        raise DeviceError(f"cannot remove {folder}: {busy[0]} is mounted inside it; unmount it "
                          f"(umount -R {busy[0]}) and retry")
    shutil.rmtree(folder)
