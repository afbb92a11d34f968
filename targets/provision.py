"""Provisioning: put the agent and its runtime on a device that has no internet.

On the host, ``provision`` builds the agent wheel (``device_agent/`` is its own distribution) and
downloads numpy and onnxruntime wheels for the device's platform and Python (the target spec's
``runtime.python_version`` and ``runtime.glibc``); it pushes them through the target's transport,
creates a venv on the device and installs them there with ``pip install --no-index
--find-links``. The venv's interpreter is then recorded as the target's ``agent_python``
(``spec.write_setup``).

``setup_loopback`` prepares this machine to be its own SSH device (target ``local-ssh``): a key
pair, a host key, an ``authorized_keys`` file, a private ``sshd_config`` listening on 127.0.0.1
and the matching known_hosts entry, all under one folder. ``sshd_command`` says how to run that
sshd; ``start_sshd`` runs it (the test suite does the same).
"""
from __future__ import annotations

import getpass
import logging
import os
import posixpath
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from edgebuild.core.errors import DeviceError, TargetError

log = logging.getLogger(__name__)

AGENT_DIST = "edgebuild-agent"
WHEELS_DIR = "wheels"            # under the agent's root on the device
VENV_DIR = "venv"
OLDEST_GLIBC_MINOR = 17          # manylinux2014 = manylinux_2_17
_MOVE = ("import os, sys\ndest = sys.argv[-1]\nos.makedirs(dest, exist_ok=True)\n"
         "for path in sys.argv[1:-1]:\n    os.replace(path, os.path.join(dest, os.path.basename(path)))")


# ------------------------------------------------------------------------------ wheels

def agent_source_dir() -> Path:
    """The ``device_agent/`` source folder (with its own ``pyproject.toml``)."""
    import edgebuild.device_agent

    folder = Path(edgebuild.device_agent.__file__).resolve().parent
    if not (folder / "pyproject.toml").is_file():
        raise DeviceError(f"the agent sources in {folder} have no pyproject.toml (edgebuild is not "
                          f"installed from a source checkout); pass a wheelhouse holding an "
                          f"{AGENT_DIST} wheel")
    return folder


def runtime_requirements() -> list[str]:
    """The agent's ``runtime`` extra (numpy, onnxruntime), read from its ``pyproject.toml``."""
    try:
        import tomllib
    except ModuleNotFoundError:     # Python 3.10
        import tomli as tomllib
    project = tomllib.loads((agent_source_dir() / "pyproject.toml").read_text())["project"]
    return list(project["optional-dependencies"]["runtime"])


def _pip(args: list[str], what: str) -> str:
    command = [sys.executable, "-m", "pip", *args]
    log.info("running %s", " ".join(command))
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
    output = done.stdout.decode("utf-8", "replace")
    if done.returncode != 0:
        tail = " | ".join(output.strip().splitlines()[-3:])
        raise DeviceError(f"{what} failed (pip exit status {done.returncode}): {tail}")
    return output


def build_agent_wheel(dest) -> Path:
    """Build the agent wheel into ``dest`` (``pip wheel --no-deps ./device_agent``)."""
    import importlib.util

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    _pip(["wheel", "--no-deps", *isolation, "-w", str(dest), str(agent_source_dir())],
         "building the agent wheel")
    wheels = sorted(dest.glob("edgebuild_agent-*.whl"), key=lambda p: p.stat().st_mtime)
    if not wheels:
        raise DeviceError(f"pip built no {AGENT_DIST} wheel in {dest}")
    return wheels[-1]


def wheel_platforms(target) -> list[str]:
    """pip ``--platform`` tags for the target's wheels: every manylinux tag its glibc accepts.

    Empty for a ``native`` target (this machine's own platform). pip takes the given tags
    literally, so a glibc 2.36 board lists manylinux_2_36 down to manylinux_2_17 and manylinux2014.
    """
    if target.arch == "native":
        return []
    if target.runtime.glibc is None:
        raise TargetError(f"target {target.name}: set runtime.glibc (e.g. \"2.36\") so wheels for "
                          f"its {target.arch} platform can be chosen")
    major, minor = (int(x) for x in target.runtime.glibc.split("."))
    if major != 2 or minor < OLDEST_GLIBC_MINOR:
        raise TargetError(f"target {target.name}: runtime.glibc {target.runtime.glibc} is older than "
                          f"2.{OLDEST_GLIBC_MINOR}; no manylinux wheels exist for it")
    tags = [f"manylinux_2_{m}_{target.arch}" for m in range(minor, OLDEST_GLIBC_MINOR - 1, -1)]
    return tags + [f"manylinux2014_{target.arch}"]


def target_python(target) -> str:
    """The device's Python ``MAJOR.MINOR`` (this interpreter's for a ``native`` target)."""
    if target.runtime.python_version:
        return target.runtime.python_version
    if target.arch == "native":
        return f"{sys.version_info.major}.{sys.version_info.minor}"
    raise TargetError(f"target {target.name}: set runtime.python_version (e.g. \"3.11\") so wheels "
                      f"for its Python can be chosen")


def download_args(target, dest) -> list[str]:
    """Arguments of ``pip`` that download the runtime wheels for ``target`` into ``dest``."""
    args = ["download", "--only-binary=:all:", "-d", str(dest)]
    platforms = wheel_platforms(target)
    if platforms or target.runtime.python_version:
        for tag in platforms:
            args += ["--platform", tag]
        args += ["--python-version", target_python(target), "--implementation", "cp"]
    return args + runtime_requirements()


def download_runtime_wheels(target, dest) -> list[Path]:
    """Download numpy, onnxruntime and their dependencies as wheels for ``target``."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    _pip(download_args(target, dest), f"downloading the runtime wheels for {target.name}")
    return sorted(dest.glob("*.whl"))


# ------------------------------------------------------------------------- the device

_PROBE = "import platform; print(platform.python_version(), *platform.libc_ver())"


def board_platform(transport, python: str = "python3") -> dict:
    """The board's Python and glibc (``{"python": "3.11", "glibc": "2.36"}``; None: not glibc)."""
    output = _run(transport, [python, "-c", _PROBE], "asking the board's Python for its version",
                  f"check that {python} runs there")
    words = output.split()
    if len(words) not in (1, 3):
        raise DeviceError(f"unexpected answer from {python} on the board: {output.strip()[:200]!r}")
    glibc = words[2] if len(words) == 3 and words[1] == "glibc" else None
    return {"python": ".".join(words[0].split(".")[:2]),
            "glibc": ".".join(glibc.split(".")[:2]) if glibc else None}


def platform_mismatch(target, found: dict) -> str | None:
    """Why the board (``found``, from ``board_platform``) cannot use the wheels chosen for
    ``target``'s ``[runtime]`` python_version and glibc; None when it can."""
    spec = {"python": target.runtime.python_version, "glibc": target.runtime.glibc}
    if all(spec[k] is None or spec[k] == found[k] for k in spec):
        return None
    where = target.source or f"target {target.name}"
    return (f"the board of target {target.name} runs Python {found['python']} with glibc "
            f"{found['glibc'] or 'none'}, but {where} says Python {spec['python'] or 'any'} with "
            f"glibc {spec['glibc'] or 'any'}; set [runtime] python_version = "
            f"\"{found['python']}\" and glibc = \"{found['glibc']}\" in the spec, or run the OS it names")


def check_platform(target, transport, python: str = "python3") -> dict:
    """The board's platform (``board_platform``); ``TargetError`` when it differs from the spec."""
    found = board_platform(transport, python)
    problem = platform_mismatch(target, found)
    if problem:
        raise TargetError(problem)
    return found

def _run(transport, argv: list[str], what: str, hint: str = "", timeout_s: float = 1800.0) -> str:
    status, output = transport.run(argv, timeout_s=timeout_s)
    if status != 0:
        tail = " | ".join(output.strip().splitlines()[-3:])
        raise DeviceError(f"{what} on the device failed (exit status {status}): {tail}"
                          f"{'; ' + hint if hint else ''}")
    return output


def install_on_device(transport, wheels: list[Path], *, device_python: str = "python3",
                      with_runtime: bool = True) -> dict:
    """Upload ``wheels``, create ``<root>/venv`` and install the agent there, offline.

    Returns ``{"agent_python", "venv", "wheels", "version"}``.
    """
    agent = [w for w in wheels if w.name.startswith("edgebuild_agent-")]
    if not agent:
        raise DeviceError(f"no {AGENT_DIST} wheel among {[w.name for w in wheels]}; build it first")
    root = transport.device_root()
    wheel_dir, venv = posixpath.join(root, WHEELS_DIR), posixpath.join(root, VENV_DIR)
    uploaded = [transport.upload(w, w.name) for w in wheels]
    _run(transport, [device_python, "-c", _MOVE, *uploaded, wheel_dir], "moving the wheels",
         f"check that {device_python} runs there")
    _run(transport, [device_python, "-m", "venv", venv], "creating a venv",
         "install the OS package python3-venv on the device")
    python = posixpath.join(venv, "bin", "python")
    pip = [python, "-m", "pip", "install", "--no-index", "--find-links", wheel_dir,
           "--disable-pip-version-check", "--quiet", "--no-compile"]
    _run(transport, pip + [f"{AGENT_DIST}[runtime]" if with_runtime else AGENT_DIST],
         "installing the agent", "the wheels may not match the device's platform or Python")
    _run(transport, pip + ["--no-deps", "--force-reinstall",
                           posixpath.join(wheel_dir, agent[-1].name)], "reinstalling the agent")
    version = _run(transport, [python, "-m", "edgebuild.device_agent", "--version"],
                   "starting the installed agent").strip()
    return {"agent_python": python, "venv": venv, "wheels": [w.name for w in wheels],
            "version": version}


def provision(target, transport, work_dir, *, wheelhouse=None, device_python: str = "python3",
              with_runtime: bool = True) -> dict:
    """Build and download the wheels, install them on ``target``'s device, record the result.

    ``wheelhouse`` (a folder of wheels) replaces the download of numpy and onnxruntime.
    """
    from edgebuild.targets.spec import write_setup

    work_dir = Path(work_dir)
    if target.runtime.python_version or target.runtime.glibc:
        check_platform(target, transport, device_python)     # before minutes of downloads
    wheels = [build_agent_wheel(work_dir / "agent")]
    if wheelhouse is not None:
        wheels += sorted(p for p in Path(wheelhouse).glob("*.whl")
                         if not p.name.startswith("edgebuild_agent-"))
    elif with_runtime:
        wheels += download_runtime_wheels(target, work_dir / "runtime")
    result = install_on_device(transport, wheels, device_python=device_python,
                               with_runtime=with_runtime)
    result["setup_file"] = str(write_setup(target.name, {"agent_python": result["agent_python"]}))
    return result


# --------------------------------------------------------------------- loopback SSH

@dataclass
class Loopback:
    """Files of a private sshd on 127.0.0.1 and of the client that logs into it."""

    folder: Path
    port: int

    @property
    def config(self) -> Path:
        return self.folder / "sshd_config"

    @property
    def key(self) -> Path:
        return self.folder / "client_key"

    @property
    def known_hosts(self) -> Path:
        return self.folder / "known_hosts"

    @property
    def pid_file(self) -> Path:
        return self.folder / "sshd.pid"


def find_sshd() -> str | None:
    """Absolute path of OpenSSH's ``sshd`` (it must be started by absolute path), if installed."""
    found = shutil.which("sshd") or shutil.which("sshd", path="/usr/sbin:/usr/local/sbin:/sbin")
    return os.path.abspath(found) if found else None


def keygen(path: Path) -> str:
    """Make an ed25519 key pair at ``path`` (kept when it exists); return ``"type base64"``."""
    if not path.is_file():
        exe = shutil.which("ssh-keygen")
        if exe is None:
            raise DeviceError("ssh-keygen not found; install OpenSSH (apt-get install openssh-client)")
        subprocess.run([exe, "-q", "-t", "ed25519", "-N", "", "-C", "edgebuild", "-f", str(path)],
                       check=True, stdin=subprocess.DEVNULL)
    return " ".join(path.with_name(path.name + ".pub").read_text().split()[:2])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _configured_port(config: Path) -> int | None:
    if not config.is_file():
        return None
    match = re.search(r"^Port (\d+)$", config.read_text(), re.MULTILINE)
    return int(match.group(1)) if match else None


def setup_loopback(folder, port: int | None = None) -> Loopback:
    """Write (or refresh) a private sshd's files and the client's key and known_hosts in ``folder``.

    Keys are kept across calls; the port is ``port``, else the one configured before, else a free one.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    layout = Loopback(folder, port or _configured_port(folder / "sshd_config") or free_port())
    host_key = keygen(folder / "host_key")
    (folder / "authorized_keys").write_text(keygen(layout.key) + "\n")
    layout.config.write_text("\n".join([
        f"Port {layout.port}", "ListenAddress 127.0.0.1", f"HostKey {folder / 'host_key'}",
        f"PidFile {layout.pid_file}", f"AuthorizedKeysFile {folder / 'authorized_keys'}",
        "StrictModes no", "UsePAM no", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "Subsystem sftp internal-sftp", ""]))
    layout.known_hosts.write_text(f"[127.0.0.1]:{layout.port} {host_key}\n")
    return layout


def sshd_command(layout: Loopback, foreground: bool = False) -> list[str]:
    """The command that runs the loopback sshd (``-D -e``: in the foreground, logging to stderr)."""
    sshd = find_sshd()
    if sshd is None:
        raise DeviceError("sshd not found; install OpenSSH's server (apt-get install openssh-server)")
    return [sshd, *(["-D", "-e"] if foreground else []), "-f", str(layout.config)]


def wait_for_port(port: int, proc=None, timeout_s: float = 10.0) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port`` within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and (proc is None or proc.poll() is None):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def start_sshd(layout: Loopback, foreground: bool = False, log_file=None):
    """Start the loopback sshd; return its process (``foreground``) or None once it listens.

    Raises ``DeviceError`` when it does not listen within 10 s.
    """
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)   # privilege separation, as root
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(sshd_command(layout, foreground), stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL)
    finally:
        if log_file:
            out.close()
    if not wait_for_port(layout.port, proc if foreground else None):
        if foreground:
            proc.kill()
        raise DeviceError(f"sshd on 127.0.0.1:{layout.port} did not start; run "
                          f"{' '.join(sshd_command(layout, True))} to see why")
    if not foreground:
        proc.wait(timeout=10)      # the daemon has forked away; reap the parent
    return proc if foreground else None


def setup_local_ssh(target, folder, *, port: int | None = None, start: bool = False) -> dict:
    """Prepare ``target`` (``local-ssh``) to reach this machine over loopback SSH.

    Writes the loopback files under ``folder`` and records port, user, key, known_hosts and this
    interpreter as the agent's; starts the sshd when ``start`` and it is not listening yet.
    """
    from edgebuild.targets.spec import write_setup

    layout = setup_loopback(folder, port)
    values = {"host": "127.0.0.1", "port": layout.port, "user": getpass.getuser(),
              "key": str(layout.key), "known_hosts": str(layout.known_hosts),
              "agent_python": sys.executable}
    setup_file = write_setup(target.name, values)
    listening = wait_for_port(layout.port, timeout_s=0.3)
    if start and not listening:
        start_sshd(layout)
        listening = True
    return {"setup_file": str(setup_file), "connection": values, "listening": listening,
            "sshd_command": sshd_command(layout)}
