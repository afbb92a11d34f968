"""The SSH transport against a real OpenSSH server started on 127.0.0.1 for this module."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import pytest

from edgebuild.core.errors import DeviceError
from edgebuild.device_agent import protocol
from edgebuild.targets import provision
from edgebuild.targets.client import AgentClient, connect, deploy_stage
from edgebuild.targets.ssh import SSHTransport

pytestmark = pytest.mark.skipif(
    provision.find_sshd() is None or provision.shutil.which("ssh-keygen") is None,
    reason="OpenSSH server not installed (apt-get install -y openssh-server)")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """A private sshd (own config, host key, free port, authorized client key) on 127.0.0.1."""
    if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
        try:
            os.makedirs("/run/sshd", mode=0o755)      # sshd's privilege-separation directory
        except OSError as err:
            pytest.skip(f"sshd needs /run/sshd as root and it cannot be created: {err}")
    layout = provision.setup_loopback(tmp_path_factory.mktemp("sshd"))
    try:
        proc = provision.start_sshd(layout, foreground=True, log_file=layout.folder / "sshd.log")
    except DeviceError:
        pytest.skip(f"sshd did not start: {(layout.folder / 'sshd.log').read_text()[-500:]}")
    yield layout
    proc.terminate()
    proc.wait(timeout=10)


def _transport(sshd, tmp_path, cls=SSHTransport, **overrides):
    settings = dict(port=sshd.port, key=sshd.key, known_hosts=sshd.known_hosts,
                    agent_python=sys.executable, root=str(tmp_path / "root"), connect_timeout_s=5,
                    retries=0, stop_timeout_s=2)
    settings.update(overrides)
    return cls("127.0.0.1", **settings)


def test_hello_info_and_stage_over_ssh(sshd, tmp_path):
    transport = _transport(sshd, tmp_path)
    (tmp_path / "weights.ebpk").write_bytes(os.urandom(300_000))
    with AgentClient(transport, timeout_s=60) as client:
        hello = client.hello("local-ssh")
        assert hello["protocol"] == protocol.PROTOCOL_VERSION and hello["root"] == str(tmp_path / "root")
        info = client.info()
        assert info["cores"] >= 1 and info["python_executable"] == sys.executable
        result = deploy_stage(client, transport, "rtn", "v1", {"weights.ebpk": tmp_path / "weights.ebpk"})
        assert client.activate("rtn", "v1")["active"] == {"name": "rtn", "version": "v1"}
    staged = tmp_path / "root" / "stages" / "rtn" / "v1" / "weights.ebpk"
    assert staged.read_bytes() == (tmp_path / "weights.ebpk").read_bytes()
    assert result["files"]["weights.ebpk"]["sha256"] == hashlib.sha256(staged.read_bytes()).hexdigest()
    assert list((tmp_path / "root" / "incoming").iterdir()) == []


def test_stage_load_time_and_score_over_ssh_match_local_onnxruntime(sshd, tmp_path_factory, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import numpy as np

    from edgebuild.device_agent.runtime import Runtime
    from test_agent import export_tiny_stage

    _model, files = export_tiny_stage(tmp_path_factory.getbasetemp())
    transport = _transport(sshd, tmp_path)
    rng = np.random.default_rng(2)
    contexts = [rng.integers(0, 256, n).tolist() for n in (3, 17)]
    requests = [(contexts[i % 2], rng.integers(0, 256, 1 + i % 4).tolist()) for i in range(8)]
    with AgentClient(transport, timeout_s=120) as client:
        client.hello("local-ssh")
        deploy_stage(client, transport, "raw", "v1", files)
        assert client.load("raw", "v1", threads=1)["loaded"] == {"name": "raw", "version": "v1"}
        timing = client.time(prompt_len=8, decode_tokens=2, warmup=0, repeats=2)
        scores = client.score(requests)
    assert len(timing["prefill_ms"]) == 2 and all(ms > 0 for ms in timing["decode_ms_per_token"])
    local = Runtime.load(files["graph.json"].parent, files["weights.ebpk"], threads=1)
    for (context, continuation), (logprob, greedy) in zip(requests, scores):
        logits = local.logits(context + continuation)[len(context) - 1:-1].astype(np.float64)
        logprobs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                   keepdims=True)) - logits.max(-1, keepdims=True)
        assert logprob == pytest.approx(logprobs[np.arange(len(continuation)), continuation].sum(),
                                        abs=1e-4)
        assert greedy == bool((logits.argmax(-1) == continuation).all())


def test_unknown_host_key_is_refused(sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(DeviceError, match=r"host key of \[127.0.0.1\]:\d+ .* is not in .*known_hosts"):
        _transport(sshd, tmp_path, known_hosts=empty).open()
    with pytest.raises(DeviceError, match="known_hosts file .* not found"):
        _transport(sshd, tmp_path, known_hosts=tmp_path / "missing").open()
    with pytest.raises(DeviceError, match=r"is not in .*known_hosts"):
        _transport(sshd, tmp_path, known_hosts=empty).upload(__file__, "x")


def test_changed_host_key_is_refused(sshd, tmp_path):
    other = provision.keygen(tmp_path / "other_host_key")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {other}\n")
    with pytest.raises(DeviceError, match=r"host key of \[127.0.0.1\]:\d+ changed .*refusing to connect"):
        _transport(sshd, tmp_path, known_hosts=known_hosts, trust_on_first_use=True).open()


def test_trust_on_first_use_records_the_key_only_when_asked(sshd, tmp_path):
    known_hosts = tmp_path / "new" / "known_hosts"
    with pytest.raises(DeviceError, match="known_hosts file .* not found"):
        _transport(sshd, tmp_path, known_hosts=known_hosts).open()
    with AgentClient(_transport(sshd, tmp_path, known_hosts=known_hosts, trust_on_first_use=True)) as c:
        c.hello()
    assert known_hosts.read_text() == sshd.known_hosts.read_text()
    with AgentClient(_transport(sshd, tmp_path, known_hosts=known_hosts)) as c:
        assert c.hello()["protocol"] == protocol.PROTOCOL_VERSION


def test_unreachable_host_is_retried_with_backoff_then_reported(sshd, tmp_path):
    start = time.monotonic()
    with pytest.raises(DeviceError, match=r"cannot reach .*127.0.0.1\]:\d+ after 3 attempt\(s\)"):
        _transport(sshd, tmp_path, port=provision.free_port(), retries=2, backoff_s=0.05).open()
    assert time.monotonic() - start < 10


def test_wrong_login_key_is_not_retried(sshd, tmp_path):
    provision.keygen(tmp_path / "stranger")
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


# --- resumable uploads ------------------------------------------------------------------

class _Cut:
    """A remote file that drops the whole connection once ``budget`` bytes were written."""

    def __init__(self, inner, transport, budget: int):
        self.inner, self.transport, self.budget = inner, transport, budget

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self.inner.close()
        except (OSError, EOFError):
            pass

    def seek(self, offset):
        self.transport.offsets.append(offset)
        self.inner.seek(offset)

    def set_pipelined(self, on=True):
        self.inner.set_pipelined(on)

    def write(self, data):
        if self.transport.cuts_left and len(data) >= self.budget:
            self.inner.write(data[:self.budget])
            self.inner.close()                       # wait until the device has these bytes
            self.transport.cuts_left -= 1
            self.transport._files.close()            # the network goes away mid-transfer
            raise EOFError("connection dropped")
        self.budget -= len(data)
        self.inner.write(data)


class _CuttingTransport(SSHTransport):
    """Cuts the first ``cuts`` transfers after ``cut_at`` bytes; records where writes start."""

    cut_at, cuts_left = 0, 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.offsets = []

    def _open_remote(self, sftp, path, mode):
        return _Cut(super()._open_remote(sftp, path, mode), self, self.cut_at)


def _big_file(tmp_path, size=3_000_000) -> Path:
    path = tmp_path / "weights.ebpk"
    path.write_bytes(os.urandom(size))
    return path


def _cutting(sshd, tmp_path, cut_at, cuts, **overrides):
    transport = _transport(sshd, tmp_path, cls=_CuttingTransport, backoff_s=0.01, **overrides)
    transport.cut_at, transport.cuts_left = cut_at, cuts
    return transport


def test_an_upload_cut_mid_way_resumes_and_verifies(sshd, tmp_path):
    src = _big_file(tmp_path)
    transport = _cutting(sshd, tmp_path, 1_234_567, cuts=1, retries=2)
    try:
        final = transport.upload(src, "weights.ebpk")
    finally:
        transport.close()
    assert Path(final).read_bytes() == src.read_bytes()
    assert transport.offsets == [0, 1_234_567], "the second attempt appends after the partial file"
    assert [p.name for p in Path(final).parent.iterdir()] == ["weights.ebpk"]


def test_a_build_session_resumes_an_upload_cut_after_first_contact(sshd, tmp_path, monkeypatch):
    from edgebuild.targets import load_target, transports
    from edgebuild.targets.session import DeviceSession, RetryPolicy
    made = []

    def factory(target):       # the first connection's upload is cut once, later ones are not
        made.append(_cutting(sshd, tmp_path, 1_234_567, cuts=0 if made else 1, retries=3))
        return made[-1]
    monkeypatch.setitem(transports._entries, "ssh", factory)
    session = DeviceSession(load_target("local-ssh"), policy=RetryPolicy(retries=2, backoff_s=0.01))
    src = _big_file(tmp_path)
    try:
        assert session.connect() is not None
        final = session.attempt("upload", lambda c: session.transport.upload(src, "weights.ebpk"))
    finally:
        session.close()
    assert Path(final).read_bytes() == src.read_bytes()
    assert session.reconnects == 1 and len(made) == 2 and made[0].retries == 0, \
        "after first contact the session alone retries, through a new connection"
    assert made[0].offsets == [0] and made[1].offsets == [1_234_567], "the new connection resumes the partial file"


def test_a_partial_upload_is_kept_and_a_later_upload_resumes_it(sshd, tmp_path):
    src = _big_file(tmp_path)
    first = _cutting(sshd, tmp_path, 2_000_000, cuts=1, retries=0)
    with pytest.raises(DeviceError, match="failed after 1 attempt.*partial file .* is kept"):
        first.upload(src, "rtn.v1.weights.ebpk")          # the name deploy_stage gives it
    first.close()
    partial = [p for p in (tmp_path / "root" / "incoming").iterdir()]
    assert len(partial) == 1 and partial[0].stat().st_size == 2_000_000
    second = _cutting(sshd, tmp_path, 0, cuts=0)
    with AgentClient(second, timeout_s=60) as client:        # a later run: stage it for real
        result = deploy_stage(client, second, "rtn", "v1", {"weights.ebpk": src})
    assert second.offsets == [2_000_000]
    assert result["files"]["weights.ebpk"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()


def test_a_partial_upload_that_differs_is_sent_again(sshd, tmp_path):
    src = _big_file(tmp_path, 500_000)
    first = _cutting(sshd, tmp_path, 300_000, cuts=1, retries=0)
    with pytest.raises(DeviceError):
        first.upload(src, "weights.ebpk")
    first.close()
    (partial,) = (tmp_path / "root" / "incoming").iterdir()
    partial.write_bytes(b"x" * 300_000)                      # the device's copy got corrupted
    second = _cutting(sshd, tmp_path, 0, cuts=0)
    try:
        final = second.upload(src, "weights.ebpk")
    finally:
        second.close()
    assert second.offsets == [0] and Path(final).read_bytes() == src.read_bytes()


def test_partial_uploads_of_an_older_file_are_removed(sshd, tmp_path):
    old = _cutting(sshd, tmp_path, 100_000, cuts=1, retries=0)
    with pytest.raises(DeviceError):
        old.upload(_big_file(tmp_path, 200_000), "weights.ebpk")
    old.close()
    src = _big_file(tmp_path, 300_000)                        # the file changed meanwhile
    transport = _transport(sshd, tmp_path)
    try:
        transport.upload(src, "weights.ebpk")
    finally:
        transport.close()
    assert [p.name for p in (tmp_path / "root" / "incoming").iterdir()] == ["weights.ebpk"]


def test_run_reports_status_and_output(sshd, tmp_path):
    transport = _transport(sshd, tmp_path)
    try:
        assert transport.run([sys.executable, "-c", "print('out'); import sys; "
                              "sys.stderr.write('err'); sys.exit(3)"]) == (3, "out\nerr")
        assert transport.device_root() == str(tmp_path / "root")
    finally:
        transport.close()


# --- provisioning and the local-ssh target -----------------------------------------------

def test_provision_installs_the_agent_into_a_venv_over_ssh(sshd, tmp_path):
    transport = _transport(sshd, tmp_path)
    wheel = provision.build_agent_wheel(tmp_path / "wheels")
    try:
        result = provision.install_on_device(transport, [wheel], device_python=sys.executable,
                                             with_runtime=False)
    finally:
        transport.close()
    venv_python = tmp_path / "root" / "venv" / "bin" / "python"
    assert result["agent_python"] == str(venv_python)
    assert result["version"] == f"edgebuild-agent {protocol.AGENT_VERSION} (protocol {protocol.PROTOCOL_VERSION})"
    assert (tmp_path / "root" / "wheels" / wheel.name).is_file()
    with AgentClient(_transport(sshd, tmp_path, agent_python=str(venv_python))) as client:
        info = client.info()
    assert info["python_executable"] == str(venv_python) and info["onnxruntime"] is None


def test_local_ssh_target_after_device_setup(sshd, tmp_path, monkeypatch):
    import signal

    from edgebuild.targets import load_target
    from edgebuild.targets.spec import setup_path

    monkeypatch.setenv("EDGEBUILD_HOME", str(tmp_path / "home"))
    target = load_target("local-ssh")
    folder = tmp_path / "home" / "local-ssh"
    result = provision.setup_local_ssh(target, folder, port=provision.free_port(), start=True)
    pid = int((folder / "sshd.pid").read_text())
    try:
        assert result["listening"] and result["connection"]["agent_python"] == sys.executable
        assert json.loads(setup_path("local-ssh").read_text())["port"] == result["connection"]["port"]
        monkeypatch.setenv("EDGEBUILD_LOCAL_SSH_ROOT", str(tmp_path / "device"))
        with connect(target) as client:
            assert client.agent_hello["root"] == str(tmp_path / "device")
        again = provision.setup_local_ssh(target, folder)          # idempotent: same port and keys
        assert again["connection"] == result["connection"] and again["listening"]
        monkeypatch.setenv("EDGEBUILD_LOCAL_SSH_PORT", str(provision.free_port()))
        with pytest.raises(DeviceError, match=r"cannot reach .*after 2 attempt"):
            connect(target)
    finally:
        os.kill(pid, signal.SIGTERM)
