"""Emulated boards, the fast parts: profiles, cpuinfo, link commands, the runner, the spec written
for a board, user specs, latency gates and the one-line errors. (Starting a board: test_emulate_board.py.)"""
from __future__ import annotations

import dataclasses
import os

import pytest

from edgebuild.build.cli import main
from edgebuild.core.errors import ExitCode, HostError, TargetError
from edgebuild.targets import emulate, emulate_net, emulate_rootfs, provision
from edgebuild.targets.emulate import BoardFiles, Running, boards
from edgebuild.targets.emulate_net import Link, LinkShape
from edgebuild.targets.spec import (
    gate_applies, latency_gate_applies, load_target, measurement_label, parse_target, target_names,
)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEBUILD_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_boards_are_registered_with_their_real_specs():
    assert boards.names() == ["rpi4", "rpi5"]
    for name in boards.names():
        board = boards.get(name)
        assert load_target(board.spec).arch == "aarch64"
    with pytest.raises(TargetError, match="unknown emulated board 'pi4'; did you mean 'rpi4'"):
        boards.get("pi4")


def test_rpi4_cpuinfo_looks_like_a_pi4_running_a_64_bit_kernel(monkeypatch):
    text = boards.get("rpi4").cpuinfo()
    assert text.count("processor\t: ") == 4
    assert "CPU part\t: 0xd08\n" in text and "CPU implementer\t: 0x41\n" in text
    assert "Features\t: fp asimd evtstrm crc32 cpuid\n" in text
    assert text.endswith("Model\t\t: Raspberry Pi 4 Model B Rev 1.4\n")
    assert "Hardware\t: BCM2835\n" in text
    from edgebuild.device_agent import sysinfo       # what the agent reports from it
    monkeypatch.setattr(sysinfo, "_read", lambda path: text if path == "/proc/cpuinfo" else None)
    assert sysinfo.cpu_model() == "BCM2835"


def test_rpi5_cpuinfo_names_a_cortex_a76():
    board = boards.get("rpi5")
    assert board.qemu_cpu == "cortex-a76"
    assert "CPU part\t: 0xd0b\n" in board.cpuinfo() and "Hardware" not in board.cpuinfo()


def test_link_names_and_addresses_follow_the_slot():
    link = Link(7)
    assert (link.netns, link.host_if, link.board_if) == ("edgebuild-7", "ebh7", "ebd7")
    assert (link.host_addr, link.board_addr) == ("10.213.7.1", "10.213.7.2")
    with pytest.raises(Exception, match="outside 1-250"):
        Link(0)


def test_tbf_shapes_each_end_of_the_veth_pair():
    down, up = LinkShape(40, 32, 50), LinkShape(10, 16, 80)
    commands = emulate_net.link_up_commands(Link(3), down, up)
    assert commands[0] == ["ip", "netns", "add", "edgebuild-3"]
    assert ["ip", "link", "add", "ebh3", "type", "veth", "peer", "name", "ebd3", "netns",
            "edgebuild-3"] in commands
    assert commands[-2] == ["tc", "qdisc", "replace", "dev", "ebh3", "root", "tbf", "rate", "40mbit",
                            "burst", "32kb", "latency", "50ms"]
    assert commands[-1] == ["tc", "-n", "edgebuild-3", "qdisc", "replace", "dev", "ebd3", "root",
                            "tbf", "rate", "10mbit", "burst", "16kb", "latency", "80ms"]
    assert not any("default" in c for c in commands), "the board must have no route out"
    assert emulate_net.link_down_commands(Link(3))[0] == ["ip", "netns", "delete", "edgebuild-3"]


def test_runner_binds_cpuinfo_and_runs_the_boards_sshd_as_pid_1(tmp_path):
    files = BoardFiles(tmp_path, "rpi4-emu")
    argv = emulate.runner_command(files, Link(2), tmp_path / "lower")
    assert argv[:4] == ["ip", "netns", "exec", "edgebuild-2"]
    assert {"--mount", "--pid", "--fork", "--kill-child"} <= set(argv)
    script = argv[-1].splitlines()
    assert script[0].startswith("mount -t overlay overlay -o lowerdir=")
    cpuinfo = next(i for i, line in enumerate(script) if line.endswith("/proc/cpuinfo"))
    proc = next(i for i, line in enumerate(script) if line.startswith("mount -t proc"))
    assert proc < cpuinfo, "cpuinfo is bound over the board's own proc"
    assert script[-1].startswith("exec env -i") and script[-1].endswith(
        "/usr/sbin/sshd -D -e -f /etc/edgebuild-board/sshd_config")
    config = emulate.sshd_config(boards.get("rpi4"), Link(2))
    assert "ListenAddress 10.213.2.2\n" in config and "SetEnv QEMU_CPU=cortex-a72\n" in config


def test_the_spec_of_a_running_board_is_its_real_boards_spec_emulated(home):
    files = BoardFiles(home, "rpi4-emu")
    run = Running(name="rpi4-emu", board="rpi4", slot=5, pid=1, started_at=0.0, rootfs={})
    path = emulate._write_spec(boards.get("rpi4"), files, run)
    assert path == home / "targets" / "rpi4-emu.toml"
    target = load_target("rpi4-emu")
    real = load_target("rpi4")
    assert target.emulated and not real.emulated
    assert target.budgets == real.budgets and target.arch == "aarch64"
    assert (target.timing.prompt_len, target.timing.warmup, target.timing.repeats) == (64, 0, 1)
    assert (target.runtime.python_version, target.runtime.glibc) == ("3.11", "2.36")
    c = target.connection
    assert (c.transport, c.host, c.user, c.port) == ("ssh", "10.213.5.2", "pi", 22)
    assert c.known_hosts == str(files.known_hosts) and c.key == str(files.client_key)
    assert target.digest() != real.digest()
    assert "rpi4-emu" in target_names()
    assert path.read_text().startswith("# Emulated Raspberry Pi 4 Model B")


def test_user_specs_are_found_by_name_and_unknown_names_suggest(home):
    (home / "targets").mkdir(parents=True)
    text = (load_target("rpi5").source.read_text().replace('name = "rpi5"', 'name = "bench-pi"'))
    (home / "targets" / "bench-pi.toml").write_text(text)
    assert load_target("bench-pi").name == "bench-pi"
    with pytest.raises(TargetError, match=r"unknown target 'bench-p'; did you mean 'bench-pi'\?"):
        load_target("bench-p")
    (home / "targets" / "other.toml").write_text(text)
    with pytest.raises(TargetError, match="key 'name' is 'bench-pi' but the spec is registered as 'other'"):
        load_target("other")


def test_latency_gates_do_not_apply_under_emulation():
    real = load_target("rpi4")
    emu = dataclasses.replace(real, emulated=True)
    assert latency_gate_applies(real) and not latency_gate_applies(emu)
    assert gate_applies(emu, "peak_rss_mb") and gate_applies(emu, "artifact_mb")
    assert not gate_applies(emu, "decode_ms_per_token_p95") and not gate_applies(emu, "prefill_ms")
    assert (measurement_label(real), measurement_label(emu)) == ("measured", "emulated")


def test_emulated_key_parses_and_is_checked():
    text = load_target("rpi4").source.read_text()
    assert parse_target(text.replace('arch = "aarch64"', 'arch = "aarch64"\nemulated = true')).emulated
    with pytest.raises(TargetError, match="key 'emulated' must be true or false"):
        parse_target(text.replace('arch = "aarch64"', 'arch = "aarch64"\nemulated = "yes"'))


def test_no_qemu_user_is_one_line_naming_the_packages(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(emulate_rootfs.shutil, "which", lambda name, **kw: None)
    with pytest.raises(HostError) as err:
        emulate_rootfs.check_host()
    assert str(err.value) == ("no qemu-user support on this host: qemu-aarch64-static not found; "
                              "install it (apt-get install qemu-user-static binfmt-support debootstrap)")
    assert err.value.exit_code == ExitCode.HOST == 15


def test_cli_start_without_qemu_exits_13(monkeypatch, home, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(emulate_rootfs.shutil, "which", lambda name, **kw: None)
    assert main(["device", "emulate", "start", "rpi4"]) == 15
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "qemu-aarch64-static not found" in err


def test_rootfs_versions_come_from_dpkg_status(tmp_path):
    status = tmp_path / "var" / "lib" / "dpkg" / "status"
    status.parent.mkdir(parents=True)
    status.write_text("Package: libc6\nStatus: install ok installed\nArchitecture: arm64\n"
                      "Version: 2.36-9+deb12u10\n\nPackage: python3\nStatus: install ok installed\n"
                      "Version: 3.11.2-1+b1\n\n")
    assert emulate_rootfs.versions(tmp_path) == {"glibc": "2.36", "python": "3.11"}


def test_a_tree_with_a_mount_inside_is_never_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(emulate_rootfs, "mounts_under", lambda folder: [f"{folder}/proc"])
    (tmp_path / "tree").mkdir()
    with pytest.raises(Exception, match=r"cannot remove .*tree: .*tree/proc is mounted inside it"):
        emulate_rootfs.remove_tree(tmp_path / "tree")
    assert (tmp_path / "tree").is_dir()


class _Board:
    """A transport whose board answers the platform probe with ``answer``."""

    def __init__(self, answer):
        self.answer, self.argv = answer, None

    def run(self, argv, timeout_s=600.0):
        self.argv = argv
        return 0, self.answer


def test_a_board_whose_python_differs_from_its_spec_is_one_line_exit_5():
    target = load_target("rpi4")
    assert provision.check_platform(target, _Board("3.11.2 glibc 2.36\n")) == {"python": "3.11",
                                                                                "glibc": "2.36"}
    with pytest.raises(TargetError) as err:
        provision.check_platform(target, _Board("3.12.1 glibc 2.39\n"), "python3")
    assert str(err.value) == (
        f"the board of target rpi4 runs Python 3.12 with glibc 2.39, but {target.source} says "
        f"Python 3.11 with glibc 2.36; set [runtime] python_version = \"3.12\" and glibc = \"2.39\" "
        f"in the spec, or run the OS it names")
    assert err.value.exit_code == 5


def test_device_setup_checks_the_platform_before_downloading(tmp_path, monkeypatch):
    board = _Board("3.13.0 glibc 2.41\n")
    monkeypatch.setattr(provision, "build_agent_wheel", lambda dest: pytest.fail("built a wheel"))
    with pytest.raises(TargetError, match="runs Python 3.13 with glibc 2.41"):
        provision.provision(load_target("rpi5"), board, tmp_path)


def test_an_emulated_board_is_not_gated_on_latency():
    real = load_target("rpi4")
    emu = dataclasses.replace(real, emulated=True)
    assert real.budgets_dict() == emu.budgets_dict()
    assert [k for k in emu.budgets_dict() if gate_applies(emu, k)] == ["peak_rss_mb", "artifact_mb"]
    assert all(gate_applies(real, k) for k in real.budgets_dict())
