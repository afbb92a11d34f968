"""An emulated Raspberry Pi 4, started for real: qemu-user, its own sshd in a network namespace,
provisioning as for a real board, a stage scored on the emulated ARM CPU, a clean stop.

Needs root, qemu-user-static, binfmt-support and debootstrap (``make test-emulated``). The root
filesystem is cached under $EDGEBUILD_HOME/emulate (built on first use: minutes).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess

import pytest

from edgebuild.build.cli import main
from edgebuild.core.errors import DeviceError, TargetError
from edgebuild.targets import emulate, emulate_net, provision
from edgebuild.targets.client import connect, deploy_stage
from edgebuild.targets.spec import dump_target, load_target
from edgebuild.targets.ssh import SSHTransport
from edgebuild.targets.transport import transport_for

pytestmark = [
    pytest.mark.emulated,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("qemu-aarch64-static") is None
                       or shutil.which("debootstrap") is None,
                       reason="emulated boards need root, qemu-user-static and debootstrap "
                              "(make emulator)"),
]

NAME = "rpi4-emu-test"


@pytest.fixture(scope="module")
def board():
    with emulate.running("rpi4", NAME, fresh=True) as run:
        yield run
    assert not emulate_net.exists(run.link)


def _shell(target, command: str) -> str:
    transport = transport_for(target)
    try:
        status, output = transport.run(["sh", "-c", command], timeout_s=120)
    finally:
        transport.close()
    assert status == 0, output
    return output


def test_the_board_is_an_arm_pi_without_a_route_out(board):
    target = load_target(NAME)
    assert target.emulated and target.connection.host == board.address
    out = _shell(target, "uname -m; grep -m1 'CPU part' /proc/cpuinfo; tail -1 /proc/cpuinfo; "
                         "echo $QEMU_CPU; python3 -c 'import socket; socket.create_connection("
                         "(\"151.101.0.223\", 80), timeout=3)' 2>&1 | tail -1")
    lines = out.splitlines()
    assert lines[0] == "aarch64" and lines[1].endswith("0xd08")
    assert lines[2].endswith("Raspberry Pi 4 Model B Rev 1.4") and lines[3] == "cortex-a72"
    assert "Network is unreachable" in lines[4]


def test_the_host_key_is_pinned(board, tmp_path):
    target = load_target(NAME)
    other = tmp_path / "known_hosts"
    other.write_text(f"{board.address} {provision.keygen(tmp_path / 'k')}\n")
    transport = SSHTransport(board.address, "pi", key=target.connection.key, known_hosts=other,
                             retries=0, connect_timeout_s=30)
    with pytest.raises(DeviceError, match="host key of 10.213.\\d+.2 changed"):
        transport.run(["true"])


def test_setup_installs_the_agent_offline_and_a_stage_scores_like_the_host(board, tmp_path_factory):
    pytest.importorskip("torch")
    import numpy as np

    from edgebuild.device_agent.runtime import Runtime
    from test_agent import export_tiny_stage

    assert main(["device", "setup", "--target", NAME]) == 0
    target = load_target(NAME)
    _model, files = export_tiny_stage(tmp_path_factory.getbasetemp())
    rng = np.random.default_rng(5)
    requests = [(rng.integers(0, 256, 6).tolist(), rng.integers(0, 256, 2).tolist()) for _ in range(6)]
    transport = transport_for(target)
    with connect(target, transport) as client:
        info = client.info()
        deploy_stage(client, transport, "raw", "v1", files)
        client.load("raw", "v1", threads=1)
        scores = client.score(requests)
        timing = client.time(prompt_len=4, decode_tokens=2, warmup=0, repeats=1)
    assert info["arch"] == "aarch64" and info["python"].startswith("3.11.")
    assert info["onnxruntime"] and info["cpu_model"] == "BCM2835"
    assert timing["prefill_ms"][0] > 0
    local = Runtime.load(files["graph.json"].parent, files["weights.ebpk"], threads=1)
    for (context, continuation), (logprob, _greedy) in zip(requests, scores):
        logits = local.logits(context + continuation)[len(context) - 1:-1].astype(np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        expected = (logits[np.arange(len(continuation)), continuation] - logz).sum()
        assert logprob == pytest.approx(expected, abs=1e-3)


def test_a_board_whose_python_differs_from_its_spec_is_refused(board, tmp_path, capsys):
    target = load_target(NAME)
    wrong = dataclasses.replace(target, runtime=dataclasses.replace(target.runtime, python_version="3.12"))
    spec = tmp_path / "wrong.toml"
    spec.write_text(dump_target(dataclasses.replace(wrong, name=NAME)))
    for command in (["device", "setup", "--target", str(spec)], ["device", "check", "--target", str(spec)]):
        assert main(command) == 5
        err = capsys.readouterr().err
        assert err == (f"error: the board of target {NAME} runs Python 3.11 with glibc 2.36, but "
                       f"{spec} says Python 3.12 with glibc 2.36; set [runtime] python_version = "
                       f"\"3.11\" and glibc = \"2.36\" in the spec, or run the OS it names\n")
    with pytest.raises(TargetError):
        provision.check_platform(wrong, transport_for(target))


def test_stop_removes_namespace_link_processes_and_spec():
    with emulate.running("rpi4", NAME + "-b") as run:
        pid = run.pid
        assert emulate.status(run.name)["ssh"] is True
    assert not emulate_net.exists(run.link)
    assert not os.path.exists(f"/proc/{pid}")
    assert run.link.host_if not in os.listdir("/sys/class/net")
    with pytest.raises(TargetError, match=f"unknown target '{NAME}-b'"):
        load_target(NAME + "-b")
    assert subprocess.run(["ip", "netns", "pids", run.link.netns], capture_output=True).returncode != 0
