"""Target specs and the transport registry."""
from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgebuild.core.errors import ConfigError, DeviceError, ExitCode, TargetError
from edgebuild.targets.local import LocalTransport
from edgebuild.targets.spec import BUILTIN, SPECS_DIR, Target, load_target, parse_target, targets
from edgebuild.targets.transport import transport_for, transports

FP32_135M_MB = 134.5e6 * 4 / 2**20      # the default model's float32 weights


def _write_variant(tmp_path, *edits) -> Path:
    """rpi5.toml with textual edits ``(regex, replacement)`` applied, written to a temporary file."""
    text = (SPECS_DIR / "rpi5.toml").read_text()
    for old, new in edits:
        assert re.search(old, text, re.MULTILINE), old
        text = re.sub(old, new, text, count=1, flags=re.MULTILINE)
    path = tmp_path / "board.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_specs_load_and_validate(name):
    target = load_target(name)
    assert isinstance(target, Target) and target.name == name
    assert target.source == SPECS_DIR / f"{name}.toml"
    assert target.timing.prompt_len > 0 and target.budgets.decode_ms_per_token_p95 > 0
    assert target.connection.transport in transports


def test_every_spec_file_is_registered():
    assert sorted(p.stem for p in SPECS_DIR.glob("*.toml")) == targets.names()


def test_hardware_of_the_named_boards():
    rpi4, rpi5, jetson = load_target("rpi4"), load_target("rpi5"), load_target("jetson-orin-nano")
    assert (rpi4.arch, rpi4.cores, rpi4.ram_mb) == ("aarch64", 4, 4096)
    assert (rpi5.cores, rpi5.ram_mb) == (4, 8192)
    assert (jetson.cores, jetson.runtime.providers) == (6, ["CPUExecutionProvider"])
    # faster hardware gets tighter latency budgets
    assert rpi4.budgets.decode_ms_per_token_p95 > rpi5.budgets.decode_ms_per_token_p95 \
        > jetson.budgets.decode_ms_per_token_p95


def test_local_budgets_let_an_fp32_135m_model_pass():
    local = load_target("local")
    assert local.connection.transport == "local" and local.runtime.threads is None
    assert local.budgets.artifact_mb > FP32_135M_MB and local.budgets.peak_rss_mb > 2 * FP32_135M_MB


def test_load_by_path_resolves_key_paths_next_to_the_file(tmp_path):
    path = _write_variant(tmp_path, (r'^name = "rpi5"', 'name = "my-board"'))
    target = load_target(str(path))
    assert target.name == "my-board" and target.source == path
    assert target.path_of("keys/id_ed25519") == tmp_path / "keys" / "id_ed25519"
    assert target.path_of("~/x") == Path.home() / "x"


def test_unknown_key_names_the_file_the_key_and_a_suggestion(tmp_path):
    path = _write_variant(tmp_path, (r"^prefill_ms", "prefil_ms"))
    with pytest.raises(TargetError) as err:
        load_target(path)
    message = str(err.value)
    assert str(path) in message and "unknown key 'budgets.prefil_ms'" in message
    assert "did you mean 'budgets.prefill_ms'?" in message and "allowed in [budgets]" in message
    assert err.value.exit_code == ExitCode.TARGET


@pytest.mark.parametrize("edit, expected", [
    ((r"^cores = 4", 'cores = "four"'), "key 'cores' must be an integer > 0, got 'four'"),
    ((r"^cores = 4", "cores = 4.5"), "key 'cores' must be an integer > 0, got 4.5"),
    ((r"^cores = 4", "cores = true"), "key 'cores' must be an integer > 0, got True"),
    ((r"^cores = 4", "cores = 0"), "key 'cores' must be an integer > 0, got 0"),
    ((r"^threads = 4", 'threads = "auto"'), "key 'runtime.threads' must be an integer > 0, got 'auto'"),
    ((r"^providers = .*", 'providers = "CPU"'),
     "key 'runtime.providers' must be a list of onnxruntime execution providers such as "
     "'CPUExecutionProvider', got 'CPU'"),
    ((r"^providers = .*", 'providers = ["CUDA"]'),
     "key 'runtime.providers' must list onnxruntime execution providers such as "
     "'CPUExecutionProvider', got ['CUDA']"),
    ((r"^providers = .*", 'providers = []'), "key 'runtime.providers' must list onnxruntime"),
    ((r"^python_version = .*", 'python_version = "3"'),
     "key 'runtime.python_version' must be MAJOR.MINOR such as '3.11', got '3'"),
    ((r"^peak_rss_mb = .*", "peak_rss_mb = -1"), "key 'budgets.peak_rss_mb' must be a number > 0, got -1"),
    ((r"^port = 22", "port = 70000"), "key 'connection.port' must be an integer in [1, 65535], got 70000"),
    ((r"^port = 22", "port = '22'"), "key 'connection.port' must be an integer in [1, 65535], got '22'"),
    ((r"^memory_bandwidth_gbps = .*", "memory_bandwidth_gbps = 0"),
     "key 'memory_bandwidth_gbps' must be a number > 0, got 0"),
    ((r'^name = "rpi5"', 'name = "My Board"'),
     "key 'name' must be lowercase letters, digits, '.', '_' or '-', got 'My Board'"),
    ((r"^warmup = 2", "warmup = -1"), "key 'timing.warmup' must be an integer >= 0, got -1"),
    ((r"^\[budgets\]", "[budgetz]"), "unknown key 'budgetz'; did you mean 'budgets'?"),
    ((r'^name = "rpi5"', 'name = "rpi5"\nsource = "x.toml"'), "unknown key 'source' (allowed in the top level:"),
])
def test_wrong_type_or_range_names_the_key(tmp_path, edit, expected):
    with pytest.raises(TargetError, match=re.escape(expected)):
        load_target(_write_variant(tmp_path, edit))


def test_a_table_given_as_a_value_is_refused(tmp_path):
    path = _write_variant(tmp_path, (r"^\[runtime\]\nthreads = 4\nproviders = .*\n(\w+ = .*\n)*", ""),
                          (r'^name = "rpi5"', 'name = "rpi5"\nruntime = 3'))
    with pytest.raises(TargetError, match=re.escape("key 'runtime' must be a table ([runtime]), got 3")):
        load_target(path)


@pytest.mark.parametrize("edit, expected", [
    ((r'^on_unreachable = "fail"', 'on_unreachable = "ignore"'),
     "key 'on_unreachable' must be one of 'fail', 'warn', got 'ignore'"),
    ((r'^arch = "aarch64"', 'arch = "arm64"'), "key 'arch' must be one of 'native', 'aarch64'"),
    ((r'^transport = "ssh"', 'transport = "telnet"'),
     "key 'connection.transport' must name a transport (labgrid, local, ssh), got 'telnet'"),
])
def test_bad_enum_lists_the_allowed_values(tmp_path, edit, expected):
    with pytest.raises(TargetError, match=re.escape(expected)):
        load_target(_write_variant(tmp_path, edit))


def test_missing_key_and_missing_host(tmp_path):
    with pytest.raises(TargetError, match=re.escape("missing key 'budgets.prefill_ms' in [budgets]")):
        load_target(_write_variant(tmp_path, (r"^prefill_ms = .*\n", "")))
    with pytest.raises(TargetError, match="key 'connection.host' must be set when connection.transport is 'ssh', got None"):
        load_target(_write_variant(tmp_path, (r'^host = "rpi5.local"\n', "")))


def test_invalid_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('name = "x"\ncores = [\n')
    with pytest.raises(TargetError, match=rf"{re.escape(str(path))}: not valid TOML"):
        load_target(path)


def test_unknown_target_name_suggests_the_closest():
    with pytest.raises(TargetError, match=r"unknown target 'rpi-4'; did you mean 'rpi4'\?"):
        load_target("rpi-4")
    with pytest.raises(TargetError, match=r"target spec file .*nope.toml not found"):
        load_target("nope.toml")


def test_optional_tables_take_their_defaults(tmp_path):
    path = _write_variant(tmp_path, (r"^\[timing\]\n(.+\n)+\n", ""), (r"^timeout_s = .*\n", ""))
    target = load_target(path)
    assert (target.timing.prompt_len, target.timing.warmup, target.timing.repeats) == (64, 2, 5)
    assert target.connection.timeout_s == 300.0
    with pytest.raises(TargetError, match="key 'timing.repeats' must be an integer > 0, got 0"):
        load_target(_write_variant(tmp_path, (r"^repeats = 5", "repeats = 0")))


def test_plain_data_budgets_and_digest():
    rpi5 = load_target("rpi5")
    data = rpi5.to_dict()
    assert data["budgets"] == rpi5.budgets_dict() and data["source"].endswith("rpi5.toml")
    assert set(rpi5.budgets_dict()) == {"decode_ms_per_token_p95", "prefill_ms", "peak_rss_mb",
                                        "artifact_mb"}
    changed = parse_target((SPECS_DIR / "rpi5.toml").read_text().replace("threads = 4", "threads = 2"))
    described = parse_target((SPECS_DIR / "rpi5.toml").read_text().replace("Raspberry Pi 5 (", "Pi5 ("))
    assert rpi5.digest() != changed.digest() and rpi5.digest() == described.digest()


def test_parse_target_from_text():
    text = (SPECS_DIR / "local.toml").read_text()
    assert parse_target(text) == load_target("local")


def test_transport_registry_builds_the_local_transport(tmp_path):
    target = parse_target((SPECS_DIR / "local.toml").read_text().replace(
        'root = "@home"', f'root = "{tmp_path}"'))
    transport = transport_for(target)
    assert isinstance(transport, LocalTransport) and transport.root == tmp_path.resolve()


def test_local_root_at_home_follows_edgebuild_home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEBUILD_HOME", str(tmp_path))
    transport = transport_for(load_target("local"))
    assert transport.root == (tmp_path / "agent-local").resolve()
    with pytest.raises(ConfigError, match="unknown transport 'sssh'; did you mean 'ssh'"):
        transports.get("sssh")


def test_ssh_transport_from_a_spec(tmp_path):
    from edgebuild.targets.ssh import SSHTransport

    path = _write_variant(tmp_path, (r"^known_hosts = .*", 'known_hosts = "hosts/known"'),
                          (r"^port = 22", 'port = 2222\nkey = "keys/id"\ntrust_on_first_use = true'))
    transport = transport_for(load_target(path))
    assert isinstance(transport, SSHTransport)
    assert (transport.host, transport.port, transport.user) == ("rpi5.local", 2222, "pi")
    assert transport.key == str(tmp_path / "keys" / "id")
    assert transport.known_hosts == tmp_path / "hosts" / "known" and transport.trust_on_first_use
    assert transport._remote_command("-m", "m", "--root", "/a b") == "python3 -m m --root '/a b'"
    home = SimpleNamespace(normalize=lambda path: "/home/pi")
    assert transport._remote_root(home) == "/home/pi/.cache/edgebuild/agent"
    transport.root = "agent"
    assert transport._remote_root(home) == "/home/pi/agent"


# --- device wheels -----------------------------------------------------------------------

def test_builtin_boards_name_their_python_and_glibc():
    for name, python, glibc in (("rpi4", "3.11", "2.36"), ("rpi5", "3.11", "2.36"),
                                ("jetson-orin-nano", "3.10", "2.35")):
        runtime = load_target(name).runtime
        assert (runtime.python_version, runtime.glibc) == (python, glibc)



def test_device_versions_are_checked(tmp_path):
    with pytest.raises(TargetError, match="key 'runtime.glibc' must be MAJOR.MINOR such as '3.11', got '2'"):
        load_target(_write_variant(tmp_path, (r'^glibc = .*', 'glibc = "2"')))


def test_pip_download_arguments_for_an_aarch64_board(tmp_path):
    from edgebuild.targets.provision import download_args, wheel_platforms

    rpi4 = load_target("rpi4")
    platforms = wheel_platforms(rpi4)
    assert platforms[0] == "manylinux_2_36_aarch64" and platforms[-2:] == [
        "manylinux_2_17_aarch64", "manylinux2014_aarch64"]
    args = download_args(rpi4, tmp_path)
    assert args[:4] == ["download", "--only-binary=:all:", "-d", str(tmp_path)]
    assert "--platform manylinux_2_28_aarch64" in " ".join(args)
    assert " --python-version 3.11 --implementation cp " in " ".join(args)
    assert [a.split(">=")[0] for a in args[-3:]] == ["numpy", "onnxruntime", "onnxruntime-genai"]
    local = download_args(load_target("local"), tmp_path)
    assert "--platform" not in local and "--python-version" not in local
    no_glibc = parse_target((SPECS_DIR / "rpi5.toml").read_text().replace('glibc = "2.36"\n', ""))
    with pytest.raises(TargetError, match=r"target rpi5: set runtime.glibc"):
        wheel_platforms(no_glibc)


# --- connection overrides ----------------------------------------------------------------

def test_setup_record_and_environment_override_the_connection(tmp_path, monkeypatch):
    from edgebuild.targets.spec import resolve_connection, setup_path, write_setup

    monkeypatch.setenv("EDGEBUILD_HOME", str(tmp_path))
    for var in ("PORT", "USER", "KEY", "KNOWN_HOSTS", "AGENT_PYTHON", "ROOT"):
        monkeypatch.delenv(f"EDGEBUILD_LOCAL_SSH_{var}", raising=False)
    target = load_target("local-ssh")
    assert resolve_connection(target) == target.connection
    write_setup("local-ssh", {"port": 2200, "key": str(tmp_path / "k"), "agent_python": "/v/python"})
    write_setup("local-ssh", {"user": "me"})                  # records merge
    resolved = resolve_connection(target)
    assert (resolved.port, resolved.user, resolved.agent_python) == (2200, "me", "/v/python")
    assert resolved.key == str(tmp_path / "k") and resolved.host == "127.0.0.1"
    monkeypatch.setenv("EDGEBUILD_LOCAL_SSH_PORT", "2201")
    assert resolve_connection(target).port == 2201
    assert load_target("local-ssh").connection.port == 22, "the spec itself is unchanged"
    monkeypatch.setenv("EDGEBUILD_LOCAL_SSH_PORT", "many")
    with pytest.raises(TargetError, match="environment variable EDGEBUILD_LOCAL_SSH_PORT must be an integer"):
        resolve_connection(target)
    monkeypatch.setenv("EDGEBUILD_RPI5_PORT", "1")           # rpi5 names no env_prefix
    assert resolve_connection(load_target("rpi5")).port == 22
    setup_path("local-ssh").write_text('{"prot": 1}')
    with pytest.raises(TargetError, match=r"local-ssh.json: unknown connection key 'prot'"):
        resolve_connection(target)
    with pytest.raises(TargetError, match="key 'port' must be an integer, got '22'"):
        write_setup("rpi5", {"port": "22"})


def test_ssh_transport_uses_the_setup_record(tmp_path, monkeypatch):
    from edgebuild.targets.spec import write_setup

    monkeypatch.setenv("EDGEBUILD_HOME", str(tmp_path))
    write_setup("rpi5", {"agent_python": "/home/pi/.cache/edgebuild/agent/venv/bin/python"})
    transport = transport_for(load_target("rpi5"))
    assert transport.agent_python == "/home/pi/.cache/edgebuild/agent/venv/bin/python"


# --- unreachable devices and predicted latency --------------------------------------------

def _unreachable(tmp_path, on_unreachable: str) -> Target:
    from edgebuild.targets.provision import free_port

    text = (SPECS_DIR / "rpi5.toml").read_text()
    text = re.sub(r'^on_unreachable = "fail".*$', f'on_unreachable = "{on_unreachable}"', text, flags=re.M)
    text = text.replace('host = "rpi5.local"', 'host = "127.0.0.1"').replace(
        "port = 22", f"port = {free_port()}\nretries = 0\nconnect_timeout_s = 2.0\n"
                     f"trust_on_first_use = true").replace(
        'known_hosts = "~/.ssh/known_hosts"', f'known_hosts = "{tmp_path / "known_hosts"}"')
    return parse_target(text)


def test_on_unreachable_warn_reports_not_run_and_never_numbers(tmp_path, monkeypatch, caplog):
    from edgebuild.build import gates
    from edgebuild.targets.client import connect, unreachable_result

    monkeypatch.setenv("EDGEBUILD_HOME", str(tmp_path))
    target = _unreachable(tmp_path, "warn")
    with pytest.raises(DeviceError) as err:
        connect(target)
    result = unreachable_result(target, err.value, predicted={"decode_ms_per_token": 60.0})
    assert result["status"] == "unreachable" and "cannot reach" in result["error"]
    assert result["predicted"]["label"] == "predicted"
    assert not {"prefill_ms", "decode_ms_per_token", "peak_rss_mb"} & set(result)
    assert "gates are not run" in caplog.text
    checks = gates.device_checks(result, 100e6, target.budgets_dict())
    timing = [c for c in checks if c.name != "device/artifact_mb"]
    assert len(timing) == 3 and {c.verdict for c in timing} == {gates.NOT_RUN}


def test_on_unreachable_fail_raises(tmp_path, monkeypatch):
    from edgebuild.targets.client import connect, unreachable_result

    monkeypatch.setenv("EDGEBUILD_HOME", str(tmp_path))
    target = _unreachable(tmp_path, "fail")
    with pytest.raises(DeviceError) as err:
        connect(target)
    with pytest.raises(DeviceError, match="cannot reach .* after 1 attempt") as raised:
        unreachable_result(target, err.value)
    assert raised.value.exit_code == ExitCode.DEVICE


def test_predicted_latency_is_bytes_per_token_over_bandwidth():
    from edgebuild.targets.spec import bytes_per_token, predicted_latency

    graph = {"vocab_size": 100, "num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "weights": {
        "embed": {"shape": [100, 16], "transpose": False},        # a lookup: one row per token
        "embed.T": {"shape": [16, 100], "transpose": True},       # the tied output layer
        "q.T": {"shape": [16, 16], "transpose": True}, "norm": {"shape": [16]}}}
    weights = 4 * (16 + 1600 + 256 + 16)
    assert bytes_per_token(graph, 0) == weights
    assert bytes_per_token(graph, 10) == weights + 2 * 2 * 2 * 8 * 4 * 10
    rpi4 = load_target("rpi4")
    predicted = predicted_latency(rpi4, graph, context_len=10)
    assert predicted["label"] == "predicted" and predicted["memory_bandwidth_gbps"] == 4.0
    assert predicted["decode_ms_per_token"] == pytest.approx(bytes_per_token(graph, 10) / 4e9 * 1e3, abs=1e-3)
    assert predicted_latency(rpi4, graph)["context_len"] == 64 + 32


# --- edgebuild device setup / check ------------------------------------------------------

def _cli(capsys, *args):
    from edgebuild.build.cli import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_device_setup_for_local_and_local_ssh(tmp_path, monkeypatch, capsys):
    import shutil

    from edgebuild.targets.provision import free_port
    from edgebuild.targets.spec import read_setup

    monkeypatch.setenv("EDGEBUILD_HOME", str(tmp_path))
    code, out, _ = _cli(capsys, "device", "setup", "--target", "local")
    assert code == 0 and "nothing to install" in json.loads(out)["note"]
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen not installed")
    port = free_port()
    code, out, _ = _cli(capsys, "device", "setup", "--target", "local-ssh", "--port", str(port))
    loopback = json.loads(out)["loopback"]
    assert code == 0 and loopback["connection"]["port"] == port and not loopback["listening"]
    assert loopback["next"].startswith("start the loopback sshd:") and "sshd_config" in loopback["next"]
    recorded = read_setup("local-ssh")
    assert recorded["key"] == str(tmp_path / "local-ssh" / "client_key")
    assert Path(recorded["known_hosts"]).read_text().startswith(f"[127.0.0.1]:{port} ssh-ed25519 ")
    code, _, err = _cli(capsys, "device", "check", "--target", "local-ssh")
    assert code == ExitCode.DEVICE and "cannot reach" in err


def test_device_check_through_the_local_agent(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGEBUILD_HOME", str(tmp_path))
    code, out, _ = _cli(capsys, "device", "check", "--target", "local")
    report = json.loads(out)
    assert code == 0 and report["hello"]["target"] == "local"
    assert report["info"]["root"] == str(tmp_path / "agent-local")
