"""Emulated boards: a Raspberry Pi's OS, CPU and network on this machine, reached like the real one.

    board = start("rpi4")                 # builds/reuses the root filesystem, starts the board
    load_target(board.target)             # "rpi4-emu": a spec written for it, emulated = true
    stop("rpi4-emu")

    with running("rpi4") as board:        # stops it afterwards only if this call started it
        ...

A board is the cached Debian root filesystem (``emulate_rootfs``) with the board's own writable
layer over it (overlayfs: its "SD card", kept between starts unless reset), arm64 programs run by
qemu-user with the board's CPU model (``QEMU_CPU``) and a Pi-like ``/proc/cpuinfo`` bound over the
host's, and the board's own OpenSSH server as PID 1 of a private PID and mount namespace inside its
network namespace (``emulate_net``), on a link shaped like the board's Wi-Fi. Stopping it kills that
PID 1, which takes every process and mount of the board with it, then deletes the namespace.

The board profiles are registered in ``emulate_boards.boards`` (``rpi4``, ``rpi5``). Each started
board writes a target spec ``<name>.toml`` (default name ``<board>-emu``) into the user's spec folder
(``spec.user_specs_dir()``), with the board's host key pinned in the board's own known_hosts, so
``edgebuild device setup --target rpi4-emu`` and ``edgebuild all --target rpi4-emu`` take the real
board's path.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from edgebuild.core.errors import DeviceError, TargetError
from edgebuild.core.files import write_text_atomic
from edgebuild.core.paths import edgebuild_home
from edgebuild.targets import emulate_net as net
from edgebuild.targets import emulate_rootfs as rootfs
from edgebuild.targets.emulate_boards import Board, boards
from edgebuild.targets.emulate_net import Link

log = logging.getLogger(__name__)

SSH_PORT = 22
START_TIMEOUT_S = 60.0


# ------------------------------------------------------------------------ files of a board

@dataclass(frozen=True)
class BoardFiles:
    """Where a board named ``name`` keeps its files under ``home`` ($EDGEBUILD_HOME)."""

    home: Path
    name: str

    @property
    def folder(self) -> Path:
        return self.home / "emulate" / "boards" / self.name

    @property
    def etc(self) -> Path:             # bound read-only at rootfs.BOARD_ETC on the board
        return self.folder / "etc"

    @property
    def upper(self) -> Path:           # the board's own writes over the cached rootfs
        return self.folder / "disk" / "upper"

    @property
    def work(self) -> Path:
        return self.folder / "disk" / "work"

    @property
    def root(self) -> Path:            # the overlay's mount point (inside the board only)
        return self.folder / "root"

    @property
    def known_hosts(self) -> Path:
        return self.folder / "known_hosts"

    @property
    def state(self) -> Path:
        return self.folder / "state.json"

    @property
    def console(self) -> Path:
        return self.folder / "console.log"

    @property
    def client_key(self) -> Path:      # one login key for every emulated board of this home
        return self.home / "emulate" / "client_key"

    @property
    def spec(self) -> Path:
        from edgebuild.targets.spec import user_specs_dir
        return user_specs_dir() / f"{self.name}.toml"


@dataclass
class Running:
    """A started board: its name, profile, slot (addresses), runner process and target spec."""

    name: str
    board: str
    slot: int
    pid: int
    started_at: float
    rootfs: dict

    @property
    def link(self) -> Link:
        return Link(self.slot)

    @property
    def address(self) -> str:
        return self.link.board_addr

    @property
    def target(self) -> str:
        return self.name


# ------------------------------------------------------------------------ the board's sshd

def sshd_config(board: Board, link: Link) -> str:
    """The board's sshd configuration (paths as seen on the board)."""
    etc = "/" + rootfs.BOARD_ETC
    return "\n".join([
        f"Port {SSH_PORT}", f"ListenAddress {link.board_addr}",
        f"HostKey {etc}/ssh_host_ed25519_key", f"AuthorizedKeysFile {etc}/authorized_keys",
        "PidFile none", "StrictModes no", "UsePAM no", "UseDNS no", "PermitRootLogin no",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "Subsystem sftp internal-sftp", f"SetEnv QEMU_CPU={board.qemu_cpu}", ""])


def runner_script(files: BoardFiles, lower: Path) -> str:
    """Shell commands run as PID 1 of the board's mount and PID namespaces: mount the overlay,
    proc with the board's cpuinfo over the host's, sysfs (without the host's DMI), /dev, /run and
    the board's own files, then become its sshd."""
    q = lambda p: shlex.quote(str(p))           # noqa: E731
    root = files.root
    return "\n".join([
        f"mount -t overlay overlay -o lowerdir={q(lower)},upperdir={q(files.upper)},"
        f"workdir={q(files.work)} {q(root)}",
        f"mount -t proc proc {q(root / 'proc')}",
        f"mount --bind {q(files.etc / 'cpuinfo')} {q(root / 'proc' / 'cpuinfo')}",
        f"mount -t sysfs sysfs {q(root / 'sys')}",
        f"if [ -d {q(root / 'sys/class/dmi')} ]; then mount -t tmpfs tmpfs {q(root / 'sys/class/dmi')}; fi",
        f"mount --rbind /dev {q(root / 'dev')}",
        f"mount -t tmpfs -o mode=755 tmpfs {q(root / 'run')}",
        f"mkdir -p {q(root / 'run/sshd')}",
        f"mount --bind -o ro {q(files.etc)} {q(root / rootfs.BOARD_ETC)}",
        "exec env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \"QEMU_CPU=$QEMU_CPU\" "
        f"chroot {q(root)} /usr/sbin/sshd -D -e -f /{rootfs.BOARD_ETC}/sshd_config",
    ])


def runner_command(files: BoardFiles, link: Link, lower: Path) -> list[str]:
    """The board's process: in its network namespace, a private mount and PID namespace whose
    PID 1 (killed with the runner) runs ``runner_script``."""
    return ["ip", "netns", "exec", link.netns, "unshare", "--mount", "--pid", "--fork",
            "--kill-child", "--propagation", "private", "/bin/sh", "-ec",
            runner_script(files, lower)]


def _write_board_etc(board: Board, files: BoardFiles, link: Link) -> None:
    """sshd config, host key, authorized key and cpuinfo of the board; its known_hosts entry."""
    from edgebuild.targets.provision import keygen
    files.etc.mkdir(parents=True, exist_ok=True)
    os.chmod(files.folder, 0o700)
    host_key = keygen(files.etc / "ssh_host_ed25519_key")
    files.client_key.parent.mkdir(parents=True, exist_ok=True)
    client = keygen(files.client_key)
    for name, text in (("authorized_keys", client + "\n"), ("sshd_config", sshd_config(board, link)),
                       ("cpuinfo", board.cpuinfo())):
        os.chmod(write_text_atomic(files.etc / name, text), 0o644)   # read by the board's user
    write_text_atomic(files.known_hosts, f"{link.board_addr} {host_key}\n")


# ------------------------------------------------------------------------ start, stop, status

def _lock():
    home = edgebuild_home() / "emulate"
    return rootfs.file_lock(home / "boards.lock")


def read_state(name: str) -> Running | None:
    """The record of board ``name`` if it was started and not stopped since."""
    try:
        data = json.loads(BoardFiles(edgebuild_home(), name).state.read_text())
    except (OSError, ValueError):
        return None
    return Running(**data)


def _alive(run: Running) -> bool:
    """Whether the board's runner still runs (a live process inside the board's namespace)."""
    return net.in_namespace(run.pid, run.link)


def ssh_ready(address: str, timeout_s: float, proc=None) -> bool:
    """Whether an SSH server answers with its banner at ``address`` within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and (proc is None or proc.poll() is None):
        try:
            with socket.create_connection((address, SSH_PORT), timeout=2.0) as sock:
                sock.settimeout(5.0)
                if sock.recv(4).startswith(b"SSH-"):
                    return True
        except OSError:
            time.sleep(0.2)
    return False


def prepare_host(board_name: str = "rpi4") -> None:
    """Check that this host can run the board and enable qemu-user in binfmt_misc; one-line
    ``HostError`` (exit code 15) naming what to install when it cannot."""
    rootfs.enable_binfmt(boards.get(board_name).release)


def rootfs_cached(board_name: str = "rpi4") -> bool:
    """Whether board ``board_name``'s root filesystem is built (else ``start`` takes minutes)."""
    release = boards.get(board_name).release
    return rootfs.read_marker(rootfs.rootfs_dir(edgebuild_home(), release)) is not None


def start(board_name: str = "rpi4", name: str | None = None, *, fresh: bool = False,
          build_log=None) -> Running:
    """Start emulated board ``board_name`` as target ``name`` (default ``<board>-emu``).

    Builds the root filesystem first when it is not cached (minutes). ``fresh`` discards the
    board's own writes (its venv, stages) first. Returns the running board; a board already
    running is returned as it is.
    """
    board = boards.get(board_name)
    name = name or f"{board.name}-emu"
    _check_name(name)
    prepare_host(board.name)
    running_now = read_state(name)
    if running_now is not None and _alive(running_now):
        return running_now
    home = edgebuild_home()
    files = BoardFiles(home, name)
    lower = rootfs.ensure_rootfs(home, board.release, log_file=build_log)
    with _lock():
        if running_now is not None:
            _teardown(running_now)
        link = Link(_slot_for(name))
        _prepare_disk(files, fresh)
        _write_board_etc(board, files, link)
        net.run_commands(net.link_down_commands(link), check=False)
        net.run_commands(net.link_up_commands(link, board.wifi, board.wifi))
        try:
            run = _launch(board, files, link, lower)
        except BaseException:
            net.run_commands(net.link_down_commands(link), check=False)
            raise
    _write_spec(board, files, run)
    return run


def _check_name(name: str) -> None:
    from edgebuild.targets.spec import BUILTIN, valid_name
    if not valid_name(name) or name in BUILTIN:
        raise TargetError(f"emulated board name {name!r} must be lowercase letters, digits, '.', "
                          f"'_' or '-' and not a built-in target ({', '.join(BUILTIN)})")


def _slot_for(name: str) -> int:
    others = {}
    for path in (edgebuild_home() / "emulate" / "boards").glob("*/state.json"):
        other = read_state(path.parent.name)
        if other is not None and other.name != name:
            others[other.slot] = other.name
    return net.free_slot(set(others))


def _prepare_disk(files: BoardFiles, fresh: bool) -> None:
    if fresh:
        rootfs.remove_tree(files.folder / "disk")
    for folder in (files.upper, files.work, files.root):
        folder.mkdir(parents=True, exist_ok=True)


def _launch(board: Board, files: BoardFiles, link: Link, lower: Path) -> Running:
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "QEMU_CPU": board.qemu_cpu}
    with open(files.console, "ab") as console:
        proc = subprocess.Popen(runner_command(files, link, lower), stdout=console,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    run = Running(name=files.name, board=board.name, slot=link.slot, pid=proc.pid,
                  started_at=time.time(), rootfs=rootfs.read_marker(lower) or {})
    write_text_atomic(files.state, json.dumps(dataclasses.asdict(run), indent=1) + "\n")
    if not ssh_ready(link.board_addr, START_TIMEOUT_S, proc):
        _teardown(run)
        tail = " | ".join(files.console.read_text(errors="replace").strip().splitlines()[-3:])
        raise DeviceError(f"emulated board {files.name} did not start its sshd on "
                          f"{link.board_addr}:{SSH_PORT} within {START_TIMEOUT_S:g} s: "
                          f"{tail or '(no output)'}; see {files.console}")
    return run


def _write_spec(board: Board, files: BoardFiles, run: Running) -> Path:
    from edgebuild.targets.spec import dump_target
    target = emulated_target(board, files, run)
    header = (f"Emulated {board.model} (edgebuild device emulate start {board.name} --name "
              f"{files.name}):\nqemu-user {board.qemu_cpu} on this host, Debian {board.release.suite} "
              f"{board.release.arch}, sshd in network namespace {run.link.netns} behind a "
              f"{board.wifi.rate_mbit:g} Mbit/s tbf link.\nWritten at each start, removed at stop. "
              f"Latency measured here is the emulator's, never the board's.")
    return write_text_atomic(files.spec, dump_target(target, header))


def emulated_target(board: Board, files: BoardFiles, run: Running):
    """The target spec of a running board: its real board's spec, emulated, reached over SSH."""
    from edgebuild.targets.spec import Connection, load_target
    real = load_target(board.spec)
    threads = min(real.runtime.threads or board.cores, os.cpu_count() or 1)
    connection = Connection(transport="ssh", host=run.address, user=rootfs.LOGIN_USER,
                            port=SSH_PORT, key=str(files.client_key),
                            known_hosts=str(files.known_hosts), agent_python="python3",
                            root=real.connection.root, connect_timeout_s=30.0, retries=2,
                            timeout_s=7200.0)
    # Timing runs the real board's shapes once each: repeats would time the emulator more closely.
    timing = dataclasses.replace(real.timing, warmup=0, repeats=1)
    return dataclasses.replace(
        real, name=files.name, emulated=True, on_unreachable="fail", connection=connection,
        runtime=dataclasses.replace(real.runtime, threads=threads), timing=timing, source=None,
        description=f"Emulated {real.description} (qemu-user {board.qemu_cpu})").validate()


def stop(name: str, *, reset: bool = False) -> bool:
    """Stop board ``name``: its processes, mounts, namespace, veth pair and target spec go.
    ``reset`` also discards its disk. Returns whether it was running."""
    files = BoardFiles(edgebuild_home(), name)
    with _lock():
        run = read_state(name)
        was_running = run is not None and _alive(run)
        if run is not None:
            _teardown(run)
        files.spec.unlink(missing_ok=True)
        if reset:
            rootfs.remove_tree(files.folder)
    return was_running


def _teardown(run: Running) -> None:
    try:
        if _alive(run):
            os.kill(run.pid, signal.SIGTERM)
            _wait_gone(run.pid, 10.0)
    except ProcessLookupError:
        pass
    net.kill_namespace(run.link)
    net.run_commands(net.link_down_commands(run.link), check=False)
    BoardFiles(edgebuild_home(), run.name).state.unlink(missing_ok=True)


def _wait_gone(pid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:              # not our child: poll its /proc entry
            if not Path(f"/proc/{pid}").exists():
                return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


def status(name: str) -> dict:
    """What is known of board ``name``: running or not, address, target, root filesystem."""
    run = read_state(name)
    files = BoardFiles(edgebuild_home(), name)
    if run is None or not _alive(run):
        return {"name": name, "running": False, "disk": files.upper.is_dir()}
    return {"name": name, "running": True, "board": run.board, "address": run.address,
            "netns": run.link.netns, "pid": run.pid, "target": run.target,
            "spec": str(files.spec), "ssh": ssh_ready(run.address, 5.0), "rootfs": run.rootfs,
            "uptime_s": round(time.time() - run.started_at, 1)}


def running_boards() -> list[str]:
    """Names of the boards started and not stopped since."""
    folder = edgebuild_home() / "emulate" / "boards"
    names = sorted(p.parent.name for p in folder.glob("*/state.json"))
    return [n for n in names if (r := read_state(n)) is not None and _alive(r)]


@contextlib.contextmanager
def running(board_name: str = "rpi4", name: str | None = None, **kwargs):
    """Yield a running board (``start``); stop it on exit when this call started it."""
    name = name or f"{boards.get(board_name).name}-emu"
    before = read_state(name)
    started = before is None or not _alive(before)
    run = start(board_name, name, **kwargs)
    try:
        yield run
    finally:
        if started:
            stop(name)
