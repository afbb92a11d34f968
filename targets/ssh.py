"""The SSH transport: the agent as the remote command of an SSH session (paramiko).

Host keys are checked strictly against the spec's ``known_hosts`` file: an unknown key is refused
unless ``trust_on_first_use`` is set (then it is recorded there), and a changed key is always
refused. Login uses the spec's key file or the ssh-agent. Connecting retries with exponential
backoff on network errors, never on host-key or authentication failures. Uploads go over SFTP to
a temporary name, are checked with sha256 on the device, then renamed into ``<root>/incoming/``.
"""
from __future__ import annotations

import collections
import getpass
import logging
import os
import posixpath
import shlex
import time
import uuid
from pathlib import Path

import paramiko

from edgebuild.build.errors import DeviceError
from edgebuild.targets.client import sha256_file
from edgebuild.targets.local import STDERR_LINES, drain_lines
from edgebuild.targets.transport import Transport

log = logging.getLogger(__name__)

_REMOTE_SHA256 = ("import hashlib, sys\nh = hashlib.sha256()\nwith open(sys.argv[1], 'rb') as f:\n"
                  "    for b in iter(lambda: f.read(1 << 20), b''):\n        h.update(b)\n"
                  "print(h.hexdigest())")


def _host_entry(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def _fingerprint(key) -> str:
    return f"{key.get_name()} {key.fingerprint}" if hasattr(key, "fingerprint") else key.get_name()


class _Reject(paramiko.RejectPolicy):
    """Refuse a host whose key is not in known_hosts, saying how to add it."""

    def __init__(self, known_hosts: Path, port: int):
        self.known_hosts, self.port = known_hosts, port

    def missing_host_key(self, client, hostname, key):
        raise DeviceError(
            f"host key of {hostname} ({_fingerprint(key)}) is not in {self.known_hosts}; check it "
            f"and add it (ssh-keyscan -p {self.port} HOST >> {self.known_hosts}) or set "
            f"connection.trust_on_first_use = true")


class _TrustOnFirstUse(paramiko.MissingHostKeyPolicy):
    """Accept an unknown host key and append it to known_hosts (only when the spec asks for it)."""

    def __init__(self, known_hosts: Path):
        self.known_hosts = known_hosts

    def missing_host_key(self, client, hostname, key):
        log.warning("trusting the new host key of %s (%s) on first use; recorded in %s",
                    hostname, _fingerprint(key), self.known_hosts)
        self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.known_hosts, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        client.get_host_keys().add(hostname, key.get_name(), key)


class SSHTransport(Transport):
    """Starts ``<agent_python> -m edgebuild.device_agent serve --stdio --root ROOT`` over SSH."""

    def __init__(self, host: str, user: str | None = None, port: int = 22, key=None,
                 known_hosts="~/.ssh/known_hosts", trust_on_first_use: bool = False,
                 agent_python: str | None = None, root: str = "~/.cache/edgebuild/agent",
                 connect_timeout_s: float = 10.0, retries: int = 3, backoff_s: float = 1.0,
                 stop_timeout_s: float = 5.0):
        self.host, self.port, self.user = host, port, user or getpass.getuser()
        self.key = str(Path(key).expanduser()) if key else None
        self.known_hosts = Path(known_hosts).expanduser()
        self.trust_on_first_use = trust_on_first_use
        self.agent_python = agent_python or "python3"
        self.root = root
        self.connect_timeout_s, self.retries, self.backoff_s = connect_timeout_s, retries, backoff_s
        self.stop_timeout_s = stop_timeout_s
        self._client = self._channel = self._sftp = self._drain = None
        self._stderr: collections.deque = collections.deque(maxlen=STDERR_LINES)

    @property
    def where(self) -> str:
        return f"{self.user}@{_host_entry(self.host, self.port)}"

    # --- connection ---------------------------------------------------------------------

    def _new_client(self) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        if self.known_hosts.is_file():
            client.load_host_keys(str(self.known_hosts))
        elif not self.trust_on_first_use:
            raise DeviceError(f"known_hosts file {self.known_hosts} not found; add the host key of "
                              f"{self.host} to it or set connection.trust_on_first_use = true")
        policy = (_TrustOnFirstUse(self.known_hosts) if self.trust_on_first_use
                  else _Reject(self.known_hosts, self.port))
        client.set_missing_host_key_policy(policy)
        return client

    def _connect_once(self) -> paramiko.SSHClient:
        client = self._new_client()
        try:
            client.connect(self.host, port=self.port, username=self.user, key_filename=self.key,
                           allow_agent=True, look_for_keys=self.key is None,
                           timeout=self.connect_timeout_s, banner_timeout=self.connect_timeout_s,
                           auth_timeout=self.connect_timeout_s)
        except BaseException:
            client.close()
            raise
        return client

    def connect(self) -> paramiko.SSHClient:
        """Log in, retrying network failures with exponential backoff; return the client."""
        if self.key and not Path(self.key).is_file():
            raise DeviceError(f"SSH key file {self.key} not found; fix connection.key in the target spec")
        delay, last = self.backoff_s, None
        for attempt in range(1, self.retries + 2):
            try:
                return self._connect_once()
            except paramiko.BadHostKeyException as err:
                raise DeviceError(
                    f"host key of {_host_entry(self.host, self.port)} changed (now "
                    f"{_fingerprint(err.key)}); refusing to connect. If the device was reinstalled, "
                    f"remove the old key from {self.known_hosts} and add the new one") from None
            except paramiko.AuthenticationException as err:
                raise DeviceError(f"SSH login as {self.where} failed ({err}); check connection.user "
                                  f"and connection.key, or load the key into ssh-agent") from None
            except (OSError, EOFError, paramiko.SSHException) as err:
                last = err
            if attempt <= self.retries:
                log.warning("cannot reach %s (%s); retrying in %.1f s", self.where, last, delay)
                time.sleep(delay)
                delay *= 2
        raise DeviceError(f"cannot reach {self.where} after {self.retries + 1} attempt(s): "
                          f"{str(last) or type(last).__name__}")

    def _remote_root(self, sftp) -> str:
        """``root`` as an absolute path on the device: ``~`` and relative paths start at home."""
        root = self.root[2:] if self.root == "~" or self.root.startswith("~/") else self.root
        if not posixpath.isabs(root):
            root = posixpath.join(sftp.normalize("."), root)
        return posixpath.normpath(root)

    def _remote_command(self, *args: str) -> str:
        """``agent_python`` (split like a shell would) followed by ``args``, quoted for the shell."""
        return " ".join(shlex.quote(w) for w in shlex.split(self.agent_python) + list(args))

    # --- Transport ----------------------------------------------------------------------

    def open(self):
        """Connect, then start the agent as the session's remote command; return its stdin, stdout."""
        if self._client is not None:
            raise DeviceError(f"the SSH transport to {self.where} is already open")
        self._client = self.connect()
        try:
            self._sftp = self._client.open_sftp()
            self.root = self._remote_root(self._sftp)
            command = self._remote_command("-m", "edgebuild.device_agent", "serve", "--stdio",
                                           "--root", self.root)
            log.info("starting the agent on %s: %s", self.where, command)
            self._channel = self._client.get_transport().open_session()
            self._channel.exec_command(command)
        except (OSError, EOFError, paramiko.SSHException) as err:
            self.close()
            raise DeviceError(f"cannot start the agent on {self.where}: {err}") from None
        self._drain = drain_lines(self._channel.makefile_stderr("rb"), self._stderr)
        return self._channel.makefile_stdin("wb"), self._channel.makefile("rb")

    def upload(self, local_path, remote_name: str) -> str:
        """SFTP ``local_path`` to a temporary name, check its sha256 on the device, then rename it
        to ``<root>/incoming/<remote_name>``."""
        if self._sftp is None:
            raise DeviceError("open the SSH transport before uploading")
        if not remote_name or "/" in remote_name or remote_name.startswith("."):
            raise DeviceError(f"upload name {remote_name!r} must be a plain file name")
        incoming = posixpath.join(self.root, "incoming")
        final = posixpath.join(incoming, remote_name)
        tmp = posixpath.join(incoming, f".{remote_name}.part-{uuid.uuid4().hex[:12]}")
        try:
            self._makedirs(incoming)
            self._sftp.put(str(local_path), tmp, confirm=True)
            problem = self._verify(local_path, tmp)
            if problem is None:
                self._rename(tmp, final)
                return final
        except (OSError, EOFError, paramiko.SSHException) as err:
            problem = str(err) or type(err).__name__
        self._remove_quietly(tmp)
        raise DeviceError(f"upload of {local_path} to {self.where}:{final} failed: {problem}")

    def close(self) -> None:
        """End the agent's input, wait briefly for it to exit, and close the connection."""
        if self._client is None:
            return
        if self._channel is not None:
            try:
                self._channel.shutdown_write()
            except (OSError, EOFError, paramiko.SSHException):
                pass
            deadline = time.monotonic() + self.stop_timeout_s
            while not self._channel.exit_status_ready() and time.monotonic() < deadline:
                time.sleep(0.05)
            if self._drain is not None:
                self._drain.join(timeout=2.0)
            self._channel.close()
        if self._sftp is not None:
            self._sftp.close()
        self._client.close()
        self._client = self._sftp = None

    def stderr_tail(self, lines: int = 20) -> list[str]:
        """The agent's last stderr lines, as relayed by SSH."""
        return list(self._stderr)[-lines:]

    def exit_status(self) -> int | None:
        """The remote agent's exit status once it has exited (-1 when killed by a signal)."""
        if self._channel is None or not self._channel.exit_status_ready():
            return None
        return self._channel.recv_exit_status()

    # --- helpers ------------------------------------------------------------------------

    def _makedirs(self, path: str) -> None:
        missing = []
        while path not in ("", "/"):
            try:
                self._sftp.stat(path)
                break
            except FileNotFoundError:
                missing.append(path)
                path = posixpath.dirname(path)
        for folder in reversed(missing):
            self._sftp.mkdir(folder)

    def _verify(self, local_path, remote_path: str) -> str | None:
        """None when the device's sha256 of ``remote_path`` equals the local file's, else why not."""
        expected = sha256_file(local_path)
        command = self._remote_command("-c", _REMOTE_SHA256, remote_path)
        _stdin, out, err = self._client.exec_command(command, timeout=600)
        actual = out.read().decode().strip()
        if out.channel.recv_exit_status() != 0:
            return f"cannot hash it on the device: {err.read().decode().strip()[-300:]}"
        return None if actual == expected else f"sha256 on the device is {actual}, expected {expected}"

    def _rename(self, tmp: str, final: str) -> None:
        try:
            self._sftp.posix_rename(tmp, final)
        except (OSError, paramiko.SSHException):    # a server without the posix-rename extension
            self._remove_quietly(final)
            self._sftp.rename(tmp, final)

    def _remove_quietly(self, path: str) -> None:
        try:
            self._sftp.remove(path)
        except (OSError, paramiko.SSHException):
            pass


def from_target(target) -> SSHTransport:
    """The SSH transport of a target spec: host, login, host keys and agent from ``[connection]``."""
    c = target.connection
    return SSHTransport(c.host, c.user, c.port, key=target.path_of(c.key) if c.key else None,
                        known_hosts=target.path_of(c.known_hosts),
                        trust_on_first_use=c.trust_on_first_use, agent_python=c.agent_python,
                        root=c.root, connect_timeout_s=c.connect_timeout_s, retries=c.retries)
