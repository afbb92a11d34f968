"""Target specs and the transport registry."""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgebuild.build.errors import ConfigError, ExitCode, TargetError
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
    ((r"^cores = 4", 'cores = "four"'), "key 'cores' must be an integer, got 'four'"),
    ((r"^cores = 4", "cores = 4.5"), "key 'cores' must be an integer, got 4.5"),
    ((r"^cores = 4", "cores = true"), "key 'cores' must be an integer, got True"),
    ((r"^threads = 4", 'threads = "auto"'), "key 'runtime.threads' must be an integer"),
    ((r"^providers = .*", 'providers = "CPU"'), "key 'runtime.providers' must be a list of strings"),
    ((r"^peak_rss_mb = .*", "peak_rss_mb = -1"), "key 'budgets.peak_rss_mb' must be positive"),
    ((r"^port = 22", "port = 70000"), "key 'connection.port' must be 1-65535"),
])
def test_wrong_type_or_range_names_the_key(tmp_path, edit, expected):
    with pytest.raises(TargetError, match=re.escape(expected)):
        load_target(_write_variant(tmp_path, edit))


def test_a_table_given_as_a_value_is_refused(tmp_path):
    path = _write_variant(tmp_path, (r"^\[runtime\]\nthreads = 4\nproviders = .*\n", ""),
                          (r'^name = "rpi5"', 'name = "rpi5"\nruntime = 3'))
    with pytest.raises(TargetError, match=re.escape("key 'runtime' must be a table ([runtime]), got 3")):
        load_target(path)


@pytest.mark.parametrize("edit, expected", [
    ((r'^on_unreachable = "warn"', 'on_unreachable = "ignore"'),
     "key 'on_unreachable' must be one of 'fail', 'warn', got 'ignore'"),
    ((r'^arch = "aarch64"', 'arch = "arm64"'), "key 'arch' must be one of 'native', 'aarch64'"),
    ((r'^transport = "ssh"', 'transport = "telnet"'),
     "key 'connection.transport' must be one of 'local', 'ssh', got 'telnet'"),
])
def test_bad_enum_lists_the_allowed_values(tmp_path, edit, expected):
    with pytest.raises(TargetError, match=re.escape(expected)):
        load_target(_write_variant(tmp_path, edit))


def test_missing_key_and_missing_host(tmp_path):
    with pytest.raises(TargetError, match=re.escape("missing key 'budgets.prefill_ms' in [budgets]")):
        load_target(_write_variant(tmp_path, (r"^prefill_ms = .*\n", "")))
    with pytest.raises(TargetError, match="'connection.host' is required when connection.transport is 'ssh'"):
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
    with pytest.raises(TargetError, match="key 'timing.repeats' must be positive, got 0"):
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
