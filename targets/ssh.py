"""The SSH transport: the agent as the remote command of an SSH session (paramiko).

Host keys are checked strictly against the spec's ``known_hosts`` file: an unknown key is refused
unless ``trust_on_first_use`` is set (then it is recorded there), and a changed key is always
refused. Login uses the spec's key file or the ssh-agent. Connecting retries with exponential
backoff on network errors, never on host-key or authentication failures.

Uploads use their own SSH connection, so a dropped transfer can reconnect without touching the
agent's session. A file goes over SFTP to a temporary name derived from its sha256
(``.<name>.part-<sha256 prefix>``); when a transfer breaks, the next attempt (after a backoff, or
in a later run) finds that partial file, checks that its bytes hash like the start of the local
file, and appends the rest. The whole file's sha256 is then computed on the device, and only a
match is renamed to ``<root>/incoming/<name>``.
"""
from __future__ import annotations

import collections
import getpass
import logging
import os
import posixpath
import shlex
import time
from pathlib import Path

import paramiko

from edgebuild.core.errors import DeviceError
from edgebuild.targets.client import ConnectionLost
from edgebuild.targets.local import STDERR_LINES, drain_lines
from edgebuild.targets.session import RetryPolicy
from edgebuild.targets.transport import Transport

log = logging.getLogger(__name__)

NETWORK_ERRORS = (OSError, EOFError, paramiko.SSHException)


class _IntoOurLog(logging.Handler):
    """paramiko's own records (it logs a dropped link at ERROR, with a traceback) as one debug
    line each in this module's log: a dropped link is reported once, by us, in one line."""

    def emit(self, record: logging.LogRecord) -> None:
        log.debug("paramiko: %s", record.getMessage())


def quiet_paramiko() -> None:
    """Route paramiko's log into ours at debug level (idempotent; called when connecting)."""
    logger = logging.getLogger("paramiko")
    if not any(isinstance(h, _IntoOurLog) for h in logger.handlers):
        logger.addHandler(_IntoOurLog())
        logger.propagate = False


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
                 stop_timeout_s: float = 5.0, io_timeout_s: float = 60.0, backoff_max_s: float = 30.0):
        self.host, self.port, self.user = host, port, user or getpass.getuser()
        self.key = str(Path(key).expanduser()) if key else None
        self.known_hosts = Path(known_hosts).expanduser()
        self.trust_on_first_use = trust_on_first_use
        self.agent_python = agent_python or "python3"
        self.root = root
        self.connect_timeout_s, self.retries, self.backoff_s = connect_timeout_s, retries, backoff_s
        self.backoff_max_s = backoff_max_s
        self.stop_timeout_s = stop_timeout_s
        self.io_timeout_s = io_timeout_s
        self._client = self._channel = self._drain = None      # the agent's session
        self._files = self._sftp = None                        # uploads and commands
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

    @property
    def policy(self) -> RetryPolicy:
        """Retries and backoff of this transport's connections and transfers."""
        return RetryPolicy(self.retries, self.backoff_s, self.backoff_max_s)

    def _connect_once(self) -> paramiko.SSHClient:
        quiet_paramiko()
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
        last = None
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
            except NETWORK_ERRORS as err:
                last = err
            if attempt <= self.retries:
                delay = self.policy.delay(attempt - 1)
                log.warning("cannot reach %s (%s); retrying in %.1f s", self.where, last, delay)
                time.sleep(delay)
        raise ConnectionLost(f"cannot reach {self.where} after {self.retries + 1} attempt(s): "
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

    def _file_session(self):
        """The SFTP session of the transfer connection, (re)connected when needed."""
        if self._sftp is None:
            self._files = self.connect()
            try:
                self._sftp = self._files.open_sftp()
            except NETWORK_ERRORS as err:
                self._drop_files()
                raise DeviceError(f"cannot open SFTP on {self.where}: {err}; enable the sftp "
                                  f"subsystem of the device's sshd") from None
            self._sftp.get_channel().settimeout(self.io_timeout_s)
            self.root = self._remote_root(self._sftp)
        return self._sftp

    def _drop_files(self) -> None:
        for thing in (self._sftp, self._files):
            try:
                if thing is not None:
                    thing.close()
            except NETWORK_ERRORS:
                pass
        self._files = self._sftp = None

    # --- Transport ----------------------------------------------------------------------

    def open(self):
        """Connect, then start the agent as the session's remote command; return its stdin, stdout."""
        if self._client is not None:
            raise DeviceError(f"the SSH transport to {self.where} is already open")
        self._client = self.connect()
        try:
            sftp = self._client.open_sftp()
            self.root = self._remote_root(sftp)
            sftp.close()
            command = self._remote_command("-m", "edgebuild.device_agent", "serve", "--stdio",
                                           "--root", self.root)
            log.info("starting the agent on %s: %s", self.where, command)
            self._channel = self._client.get_transport().open_session()
            self._channel.exec_command(command)
        except NETWORK_ERRORS as err:
            self.close()
            raise ConnectionLost(f"cannot start the agent on {self.where}: {err}") from None
        self._drain = drain_lines(self._channel.makefile_stderr("rb"), self._stderr)
        return self._channel.makefile_stdin("wb"), self._channel.makefile("rb")

    def device_root(self) -> str:
        """The agent's root folder as an absolute path on the device."""
        self._file_session()
        return self.root

    def upload(self, local_path, remote_name: str) -> str:
        """SFTP ``local_path`` to ``<root>/incoming/<remote_name>``: resumable, then sha256-checked
        on the device, then renamed into place (``edgebuild.targets.sftp_upload``)."""
        from edgebuild.targets.sftp_upload import SftpUpload
        return SftpUpload(self, local_path, remote_name).run()

    def run(self, argv, timeout_s: float = 600.0) -> tuple[int, str]:
        """Run ``argv`` on the device (no shell: each word is quoted); ``(exit status, output)``
        with stdout and stderr together."""
        command = " ".join(shlex.quote(str(word)) for word in argv)
        self._file_session()
        try:
            channel = self._files.get_transport().open_session(timeout=self.connect_timeout_s)
            channel.set_combine_stderr(True)
            channel.settimeout(timeout_s)
            channel.exec_command(command)
            channel.shutdown_write()
            with channel.makefile("rb") as out:
                text = out.read().decode("utf-8", "replace")
            status = channel.recv_exit_status()
            channel.close()
            return status, text
        except NETWORK_ERRORS as err:
            self._drop_files()
            raise ConnectionLost(f"running {argv[0]} on {self.where} failed: "
                                 f"{str(err) or type(err).__name__}") from None

    def close(self) -> None:
        """End the agent's input, wait briefly for it to exit, and close the connections."""
        self._drop_files()
        if self._client is None:
            return
        if self._channel is not None:
            try:
                self._channel.shutdown_write()
            except NETWORK_ERRORS:
                pass
            deadline = time.monotonic() + self.stop_timeout_s
            while not self._channel.exit_status_ready() and time.monotonic() < deadline:
                time.sleep(0.05)
            if self._drain is not None:
                self._drain.join(timeout=2.0)
            self._channel.close()
        self._client.close()
        self._client = None

    def stderr_tail(self, lines: int = 20) -> list[str]:
        """The agent's last stderr lines, as relayed by SSH."""
        return list(self._stderr)[-lines:]

    def exit_status(self) -> int | None:
        """The remote agent's exit status once it has exited (-1 when killed by a signal)."""
        if self._channel is None or not self._channel.exit_status_ready():
            return None
        return self._channel.recv_exit_status()

    # --- transfer -----------------------------------------------------------------------

    def _open_remote(self, sftp, path: str, mode: str):
        """The remote file to write (a seam: tests wrap it to cut a transfer off)."""
        return sftp.open(path, mode)


def from_target(target) -> SSHTransport:
    """The SSH transport of a target: host, login, host keys and agent from its ``[connection]``,
    with the setup record and environment laid over it (``spec.resolve_connection``)."""
    from edgebuild.targets.spec import resolve_connection

    c = resolve_connection(target)
    return SSHTransport(c.host, c.user, c.port, key=target.path_of(c.key) if c.key else None,
                        known_hosts=target.path_of(c.known_hosts),
                        trust_on_first_use=c.trust_on_first_use, agent_python=c.agent_python,
                        root=c.root, connect_timeout_s=c.connect_timeout_s, retries=c.retries,
                        backoff_s=c.backoff_s, backoff_max_s=c.backoff_max_s, io_timeout_s=c.timeout_s)
