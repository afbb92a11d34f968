"""The SSH transport against a real OpenSSH server started on 127.0.0.1 for this module."""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgebuild.build.errors import DeviceError
from edgebuild.targets.client import AgentClient, deploy_stage

SSHD = shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd",) if os.path.exists(p)), None)
KEYGEN = shutil.which("ssh-keygen")

pytestmark = pytest.mark.skipif(
    SSHD is None or KEYGEN is None,
    reason="OpenSSH server not installed (apt-get install -y openssh-server)")


def _keygen(path: Path) -> str:
    subprocess.run([KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return " ".join(path.with_suffix(".pub").read_text().split()[:2])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def _sshd_config(folder: Path, port: int) -> Path:
    config = folder / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {folder / 'host_key'}",
        f"PidFile {folder / 'sshd.pid'}", f"AuthorizedKeysFile {folder / 'authorized_keys'}",
        "StrictModes no", "UsePAM no", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "Subsystem sftp internal-sftp", ""]))
    return config


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """A private sshd: own config, host key, free port and authorized client key."""
    if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
        try:
            os.makedirs("/run/sshd", mode=0o755)      # sshd's privilege-separation directory
        except OSError as err:
            pytest.skip(f"sshd needs /run/sshd as root and it cannot be created: {err}")
    folder = tmp_path_factory.mktemp("sshd")
    host_key = _keygen(folder / "host_key")
    (folder / "authorized_keys").write_text(_keygen(folder / "client_key") + "\n")
    port = _free_port()
    log = open(folder / "sshd.log", "wb")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(_sshd_config(folder, port))],
                            stdout=log, stderr=log)
    if not _wait_for_port(port, proc):
        proc.kill()
        pytest.skip(f"sshd did not start: {(folder / 'sshd.log').read_text()[-500:]}")
    known_hosts = folder / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_key}\n")
    yield SimpleNamespace(port=port, folder=folder, key=folder / "client_key", known_hosts=known_hosts)
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


def _transport(sshd, tmp_path, **overrides):
    from edgebuild.targets.ssh import SSHTransport

    settings = dict(port=sshd.port, key=sshd.key, known_hosts=sshd.known_hosts,
                    agent_python=sys.executable, root=str(tmp_path / "root"), connect_timeout_s=5,
                    retries=0, stop_timeout_s=2)
    settings.update(overrides)
    return SSHTransport("127.0.0.1", **settings)


def test_hello_info_and_stage_over_ssh(sshd, tmp_path):
    transport = _transport(sshd, tmp_path)
    (tmp_path / "weights.ebpk").write_bytes(os.urandom(300_000))
    with AgentClient(transport, timeout_s=60) as client:
        hello = client.hello("local-ssh")
        assert hello["protocol"] == 1 and hello["root"] == str(tmp_path / "root")
        info = client.info()
        assert info["cores"] >= 1 and info["python_executable"] == sys.executable
        result = deploy_stage(client, transport, "rtn", "v1", {"weights.ebpk": tmp_path / "weights.ebpk"})
        assert client.activate("rtn", "v1")["active"] == {"name": "rtn", "version": "v1"}
    staged = tmp_path / "root" / "stages" / "rtn" / "v1" / "weights.ebpk"
    assert staged.read_bytes() == (tmp_path / "weights.ebpk").read_bytes()
    assert result["files"]["weights.ebpk"]["sha256"] == hashlib.sha256(staged.read_bytes()).hexdigest()
    assert list((tmp_path / "root" / "incoming").iterdir()) == []


def test_unknown_host_key_is_refused(sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(DeviceError, match=r"host key of \[127.0.0.1\]:\d+ .* is not in .*known_hosts"):
        _transport(sshd, tmp_path, known_hosts=empty).open()
    with pytest.raises(DeviceError, match="known_hosts file .* not found"):
        _transport(sshd, tmp_path, known_hosts=tmp_path / "missing").open()


def test_changed_host_key_is_refused(sshd, tmp_path):
    other = _keygen(tmp_path / "other_host_key")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {other}\n")
    with pytest.raises(DeviceError, match=r"host key of \[127.0.0.1\]:\d+ changed .*refusing to connect"):
        _transport(sshd, tmp_path, known_hosts=known_hosts).open()


def test_trust_on_first_use_records_the_key_only_when_asked(sshd, tmp_path):
    known_hosts = tmp_path / "new" / "known_hosts"
    with AgentClient(_transport(sshd, tmp_path, known_hosts=known_hosts, trust_on_first_use=True)) as c:
        c.hello()
    assert known_hosts.read_text() == sshd.known_hosts.read_text()
    with AgentClient(_transport(sshd, tmp_path, known_hosts=known_hosts)) as c:
        assert c.hello()["protocol"] == 1


def test_unreachable_host_is_retried_with_backoff_then_reported(sshd, tmp_path):
    start = time.monotonic()
    with pytest.raises(DeviceError, match=r"cannot reach .*127.0.0.1\]:\d+ after 3 attempt\(s\)"):
        _transport(sshd, tmp_path, port=_free_port(), retries=2, backoff_s=0.05).open()
    assert time.monotonic() - start < 10


def test_wrong_login_key_is_not_retried(sshd, tmp_path):
    _keygen(tmp_path / "stranger")
    with pytest.raises(DeviceError, match="SSH login as .* failed"):
        _transport(sshd, tmp_path, key=tmp_path / "stranger", retries=3, backoff_s=5).open()


def test_missing_key_file_is_reported_without_retrying(sshd, tmp_path):
    with pytest.raises(DeviceError, match="SSH key file .*nope not found"):
        _transport(sshd, tmp_path, key=tmp_path / "nope", retries=3, backoff_s=5).open()


def test_agent_failure_is_reported_with_remote_stderr(sshd, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    transport = _transport(sshd, tmp_path, root=str(tmp_path / "file" / "root"))
    with pytest.raises(DeviceError, match="exit status 2\\); last stderr: edgebuild-agent: cannot use root"):
        AgentClient(transport, timeout_s=30).hello()
